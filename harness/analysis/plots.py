"""Matplotlib plots of the leaderboard (PNG + SVG), and a reusable reliability diagram.

Figures are built with ``matplotlib.figure.Figure`` (no pyplot): no global state, no GUI backend, safe to
call from any process.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from harness.records import atomic_write_bytes

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from harness.analysis.leaderboard import Leaderboard, TaskBoard

MAX_LINES = 6  # curves per plot: the baseline and the best configurations, more is unreadable
# text.parse_math off: labels come from records ("cost $\\foo$" is text, never matplotlib mathtext)
RC = {
    "svg.fonttype": "none",
    "font.size": 8,
    "axes.titlesize": 9,
    "legend.fontsize": 7,
    "figure.dpi": 100,
    "text.parse_math": False,
    "text.usetex": False,
}
LEGEND_CHAR_IN = 0.07  # inches per character of a 7 pt legend entry (generous: DejaVu Sans is wide)


def _styled(fn):
    """Run a plotting function under RC: artists take their font sizes when created, not when saved."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(RC):
            return fn(*args, **kwargs)

    return wrapper


def save(fig: Figure, stem: str | Path) -> bytes:
    """Write ``stem``.png and ``stem``.svg atomically; return the PNG bytes (embedded in the HTML page)."""
    stem = Path(stem)
    buf, svg = io.BytesIO(), io.BytesIO()
    with matplotlib.rc_context(RC):
        # fixed margins (no bbox_inches="tight", no constrained layout): each of those costs an extra draw
        fig.savefig(buf, format="png", dpi=100, pil_kwargs={"compress_level": 1})  # zlib level 6 is 10x slower
        fig.savefig(svg, format="svg")
    png = buf.getvalue()
    atomic_write_bytes(stem.with_suffix(".svg"), svg.getvalue())
    atomic_write_bytes(stem.with_suffix(".png"), png)
    return png


def _legend_width(labels: Sequence[str]) -> float:
    """Inches a legend of these entries needs beside the axes."""
    return 0.7 + LEGEND_CHAR_IN * max((len(x) for x in labels), default=0)


def _legend_outside(ax: Axes, **kw) -> None:
    """The legend right of the axes (it never covers data); the figure's right margin leaves room for it."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, **kw)


def _short(s: Any, n: int = 40) -> str:
    s = str(s)
    return s if len(s) <= n else s[: n - 1] + "…"


def _scale(metric: str) -> tuple[float, str]:
    """Proportions are drawn in percent, like the tables."""
    from harness.analysis.leaderboard import is_proportion

    return (100.0, f"{metric} [%]") if is_proportion(metric) else (1.0, metric)


def _ticks(*axes: Axes, x: bool = True, y: bool = True) -> None:
    """At most ~5 ticks per axis: tick-label layout is most of matplotlib's drawing time."""
    for ax in axes:
        if x:
            ax.xaxis.set_major_locator(MaxNLocator(4))
        if y:
            ax.yaxis.set_major_locator(MaxNLocator(4))


def _fig(w: float, h: float, left=0.7, right=0.15, bottom=0.45, top=0.35, wspace=0.35) -> Figure:
    """A figure of w x h inches with margins given in inches."""
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(w, h))
    fig.subplots_adjust(left=left / w, right=1 - right / w, bottom=bottom / h, top=1 - top / h, wspace=wspace)
    return fig


# ----------------------------------------------------------------------------- reliability diagram


def ece_from_bins(bins: Mapping[str, Sequence]) -> float:
    """ECE of a bins dict: sum over bins of count/N * |accuracy - confidence|."""
    c = np.asarray(bins["count"], float)
    gap = np.abs(np.asarray(bins["accuracy"], float) - np.asarray(bins["confidence"], float))
    m = c > 0
    return float((c[m] * gap[m]).sum() / c[m].sum()) if m.any() else math.nan


@_styled
def reliability_diagram(
    diagrams: Mapping[str, Mapping[str, Sequence]],
    ax: Axes | None = None,
    title: str | None = None,
    path: str | Path | None = None,
) -> Figure:
    """Reliability diagram: accuracy vs confidence per bin for each stage (e.g. ``{"before": bins, "after":
    bins}`` with bins from ``harness.metrics.calibration.reliability_bins``: keys ``confidence``, ``accuracy``, ``count``, optional
    ``edges``), the diagonal of perfect calibration, the ECE of each stage in the legend, and the bin counts
    (share of samples) as bars underneath. Draws into ``ax`` when given; writes ``path``.png/.svg when given."""
    fig = ax.figure if ax is not None else _fig(3.6, 3.4)
    ax = ax if ax is not None else fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=0.8, label="perfect")
    colors = {"before": "tab:red", "after": "tab:blue"}
    total = None
    for i, (stage, b) in enumerate(diagrams.items()):
        conf = np.asarray(b["confidence"], float)
        acc = np.asarray(b["accuracy"], float)
        cnt = np.asarray(b["count"], float)
        m = cnt > 0
        ece = ece_from_bins(b)
        ax.plot(conf[m], acc[m], "o-", ms=3, lw=1.2, color=colors.get(stage, f"C{i}"), label=f"{stage} (ECE {ece:.3f})")
        if total is None:
            edges = np.asarray(b.get("edges") or np.linspace(0, 1, len(cnt) + 1), float)
            total = (edges, cnt / max(cnt.sum(), 1))
    if total is not None:  # sample share per bin, scaled into the bottom fifth of the axes
        edges, share = total
        ax.bar(edges[:-1], share * 0.2 / max(share.max(), 1e-12), width=np.diff(edges), align="edge", color="0.85")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=title or "Reliability diagram")
    ax.set_xticks([0, 0.5, 1])
    ax.set_yticks([0, 0.5, 1])
    ax.legend(loc="upper left")
    if path is not None:
        save(fig, path)
    return fig


def _pool_bins(items: list[Mapping[str, Sequence]]) -> dict[str, list]:
    """Pool bins of several seeds: counts add, confidence and accuracy are count-weighted."""
    cnt = np.sum([np.asarray(b["count"], float) for b in items], 0)
    out = {"count": cnt.tolist()}
    for k in ("confidence", "accuracy"):
        s = np.sum([np.nan_to_num(np.asarray(b[k], float)) * np.asarray(b["count"], float) for b in items], 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[k] = (s / cnt).tolist()
    if items[0].get("edges"):
        out["edges"] = list(items[0]["edges"])
    return out


def _stages(rel: Mapping[str, Any]) -> dict[str, Mapping]:
    """Accept ``{"before": bins, "after": bins}`` or one bins dict."""
    if "count" in rel:
        return {"model": rel}
    return {k: v for k, v in rel.items() if isinstance(v, Mapping) and "count" in v}


# ----------------------------------------------------------------------------- leaderboard plots


def _shown(board: TaskBoard) -> list[str]:
    """Keys to draw: the baseline and the best configurations (ranked ones first)."""
    keys = list(board.table.loc[board.table["n"] > 0, "key"])[:MAX_LINES]
    if board.baseline_key and board.baseline_key not in keys:
        keys = keys[: MAX_LINES - 1] + [board.baseline_key]
    return keys


def _x_axis(board: TaskBoard, keys: list[str]) -> str:
    """Curves are drawn against epochs when every run has the same steps per epoch; otherwise against
    optimizer steps, or tokens when the curve records them (language models)."""
    per_epoch, has_tokens, has_step = set(), True, True
    for r in board.runs:
        if r.status != "ok" or r.key not in keys:
            continue
        for p in r.curve:
            has_tokens &= isinstance(p.get("tokens"), (int, float))
            has_step &= isinstance(p.get("step"), (int, float))
            e, st = p.get("epoch"), p.get("step")
            if isinstance(e, (int, float)) and e > 0 and isinstance(st, (int, float)):
                per_epoch.add(round(st / e, 3))
    if has_tokens and (len(per_epoch) > 1 or "steps" in board.budget):
        return "tokens"
    if has_step and (len(per_epoch) > 1 or "steps" in board.budget):
        return "step"
    return "epoch"


@_styled
def plot_curves(board: TaskBoard, stem: Path) -> bytes | None:
    """Training loss and the evaluation metric over training: mean over seeds with a +-1 std band, against
    epochs, or steps/tokens when runs differ in epoch length. A panel none of whose series has two points is
    left out."""
    labels = dict(zip(board.table["key"], board.table["label"]))
    shown = _shown(board)
    xname = _x_axis(board, shown)
    curves: dict[str, dict[str, dict[float, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in board.runs:
        if r.status != "ok" or r.key not in shown:
            continue
        for p in r.curve:
            x = p.get(xname)
            if not isinstance(x, (int, float)):
                continue
            for m, v in p.items():
                if m in ("epoch", "step", "time_s", "lr", "tokens") or isinstance(v, bool):
                    continue
                if isinstance(v, (int, float)) and math.isfinite(v):
                    curves[r.key][m][x].append(v)

    def drawable(m: str) -> bool:
        return any(len(curves[k].get(m) or {}) >= 2 for k in shown)

    evalm = next(
        (
            m
            for m in (board.metric, "val_" + board.metric.split("_", 1)[-1], "test_acc", "val_loss", "test_loss")
            if drawable(m)
        ),
        None,
    )
    panels = [m for m in dict.fromkeys(("train_loss", evalm)) if m and drawable(m)]
    if not panels:
        return None
    names = [_short(labels[k]) for k in shown]
    lw = _legend_width(names)
    fig = _fig(3.3 * len(panels) + lw, 2.9, top=0.5, right=lw)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, m in zip(axes, panels):
        scale, ylabel = _scale(m)
        for i, key in enumerate(shown):
            pts = curves[key].get(m)
            if not pts:
                continue
            xs = np.array(sorted(pts))
            vals = [np.array(pts[x]) * scale for x in xs]
            mu = np.array([v.mean() for v in vals])
            sd = np.array([v.std(ddof=1) if len(v) > 1 else 0.0 for v in vals])
            base = key == board.baseline_key
            ax.plot(xs, mu, color=f"C{i}", lw=1.8 if base else 1.2, ls="--" if base else "-", label=names[i],
                    marker="o" if len(xs) < 6 else None, ms=3)  # fmt: skip
            ax.fill_between(xs, mu - sd, mu + sd, color=f"C{i}", alpha=0.2, lw=0)
        ax.set(xlabel=xname, ylabel=ylabel)
        _ticks(ax)
        ax.xaxis.set_major_locator(MaxNLocator(4, integer=True))  # epochs, steps and tokens are counts
    _legend_outside(axes[-1])
    fig.suptitle(f"{_short(board.title, 70)}: mean ± std over seeds")
    return save(fig, stem)


@_styled
def plot_metric_vs_time(board: TaskBoard, stem: Path) -> bytes | None:
    """Primary metric against wall time per configuration (mean ± std over seeds), every point labelled,
    Pareto-optimal ones ringed; configurations with too few seeds drawn hollow."""
    t = board.table[board.table["n"] > 0]
    if t.empty or t["total_s"].isna().all():
        return None
    scale, ylabel = _scale(board.metric)
    entries = ["configuration", "baseline", "Pareto-optimal (joint view)", f"fewer than {board.min_seeds} seeds"]
    lw = _legend_width(entries)
    fig = _fig(4.4 + lw, 3.4, right=lw)
    ax = fig.add_subplot()
    base = t["is_baseline"].to_numpy(bool)
    ranked = t["ranked"].to_numpy(bool)
    front = t["pareto"].to_numpy(bool)
    x, y = t["total_s"].to_numpy(float), t["mean"].to_numpy(float) * scale
    e = t["std"].fillna(0).to_numpy(float) * scale
    m = ~base & ranked
    if m.any():
        ax.errorbar(x[m], y[m], yerr=e[m], fmt="o", ms=4, color="C0", alpha=0.8, label="configuration")
    m = ~base & ~ranked
    if m.any():
        ax.errorbar(x[m], y[m], yerr=e[m], fmt="o", ms=4, mfc="none", color="0.5", label=entries[3])
    if base.any():
        ax.errorbar(x[base], y[base], yerr=e[base], fmt="s", ms=6, color="k", label="baseline")
    if front.any():
        # rings, not a line: the front is over every joint-view objective, not just these two axes
        ax.scatter(x[front], y[front], s=90, facecolors="none", edgecolors="C3", label=entries[2])
    for xi, yi, lab in list(zip(x, y, t["label"]))[:25]:  # every point named (the 25 best)
        if math.isfinite(xi) and math.isfinite(yi):
            ax.annotate(_short(lab, 28), (xi, yi), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel="wall time per run [s]", ylabel=ylabel)
    ax.margins(x=0.15, y=0.12)
    _legend_outside(ax)
    _ticks(ax)
    fig.suptitle(f"{_short(board.title, 60)}: {board.metric} vs wall time")
    return save(fig, stem)


@_styled
def plot_delta(board: TaskBoard, stem: Path) -> bytes | None:
    """Δ vs the baseline with its 95% Welch interval, in the tables' units; green/red = significantly
    better/worse after the table's multiple-comparison correction; grey hatched = too few seeds."""
    t = board.table[~board.table["is_baseline"] & board.table["delta"].notna()]
    if t.empty or not board.baseline_key:
        return None
    scale, unit = _scale(board.metric)
    t = t.sort_values("delta", ascending=board.higher).tail(40)  # best at the top
    d = t["delta"].to_numpy(float) * scale
    lo = np.nan_to_num(d - t["delta_lo"].to_numpy(float) * scale)
    hi = np.nan_to_num(t["delta_hi"].to_numpy(float) * scale - d)
    colors = ["tab:green" if b is True else "tab:red" if b is False else "0.6" for b in t["better"]]
    names = [_short(s, 45) + ("" if rk else " (n<min)") for s, rk in zip(t["label"], t["ranked"])]
    margin = 0.2 + 0.075 * max(map(len, names))  # inches of 8 pt tick labels
    fig = _fig(3.6 + margin, 1.0 + 0.2 * len(t), left=margin, right=0.3, bottom=0.5)
    ax = fig.add_subplot()
    yy = np.arange(len(t))
    bars = ax.barh(yy, d, xerr=np.stack([lo, hi]), color=colors, error_kw={"lw": 0.8, "capsize": 2})
    for bar, rk in zip(bars, t["ranked"]):
        if not rk:
            bar.set_hatch("///")
            bar.set_alpha(0.5)
    ax.set_yticks(yy, names)
    ax.axvline(0, color="k", lw=0.8)
    _ticks(ax, y=False)
    better = "higher" if board.higher else "lower"
    pp = " [pp]" if scale == 100 else ""
    ax.set(xlabel=f"Δ {board.metric}{pp} vs baseline ({better} is better), 95% CI")
    fig.suptitle(_short(board.title, 70))
    return save(fig, stem)


@_styled
def plot_reliability(board: TaskBoard, stem: Path) -> bytes | None:
    """Reliability diagrams (pooled over seeds) of the baseline and the best configuration with bin data."""
    by_key: dict[str, list[Mapping]] = defaultdict(list)
    for r in board.runs:
        if r.status == "ok" and r.reliability:
            by_key[r.key].append(r.reliability)
    keys = [k for k in board.table["key"] if k in by_key][:1]  # the best configuration with bins
    if board.baseline_key in by_key and board.baseline_key not in keys:
        keys = [board.baseline_key] + keys
    if not keys:
        return None
    labels = dict(zip(board.table["key"], board.table["label"]))
    fig = _fig(3.2 * len(keys), 3.3, top=0.5)
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, k in zip(axes, keys):
        stages = defaultdict(list)
        for rel in by_key[k]:
            for s, b in _stages(rel).items():
                stages[s].append(b)
        reliability_diagram({s: _pool_bins(bs) for s, bs in stages.items()}, ax=ax, title=str(labels[k])[:40])
    fig.suptitle(f"{board.title}: reliability (pooled over seeds)")
    return save(fig, stem)


@_styled
def plot_profile(lb: Leaderboard, stem: Path, top: int = 10) -> bytes | None:
    """AlgoPerf performance profile: fraction of the tasks each technique was run on where it reaches the
    target within tau x the fastest. The legend sits right of the axes."""
    if lb.profile is None or lb.profile.empty:
        return None
    rows = list(lb.profile.head(top).itertuples())
    names = [f"{_short(r.label, 32)} ({r.score:.2f}, {r.tasks} tasks)" for r in rows]
    lw = _legend_width(names)
    fig = _fig(4.4 + lw, 3.2, right=lw)
    ax = fig.add_subplot()
    for i, (row, name) in enumerate(zip(rows, names)):
        taus, rho = lb.profile_curves[row.label]
        ax.step(taus, rho, where="post", color=f"C{i % 10}", label=name)
    ax.set(xlabel="τ (time to target / best)", ylabel="fraction of tasks run", xlim=(1, taus[-1]), ylim=(-0.02, 1.02))
    _ticks(ax)
    fig.suptitle(f"Performance profile over {lb.n_profile_tasks} tasks (score, tasks run)")
    _legend_outside(ax)
    return save(fig, stem)


TASK_PLOTS = {
    "curves": plot_curves,
    "metric_vs_time": plot_metric_vs_time,
    "delta": plot_delta,
    "reliability": plot_reliability,
}


def fingerprint(board: TaskBoard) -> str:
    """Hash of everything a task's plots are drawn from: the aggregated table, every record's path, size and
    mtime (curves and reliability bins live in the records) and this module's source."""
    h = hashlib.sha1(Path(__file__).read_bytes())
    h.update(board.table.to_csv(index=False).encode())
    for r in sorted(board.runs, key=lambda r: r.path):
        try:
            st = os.stat(r.path)
            h.update(f"{r.path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{r.path}\0missing\n".encode())
    return h.hexdigest()


def task_plots(board: TaskBoard, out: Path, cache: bool = True) -> dict[str, tuple[Path, bytes]]:
    """All plots of one task: name -> (stem, PNG bytes); plots without data are skipped. With ``cache``, a
    task whose records and aggregates did not change since the last run keeps its files (matplotlib is most
    of the leaderboard's time, and most tasks do not change between two runs)."""
    stamp = out / ".cache" / f"{board.slug}.json"
    fp = fingerprint(board) if cache else ""
    if cache and stamp.exists():
        try:
            old = json.loads(stamp.read_text())
            if old["fingerprint"] == fp:
                stems = {name: out / f"{board.slug}_{name}" for name in old["plots"]}
                if all(s.with_suffix(".svg").exists() for s in stems.values()):
                    return {name: (st, st.with_suffix(".png").read_bytes()) for name, st in stems.items()}
        except (OSError, ValueError, KeyError):
            pass  # unreadable stamp or missing file: draw again
    done = {}
    for name, fn in TASK_PLOTS.items():
        stem = out / f"{board.slug}_{name}"
        png = fn(board, stem)
        if png is not None:
            done[name] = (stem, png)
        else:  # a plot that no longer has data must not linger from an earlier run
            for ext in (".png", ".svg"):
                stem.with_suffix(ext).unlink(missing_ok=True)
    if cache:
        atomic_write_bytes(stamp, json.dumps({"fingerprint": fp, "plots": list(done)}).encode())
    return done
