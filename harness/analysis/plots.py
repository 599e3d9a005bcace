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

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from harness.analysis.leaderboard import Leaderboard, TaskBoard

MAX_LINES = 6  # curves per plot: the baseline and the best configurations, more is unreadable
RC = {"svg.fonttype": "none", "font.size": 8, "axes.titlesize": 9, "legend.fontsize": 7, "figure.dpi": 100}


def _styled(fn):
    """Run a plotting function under RC: artists take their font sizes when created, not when saved."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(RC):
            return fn(*args, **kwargs)

    return wrapper


def save(fig: Figure, stem: str | Path) -> bytes:
    """Write ``stem``.png and ``stem``.svg; return the PNG bytes (embedded in the HTML page)."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with matplotlib.rc_context(RC):
        # fixed margins (no bbox_inches="tight", no constrained layout): each of those costs an extra draw
        fig.savefig(buf, format="png", dpi=100, pil_kwargs={"compress_level": 1})  # zlib level 6 is 10x slower
        fig.savefig(stem.with_suffix(".svg"), format="svg")
    png = buf.getvalue()
    stem.with_suffix(".png").write_bytes(png)
    return png


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
    """Keys to draw: the baseline and the best configurations."""
    keys = list(board.table.loc[board.table["n"] > 0, "key"])[:MAX_LINES]
    if board.baseline_key and board.baseline_key not in keys:
        keys = keys[: MAX_LINES - 1] + [board.baseline_key]
    return keys


@_styled
def plot_curves(board: TaskBoard, stem: Path) -> bytes | None:
    """Training loss and the evaluation metric per epoch: mean over seeds with a +-1 std band."""
    labels = dict(zip(board.table["key"], board.table["label"]))
    curves: dict[str, dict[str, dict[int, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    present: set[str] = set()
    shown = _shown(board)
    for r in board.runs:
        if r.status != "ok" or r.key not in shown:
            continue
        for p in r.curve:
            e = p.get("epoch")
            if e is None:
                continue
            for m, v in p.items():
                if isinstance(v, (int, float)) and m not in ("epoch", "step", "time_s", "lr") and math.isfinite(v):
                    curves[r.key][m][e].append(v)
                    present.add(m)
    evalm = next((m for m in (board.metric, "test_acc", "val_loss", "test_loss") if m in present), None)
    panels = [m for m in ("train_loss", evalm) if m and m in present]
    if not panels:
        return None
    fig = _fig(3.4 * len(panels), 2.9, top=0.5)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, m in zip(axes, panels):
        for i, key in enumerate(shown):
            pts = curves[key].get(m)
            if not pts:
                continue
            ep = np.array(sorted(pts))
            vals = [np.array(pts[e]) for e in ep]
            mu = np.array([v.mean() for v in vals])
            sd = np.array([v.std(ddof=1) if len(v) > 1 else 0.0 for v in vals])
            base = key == board.baseline_key
            ax.plot(ep, mu, color=f"C{i}", lw=1.8 if base else 1.2, ls="--" if base else "-", label=labels[key][:40])
            ax.fill_between(ep, mu - sd, mu + sd, color=f"C{i}", alpha=0.2, lw=0)
        ax.set(xlabel="epoch", ylabel=m)
        _ticks(ax)
    axes[0].legend(loc="upper right")  # an explicit place: loc="best" searches every data point
    fig.suptitle(f"{board.title}: mean ± std over seeds")
    return save(fig, stem)


@_styled
def plot_metric_vs_time(board: TaskBoard, stem: Path) -> bytes | None:
    """Primary metric against wall time per configuration (mean ± std over seeds), Pareto-optimal ones ringed."""
    t = board.table[board.table["n"] > 0]
    if t.empty or t["total_s"].isna().all():
        return None
    fig = _fig(4.6, 3.4)
    ax = fig.add_subplot()
    base = t["is_baseline"].to_numpy(bool)
    front = t["pareto"].to_numpy(bool)
    x, y, e = t["total_s"].to_numpy(float), t["mean"].to_numpy(float), t["std"].fillna(0).to_numpy(float)
    ax.errorbar(x[~base], y[~base], yerr=e[~base], fmt="o", ms=4, color="C0", alpha=0.7, label="configuration")
    if base.any():
        ax.errorbar(x[base], y[base], yerr=e[base], fmt="s", ms=6, color="k", label="baseline")
    if front.any():
        # rings, not a line: the front is over every joint-view objective, not just these two axes
        ax.scatter(x[front], y[front], s=90, facecolors="none", edgecolors="C3", label="Pareto-optimal (joint view)")
        for xi, yi, lab in list(zip(x[front], y[front], t["label"][front]))[:6]:
            ax.annotate(str(lab)[:28], (xi, yi), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel="wall time per run [s]", ylabel=board.metric)
    ax.legend(loc="lower right" if board.higher else "upper right")
    _ticks(ax)
    fig.suptitle(f"{board.title}: {board.metric} vs wall time")
    return save(fig, stem)


@_styled
def plot_delta(board: TaskBoard, stem: Path) -> bytes | None:
    """Delta vs the baseline with its 95% Welch interval; green/red = significantly better/worse."""
    t = board.table[~board.table["is_baseline"] & board.table["delta"].notna()]
    if t.empty or not board.baseline_key:
        return None
    t = t.sort_values("delta", ascending=board.higher).tail(40)  # best at the top
    d = t["delta"].to_numpy(float)
    lo = np.nan_to_num(d - t["delta_lo"].to_numpy(float))
    hi = np.nan_to_num(t["delta_hi"].to_numpy(float) - d)
    colors = ["tab:green" if b is True else "tab:red" if b is False else "0.6" for b in t["better"]]
    names = [str(s)[:45] for s in t["label"]]
    margin = 0.2 + 0.075 * max(map(len, names))  # inches of 8 pt tick labels
    fig = _fig(3.6 + margin, 1.0 + 0.2 * len(t), left=margin, right=0.3, bottom=0.5)
    ax = fig.add_subplot()
    yy = np.arange(len(t))
    ax.barh(yy, d, xerr=np.stack([lo, hi]), color=colors, error_kw={"lw": 0.8, "capsize": 2})
    ax.set_yticks(yy, names)
    ax.axvline(0, color="k", lw=0.8)
    _ticks(ax, y=False)
    better = "higher" if board.higher else "lower"
    ax.set(xlabel=f"Δ {board.metric} vs baseline ({better} is better), 95% CI")
    fig.suptitle(board.title)
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
    """AlgoPerf performance profile: fraction of tasks reaching the target within tau x the fastest."""
    if lb.profile is None or lb.profile.empty:
        return None
    fig = _fig(4.8, 3.2)
    ax = fig.add_subplot()
    for i, row in enumerate(lb.profile.head(top).itertuples()):
        taus, rho = lb.profile_curves[row.label]
        ax.step(taus, rho, where="post", color=f"C{i % 10}", label=f"{str(row.label)[:32]} ({row.score:.2f})")
    ax.set(xlabel="τ (time to target / best)", ylabel="fraction of tasks", xlim=(1, taus[-1]), ylim=(-0.02, 1.02))
    _ticks(ax)
    fig.suptitle(f"Performance profile over {int(lb.profile['tasks'].iloc[0])} tasks (score in legend)")
    ax.legend(loc="lower right")
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
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps({"fingerprint": fp, "plots": list(done)}))
    return done
