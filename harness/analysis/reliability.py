"""``harness plot reliability RUN_DIR``: reliability diagrams of one run before and after post-hoc calibration.

Reads ``RUN_DIR/result.json`` (title, ECE values) and ``RUN_DIR/calibration_logits.pt`` (test logits before
and after calibration and the labels, written by ``harness.techniques.calibration``), and writes
``RUN_DIR/reliability.png``: per stage, the accuracy of each equal-width confidence bin against the
diagonal of perfect calibration, with the gap to the bin's mean confidence shaded (Guo et al. 2017,
Figure 1), and the number of samples per bin underneath. A run without post-hoc calibration has no
logits file; its diagram is drawn from ``record["reliability"]`` when the record carries bins.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from harness.errors import ConfigError
from harness.metrics.calibration import N_BINS, calibration_metrics, reliability_bins

LOGITS_FILE = "calibration_logits.pt"  # same name as harness.techniques.calibration.LOGITS_FILE


def load_stages(run_dir: Path, n_bins: int) -> tuple[dict[str, dict[str, Any]], dict[str, float], dict[str, Any]]:
    """(stage -> bins, stage -> ECE, record) from a run directory."""
    record_path = run_dir / "result.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    logits_path = run_dir / LOGITS_FILE
    if logits_path.exists():
        import torch

        saved = torch.load(logits_path, map_location="cpu")
        method = saved.get("method", "calibrated")
        stages, eces = {}, {}
        for stage, key in (("before", "logits"), (f"after {method}", "calibrated")):
            stages[stage] = reliability_bins(saved[key].float().softmax(-1), saved["labels"], n_bins)
            eces[stage] = calibration_metrics(saved[key], saved["labels"], n_bins=n_bins)["test_ece"]
        return stages, eces, record
    rel = record.get("reliability") or {}
    stages = {k: v for k, v in rel.items() if isinstance(v, dict) and "count" in v}
    if not stages:
        raise ConfigError(
            f"{logits_path} not found and {record_path} has no reliability bins: the logits file is written by runs "
            "with post-hoc calibration (calibration=temperature|vector|matrix|isotonic|histogram)"
        )
    eces = {}
    for k, b in stages.items():
        c = np.asarray(b["count"], float)
        gap = np.abs(
            np.nan_to_num(np.asarray(b["accuracy"], float)) - np.nan_to_num(np.asarray(b["confidence"], float))
        )
        eces[k] = float((c * gap).sum() / max(c.sum(), 1))
    return stages, eces, record


def draw(stages: dict[str, dict[str, Any]], eces: dict[str, float], title: str) -> Figure:
    fig = Figure(figsize=(3.4 * len(stages), 4.6))
    grid = fig.add_gridspec(2, len(stages), height_ratios=(3, 1), hspace=0.08, wspace=0.3)
    for col, (stage, b) in enumerate(stages.items()):
        edges = np.asarray(b["edges"], float)
        width, left = np.diff(edges), edges[:-1]
        count = np.asarray(b["count"], float)
        acc = np.nan_to_num(np.asarray(b["accuracy"], float))
        conf = np.nan_to_num(np.asarray(b["confidence"], float))
        m = count > 0
        ax = fig.add_subplot(grid[0, col])
        ax.bar(left[m], acc[m], width[m], align="edge", color="tab:blue", edgecolor="black", lw=0.5, label="accuracy")
        lo, hi = np.minimum(acc, conf)[m], np.abs(acc - conf)[m]
        ax.bar(
            left[m],
            hi,
            width[m],
            bottom=lo,
            align="edge",
            facecolor="none",
            edgecolor="tab:red",
            hatch="///",
            lw=0.8,
            label="gap to confidence",
        )
        ax.plot([0, 1], [0, 1], ls="--", color="0.4", lw=1)
        ax.set(xlim=(0, 1), ylim=(0, 1), title=f"{stage}: ECE {100 * eces[stage]:.2f}%")
        ax.tick_params(labelbottom=False)
        ax.set_ylabel("accuracy" if col == 0 else "")
        ax.legend(loc="upper left", fontsize=8)
        ax2 = fig.add_subplot(grid[1, col], sharex=ax)
        ax2.bar(left, count, width, align="edge", color="0.6", edgecolor="black", lw=0.5)
        ax2.set_yscale("log" if count.max() > 50 * max(np.median(count[m]), 1) else "linear")
        ax2.set(xlim=(0, 1), xlabel="confidence")
        ax2.set_ylabel("samples" if col == 0 else "")
    fig.suptitle(title, fontsize=10, parse_math=False)  # task and label come from the record: plain text
    return fig


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="harness plot", description="Plots of one run.")
    p.add_argument("kind", choices=["reliability"], help="reliability: diagram before/after post-hoc calibration")
    p.add_argument("run_dir", type=Path, help="a run directory (holding result.json)")
    p.add_argument("--bins", type=int, default=N_BINS, help=f"equal-width confidence bins (default {N_BINS})")
    p.add_argument("--out", type=Path, default=None, help="output PNG (default RUN_DIR/reliability.png)")
    args = p.parse_args(argv)
    if not args.run_dir.is_dir():
        raise ConfigError(f"run directory {args.run_dir} does not exist")
    if args.bins < 1:
        raise ConfigError(f"--bins={args.bins} must be a positive integer")
    stages, eces, record = load_stages(args.run_dir, args.bins)
    task = (record.get("task") or {}).get("name", args.run_dir.name)
    label = (record.get("technique") or {}).get("label", "")
    fig = draw(stages, eces, f"{task} {label} (seed {record.get('seed', '?')})".strip())
    out = args.out or args.run_dir / "reliability.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(out)
    return 0
