"""Sweeps on a real SLURM cluster through Hydra's submitit launcher (``hydra/launcher=slurm``).

Needs the single-node cluster of scripts/slurm/start-local-slurm.sh (scripts/ci_slurm.sh starts
it, runs ``pytest -m slurm`` and stops it). Deselected by default (pyproject addopts).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

# CPU-only single-node test cluster: no GPU, one CPU per job, memory not a consumable resource
CLUSTER = [
    "hydra/launcher=slurm",
    "hydra.launcher.gpus_per_node=null",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=null",
    "hydra.launcher.timeout_min=10",
]
QUICK = ["task=quickstart", "trainer.progress=none"]


def _cluster_up() -> str | None:
    """None when a SLURM controller answers and a node is up, else the reason to skip."""
    if shutil.which("sinfo") is None or shutil.which("sacct") is None:
        return "SLURM client tools (sinfo, sacct) not installed: run scripts/slurm/start-local-slurm.sh"
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    if "UP" not in ping.stdout:
        return f"no SLURM controller answers (scontrol ping: {ping.stdout.strip() or ping.stderr.strip()})"
    states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True).stdout.split()
    if not any(s.rstrip("*~#") in ("idle", "mixed", "allocated", "completing") for s in states):
        return f"no SLURM node is up (sinfo states: {states})"
    if subprocess.run(["sacct", "-n", "-X", "-S", "now"], capture_output=True).returncode != 0:
        return "SLURM accounting (sacct) is not available"
    return None


@pytest.fixture(scope="module", autouse=True)
def cluster():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e .[cluster]")
    reason = _cluster_up()
    if reason:
        pytest.skip(reason)


def harness(*args: str, cwd: Path, background: bool = False):
    cmd = [sys.executable, "-m", "harness", "run", "-m", *CLUSTER, *QUICK, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if background:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def sacct_states(name: str, expect: int, timeout: float = 60) -> dict[str, str]:
    """JobID -> final State of the jobs named ``name`` (rows can lag the job's end by a few seconds)."""
    deadline = time.time() + timeout
    while True:
        out = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-S", "now-1hours", "--name", name, "-o", "JobID,State"],
            capture_output=True,
            text=True,
        ).stdout
        states = dict(line.split("|", 1) for line in out.split())
        done = {k: v for k, v in states.items() if v not in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING")}
        if len(done) >= expect or time.time() > deadline:
            return states
        time.sleep(1)


def records(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.rglob("result.json"))]


def test_four_job_sweep_completes_with_four_records(tmp_path):
    name = f"harness-sweep-{uuid.uuid4().hex[:8]}"
    proc = harness(
        "trainer.epochs=1", "seed=0,1,2,3", f"hydra.launcher.name={name}", f"results_dir={tmp_path}", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recs = records(tmp_path)
    assert sorted(r["seed"] for r in recs) == [0, 1, 2, 3]
    assert all(r["status"] == "ok" for r in recs)
    states = sacct_states(name, 4)
    assert sorted(states.values()) == ["COMPLETED"] * 4, states
    # submitit's own logs say the same
    logs = list(tmp_path.rglob(".submitit/*/*_log.out"))
    assert len(logs) == 4 and all("Job completed successfully" in p.read_text() for p in logs)


def test_failed_run_is_failed_in_slurm_and_in_its_record(tmp_path):
    name = f"harness-fail-{uuid.uuid4().hex[:8]}"
    # a learning rate of 1e6 passes every check (bad input is refused before any job) and makes the loss
    # non-finite after the run started: a `diverged` record, and a job that exits non-zero
    proc = harness(
        "trainer.epochs=1", "optimizer.lr=1e6", f"hydra.launcher.name={name}", f"results_dir={tmp_path}", cwd=tmp_path
    )
    assert proc.returncode != 0  # the sweep reports the failed job
    (rec,) = records(tmp_path)
    assert rec["status"] == "diverged" and "non-finite training loss" in rec["error"]
    states = sacct_states(name, 1)
    assert list(states.values()) == ["FAILED"], states


def test_preempted_job_resumes_from_its_checkpoint(tmp_path):
    name = f"harness-preempt-{uuid.uuid4().hex[:8]}"
    # 15 epochs of the quickstart take long enough to be interrupted after the first checkpoint
    sweep = harness(
        "trainer.epochs=15", f"hydra.launcher.name={name}", f"results_dir={tmp_path}", cwd=tmp_path, background=True
    )
    try:
        deadline = time.time() + 300
        while not list(tmp_path.rglob("checkpoint.pt")):  # epoch 1 is done: there is progress to keep
            assert sweep.poll() is None, sweep.stdout.read()
            assert time.time() < deadline, "the job never wrote a checkpoint"
            time.sleep(0.5)
        job = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True, text=True).stdout.split()
        assert len(job) == 1, job
        # what SLURM sends before a time limit or a preemption (--signal=USR2@signal_delay_s)
        subprocess.run(["scancel", "--signal=USR2", job[0]], check=True)
        out, _ = sweep.communicate(timeout=600)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode == 0, out[-3000:]
    (rec,) = records(tmp_path)
    assert rec["status"] == "ok" and rec["requeues"] >= 1
    assert rec["epochs_completed"] == 15 and [p["epoch"] for p in rec["curve"]] == list(range(1, 16))
    assert not list(tmp_path.rglob("checkpoint.pt"))  # removed once the record is written
    log = "".join(p.read_text() for p in tmp_path.rglob(".submitit/*/*_log.*"))
    assert "handing over to submitit to requeue" in log and "Requeued job" in log
    assert "resumed from" in log
    assert list(sacct_states(name, 1).values()) == ["COMPLETED"]


def test_a_study_launches_its_runs_on_slurm(tmp_path):
    """`harness study smoke -m hydra/launcher=slurm`: every tuning and seed run is a SLURM job, the study
    selects on validation and writes its report; a second invocation submits nothing."""
    name = f"harness-study-{uuid.uuid4().hex[:8]}"
    args = [
        sys.executable, "-m", "harness", "study", "smoke", "-m", *CLUSTER, f"hydra.launcher.name={name}",
        "study.budget=1", "study.seeds=2", 'study.overrides=["trainer.epochs=1","trainer.progress=none"]',
        f"results_dir={tmp_path}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    study = json.loads((tmp_path / "studies" / "smoke" / "study.json").read_text())
    assert all(a["budget_trials"] == 1 and len(a["runs"]) == 2 for a in study["arms"])
    assert study["verdict"]["verdict"] in ("reproduced", "contradicted", "inconclusive")
    states = sacct_states(name, expect=2 * (1 + 2))
    assert len(states) == 6 and set(states.values()) == {"COMPLETED"}, states
    again = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "launching 0" in again.stdout + again.stderr
    assert len(sacct_states(name, expect=6)) == 6  # nothing new was submitted
