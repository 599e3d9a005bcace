"""Writers of the leaderboard: Markdown (index + one file per task), tidy CSV, one self-contained HTML page,
and the terminal tables. Every text that comes from a record is escaped (Markdown pipes, HTML entities)."""

from __future__ import annotations

import base64
import functools
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

from harness.analysis.leaderboard import ALPHA, CALIBRATED, CORRECTIONS, Leaderboard, TaskBoard, is_proportion
from harness.records import atomic_write_text

# ----------------------------------------------------------------------------- formatting


def _ok(v: Any) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def is_percent(metric: str) -> bool:
    """Proportions (accuracy, ECE) are shown in percent, in tables and plots alike."""
    return is_proportion(metric)


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


def _p_text(p: Any) -> str:
    return ("<0.001" if p < 1e-3 else f"{p:.3f}") if _ok(p) else "—"


def columns(
    board: TaskBoard, table: pd.DataFrame | None = None
) -> tuple[list[tuple[str, str]], list[list[tuple[str, float | str | None]]]]:
    """The displayed table: [(column id, header)] and rows of (text, sort value). Shared by every format.
    ``table`` is a subset of the board's rows (ranked ones, or those with too few seeds)."""
    m = board.metric
    t = board.table if table is None else table
    has = {c: c in t and t[c].notna().any() for c in ("time_to_target_s", "total_s", "peak_bytes")}
    rate = "tokens" if "tokens_per_s" in t and t["tokens_per_s"].notna().any() else "samples"
    corr = CORRECTIONS[board.correction].split("-")[0]
    cols = [("rank", "#"), ("label", "technique"), ("mean", f"{metric_header(m)} mean ± std"), ("n", "n")]
    cols += [("ci", "95% CI"), ("delta", "Δ vs baseline [95% CI]"), ("p", f"p (Welch, {corr})")]
    cols += [(f"{s}_mean", metric_header(s) + (" (primary)" if s == board.primary else "")) for s in board.secondary]
    if "tuning_budget" in t and t["tuning_budget"].notna().any():
        cols.append(("tuning_budget", "tuning budget"))
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
                row.append((f"{int(r['rank'])}" if _ok(r["rank"]) else "—", _num(r["rank"])))
            elif c == "label":
                row.append((r["label"] + (" (baseline)" if r["is_baseline"] else ""), r["label"].lower()))
            elif c == "mean":
                txt = fmt_num(m, r["mean"]) + (f" ± {fmt_num(m, r['std'])}" if _ok(r["std"]) else "")
                row.append((txt, _num(r["mean"])))
            elif c == "n":
                row.append((f"{r['n']}" + (f" ⚠ n<{board.min_seeds}" if r["warning"] else ""), r["n"]))
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
                p = r["p_adj"] if _ok(r["p_adj"]) else r["p_value"]
                txt = _p_text(r["p_adj"]) if _ok(r["p_adj"]) else _p_text(r["p_value"])
                if _ok(r["p_value"]) and not _ok(r["p_adj"]):
                    txt += " (uncorrected, not ranked)"
                elif not _ok(p) and r["p_note"] and not r["is_baseline"]:
                    txt = f"— ({r['p_note']})"
                row.append((txt, _num(p)))
            elif c.endswith("_mean"):
                s = c[:-5]
                txt = fmt_num(s, r[c]) + (f" ± {fmt_num(s, r[s + '_std'])}" if _ok(r.get(s + "_std")) else "")
                row.append((txt if _ok(r[c]) else "—", _num(r[c])))
            elif c == "tuning_budget":
                row.append((f"{int(r[c])} trials" if _ok(r[c]) else "—", _num(r[c])))
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


def calibration_columns(board: TaskBoard) -> tuple[list[tuple[str, str]], list[list[tuple[str, Any]]]]:
    """The post-hoc calibration table: per configuration and calibrator, ECE and NLL before -> after and the
    after value's Δ against the baseline's uncalibrated value."""
    t = board.calibration
    cols = [("label", "technique"), ("calibrator", "calibrator"), ("n", "n")]
    for b in CALIBRATED:
        cols += [(f"{b}_before", f"{metric_header(b)} before"), (f"{b}_after", f"{metric_header(b)} after")]
        cols += [(f"{b}_delta", f"Δ {b} after vs baseline before [95% CI]")]
    rows = []
    for r in t.to_dict("records"):
        row = [(r["label"], r["label"].lower()), (r["calibrator"], r["calibrator"])]
        row.append((str(max(r[f"{b}_n"] for b in CALIBRATED)), max(r[f"{b}_n"] for b in CALIBRATED)))
        for b in CALIBRATED:
            row += [
                (fmt_num(b, r[f"{b}_before"]), _num(r[f"{b}_before"])),
                (fmt_num(b, r[f"{b}_after"]), _num(r[f"{b}_after"])),
            ]
            txt = fmt_num(b, r[f"{b}_delta"], signed=True)
            if _ok(r[f"{b}_delta_lo"]):
                txt += f" [{fmt_num(b, r[f'{b}_delta_lo'], True)}, {fmt_num(b, r[f'{b}_delta_hi'], True)}]"
            txt += f" {r[f'{b}_mark']}" if r[f"{b}_mark"] else ""
            row.append((txt, _num(r[f"{b}_delta"])))
        rows.append(row)
    return cols, rows


def legend(board: TaskBoard) -> str:
    d = "higher" if board.higher else "lower"
    corr = CORRECTIONS[board.correction]
    ci = (
        "95% BCa bootstrap interval of the mean (stays within 0-100 %)"
        if is_percent(board.metric)
        else "95% Student t interval of the mean"
    )
    return (
        f"Primary metric **{board.metric}** ({d} is better); mean ± sample std over seeds, {ci}. "
        f"Δ = mean − baseline mean with its 95% Welch interval; p = Welch's t-test, {corr}-adjusted over the "
        f"{board.n_comparisons} comparisons of this table; ▲/▼ = significantly better/worse (adjusted p < {ALPHA}). "
        f"No p-value where a group has fewer than 2 seeds or no variance. Configurations with fewer than "
        f"{board.min_seeds} seeds are listed apart: not ranked, not starred, not in the corrected family. "
        f"Pareto ★ = not dominated on {', '.join(o.replace('_mean', '') for o in board.objectives)} (ranked rows); "
        f"joint rank = mean rank over those."
    )


def _status_line(board: TaskBoard) -> str:
    c = {s: sum(r.status == s for r in board.runs) for s in ("ok", "diverged", "failed")}
    dup = f"; {len(board.duplicates)} duplicate records not counted" if board.duplicates else ""
    return f"{len(board.runs)} runs: {c['ok']} ok, {c['diverged']} diverged, {c['failed']} failed{dup}"


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


def run_links(board: TaskBoard, key: str, base: Path) -> list[tuple[str, str, str]]:
    """(seed text, run directory href, resolved-config href) of every run of a configuration, relative to
    ``base``: the config is ``<run_dir>/.hydra/config.yaml`` when Hydra wrote one, else the record.
    Computed once per board and output directory (the Markdown and HTML writers share it)."""
    cache = board.__dict__.setdefault("_links", {})
    if base not in cache:
        by_key: dict[str, list[tuple[str, str, str]]] = {}
        for r in sorted(board.runs, key=lambda r: (str(r.seed), r.path)):
            run_dir = os.path.dirname(r.path)  # where the record is now (results may have been moved)
            d = _rel(run_dir, base)
            hydra = os.path.isfile(os.path.join(run_dir, ".hydra", "config.yaml"))
            cfg = f"{d}/.hydra/config.yaml" if hydra else f"{d}/{os.path.basename(r.path)}"
            txt = f"s{r.seed}" + ("" if r.status == "ok" else f" {r.status}")
            by_key.setdefault(r.key, []).append((txt, d, cfg))
        cache[base] = by_key
    return cache[base].get(key, [])


@functools.lru_cache(maxsize=4096)
def _rel_dir(path: str, base: str) -> str:
    try:
        return Path(os.path.relpath(path, base)).as_posix()
    except ValueError:  # another drive (Windows): an absolute URI
        return Path(path).resolve().as_uri()


def _rel(path: str | Path, base: Path) -> str:
    """``path`` relative to ``base`` (relpath once per parent directory: 10^4 runs share a few sweeps)."""
    head, tail = os.path.split(os.path.abspath(path))
    d = _rel_dir(head, os.path.abspath(base))
    return tail if d == "." else f"{d}/{tail}"


def _md_link(text: str, href: str) -> str:
    return f"[{md_link_text(text)}](<{href.replace('>', '%3E')}>)"


def md_link_text(s: Any) -> str:
    """Text inside a Markdown link: escaped like a cell, and brackets escaped so it cannot close the link."""
    return md_escape(s).replace("[", "\\[").replace("]", "\\]")


def _notes(board: TaskBoard) -> list[str]:
    return ([board.variant_note] if board.variant_note else []) + board.notes


def task_markdown(board: TaskBoard, plots: dict[str, str], base: Path | None = None) -> str:
    base = base or Path(".")
    base_row = board.table.loc[board.table["is_baseline"], "label"]
    lines = [
        f"# {md_escape(board.title)}",
        "",
        f"Task key `{board.task_key}`. Baseline: **{md_escape(base_row.iloc[0]) if len(base_row) else 'none'}** "
        f"({md_escape(board.baseline_note)}). {_status_line(board)}.",
        "",
    ]
    lines += [f"> {md_escape(n)}" for n in _notes(board)] + ([""] if _notes(board) else [])
    lines += [legend(board), ""]
    if len(board.ranked):
        cols, rows = columns(board, board.ranked)
        lines += [md_table([h for _, h in cols], [[txt for txt, _ in r] for r in rows]), ""]
    if len(board.unranked):
        lines += [f"## Fewer than {board.min_seeds} seeds (not ranked)", ""]
        cols, rows = columns(board, board.unranked)
        lines += [md_table([h for _, h in cols], [[txt for txt, _ in r] for r in rows]), ""]
    if board.calibration is not None:
        cols, rows = calibration_columns(board)
        lines += ["## Post-hoc calibration", "", calibration_legend(board), ""]
        lines += [md_table([h for _, h in cols], [[txt for txt, _ in r] for r in rows]), ""]
    front = board.table[board.table["pareto"]].sort_values("joint_rank")
    if len(front):
        lines += ["## Joint view (Pareto front)", ""]
        hdr = ["technique", "joint rank"] + [o.replace("_mean", "") for o in board.objectives]
        body = []
        for r in front.to_dict("records"):
            row = [r["label"], f"{r['joint_rank']:.1f}"]
            for o in board.objectives:
                row.append(
                    fmt_time(r[o])
                    if o == "total_s"
                    else fmt_bytes(r[o])
                    if o == "peak_bytes"
                    else fmt_num(board.metric if o == "mean" else o.replace("_mean", ""), r[o])
                )
            body.append(row)
        lines += [md_table(hdr, body), ""]
    if board.bad_runs:
        lines += ["## Failed and diverged runs", ""]
        body = [
            [b.status, board_label(board, b.key), str(b.seed), _oneline(b.error), b.run_dir] for b in board.bad_runs
        ]
        lines += [md_table(["status", "technique", "seed", "error", "run dir"], body), ""]
    if board.duplicates:
        lines += ["## Duplicate records (same run_key: one experiment, the newest counted)", ""]
        body = [
            [d.dropped.run_key or "", board_label(board, d.kept.key), d.kept.path, d.dropped.path]
            for d in board.duplicates
        ]
        lines += [md_table(["run_key", "technique", "counted", "not counted"], body), ""]
    lines += ["## Runs (run directory, resolved config)", ""]
    body = []
    for k in board.table["key"]:
        links = " · ".join(f"{_md_link(t, d)} ({_md_link('config', c)})" for t, d, c in run_links(board, k, base))
        body.append(f"| {md_escape(board.labels[k])} | {links} |")
    lines += ["| technique | runs |", "|---|---|", *body, ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{name}]({path})" for name, path in plots.items()] + [""]
    return "\n".join(lines)


def calibration_legend(board: TaskBoard) -> str:
    return (
        "ECE and NLL on the test split before and after each post-hoc calibrator (mean over seeds); Δ = "
        "after-calibration mean − the baseline's uncalibrated mean, 95% Welch interval, ▲/▼ where significant "
        f"after {CORRECTIONS[board.correction]} correction over this table (lower is better for both)."
    )


def board_label(board: TaskBoard, key: str) -> str:
    return board.labels[key]


def index_markdown(
    lb: Leaderboard, files: dict[str, str], command: str, generated: str, profile_png: str | None
) -> str:
    lines = [
        "# Leaderboards",
        "",
        f"Generated {generated} by `{md_escape(command)}` from {lb.n_records} records ({len(lb.problems)} skipped"
        + (f", {len(lb.duplicates)} duplicates not counted" if lb.duplicates else "")
        + "). "
        "Tasks are identified by their task key (model, data and budget as resolved); techniques by the key of "
        f"their own configuration. p-values are {CORRECTIONS[lb.correction]}-corrected within each table.",
        "",
    ]
    hdr = ["task", "metric", "best", "baseline", "configurations", "runs"]
    lines += ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for b in lb.boards:
        ranked = b.ranked
        best = (
            f"{md_escape(ranked.iloc[0]['label'])} ({fmt_num(b.metric, ranked.iloc[0]['mean'])})"
            if len(ranked)
            else f"— (no configuration has {b.min_seeds} seeds)"
        )
        base = b.table.loc[b.table["is_baseline"], "label"]
        cells = [
            _md_link(b.title, files[b.task_key]),
            md_escape(b.metric),
            best,
            md_escape(base.iloc[0]) if len(base) else "none",
            str(len(b.table)),
            md_escape(_status_line(b)),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if lb.profile is not None:
        lines += [
            "## Performance profile (time to target)",
            "",
            f"Over {lb.n_profile_tasks} tasks where some configuration reached the target: fraction of the tasks "
            "a technique was run on where it reaches the target within τ× the fastest, τ ∈ [1, 4]; score = "
            "normalised area under that curve (AlgoPerf). A task a technique was not run on is not counted for "
            "it; a run that did not reach the target counts as infinitely slow.",
            "",
        ]
        pr = lb.profile
        lines += [
            md_table(
                ["technique", "score", "tasks run", "reached"],
                [
                    [r.label, f"{r.score:.3f}", f"{r.tasks}/{lb.n_profile_tasks}", f"{r.reached}/{r.tasks}"]
                    for r in pr.itertuples()
                ],
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
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;max-width:100%}
.scroll{max-width:100%;overflow-x:auto;margin:.5em 0 1em}
table{border-collapse:collapse;font-size:12.5px}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:right;white-space:nowrap}
td.links{white-space:normal;min-width:12em;max-width:28em;text-align:left}
td.links a{margin-right:.4em} .note{color:#8a4b00}
td:nth-child(2),th:nth-child(2){text-align:left}
th{background:#f3f3f3;cursor:pointer;user-select:none}
th[aria-sort=ascending]::after{content:" ▲"} th[aria-sort=descending]::after{content:" ▼"}
tr.baseline{background:#fff8dc} .better{color:#137333} .worse{color:#b3261e} .warn{color:#b06000}
img{max-width:100%;margin:.3em} .meta{color:#555} code{background:#f3f3f3;padding:1px 3px}
"""


def _h(s: Any) -> str:
    return html.escape(str(s), quote=True)


def html_table(cols, rows, classes: list[str] | None = None, table_id: str = "", links=None) -> str:
    """A sortable table inside its own horizontally scrolling box (the page never scrolls sideways).
    ``links``: per row a list of (text, run dir href, config href), shown in a last "runs" column."""
    head = "".join(f'<th data-col="{_h(c)}">{_h(h)}</th>' for c, h in cols)
    if links is not None:
        head += '<th data-col="runs">runs (config)</th>'
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{_h(classes[i])}"' if classes and classes[i] else ""
        cells = []
        for (c, _), (txt, v) in zip(cols, row):
            dv = "" if v is None else (_h(v) if isinstance(v, str) else repr(float(v)))
            extra = ""
            if "delta" in c and ("▲" in txt or "▼" in txt):
                extra = ' class="better"' if "▲" in txt else ' class="worse"'
            elif c == "n" and "⚠" in txt:
                extra = ' class="warn"'
            cells.append(f'<td data-v="{dv}"{extra}>{_h(txt)}</td>')
        if links is not None:
            a = "".join(
                f'<a href="{_h(d)}">{_h(t)}</a><a href="{_h(c)}" title="resolved config">⚙</a> ' for t, d, c in links[i]
            )
            cells.append(f'<td class="links" data-v="{len(links[i])}">{a}</td>')
        body.append(f"<tr{cls}>{''.join(cells)}</tr>")
    tid = f' id="{_h(table_id)}"' if table_id else ""
    return (
        f'<div class="scroll"><table class="sortable"{tid}><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def _img(png: bytes | None, alt: str) -> str:
    if not png:
        return ""
    return f'<img alt="{_h(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _board_html(b: TaskBoard, base: Path, pngs: dict[str, bytes]) -> list[str]:
    base_row = b.table.loc[b.table["is_baseline"], "label"]
    parts = [
        f"<section id='{_h(b.slug)}'><h2>{_h(b.title)}</h2>",
        f"<p>Task key <code>{_h(b.task_key)}</code>. Baseline: <b>{_h(base_row.iloc[0]) if len(base_row) else 'none'}"
        f"</b> ({_h(b.baseline_note)}). {_h(_status_line(b))}.</p>",
    ]
    parts += [f"<p class='note'>{_h(n)}</p>" for n in _notes(b)]
    parts.append(f"<p class='meta'>{_h(legend(b).replace('**', ''))}</p>")
    for sub, tid, title in ((b.ranked, f"t-{b.slug}", ""), (b.unranked, f"u-{b.slug}", "few")):
        if not len(sub):
            continue
        if title:
            parts.append(f"<h3>Fewer than {b.min_seeds} seeds (not ranked)</h3>")
        cols, rows = columns(b, sub)
        classes = ["baseline" if x else "" for x in sub["is_baseline"]]
        links = [run_links(b, k, base) for k in sub["key"]]
        parts.append(html_table(cols, rows, classes, table_id=tid, links=links))
    if b.calibration is not None:
        cols, rows = calibration_columns(b)
        parts += [
            "<h3>Post-hoc calibration</h3>",
            f"<p class='meta'>{_h(calibration_legend(b))}</p>",
            html_table(cols, rows, table_id=f"c-{b.slug}"),
        ]
    if b.bad_runs:
        bc = [("status", "status"), ("label", "technique"), ("seed", "seed"), ("error", "error"), ("dir", "run dir")]
        br = [
            [(x.status, x.status), (board_label(b, x.key), None), (str(x.seed), None), (_oneline(x.error), None)]
            + [(x.run_dir, None)]
            for x in b.bad_runs
        ]
        br = [[(t, t if v is None else v) for t, v in r] for r in br]
        parts += ["<h3>Failed and diverged runs</h3>", html_table(bc, br)]
    if b.duplicates:
        dc = [("run_key", "run_key"), ("label", "technique"), ("kept", "counted"), ("dropped", "not counted")]
        dr = [
            [
                (d.dropped.run_key or "", None),
                (board_label(b, d.kept.key), None),
                (d.kept.path, None),
                (d.dropped.path, None),
            ]
            for d in b.duplicates
        ]
        dr = [[(t, t) for t, _ in r] for r in dr]
        parts += ["<h3>Duplicate records (same run_key: one experiment, the newest counted)</h3>", html_table(dc, dr)]
    parts += [_img(png, f"{b.title} {name}") for name, png in pngs.items()]
    parts.append("</section>")
    return parts


def render_html(
    lb: Leaderboard,
    command: str,
    generated: str,
    pngs: dict[str, dict[str, bytes]],
    profile_png,
    base: Path = Path("."),
) -> str:
    dup = f", {len(lb.duplicates)} duplicates not counted" if lb.duplicates else ""
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width,initial-scale=1'>",
        f"<title>harness leaderboard</title><style>{CSS}</style></head><body>",
        "<h1>Leaderboards</h1>",
        f"<p class='meta'>Generated <span id='generated'>{_h(generated)}</span> by <code id='command'>{_h(command)}"
        f"</code> from <span id='records'>{lb.n_records}</span> records ({len(lb.problems)} skipped{dup}). "
        f"Click a column header to sort. p-values are {CORRECTIONS[lb.correction]}-corrected within each table.</p>",
        "<ul>" + "".join(f"<li><a href='#{_h(b.slug)}'>{_h(b.title)}</a></li>" for b in lb.boards) + "</ul>",
    ]
    for b in lb.boards:
        parts += _board_html(b, base, pngs.get(b.task_key, {}))
    if lb.profile is not None:
        n = lb.n_profile_tasks
        pc = [("label", "technique"), ("score", "score"), ("tasks", "tasks run"), ("reached", "reached")]
        pr = [
            [(r.label, r.label.lower()), (f"{r.score:.3f}", r.score), (f"{r.tasks}/{n}", r.tasks)]
            + [(f"{r.reached}/{r.tasks}", r.reached)]
            for r in lb.profile.itertuples()
        ]
        parts += [
            "<section id='profile'><h2>Performance profile (time to target)</h2>",
            f"<p class='meta'>Over {n} tasks: fraction of the tasks a technique was run on where it reaches the "
            "target within τ× the fastest, τ ∈ [1, 4]; score = normalised area under the curve (AlgoPerf). Tasks "
            "a technique was not run on are not counted for it.</p>",
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
            pngs[b.task_key] = {name: png for name, (_, png) in done.items()}
            rel[b.task_key] = {name: f"plots/{stem.name}.png" for name, (stem, _) in done.items()}
            written += [s.with_suffix(x) for s, _ in done.values() for x in (".png", ".svg")]
        profile_png = P.plot_profile(lb, pdir / "performance_profile")
        if profile_png:
            written += [pdir / "performance_profile.png", pdir / "performance_profile.svg"]
    if "md" in formats:
        files = {}
        for b in lb.boards:
            p = out / f"{b.slug}.md"
            atomic_write_text(p, task_markdown(b, rel.get(b.task_key, {}), out))
            files[b.task_key] = p.name
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
        atomic_write_text(p, render_html(lb, command, generated, pngs, profile_png, out))
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
