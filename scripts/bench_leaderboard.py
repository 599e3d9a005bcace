"""Benchmark `harness leaderboard` on synthetic records (issue target: 10,000 records, 20 tasks, <= 10 s on 2 cores).

    python scripts/bench_leaderboard.py                  # 10,000 records, in-process and subprocess timings
    python scripts/bench_leaderboard.py --records 2000 --keep /tmp/lb   # smaller, keep the tree to look at

Records follow schema 1 (harness.records): full config, task, technique (key/label/choices/config), metrics,
a 30-epoch curve, timings, throughput, memory; 2% diverged and 1% failed; calibration tasks carry reliability bins.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from harness.records import metric_directions, task_identity

MODELS = ["resnet18", "resnet34", "resnet50", "vit_tiny", "small_cnn"]
DATASETS = ["cifar10", "cifar100", "digits", "imagenette"]
OPTS = ["sgd", "adam", "adamw", "adamp", "lion"]
SCHEDS = ["cosine", "step", "constant", "linear", "wsd"]


def make_records(root: Path, n_records: int = 10_000, n_tasks: int = 20, epochs: int = 30, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    configs = [(o, s) for o in OPTS for s in SCHEDS]  # 25 technique configurations per task
    per_task = n_records // n_tasks
    seeds = max(1, per_task // len(configs))
    written = 0
    for ti in range(n_tasks):
        model, dataset = MODELS[ti % len(MODELS)], DATASETS[ti // len(MODELS) % len(DATASETS)]
        budget = f"{epochs}ep"
        base_acc = rng.uniform(0.6, 0.95)
        sweep = root / "sweeps" / "2025-01-01" / f"00-00-{ti:02d}"
        for ci, (opt, sched) in enumerate(configs):
            effect = rng.normal(0, 0.01)
            tech_cfg = {
                "optimizer": {"name": opt, "lr": 0.1 if opt == "sgd" else 1e-3, "weight_decay": 5e-4},
                "schedule": {"name": sched, "warmup_epochs": 2},
                "precision": {"name": "bf16"},
                "clip": {"name": "none"},
            }
            key = hashlib.sha1(json.dumps(tech_cfg, sort_keys=True).encode()).hexdigest()[:12]
            for s in range(seeds):
                if written >= n_records:
                    break
                u = rng.random()
                status = "failed" if u < 0.01 else "diverged" if u < 0.03 else "ok"
                acc = float(np.clip(base_acc + effect + rng.normal(0, 0.004), 0, 1))
                ece = float(abs(rng.normal(0.04, 0.01)))
                total = float(rng.uniform(100, 400))
                curve = [
                    {
                        "epoch": e,
                        "step": e * 98,
                        "time_s": total * e / epochs,
                        "lr": 0.1 * (1 - e / epochs),
                        "train_loss": float(2.3 * np.exp(-e / 8) + rng.normal(0, 0.01)),
                        "test_acc": float(acc * (1 - np.exp(-e / 5))),
                        "test_loss": float(2.3 * np.exp(-e / 9) + 0.2),
                    }
                    for e in range(1, epochs + 1)
                ]
                conf = np.linspace(0.05, 0.95, 15) + 1 / 30
                rec = {
                    "schema_version": 1,
                    "run_id": f"{ti}-{ci}-{s}",
                    "run_dir": str(sweep / f"{ci * seeds + s}_{model}_{dataset}_{opt}_s{s}"),
                    "status": status,
                    "error": None if status == "ok" else ("RuntimeError: CUDA out of memory" if status == "failed" else "loss is nan at step 1234"),
                    "config": {"model": {"name": model, "depth": 18}, "dataset": {"name": dataset, "val_size": 5000},
                               **tech_cfg, "trainer": {"epochs": epochs, "batch_size": 512, "target": 0.8}, "seed": s},
                    "choices": {"model": model, "dataset": dataset, "optimizer": opt, "schedule": sched},
                    "task": {"name": f"{model}-{dataset}", "model": model, "dataset": dataset, "budget": budget,
                             "epochs": epochs, "max_steps": None, "batch_size": 512, "target": 0.8,
                             "baseline": {"optimizer": "sgd", "schedule": "cosine"}},
                    "technique": {"key": key, "label": f"{opt}+{sched}",
                                  "choices": {"optimizer": opt, "schedule": sched, "precision": "bf16", "clip": "none",
                                              "normalization": "default", "regularization": "none",
                                              "calibration": "none", "quantization": "none"},
                                  "config": tech_cfg},
                    "run_key": hashlib.sha1(f"{ti}{ci}{s}".encode()).hexdigest()[:16],
                    "seed": s,
                    "metrics": {} if status == "failed" else {
                        "test_acc": acc, "test_top5": min(1.0, acc + 0.05), "test_loss": 0.3, "train_loss": 0.1,
                        "test_ece": ece, "test_ece_after": ece / 3, "test_nll": 0.3, "test_brier": 0.1},
                    "curve": curve if status == "ok" else curve[:5],
                    "timing": {"total_s": total, "train_s": total * 0.9, "eval_s": total * 0.1,
                               "time_to_target_s": total * 0.6 if acc > 0.8 else None, "target_epoch": 18},
                    "throughput": {"samples_per_s": float(rng.uniform(5e3, 2e4))},
                    "memory": {"peak_bytes": int(rng.uniform(1e9, 8e9))},
                    "hardware": {"device": "cuda", "device_name": "NVIDIA H100", "world_size": 1},
                    "model_info": {"params": 11_000_000, "flops_per_sample": 5.5e8},
                    "techniques": {"calibration": {"reliability": {
                        "before": {"confidence": conf.tolist(), "accuracy": (conf - 0.05).clip(0, 1).tolist(), "count": [100] * 15},
                        "after": {"confidence": conf.tolist(), "accuracy": (conf - 0.01).clip(0, 1).tolist(), "count": [100] * 15},
                    }}} if ti % 4 == 0 else {},
                    "versions": {"python": "3.11", "torch": "2.4", "cuda": "12.4", "harness": "0.1.0", "git_commit": "abc"},
                    "requeues": 0,
                    "started_at": "2025-01-01T00:00:00",
                    "finished_at": "2025-01-01T00:05:00",
                }  # fmt: skip
                # the task/technique contract of new records (task key and identity, metric directions, environment)
                identity = task_identity(rec["config"])
                rec["task"] |= {
                    "metric": "acc",
                    "direction": "max",
                    "split": "val",
                    "report_split": "test",
                    "min_seeds": 3,
                    "identity": identity,
                    "key": hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12],
                }
                rec["metric_directions"] = metric_directions(rec["metrics"], rec["task"])
                rec["environment"] = {"device": "cuda", "threads": 8, "deterministic": False}
                d = Path(rec["run_dir"])
                d.mkdir(parents=True, exist_ok=True)
                (d / "result.json").write_text(json.dumps(rec, indent=2))
                written += 1
    return written


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=10_000)
    ap.add_argument("--tasks", type=int, default=20)
    ap.add_argument("--keep", default=None, help="write the records here and keep them (default: a temp dir)")
    ap.add_argument("--no-subprocess", action="store_true", help="only time the in-process call")
    args = ap.parse_args()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_leaderboard_"))
    try:
        t0 = time.perf_counter()
        if args.keep and (root / "results").is_dir():
            print(f"reusing the records under {root / 'results'}")
        else:
            n = make_records(root / "results", args.records, args.tasks)
            size = sum(f.stat().st_size for f in (root / "results").rglob("result.json"))
            print(
                f"generated {n} records ({size / 2**20:.0f} MiB), {args.tasks} tasks, {time.perf_counter() - t0:.1f} s"
            )
        for d in ("lb_inproc", "lb_subproc"):  # time a first run (every plot drawn), not a cached one
            shutil.rmtree(root / d, ignore_errors=True)
        from harness.analysis.command import cli

        t0, c0 = time.perf_counter(), os.times()
        rc = cli(["--results", str(root / "results"), "--out", str(root / "lb_inproc"), "--quiet"])
        t_in, c1 = time.perf_counter() - t0, os.times()
        cpu = sum(c1[:4]) - sum(c0[:4])  # user + system, this process and its plot workers
        print(f"in-process  harness.analysis.leaderboard.cli: {t_in:.2f} s wall, {cpu:.2f} s CPU (rc={rc})")
        t0, c0 = time.perf_counter(), os.times()
        cli(["--results", str(root / "results"), "--out", str(root / "lb_inproc"), "--quiet"])
        t_re, c1 = time.perf_counter() - t0, os.times()
        print(f"second run, plots unchanged (cached): {t_re:.2f} s wall, {sum(c1[:4]) - sum(c0[:4]):.2f} s CPU")
        if not args.no_subprocess:
            cmd = [sys.executable, "-m", "harness.analysis.command", "--results", str(root / "results")]
            cmd += ["--out", str(root / "lb_subproc"), "--quiet"]
            t0 = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True)
            t_sub = time.perf_counter() - t0
            print(
                f"subprocess  python -m harness.analysis.command: {t_sub:.2f} s (rc={p.returncode}, includes imports)"
            )
            if p.returncode:
                print(p.stderr[-2000:], file=sys.stderr)
        print(f"cpu cores: {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}, target: <= 10 s")
        return rc
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
