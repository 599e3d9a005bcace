"""A sweep lists every job's outcome and exits non-zero when any job did not succeed; an
inapplicable choice or a damaged data file does not stop the other jobs; a SIGTERM'd sweep says how
to continue and continuing works (issue 14 items 1, 2, 15; issue 18 item 4)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, harness, records

TASK = "task=quickstart" if (ROOT / "conf" / "task").is_dir() else "experiment=quickstart"
QUICK = (TASK, "trainer.epochs=1", "trainer.progress=none")


def summary_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if re.match(r"  #\d+ ", ln)]


@pytest.fixture(scope="module")
def damaged_cifar(tmp_path_factory) -> Path:
    from tests.test_data_cifar import write_cifar10

    data = tmp_path_factory.mktemp("data")
    write_cifar10(data)
    batch = data / "cifar-10-batches-py" / "data_batch_2"
    batch.write_bytes(batch.read_bytes()[:100])
    return data


def test_sweep_lists_every_outcome_and_exits_non_zero(tmp_path, damaged_cifar):
    results = tmp_path / "results"
    # ok, diverged (lr 1e8), refused (skipinit needs residual blocks), damaged data (cifar10)
    p = harness(
        "run",
        "-m",
        *QUICK,
        "optimizer.lr=0.05,1e8",
        "normalization=default,skipinit",
        f"results_dir={results}",
        f"data_dir={damaged_cifar}",
        "hydra.sweep.dir=" + str(results / "sweep"),
    )
    assert p.returncode == 1, p.stderr[-3000:]
    lines = summary_lines(p.stderr)
    assert len(lines) == 4, p.stderr[-3000:]
    status = {ln.split()[0]: ln.split()[1] for ln in lines}
    assert status == {"#0": "ok", "#1": "refused", "#2": "diverged", "#3": "refused"}
    assert "sweep summary (4 jobs: 1 ok, 1 diverged, 2 refused)" in p.stderr
    assert "normalization=skipinit" in p.stderr and "does not apply" in p.stderr
    # refused jobs leave no run directory and no record; the others have records
    assert sorted(r["status"] for r in records(results)) == ["diverged", "ok"]
    jobs = sorted(d.name for d in (results / "sweep").iterdir() if d.name[0].isdigit())
    assert [j.split("_")[0] for j in jobs] == ["0", "2"]
    outcomes = sorted((results / "sweep" / "outcomes").glob("*.json"))
    assert [json.loads(o.read_text())["status"] for o in outcomes] == ["ok", "refused", "diverged", "refused"]
    # the leaderboard reads the records of the sweep
    lb = harness("leaderboard", "--results", str(results), "--out", str(tmp_path / "lb"))
    assert lb.returncode == 0, lb.stderr[-3000:]


def test_damaged_data_in_a_sweep_is_refused_and_the_sweep_goes_on(tmp_path, damaged_cifar):
    results = tmp_path / "results"
    p = harness("run", "-m", *QUICK, "dataset=digits,cifar10", f"results_dir={results}", f"data_dir={damaged_cifar}")
    assert p.returncode == 2, p.stderr[-3000:]  # non-zero; 2: the only failures are refusals (bad input)
    lines = summary_lines(p.stderr)
    assert [ln.split()[1] for ln in lines] == ["ok", "refused"], p.stderr[-3000:]
    assert "data_batch_2 is not a readable CIFAR batch file" in p.stderr and "Delete" in p.stderr
    assert [r["config"]["dataset"]["name"] for r in records(results)] == ["digits"]


def test_a_sweep_of_refusals_only_exits_2(tmp_path):
    p = harness("run", "-m", *QUICK, "normalization=skipinit,nf", f"results_dir={tmp_path}")
    assert p.returncode == 2, p.stderr[-3000:]
    assert [ln.split()[1] for ln in summary_lines(p.stderr)] == ["refused", "refused"]
    assert not records(tmp_path)


def test_sigterm_stops_a_local_sweep_and_the_printed_command_continues_it(tmp_path):
    results, sweep = tmp_path / "results", tmp_path / "results" / "sweep"
    args = [
        "-m",
        TASK,
        "trainer.epochs=3",
        "trainer.log_every=1",
        "trainer.progress=plain",
        "seed=0,1,2",
        f"results_dir={results}",
        f"hydra.sweep.dir={sweep}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HARNESS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "harness", "run", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = []
    for line in proc.stdout:
        out.append(line)
        if "#1 :" in "".join(out[-40:]) and "epoch 2/3 step 3/" in line:  # job 1 in its second epoch
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=300)
    text = "".join(out) + rest
    assert proc.returncode == 143, text[-3000:]
    status = [ln.split()[1] for ln in summary_lines(text)]
    assert status == ["ok", "interrupted"], text[-3000:]
    (first,) = records(results)
    first_mtime = Path(first["run_dir"], "result.json").stat().st_mtime_ns
    m = re.search(r"to continue this sweep.*:\n  harness run (.*)\n", text)
    assert m, text[-3000:]
    again = subprocess.run(
        [sys.executable, "-m", "harness", "run", *__import__("shlex").split(m.group(1))],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert [ln.split()[1] for ln in summary_lines(again.stderr)] == ["ok", "ok", "ok"]
    recs = {r["seed"]: r for r in records(results)}
    assert sorted(recs) == [0, 1, 2] and all(r["status"] == "ok" for r in recs.values())
    assert recs[1]["requeues"] == 1  # resumed from the checkpoint SIGTERM left
    assert Path(first["run_dir"], "result.json").stat().st_mtime_ns == first_mtime  # not trained again
