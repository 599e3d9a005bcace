"""Local sweeps: joblib in parallel, concurrent record writes, and ``sweep.skip_completed``."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.records import RECORD_NAME, read_record, write_record
from harness.run.checkpoint import load_checkpoint

pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="pip install -e .[cluster] (hydra-joblib-launcher)")

SWEEP = ["task=quickstart", "trainer.epochs=1", "trainer.progress=none", "seed=0,1,2,3"]


def harness_run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "harness", "run", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def records(root: Path) -> dict[Path, dict]:
    return {p: json.loads(p.read_text()) for p in sorted(root.rglob(RECORD_NAME))}


@pytest.fixture(scope="module")
def joblib_sweep(tmp_path_factory):
    """One 4-run sweep with hydra/launcher=parallel (joblib), 2 runs at a time."""
    root = tmp_path_factory.mktemp("sweep")
    results = root / "results"
    proc = harness_run(
        "-m", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", *SWEEP, f"results_dir={results}", cwd=root
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, results


def test_joblib_sweep_writes_four_valid_records(joblib_sweep):
    _, results = joblib_sweep
    recs = records(results)
    assert len(recs) == 4
    assert sorted(r["seed"] for r in recs.values()) == [0, 1, 2, 3]
    assert all(r["status"] == "ok" and r["metrics"]["test_acc"] > 0.3 for r in recs.values())
    assert len({r["run_key"] for r in recs.values()}) == 4
    # all four under one sweep dir, one job dir each
    assert len({p.parent.parent for p in recs}) == 1 and all("sweeps" in p.parts for p in recs)


def test_skip_completed_reruns_nothing_then_exactly_the_missing_run(joblib_sweep):
    root, results = joblib_sweep
    before = records(results)
    mtimes = {p: p.stat().st_mtime_ns for p in before}
    # the same sweep again; Hydra's basic launcher (in-process) keeps the test fast, the skip
    # happens in each job whatever the launcher
    args = ["-m", *SWEEP, f"results_dir={results}", "sweep.skip_completed=true"]

    proc = harness_run(*args, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (proc.stdout + proc.stderr).count("skipping: an ok record of this configuration exists") == 4
    after = records(results)
    assert after.keys() == before.keys(), "a completed run was run again"
    assert all(p.stat().st_mtime_ns == mtimes[p] for p in after)

    gone = next(p for p, r in before.items() if r["seed"] == 2)
    gone.unlink()
    proc = harness_run(*args, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = records(results)
    new = [p for p in final if p not in before]
    assert len(final) == 4 and len(new) == 1, new
    assert final[new[0]]["seed"] == 2 and final[new[0]]["run_key"] == before[gone]["run_key"]
    assert all(p.stat().st_mtime_ns == mtimes[p] for p in final if p in mtimes)


def _writer(results: str, i: int, rounds: int) -> None:
    run_dir = Path(results) / "sweeps" / "d" / "t" / f"{i}_job"
    # ~150 kB per record, rewritten several times, so a non-atomic write would be caught half-done
    rec = {
        "schema_version": 1,
        "run_id": f"r{i}",
        "status": "ok",
        "seed": i,
        "curve": [{"epoch": e, "train_loss": 0.5} for e in range(4000)],
    }
    for r in range(rounds):
        rec["round"] = r
        write_record(run_dir, rec)


def _reader(results: str, stop, bad) -> None:
    while not stop.is_set():
        for p in Path(results).rglob(RECORD_NAME):
            try:
                read_record(p)
            except FileNotFoundError:
                pass
            except ValueError:
                bad.value += 1


def test_sixteen_processes_write_records_into_one_results_dir(tmp_path):
    ctx = mp.get_context("fork")  # the children only write JSON
    stop, bad = ctx.Event(), ctx.Value("i", 0)
    reader = ctx.Process(target=_reader, args=(str(tmp_path), stop, bad))
    reader.start()
    writers = [ctx.Process(target=_writer, args=(str(tmp_path), i, 3)) for i in range(16)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(120)
    stop.set()
    reader.join(60)
    assert all(w.exitcode == 0 for w in writers)
    recs = records(tmp_path)
    assert len(recs) == 16
    assert sorted(r["seed"] for r in recs.values()) == list(range(16))
    assert all(r["round"] == 2 and len(r["curve"]) == 4000 for r in recs.values())
    assert bad.value == 0, f"a reader saw {bad.value} half-written records"
    assert not [p for p in tmp_path.rglob("*.tmp")], "temp files left behind"


def test_sigterm_checkpoints_mid_epoch_and_resume_is_exact(tmp_path):
    """SIGTERM (what `scontrol requeue` / a preemption's grace end sends) during epoch 2: the run
    checkpoints after the current step and exits 143; `resume=true` continues mid-epoch and ends
    with the same result as an uninterrupted run, one record, requeues == 1."""
    import signal

    args = ["task=quickstart", "trainer.epochs=3", "trainer.log_every=1", "trainer.progress=plain"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "harness", "run", *args, f"results_dir={tmp_path / 'cut'}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = []
    for line in proc.stdout:
        out.append(line)
        if "epoch 2/3 step 5/" in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=300)
    out = "".join(out) + rest
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert not list((tmp_path / "cut").rglob(RECORD_NAME))
    (ckpt,) = (tmp_path / "cut").rglob("checkpoint.pt")

    state = load_checkpoint(ckpt)  # checksummed: read through the harness
    assert state["epoch"] == 1 and state["partial"]["batch"] >= 5  # mid-epoch 2, not the epoch-1 checkpoint

    resumed = harness_run(*args, f"results_dir={tmp_path / 'cut'}", "resume=true", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = harness_run(*args, f"results_dir={tmp_path / 'whole'}", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    (rec,), (ref,) = records(tmp_path / "cut").values(), records(tmp_path / "whole").values()
    assert rec["status"] == "ok" and rec["requeues"] == 1 and ref["requeues"] == 0
    assert rec["steps"] == ref["steps"] and [p["epoch"] for p in rec["curve"]] == [1, 2, 3]
    # same batches, same RNG state, same optimizer state: the interruption changes nothing
    assert rec["metrics"]["test_loss"] == pytest.approx(ref["metrics"]["test_loss"], rel=1e-5)
    assert [p["train_loss"] for p in rec["curve"]] == pytest.approx([p["train_loss"] for p in ref["curve"]], rel=1e-5)
    assert not list((tmp_path / "cut").rglob("checkpoint.pt"))
