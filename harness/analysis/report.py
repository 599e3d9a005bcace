"""Writers of the leaderboard: Markdown (index + one file per task), tidy CSV, one self-contained HTML page,
and the terminal tables. Every text that comes from a record is escaped (Markdown pipes, HTML entities)."""

from __future__ import annotations

import base64
import html
import math
import multiprocessing as mp
import os
import re
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from harness.analysis.leaderboard import ALPHA, Leaderboard, TaskBoard
from harness.records import atomic_write_text

PERCENT = ("acc", "top1", "top5", "ece", "mce")  # fractions shown in percent


# ----------------------------------------------------------------------------- formatting


def _ok(v: Any) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def is_percent(metric: str) -> bool:
    return any(p in metric for p in PERCENT)


def fmt_num(metric: str, v: Any, signed: bool = False) -> str:
    if not _ok(v):
        return "—"
    if is_percent(metric):
        return f"{100 * v:+.2f}" if signed else f"{100 * v:.2f}"
    a = abs(v)
    nd = 4 if a < 10 else 3 if a < 100 else 2 if a < 1000 else 1
    return f"{v:+.{nd}f}" if signed else f"{v:.{nd}f}"


def fmt_time(s: Any) -> str:
    if not _ok(s):
        return "—"
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.2f} h"


def fmt_bytes(b: Any) -> str:
    if not _ok(b):
        return "—"
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def fmt_rate(r: Any, unit: str) -> str:
    if not _ok(r):
        return "—"
    return f"{r / 1e6:.2f}M {unit}/s" if r >= 1e6 else f"{r / 1e3:.1f}k {unit}/s" if r >= 1e3 else f"{r:.0f} {unit}/s"


def metric_header(m: str) -> str:
    return f"{m} [%]" if is_percent(m) else m


def _num(v: Any) -> float | None:
    return float(v) if _ok(v) else None


def columns(board: TaskBoard) -> tuple[list[tuple[str, str]], list[list[tuple[str, float | str | None]]]]:
    """The displayed table: [(column id, header)] and rows of (text, sort value). Shared by every format."""
    m = board.metric
    t = board.table
    has = {c: c in t and t[c].notna().any() for c in ("time_to_target_s", "total_s", "peak_bytes")}
    rate = "tokens" if "tokens_per_s" in t and t["tokens_per_s"].notna().any() else "samples"
    cols = [("rank", "#"), ("label", "technique"), ("mean", f"{metric_header(m)} mean ± std"), ("n", "n")]
    cols += [("ci", "95% CI"), ("delta", "Δ vs baseline [95% CI]"), ("p", "p (Welch)")]
    cols += [(f"{s}_mean", metric_header(s)) for s in board.secondary]
    if has["time_to_target_s"]:
        cols.append(("time_to_target_s", "time to target (reached)"))
    if has["total_s"]:
        cols.append(("total_s", "wall time"))
    if t[f"{rate}_per_s"].notna().any():
        cols.append((f"{rate}_per_s", "throughput"))
    if has["peak_bytes"]:
        cols.append(("peak_bytes", "peak memory"))
    cols += [("status", "ok/diverged/failed"), ("joint_rank", "joint rank"), ("pareto", "Pareto")]
    rows = []
    for r in t.to_dict("records"):
        row = []
        for c, _ in cols:
            if c == "rank":
                row.append((str(r["rank"]), r["rank"]))
            elif c == "label":
                row.append((r["label"] + (" (baseline)" if r["is_baseline"] else ""), r["label"].lower()))
            elif c == "mean":
                txt = fmt_num(m, r["mean"]) + (f" ± {fmt_num(m, r['std'])}" if _ok(r["std"]) else "")
                row.append((txt, _num(r["mean"])))
            elif c == "n":
                row.append((f"{r['n']}" + (" ⚠ n<3" if r["warning"] else ""), r["n"]))
            elif c == "ci":
                txt = f"[{fmt_num(m, r['ci_lo'])}, {fmt_num(m, r['ci_hi'])}]" if _ok(r["ci_lo"]) else "—"
                row.append((txt, _num(r["ci_lo"])))
            elif c == "delta":
                if r["is_baseline"]:
                    txt = "baseline"
                elif _ok(r["delta"]):
                    txt = fmt_num(m, r["delta"], signed=True)
                    if _ok(r["delta_lo"]):
                        txt += f" [{fmt_num(m, r['delta_lo'], True)}, {fmt_num(m, r['delta_hi'], True)}]"
                    txt += f" {r['mark']}" if r["mark"] else ""
                else:
                    txt = "—"
                row.append((txt, _num(r["delta"])))
            elif c == "p":
                p = r["p_value"]
                row.append((("<0.001" if p < 1e-3 else f"{p:.3f}") if _ok(p) else "—", _num(p)))
            elif c.endswith("_mean"):
                s = c[:-5]
                txt = fmt_num(s, r[c]) + (f" ± {fmt_num(s, r[s + '_std'])}" if _ok(r.get(s + "_std")) else "")
                row.append((txt if _ok(r[c]) else "—", _num(r[c])))
            elif c == "time_to_target_s":
                txt = f"{fmt_time(r[c])} ({r['target_reached']}/{r['ok']})" if r["ok"] else "—"
                row.append((txt, _num(r[c])))
            elif c == "total_s":
                row.append((fmt_time(r[c]), _num(r[c])))
            elif c.endswith("_per_s"):
                row.append((fmt_rate(r[c], rate), _num(r[c])))
            elif c == "peak_bytes":
                row.append((fmt_bytes(r[c]), _num(r[c])))
            elif c == "status":
                row.append((f"{r['ok']}/{r['diverged']}/{r['failed']}", r["diverged"] + r["failed"]))
            elif c == "joint_rank":
                row.append((f"{r[c]:.1f}" if _ok(r[c]) else "—", _num(r[c])))
            elif c == "pareto":
                row.append(("★" if r["pareto"] else "", 1.0 if r["pareto"] else 0.0))
        rows.append(row)
    return cols, rows


def legend(board: TaskBoard) -> str:
    d = "higher" if board.higher else "lower"
    return (
        f"Primary metric **{board.metric}** ({d} is better); mean ± sample std over seeds, 95% t interval. "
        f"Δ = mean − baseline mean with its 95% Welch interval; ▲/▼ = significantly better/worse "
        f"(Welch's t-test, p < {ALPHA}); ⚠ = fewer than 3 seeds (no reliable interval). "
        f"Pareto ★ = not dominated on {', '.join(o.replace('_mean', '') for o in board.objectives)}; "
        f"joint rank = mean rank over those."
    )


def _status_line(board: TaskBoard) -> str:
    c = {s: sum(r.status == s for r in board.runs) for s in ("ok", "diverged", "failed")}
    return f"{len(board.runs)} runs: {c['ok']} ok, {c['diverged']} diverged, {c['failed']} failed"


def _oneline(s: Any, n: int = 200) -> str:
    s = " ".join(str(s or "").split())
    return s if len(s) <= n else s[: n - 1] + "…"


# ----------------------------------------------------------------------------- markdown


_TAG_START = re.compile(r"<(?=[A-Za-z/!?])")


def md_escape(s: Any, html: bool = True) -> str:
    s = str(s).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")
    # Markdown renderers pass raw HTML through: a run named <script> must stay text in README.md ("n<3" may stay)
    return _TAG_START.sub("&lt;", s) if html else s


def md_table(headers: list[str], rows: list[list[str]], html: bool = True) -> str:
    out = ["| " + " | ".join(md_escape(h, html) for h in headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(md_escape(c, html) for c in r) + " |" for r in rows]
    return "\n".join(out)


def task_markdown(board: TaskBoard, plots: dict[str, str]) -> str:
    cols, rows = columns(board)
    base = board.table.loc[board.table["is_baseline"], "label"]
    lines = [
        f"# {md_escape(board.title)}",
        "",
        f"Baseline: **{md_escape(base.iloc[0]) if len(base) else 'none'}** ({md_escape(board.baseline_note)}). "
        f"{_status_line(board)}.",
        "",
        legend(board),
        "",
        md_table([h for _, h in cols], [[txt for txt, _ in r] for r in rows]),
        "",
    ]
    front = board.table[board.table["pareto"]].sort_values("joint_rank")
    if len(front):
        lines += ["## Joint view (Pareto front)", ""]
        hdr = ["technique", "joint rank"] + [o.replace("_mean", "") for o in board.objectives]
        body = [
            [r["label"], f"{r['joint_rank']:.1f}"]
            + [
                fmt_num(o.replace("_mean", ""), r[o]) if "bytes" not in o and o != "total_s" else ""
                for o in board.objectives
            ]
            for r in front.to_dict("records")
        ]
        for row, r in zip(body, front.to_dict("records")):  # readable units for time and memory
            for i, o in enumerate(board.objectives):
                if o == "total_s":
                    row[2 + i] = fmt_time(r[o])
                elif o == "peak_bytes":
                    row[2 + i] = fmt_bytes(r[o])
        lines += [md_table(hdr, body), ""]
    if board.bad_runs:
        lines += ["## Failed and diverged runs", ""]
        body = [
            [b.status, board_label(board, b.key), str(b.seed), _oneline(b.error), b.run_dir] for b in board.bad_runs
        ]
        lines += [md_table(["status", "technique", "seed", "error", "run dir"], body), ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{name}]({path})" for name, path in plots.items()] + [""]
    return "\n".join(lines)


def board_label(board: TaskBoard, key: str) -> str:
    return board.labels[key]


def index_markdown(
    lb: Leaderboard, files: dict[str, str], command: str, generated: str, profile_png: str | None
) -> str:
    lines = [
        "# Leaderboards",
        "",
        f"Generated {generated} by `{md_escape(command)}` from {lb.n_records} records ({len(lb.problems)} skipped).",
        "",
    ]
    body = []
    for b in lb.boards:
        best = b.table.iloc[0]
        base = b.table.loc[b.table["is_baseline"], "label"]
        body.append(
            [
                f"[{b.title}]({files[b.task_id]})",
                b.metric,
                f"{best['label']} ({fmt_num(b.metric, best['mean'])})",
                base.iloc[0] if len(base) else "none",
                str(len(b.table)),
                _status_line(b),
            ]
        )
    # links are built here, so escape cell by cell without touching the link syntax
    hdr = ["task", "metric", "best", "baseline", "configurations", "runs"]
    lines += ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    lines += ["| " + " | ".join([r[0].replace("|", "\\|")] + [md_escape(c) for c in r[1:]]) + " |" for r in body]
    lines.append("")
    if lb.profile is not None:
        lines += [
            "## Performance profile (time to target)",
            "",
            "Fraction of tasks on which a technique reaches the target within τ× the fastest, τ ∈ [1, 4]; "
            "score = normalised area under that curve (AlgoPerf). Not run or not reached = infinitely slow.",
            "",
        ]
        pr = lb.profile
        lines += [
            md_table(
                ["technique", "score", "tasks reached"],
                [[r.label, f"{r.score:.3f}", f"{r.reached}/{r.tasks}"] for r in pr.itertuples()],
            ),
            "",
        ]
        if profile_png:
            lines += [f"![performance profile]({profile_png})", ""]
    if lb.problems:
        lines += ["## Skipped records", ""]
        lines += [md_table(["path", "reason"], [[p.path, p.reason] for p in lb.problems]), ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- csv


def tidy_frame(lb: Leaderboard) -> pd.DataFrame:
    """One row per (task, technique configuration), every aggregated column."""
    return pd.concat([b.table.assign(task_id=b.task_id) for b in lb.boards], ignore_index=True)


# ----------------------------------------------------------------------------- html

SORT_JS = """
function sortTable(t, col, desc) {
  const ths = [...t.tHead.rows[0].cells], i = ths.findIndex(th => th.dataset.col === col);
  if (i < 0) return false;
  const key = r => { const c = r.cells[i], v = c.dataset.v;
    return v === undefined ? c.textContent.trim().toLowerCase() : (v === '' ? null : parseFloat(v)); };
  const rows = [...t.tBodies[0].rows];
  rows.sort((a, b) => { const x = key(a), y = key(b);
    if (x === null || y === null) return (x === null) - (y === null);  // blanks always last
    const r = (typeof x === 'number' && typeof y === 'number') ? x - y : String(x).localeCompare(String(y));
    return desc ? -r : r; });
  rows.forEach(r => t.tBodies[0].appendChild(r));
  ths.forEach(th => th.removeAttribute('aria-sort'));
  ths[i].setAttribute('aria-sort', desc ? 'descending' : 'ascending');
  return true;
}
document.querySelectorAll('table.sortable th').forEach(th => th.addEventListener('click', () =>
  sortTable(th.closest('table'), th.dataset.col, th.getAttribute('aria-sort') === 'ascending')));
// #sort=<column>[:desc] in the URL sorts every table on load (shareable links, headless checks)
function sortFromHash() {
  const m = /sort=([\\w.-]+)(?::(asc|desc))?/.exec(decodeURIComponent(location.hash));
  if (m) document.querySelectorAll('table.sortable').forEach(t => sortTable(t, m[1], m[2] === 'desc'));
}
sortFromHash();
window.addEventListener('hashchange', sortFromHash);
"""

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:12.5px}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:right;white-space:nowrap}
td:nth-child(2),th:nth-child(2){text-align:left}
th{background:#f3f3f3;cursor:pointer;user-select:none}
th[aria-sort=ascending]::after{content:" ▲"} th[aria-sort=descending]::after{content:" ▼"}
tr.baseline{background:#fff8dc} .better{color:#137333} .worse{color:#b3261e} .warn{color:#b06000}
img{max-width:100%;margin:.3em} .meta{color:#555} code{background:#f3f3f3;padding:1px 3px}
"""


def _h(s: Any) -> str:
    return html.escape(str(s), quote=True)


def html_table(cols, rows, classes: list[str] | None = None, table_id: str = "") -> str:
    head = "".join(f'<th data-col="{_h(c)}">{_h(h)}</th>' for c, h in cols)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{_h(classes[i])}"' if classes and classes[i] else ""
        cells = []
        for (c, _), (txt, v) in zip(cols, row):
            dv = "" if v is None else (_h(v) if isinstance(v, str) else repr(float(v)))
            extra = ""
            if c == "delta" and ("▲" in txt or "▼" in txt):
                extra = ' class="better"' if "▲" in txt else ' class="worse"'
            elif c == "n" and "⚠" in txt:
                extra = ' class="warn"'
            cells.append(f'<td data-v="{dv}"{extra}>{_h(txt)}</td>')
        body.append(f"<tr{cls}>{''.join(cells)}</tr>")
    tid = f' id="{_h(table_id)}"' if table_id else ""
    return f'<table class="sortable"{tid}><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _img(png: bytes | None, alt: str) -> str:
    if not png:
        return ""
    return f'<img alt="{_h(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def render_html(lb: Leaderboard, command: str, generated: str, pngs: dict[str, dict[str, bytes]], profile_png) -> str:
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width,initial-scale=1'>",
        f"<title>harness leaderboard</title><style>{CSS}</style></head><body>",
        "<h1>Leaderboards</h1>",
        f"<p class='meta'>Generated <span id='generated'>{_h(generated)}</span> by <code id='command'>{_h(command)}"
        f"</code> from <span id='records'>{lb.n_records}</span> records ({len(lb.problems)} skipped). "
        "Click a column header to sort.</p>",
        "<ul>" + "".join(f"<li><a href='#{_h(b.slug)}'>{_h(b.title)}</a></li>" for b in lb.boards) + "</ul>",
    ]
    for b in lb.boards:
        cols, rows = columns(b)
        classes = ["baseline" if x else "" for x in b.table["is_baseline"]]
        base = b.table.loc[b.table["is_baseline"], "label"]
        parts += [
            f"<section id='{_h(b.slug)}'><h2>{_h(b.title)}</h2>",
            f"<p>Baseline: <b>{_h(base.iloc[0]) if len(base) else 'none'}</b> ({_h(b.baseline_note)}). "
            f"{_h(_status_line(b))}.</p>",
            f"<p class='meta'>{_h(legend(b).replace('**', ''))}</p>",
            html_table(cols, rows, classes, table_id=f"t-{b.slug}"),
        ]
        if b.bad_runs:
            bc = [
                ("status", "status"),
                ("label", "technique"),
                ("seed", "seed"),
                ("error", "error"),
                ("dir", "run dir"),
            ]
            br = [
                [(x.status, x.status), (board_label(b, x.key), None), (str(x.seed), None), (_oneline(x.error), None)]
                + [(x.run_dir, None)]
                for x in b.bad_runs
            ]
            br = [[(t, t if v is None else v) for t, v in r] for r in br]
            parts += ["<h3>Failed and diverged runs</h3>", html_table(bc, br)]
        parts += [_img(png, f"{b.title} {name}") for name, png in pngs.get(b.task_id, {}).items()]
        parts.append("</section>")
    if lb.profile is not None:
        pc = [("label", "technique"), ("score", "score"), ("reached", "tasks reached")]
        pr = [
            [(r.label, r.label.lower()), (f"{r.score:.3f}", r.score), (f"{r.reached}/{r.tasks}", r.reached)]
            for r in lb.profile.itertuples()
        ]
        parts += [
            "<section id='profile'><h2>Performance profile (time to target)</h2>",
            "<p class='meta'>Fraction of tasks on which a technique reaches the target within τ× the fastest, "
            "τ ∈ [1, 4]; score = normalised area under the curve (AlgoPerf).</p>",
            html_table(pc, pr),
            _img(profile_png, "performance profile"),
            "</section>",
        ]
    if lb.problems:
        pc = [("path", "path"), ("reason", "reason")]
        parts += [
            "<h2>Skipped records</h2>",
            html_table(pc, [[(p.path, p.path), (p.reason, p.reason)] for p in lb.problems]),
        ]
    parts.append(f"<script>{SORT_JS}</script></body></html>")
    return "\n".join(parts)


# ----------------------------------------------------------------------------- all outputs


def write_all(
    lb: Leaderboard, out: Path, formats: list[str], plots: bool = True, command: str = "", cache: bool = True
) -> list[Path]:
    """Write the requested formats (and plots) under ``out``; return the written paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    generated = datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")
    written: list[Path] = []
    pngs: dict[str, dict[str, bytes]] = {}
    rel: dict[str, dict[str, str]] = {}
    profile_png = None
    if plots:
        from harness.analysis import plots as P

        pdir = out / "plots"
        for b, done in zip(lb.boards, _task_plots_parallel(lb, pdir, cache)):
            pngs[b.task_id] = {name: png for name, (_, png) in done.items()}
            rel[b.task_id] = {name: f"plots/{stem.name}.png" for name, (stem, _) in done.items()}
            written += [s.with_suffix(x) for s, _ in done.values() for x in (".png", ".svg")]
        profile_png = P.plot_profile(lb, pdir / "performance_profile")
        if profile_png:
            written += [pdir / "performance_profile.png", pdir / "performance_profile.svg"]
    if "md" in formats:
        files = {}
        for b in lb.boards:
            p = out / f"{b.slug}.md"
            atomic_write_text(p, task_markdown(b, rel.get(b.task_id, {})))
            files[b.task_id] = p.name
            written.append(p)
        p = out / "README.md"
        atomic_write_text(
            p, index_markdown(lb, files, command, generated, "plots/performance_profile.png" if profile_png else None)
        )
        written.append(p)
    if "csv" in formats:
        p = out / "leaderboard.csv"
        atomic_write_text(p, tidy_frame(lb).to_csv(index=False))
        written.append(p)
        if lb.profile is not None:
            p = out / "performance_profile.csv"
            atomic_write_text(p, lb.profile.to_csv(index=False))
            written.append(p)
    if "html" in formats:
        p = out / "index.html"
        atomic_write_text(p, render_html(lb, command, generated, pngs, profile_png))
        written.append(p)
    return written


_JOB: tuple[Leaderboard, Path, bool] | None = None  # what forked plot workers inherit (no pickling of records)


def _plot_one(i: int):
    from harness.analysis import plots as P

    lb, pdir, cache = _JOB
    return P.task_plots(lb.boards[i], pdir, cache)


def _task_plots_parallel(lb: Leaderboard, pdir: Path, cache: bool) -> list[dict]:
    """Per-task plots, on all cores when there are several tasks: matplotlib is single-threaded and the
    plots are most of the leaderboard's time. Forked workers read the leaderboard from memory."""
    global _JOB
    n = len(lb.boards)
    workers = min(os.cpu_count() or 1, n, 8)
    if workers > 1 and "fork" in mp.get_all_start_methods():
        _JOB = (lb, pdir, cache)
        try:
            with mp.get_context("fork").Pool(workers) as pool:
                return pool.map(_plot_one, range(n), chunksize=1)
        finally:
            _JOB = None
    from harness.analysis import plots as P

    return [P.task_plots(b, pdir, cache) for b in lb.boards]


TERMINAL_COLUMNS = ("rank", "label", "mean", "n", "delta", "p", "time_to_target_s", "total_s", "status")


def print_tables(lb: Leaderboard, file=None) -> None:
    """Each task's main columns (the files hold every column): a rich table on a terminal, Markdown
    otherwise (pipes, logs, CI)."""
    file = file or sys.stdout
    tty = file.isatty()
    if tty:
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        con = Console(file=file)
    for b in lb.boards:
        cols, rows = columns(b)
        keep = [i for i, (c, _) in enumerate(cols) if c in TERMINAL_COLUMNS]
        cols, rows = [cols[i] for i in keep], [[r[i] for i in keep] for r in rows]
        if not tty:
            print(f"\n## {b.title}\n", file=file)
            print(md_table([h for _, h in cols], [[txt for txt, _ in r] for r in rows], html=False), file=file)
            continue
        t = Table(title=Text(f"{b.title} — {b.metric}"), title_justify="left")
        for c, h in cols:
            t.add_column(h, justify="left" if c == "label" else "right", min_width=12 if c == "label" else None)
        for row, is_base in zip(rows, b.table["is_baseline"]):
            t.add_row(*(Text(txt) for txt, _ in row), style="bold" if is_base else None)
        con.print(t)
