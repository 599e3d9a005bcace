"""A study's outputs in ``results/studies/<name>/``: ``report.md`` and ``report.html`` (the verdict
first, then the protocol and per arm the selected hyper-parameters, tuning curves, seed statistics and
the comparison with the baseline), ``summary.csv`` (one row per arm), ``study.json`` (the expanded
protocol, every run key, the numbers and the verdict) and the plots (PNG)."""

from __future__ import annotations

import base64
import csv
import datetime as dt
import html
import io
import json
import math
import os
import platform
from pathlib import Path
from typing import Any

from harness.records import atomic_write_text, git_commit


def _pct(metric: str) -> bool:
    return metric.endswith(("_acc", "_top5"))


def fmt(metric: str, v: Any, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if _pct(metric):
        return f"{100 * v:+.2f}" if signed else f"{100 * v:.2f}"
    return f"{v:+.4g}" if signed else f"{v:.4g}"


def fmt_ci(metric: str, ci: list[float] | None, signed: bool = True) -> str:
    return "–" if not ci else f"[{fmt(metric, ci[0], signed)}, {fmt(metric, ci[1], signed)}]"


def fmt_p(p: float | None) -> str:
    return "–" if p is None else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


def fmt_params(params: dict[str, Any] | None) -> str:
    if params is None:
        return "(no successful trial)"
    if not params:
        return "published defaults"
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def unit(metric: str) -> str:
    return " (%)" if _pct(metric) else ""


def arm_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    m = result["metric"]
    headers = [
        "arm", "selected", f"{m}{unit(m)} mean ± std", "95% CI", "n", f"Δ vs baseline{unit(m)}", "Δ 95% CI (bootstrap)",
        "p (Welch)", "p (Holm)", "P(improve)", "time to target (s)", "samples/s", "peak MB", "tuning trials", "CPU/GPU h",
    ]  # fmt: skip
    rows = []
    for a in result["arms"]:
        c = a["comparison"] or {}
        rows.append(
            [
                a["name"] + (" (baseline)" if a["baseline"] else ""),
                fmt_params(a["selected"]) + (" ⚠ edge: " + ", ".join(a["on_edge"]) if a["on_edge"] else ""),
                f"{fmt(m, a['mean'])} ± {fmt(m, a['std'])}" if a["std"] is not None else fmt(m, a["mean"]),
                fmt_ci(m, a["ci"], signed=False),
                f"{a['n']}" + (f" ({a['failed_runs']} not ok)" if a["failed_runs"] else ""),
                fmt(m, c.get("delta"), True) if c else "–",
                fmt_ci(m, c.get("delta_ci")) if c else "–",
                fmt_p(c.get("p")) if c else "–",
                fmt_p(c.get("p_holm")) if c else "–",
                f"{c['prob_improvement']:.2f}" if c.get("prob_improvement") is not None else "–",
                f"{a['time_to_target_s']:.1f} ({a['reached_target']}/{a['n']})"
                if a["time_to_target_s"] is not None
                else f"– (0/{a['n']})",
                f"{a['samples_per_s']:.0f}" if a["samples_per_s"] else "–",
                f"{a['peak_bytes'] / 2**20:.0f}" if a["peak_bytes"] else "–",
                str(a["budget_trials"]),
                f"{a['cost_hours']:.3f}",
            ]
        )
    return headers, rows


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    return "\n".join(
        ["| " + " | ".join(map(esc, headers)) + " |", "|" + "---|" * len(headers)]
        + ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    )


def torch_version() -> str:
    import torch

    return torch.__version__


def provenance(result: dict[str, Any]) -> dict[str, str]:
    s = result["study"]
    cmd = f"harness study {s['name']}" + (f" study.scale={s['scale']}" if s.get("scale") else "")
    devices = sorted({a["device"] for a in result["arms"] if a.get("device")})
    return {
        "command": result.get("command") or cmd,
        "commit": git_commit() or "unknown",
        "machine": f"{platform.node() or 'unknown'} ({platform.machine()}, {os.cpu_count()} CPUs, {', '.join(devices) or 'unknown device'}, "
        f"torch {torch_version()})",
        "generated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def scan_markdown(result: dict[str, Any], plots: dict[str, str]) -> str:
    s, v = result["study"], result["verdict"]
    prov, claim, scan = provenance(result), s.get("claim") or {}, s.get("lr_scan") or {}
    out = [f"# Study `{s['name']}`", "", s.get("description") or "", "", "## Verdict", ""]
    if claim:
        out += [f"> {claim.get('text', '')}", "", f"Source: {claim.get('paper', '–')}", ""]
    out += [f"**{v['verdict']}**: {v['reason']}.", "", "## Protocol", ""]
    out += [
        f"- Task `{s['task']}`"
        + (f", scale `{s['scale']}`" if s.get("scale") else "")
        + f"; common overrides: `{' '.join(s['overrides']) or '–'}`.",
        f"- Learning-rate scan: for every arm and batch size {scan.get('batch_sizes')}, {scan.get('lr', {}).get('n')} log-spaced learning rates in "
        f"[{scan.get('lr', {}).get('low')}, {scan.get('lr', {}).get('high')}], {scan.get('steps')} steps each (seed {s['tune_seed']}). A run is stable when it ends ok with a final "
        f"training loss below {scan.get('loss_ratio', 1.0)} x ln(classes) (the uniform prediction's loss). The largest stable learning rate per batch size is fitted "
        "against the batch size on log-log axes (least squares; 95% t interval of the slope). A largest stable rate at the top of the grid is censored and left out of the fit.",
        f"- Command: `{prov['command']}`; harness commit `{prov['commit']}`; machine {prov['machine']}; generated {prov['generated']}.",
        "",
        "## Largest stable learning rate",
        "",
    ]
    batches = sorted({r["batch_size"] for a in result["arms"] for r in a["rows"]})
    rows = []
    for a in result["arms"]:
        by_b = {r["batch_size"]: r for r in a["rows"]}
        cells = [
            (
                "–"
                if by_b[b]["lr_max"] is None
                else f"{by_b[b]['lr_max']:.3g}" + (" (≥, censored)" if by_b[b]["censored"] else "")
            )
            for b in batches
        ]
        sl = a["slope"]
        rows.append(
            [
                a["name"],
                *cells,
                "–" if sl is None else f"{sl['slope']:.2f} [{sl['ci'][0]:.2f}, {sl['ci'][1]:.2f}]",
                f"{a['cost_hours']:.3f}",
            ]
        )
    out += [md_table(["arm", *[f"batch {b}" for b in batches], "slope [95% CI]", "CPU/GPU h"], rows), ""]
    for name, path in plots.items():
        out += [f"![{name}]({path})", ""]
    out += [
        "## Runs",
        "",
        md_table(
            ["run", "batch", "lr", "status", "run key"],
            [
                [
                    r["label"],
                    str(r["params"]["trainer.batch_size"]),
                    f"{r['params']['optimizer.lr']:.3g}",
                    r["status"],
                    r["run_key"] or "–",
                ]
                for r in result["runs"]
            ],
        ),
        "",
    ]
    return "\n".join(out)


def markdown(result: dict[str, Any], plots: dict[str, str]) -> str:
    if result.get("kind") == "lr_scan":
        return scan_markdown(result, plots)
    s, v, m = result["study"], result["verdict"], result["metric"]
    prov = provenance(result)
    claim = s.get("claim") or {}
    out = [f"# Study `{s['name']}`", ""]
    if s.get("description"):
        out += [s["description"], ""]
    out += ["## Verdict", ""]
    if claim:
        out += [f"> {claim.get('text', '')}", "", f"Source: {claim.get('paper', '–')}", ""]
    out += [f"**{v['verdict']}**: {v['reason']}."]
    if v.get("seeds_needed"):
        out += [
            "",
            f"About {v['seeds_needed']} seeds per arm would resolve it at the observed variance (two-sided, α = {s['alpha']}, 80% power).",
        ]
    if v.get("criterion"):
        out += ["", f"Criterion: `{json.dumps(v['criterion'])}` on `{v.get('metric', m)}`."]
    out += [
        "",
        "## Protocol",
        "",
        f"- Task `{s['task']}`"
        + (f", scale `{s['scale']}`" if s.get("scale") else "")
        + f"; common overrides: `{' '.join(s['overrides']) or '–'}`.",
        f"- Tuning: {s['budget']} trials per arm (every arm, the baseline too), sampler `{s['sampler']}` (scipy.stats.qmc, seed {s['sampler_seed']}), "
        f"tuning seed {s['tune_seed']}; each arm's configuration is selected on `{result['selection_metric']}` (validation; test is never read for a decision)."
        if s["budget"]
        else "- Tuning: none (budget 0): every arm runs its published defaults.",
        f"- Seeds: {len(s['seeds'])} fresh seeds per arm ({', '.join(map(str, s['seeds']))}); reported metric `{m}`, "
        f"{'higher' if result['direction'] == 'max' else 'lower'} is better.",
        f"- Statistics: mean ± sample std, 95% interval of the mean (BCa bootstrap for proportions, Student's t otherwise: the leaderboard's); Δ = arm − baseline with a percentile bootstrap 95% interval; Welch's t-test, "
        f"Holm–Bonferroni-corrected over {sum(1 for a in result['arms'] if not a['baseline'])} comparisons; P(improve) over all seed pairs.",
        f"- Command: `{prov['command']}`; harness commit `{prov['commit']}`; machine {prov['machine']}; generated {prov['generated']}.",
        "",
        "## Arms",
        "",
    ]
    headers, rows = arm_rows(result)
    out += [md_table(headers, rows), ""]
    edges = [a for a in result["arms"] if a["on_edge"]]
    if edges:
        out += [
            "Selected values on the edge of their search space (widen it): "
            + "; ".join(f"{a['name']}: {', '.join(a['on_edge'])}" for a in edges)
            + ".",
            "",
        ]
    calib = [a for a in result["arms"] if a.get("test_ece") is not None]
    if calib:

        def after(a: dict, key: str) -> str:
            return f" → {a[key]:.4f} after post-hoc calibration" if a.get(key) is not None else ""

        out += [
            "Calibration (test, mean over seeds): "
            + "; ".join(
                f"{a['name']} ECE {a['test_ece']:.4f}{after(a, 'test_ece_after')}, NLL {a['test_nll']:.4f}{after(a, 'test_nll_after')}"
                for a in calib
            )
            + ".",
            "",
        ]
    for name, path in plots.items():
        out += [f"![{name}]({path})", ""]
    out += ["## Runs", ""]
    run_rows = []
    for a in result["arms"]:
        for r in (*a["trials"], *a["runs"]):
            val = r["value"]
            metric = result["selection_metric"] if r["label"].startswith("tune") else m
            run_rows.append(
                [
                    r["label"],
                    fmt_params(r["params"]),
                    r["status"],
                    f"{metric} {fmt(metric, val)}",
                    r["run_key"] or "–",
                    r["run_dir"] or "–",
                ]
            )
    out += [md_table(["run", "hyper-parameters", "status", "value", "run key", "run dir"], run_rows), ""]
    return "\n".join(out)


def html_page(result: dict[str, Any], pngs: dict[str, bytes]) -> str:
    s, v = result["study"], result["verdict"]
    if result.get("kind") == "lr_scan":
        headers, rows = (
            ["arm", "batch size", "largest stable lr", "censored"],
            [
                [
                    a["name"],
                    str(r["batch_size"]),
                    "–" if r["lr_max"] is None else f"{r['lr_max']:.3g}",
                    str(r["censored"]),
                ]
                for a in result["arms"]
                for r in a["rows"]
            ],
        )
    else:
        headers, rows = arm_rows(result)
    colour = {"reproduced": "#1a7f37", "contradicted": "#cf222e"}.get(v["verdict"], "#9a6700")
    table = "<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + "</tr></thead><tbody>"
    table += (
        "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows) + "</tbody></table>"
    )
    imgs = "".join(
        f'<figure><img alt="{html.escape(k)}" src="data:image/png;base64,{base64.b64encode(b).decode()}"></figure>'
        for k, b in pngs.items()
    )
    claim = s.get("claim") or {}
    prov = provenance(result)
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>study "
        + html.escape(s["name"])
        + "</title><style>body{font-family:sans-serif;max-width:1300px;margin:2em auto;padding:0 1em}"
        ".scroll{overflow-x:auto}table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
        "td:first-child,th:first-child,td:nth-child(2){text-align:left}img{max-width:100%}.verdict{font-size:1.3em;font-weight:bold}</style></head><body>"
        f"<h1>Study {html.escape(s['name'])}</h1><p>{html.escape(s.get('description') or '')}</p>"
        + (
            f"<blockquote>{html.escape(claim.get('text', ''))}<br><small>{html.escape(claim.get('paper', ''))}</small></blockquote>"
            if claim
            else ""
        )
        + f"<p class='verdict' style='color:{colour}'>{html.escape(v['verdict'])}</p><p>{html.escape(v['reason'])}</p>"
        f"<p><small>{html.escape(prov['command'])} · commit {html.escape(prov['commit'])} · {html.escape(prov['machine'])}</small></p>"
        f"<div class='scroll'>{table}</div>{imgs}</body></html>"
    )


def plot(result: dict[str, Any]) -> dict[str, bytes]:
    """Tuning curves (validation metric against each tuned hyper-parameter) and the seeds per arm; for an
    lr scan, the grid of stable/unstable runs and the largest stable rate against the batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, bytes] = {}
    if result.get("kind") == "lr_scan":
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for k, a in enumerate(result["arms"]):
            colour = f"C{k}"
            for r in a["rows"]:
                for lr, ok, _ in r["cells"]:
                    ax.plot(r["batch_size"] * (1 + 0.04 * k), lr, "o" if ok else "x", color=colour, alpha=0.35, ms=4)
            pts = [(r["batch_size"], r["lr_max"]) for r in a["rows"] if r["lr_max"]]
            label = a["name"] + (f" (slope {a['slope']['slope']:.2f})" if a["slope"] else "")
            if pts:
                ax.plot(*zip(*pts), "-s", color=colour, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("learning rate (o stable, x unstable)")
        ax.set_title("largest stable learning rate")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
        fig.tight_layout()
        out["lr_scan"] = _png(fig)
        plt.close("all")
        return out
    sel, m = result["selection_metric"], result["metric"]
    keys = sorted({k for a in result["arms"] for t in a["trials"] for k in t["params"]})
    scale = 100 if _pct(sel) else 1
    if keys:
        fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
        for ax, key in zip(axes[0], keys):
            for a in result["arms"]:
                pts = sorted(
                    (t["params"][key], t["value"] * scale)
                    for t in a["trials"]
                    if key in t["params"] and isinstance(t["value"], (int, float))
                )
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=a["name"])
                bad = [t["params"][key] for t in a["trials"] if key in t["params"] and t["status"] != "ok"]
                if bad:
                    ax.plot(bad, [ax.get_ylim()[0]] * len(bad), "x", color="red")
            if all(
                isinstance(t["params"].get(key), float)
                for a in result["arms"]
                for t in a["trials"]
                if key in t["params"]
            ):
                ax.set_xscale("log")
            ax.set_xlabel(key)
            ax.set_ylabel(sel + unit(sel))
            ax.set_title("tuning trials (red x: not ok)")
        axes[0][0].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0) if len(keys) == 1 else (0, -0.2), fontsize=8)
        fig.tight_layout()
        out["tuning"] = _png(fig)
    arms = [a for a in result["arms"] if a["values"]]
    if arms:
        fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(arms) + 2), 3.6))
        scale = 100 if _pct(m) else 1
        for i, a in enumerate(arms):
            ys = [v * scale for v in a["values"]]
            ax.plot([i] * len(ys), ys, "o", alpha=0.7)
            if a["ci"]:
                ax.errorbar(
                    [i + 0.15],
                    [a["mean"] * scale],
                    yerr=[[(a["mean"] - a["ci"][0]) * scale], [(a["ci"][1] - a["mean"]) * scale]],
                    fmt="s",
                    color="black",
                    capsize=3,
                )
        ax.set_xticks(range(len(arms)), [a["name"] + ("\n(baseline)" if a["baseline"] else "") for a in arms])
        ax.set_ylabel(m + unit(m))
        ax.set_title("fresh seeds (square: mean and its 95% interval)")
        fig.tight_layout()
        out["seeds"] = _png(fig)
    plt.close("all")
    return out


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def summary_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for a in result["arms"]:
        c = a["comparison"] or {}
        rows.append(
            {
                "study": result["study"]["name"], "task": result["study"]["task"], "arm": a["name"], "baseline": a["baseline"],
                "selected": json.dumps(a["selected"]), "metric": result["metric"], "n": a["n"], "mean": a["mean"], "std": a["std"],
                "ci_low": (a["ci"] or [None])[0], "ci_high": (a["ci"] or [None, None])[1], "delta": c.get("delta"),
                "delta_ci_low": (c.get("delta_ci") or [None])[0], "delta_ci_high": (c.get("delta_ci") or [None, None])[1],
                "p_welch": c.get("p"), "p_holm": c.get("p_holm"), "prob_improvement": c.get("prob_improvement"),
                "time_to_target_s": a["time_to_target_s"], "samples_per_s": a["samples_per_s"], "peak_bytes": a["peak_bytes"],
                "test_ece": a.get("test_ece"), "test_nll": a.get("test_nll"), "tuning_trials": a["budget_trials"], "cost_hours": a["cost_hours"],
                "verdict": result["verdict"]["verdict"],
            }
        )  # fmt: skip
    return rows


def write(result: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    pngs = plot(result)
    written = []
    plots = {}
    for name, data in pngs.items():
        p = out / f"{name}.png"
        tmp = p.with_name(f".{p.name}.tmp")
        tmp.write_bytes(data)
        tmp.replace(p)
        plots[name] = p.name
        written.append(p)
    atomic_write_text(out / "report.md", markdown(result, plots) + "\n")
    atomic_write_text(out / "report.html", html_page(result, pngs))
    buf = io.StringIO()
    rows = summary_rows(result) if result.get("kind") != "lr_scan" else [
        {"study": result["study"]["name"], "arm": a["name"], "batch_size": r["batch_size"], "lr_max": r["lr_max"], "censored": r["censored"],
         "slope": (a["slope"] or {}).get("slope"), "slope_ci_low": ((a["slope"] or {}).get("ci") or [None])[0],
         "slope_ci_high": ((a["slope"] or {}).get("ci") or [None, None])[1], "verdict": result["verdict"]["verdict"]}
        for a in result["arms"] for r in a["rows"]
    ]  # fmt: skip
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "summary.csv", buf.getvalue())
    slim = json.loads(json.dumps(result, default=str))
    for a in slim["arms"]:
        for r in (*a.get("trials", []), *a.get("runs", [])):
            r.pop("curve", None)
    slim["provenance"] = provenance(result)
    atomic_write_text(out / "study.json", json.dumps(slim, indent=2) + "\n")
    written += [out / n for n in ("report.md", "report.html", "summary.csv", "study.json")]
    return written


def write_not_run(study, reason: str, out: Path) -> Path:
    """The report of a study this machine cannot run: its claim and protocol, ``not run: <reason>``, no verdict."""
    claim = study.claim or {}
    prov = provenance({"study": {"name": study.name, "scale": study.scale}, "arms": []})
    text = "\n".join(
        [
            f"# Study `{study.name}`",
            "",
            study.description,
            "",
            "## Verdict",
            "",
            *([f"> {claim.get('text', '')}", "", f"Source: {claim.get('paper', '–')}", ""] if claim else []),
            f"**not run**: {reason}. No verdict.",
            "",
            "## Protocol (as it would run)",
            "",
            f"- Task `{study.task}`"
            + (f", scale `{study.scale}`" if study.scale else "")
            + "; arms: "
            + "; ".join(
                f"`{a.name}` ({' '.join(a.overrides) or 'defaults'})" + (" baseline" if a.baseline else "")
                for a in study.arms
            ),
            f"- Budget {study.budget} tuning trials per arm, {study.seeds} fresh seeds; criterion `{json.dumps((claim or {}).get('criterion'))}`.",
            f"- Checked with `{prov['command']}` at harness commit `{prov['commit']}` on {prov['machine']} ({prov['generated']}).",
            "",
        ]
    )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.md", text)
    atomic_write_text(
        out / "study.json",
        json.dumps(
            {
                "study": study.name,
                "scale": study.scale,
                "verdict": {"verdict": "not run", "reason": reason},
                "provenance": prov,
            },
            indent=2,
        )
        + "\n",
    )
    return out / "report.md"
