"""The foundation: `harness run` trains, writes one trustworthy record, fails honestly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, harness, records

QUICK = ("task=quickstart", "trainer.progress=none")


def test_quickstart_learns_and_writes_a_valid_record(tmp_path):
    p = harness("run", *QUICK, f"results_dir={tmp_path}")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "test: test_acc" in p.stdout
    (rec,) = records(tmp_path)
    assert rec["status"] == "ok" and rec["error"] is None
    assert rec["metrics"]["test_acc"] >= 0.90
    assert rec["schema_version"] == 1
    task = rec["task"]
    assert task["name"] == "quickstart" and task["budget"] == "15ep" and len(task["key"]) == 12
    assert (task["metric"], task["direction"], task["split"], task["report_split"]) == ("acc", "max", "val", "test")
    assert task["identity"]["dataset"]["val_size"] == 300  # the task carves its validation split
    assert rec["dataset_info"]["sizes"] == {"train": 1137, "val": 300, "test": 360}
    assert rec["metric_directions"]["test_acc"] == "max" and rec["metric_directions"]["test_ece"] == "min"
    assert rec["environment"]["device"] == "cpu" and rec["environment"]["threads"] >= 1
    assert rec["technique"]["choices"]["optimizer"] == "sgd"
    assert rec["config"]["optimizer"]["lr"] == 0.05  # the preset's baseline recipe applied to its baseline optimizer
    assert len(rec["curve"]) == 15 and rec["curve"][-1]["epoch"] == 15
    assert rec["timing"]["total_s"] > 0 and rec["throughput"]["samples_per_s"] > 0
    assert rec["timing"]["time_to_target_s"] is not None  # target 0.9 was reached
    assert rec["timing"]["target_metric"] == "val_acc"  # read on validation, never on test
    first = next(c for c in rec["curve"] if c["epoch"] == rec["timing"]["target_epoch"])
    assert first["val_acc"] >= 0.9 and "test_acc" not in rec["curve"][0]  # test only at the end
    assert rec["memory"]["estimated_peak_bytes"] > 0 and rec["memory"]["peak_bytes"] > 0
    assert rec["model_info"]["params"] > 0 and rec["model_info"]["flops_per_sample"] > 0
    for key in ("torch", "python", "harness", "git_commit"):
        assert key in rec["versions"]
    run_dir = Path(rec["run_dir"])
    assert run_dir.parent.parent.name == "runs" and run_dir.name.endswith("_small_cnn_digits_sgd_s0")
    assert not (run_dir / "checkpoint.pt").exists()  # removed once the run is complete


def test_same_seed_gives_identical_metrics(tmp_path):
    outs = []
    for i in range(2):
        p = harness("run", *QUICK, "trainer.epochs=3", "seed=7", f"results_dir={tmp_path / str(i)}")
        assert p.returncode == 0, p.stderr[-3000:]
        outs.append(records(tmp_path / str(i))[0])
    a, b = outs
    assert a["metrics"]["test_acc"] == b["metrics"]["test_acc"]
    assert a["metrics"]["test_loss"] == b["metrics"]["test_loss"]
    assert [c["train_loss"] for c in a["curve"]] == [c["train_loss"] for c in b["curve"]]
    assert a["run_key"] == b["run_key"]


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    args = (*QUICK, "trainer.epochs=8", "seed=3")
    ref = harness("run", *args, f"results_dir={tmp_path / 'ref'}")
    assert ref.returncode == 0, ref.stderr[-3000:]
    (expected,) = records(tmp_path / "ref")

    run_dir = tmp_path / "interrupted" / "run"
    cmd = [
        sys.executable,
        "-m",
        "harness",
        "run",
        *args,
        f"results_dir={tmp_path / 'interrupted'}",
        f"hydra.run.dir={run_dir}",
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "killed.log", "w"),  # noqa: SIM115  (a file: a full pipe would stall the run)
        env={"OMP_NUM_THREADS": "1", **os.environ, "HARNESS_OFFLINE": "1"},  # as harness() runs: same run key
    )
    ckpt = run_dir / "checkpoint.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    err = (tmp_path / "killed.log").read_text()
    assert ckpt.exists() and not (run_dir / "result.json").exists(), f"the run must be killed mid-way: {err[-2000:]}"

    again = harness("run", *args, f"results_dir={tmp_path / 'interrupted'}", f"hydra.run.dir={run_dir}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr + again.stdout
    resumed = json.loads((run_dir / "result.json").read_text())
    assert resumed["requeues"] == 1
    assert resumed["metrics"]["test_acc"] == expected["metrics"]["test_acc"]
    assert resumed["metrics"]["test_loss"] == expected["metrics"]["test_loss"]
    assert [c["train_loss"] for c in resumed["curve"]] == [c["train_loss"] for c in expected["curve"]]


def test_nan_loss_is_recorded_as_diverged(tmp_path):
    p = harness("run", *QUICK, "optimizer.lr=1e8", "trainer.epochs=3", f"results_dir={tmp_path}")
    assert p.returncode == 1
    assert "diverged" in p.stderr
    (rec,) = records(tmp_path)
    assert rec["status"] == "diverged" and "non-finite" in rec["error"]


def test_multirun_with_one_failing_job_keeps_every_record(tmp_path):
    # a learning rate of 1e6 passes every check and makes the loss non-finite after the run has started
    p = harness("run", "-m", *QUICK, "trainer.epochs=1", "optimizer.lr=0.05,1e6,0.1", f"results_dir={tmp_path}")
    assert p.returncode != 0  # the sweep reports the failure
    recs = records(tmp_path)
    assert len(recs) == 3
    by_lr = {r["config"]["optimizer"]["lr"]: r for r in recs}
    assert by_lr[1e6]["status"] == "diverged" and by_lr[1e6]["error"]
    assert by_lr[0.05]["status"] == by_lr[0.1]["status"] == "ok"
    assert all("/sweeps/" in r["run_dir"] for r in recs)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model=resnet9", "unknown model 'resnet9'"),
        ("optimizer=adamx", "unknown optimizer 'adamx'"),
        ("trainer.epochs=-1", "trainer.epochs=-1"),
        ("trainer.epochs=abc", "trainer.epochs='abc'"),
        ("dataset=cifar10", "cifar-10-batches-py"),
    ],
)
def test_bad_input_fails_clearly_and_leaves_no_files(tmp_path, override, message):
    results = tmp_path / "results"
    p = harness("run", *QUICK, override, f"results_dir={results}", f"data_dir={tmp_path / 'nodata'}")
    assert p.returncode == 2, p.stderr[-2000:]
    assert message in p.stderr
    if override.startswith(("model=", "optimizer=")):
        assert "Valid choices:" in p.stderr
    leftovers = [f for f in results.rglob("*") if f.is_file()] if results.exists() else []
    assert leftovers == []


def test_unwritable_results_dir_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root without CAP restrictions)")
        p = harness("run", *QUICK, f"results_dir={locked / 'results'}")
        assert p.returncode == 2 and "not writable" in p.stderr
    finally:
        locked.chmod(0o700)


def test_results_dir_on_a_read_only_filesystem_is_refused():
    p = harness("run", *QUICK, "results_dir=/proc/harness-results")
    assert p.returncode == 2
    assert "results_dir=/proc/harness-results is not writable" in p.stderr


def test_cli_list_and_unknown_subcommand():
    p = harness("list")
    assert p.returncode == 0
    for group in ("model:", "dataset:", "optimizer:", "schedule:", "precision:", "task:", "study:"):
        assert group in p.stdout
    p = harness("list", "optimizer")
    assert p.returncode == 0 and "sgd" in p.stdout and "adamw" in p.stdout and "Loshchilov" in p.stdout
    p = harness("list", "optimizers")
    assert p.returncode == 2 and "Did you mean: optimizer" in p.stderr
    p = harness("trian")
    assert p.returncode == 2 and "unknown command 'trian'. Did you mean: run?" in p.stderr
    assert "Valid choices: leaderboard, list, plot, run" in p.stderr


def test_cifar10_small_cnn_learns_on_real_data(tmp_path, real_cifar10):
    """CIFAR-10 rebuilt in the official pickle layout from the shared JPEG copy: one epoch on 5,000 images."""
    out = real_cifar10
    p = harness(
        "run",
        "model=small_cnn",
        "dataset=cifar10",
        "+dataset.train_subset=5000",
        "dataset.val_size=0",
        "trainer.epochs=1",
        "trainer.batch_size=64",
        "optimizer.lr=0.05",
        "schedule.warmup_epochs=0",
        "trainer.progress=none",
        f"data_dir={out}",
        f"results_dir={tmp_path / 'results'}",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    (rec,) = records(tmp_path / "results")
    assert rec["dataset_info"]["train_subset"] == 5000
    assert rec["metrics"]["test_acc"] >= 0.30
