"""Progress that talks: the duration estimate printed before training (within a factor of 2 of the measured
time), a plain progress line within seconds and then at a time interval, evaluation progress naming the
split, tokens/s for language models, and the plain warning before a GPU-sized run on a CPU."""

from __future__ import annotations

import datetime as dt
import logging
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from harness.run import preflight, progress
from tests.conftest import ROOT, harness, records

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # two threads on a shared 2-core machine time other processes, not ours


def stamp(line: str) -> dt.datetime:
    return dt.datetime.strptime(line[1:9], "%H:%M:%S")


def check_estimate(p: subprocess.CompletedProcess, results) -> dict:
    assert p.returncode == 0, p.stderr[-3000:]
    lines = (p.stdout + p.stderr).splitlines()
    est_line = next(i for i, ln in enumerate(lines) if "estimated duration ~ " in ln)
    first_epoch = next(i for i, ln in enumerate(lines) if re.search(r"\] epoch 1/\d+ ", ln))
    assert est_line < first_epoch  # printed before training
    (rec,) = records(results)
    est, measured = rec["timing"]["estimated_s"], rec["timing"]["total_s"]
    assert measured / 2 <= est <= measured * 2, (est, measured, lines[est_line])
    assert rec["timing"]["estimate"]["samples_per_s"] > 0
    return rec


def test_duration_estimate_of_the_quickstart_is_within_a_factor_of_2(tmp_path):
    p = harness("run", "task=quickstart", "trainer.progress=plain", f"results_dir={tmp_path}", env=ONE_THREAD)
    check_estimate(p, tmp_path)


def test_duration_estimate_of_a_small_cifar_like_run_is_within_a_factor_of_2(tmp_path):
    # ResNet-18 on 32x32 RGB images, 10 classes (the CIFAR shapes), a few hundred samples
    p = harness(
        "run",
        "task=resnet18_cifar10",
        "dataset=synthetic",
        "dataset.train_size=640",
        "dataset.test_size=256",
        "dataset.val_size=128",
        "trainer.batch_size=128",
        "trainer.epochs=1",
        "trainer.progress=plain",
        f"results_dir={tmp_path}",
        env=ONE_THREAD,
    )
    rec = check_estimate(p, tmp_path)
    assert rec["steps"] == 4


def test_plain_progress_prints_a_first_line_within_seconds(tmp_path):
    # log_every far beyond the run: the first step and the time interval still print
    p = harness(
        "run",
        "task=quickstart",
        "trainer.epochs=1",
        "trainer.log_every=1000",
        "trainer.progress=plain",
        f"results_dir={tmp_path}",
        env=ONE_THREAD,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    lines = (p.stdout + p.stderr).splitlines()
    start = next(ln for ln in lines if "] task quickstart, model" in ln)
    first = next(ln for ln in lines if "] epoch 1/1 step 1/17 loss" in ln)
    assert (stamp(first) - stamp(start)).total_seconds() <= 10
    assert "samples/s" in first


def test_progress_points_every_n_steps_and_at_a_time_interval(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    prog = progress.Progress("plain", epochs=1, steps_per_epoch=1000, log_every=50, interval_s=30)
    due = []
    for step in range(1, 201):
        clock[0] += 1.0  # one second per step
        if prog.due(step):
            due.append(step)
    assert due == [1, 31, 50, 80, 100, 130, 150, 180, 200]  # the first step, every 30 s, every 50 steps


def test_language_models_report_tokens_per_second(caplog):
    prog = progress.Progress("plain", epochs=1, steps_per_epoch=10, unit="tokens", per_sample=64)
    with caplog.at_level(logging.INFO, logger="harness"):
        prog.update(0, 5, 3.25, rate=100.0)  # 100 sequences of 64 tokens per second
    assert "6,400 tokens/s" in caplog.text and "samples/s" not in caplog.text


def test_evaluation_progress_names_the_split(tmp_path):
    # evaluations shorter than EVAL_QUIET_S stay quiet in logs; with no quiet time every batch shows
    code = (
        "import sys, harness.run.progress as p; p.EVAL_QUIET_S = 0.0; p.PLAIN_INTERVAL_S = 0.0; "
        "from harness.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    args = ["run", "task=quickstart", "trainer.epochs=1", "trainer.eval_batch_size=64", "trainer.progress=plain"]
    p = subprocess.run(
        [sys.executable, "-c", code, *args, f"results_dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "HARNESS_OFFLINE": "1", **ONE_THREAD},
    )
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout + p.stderr
    assert "eval val 1/5 batches" in out and "eval val 5/5 batches in" in out  # 300 validation images
    assert "eval test 6/6 batches in" in out  # 360 test images, at the end


def test_gpu_sized_run_on_a_cpu_is_announced_plainly(monkeypatch, caplog):
    monkeypatch.setattr(preflight, "measure_speed", lambda *a: (47.0, 150.0, 1_700_000_000))
    cfg = OmegaConf.create(
        {
            "trainer": {"batch_size": 128, "eval_batch_size": 256, "eval_every": 1},
            "task": {"name": "resnet18_cifar10"},
            "optimizer": {"name": "adamp"},
        }
    )
    data = SimpleNamespace(task="classification", input_shape=(3, 32, 32), val=[0] * 5000, test=[0] * 10000)

    with caplog.at_level(logging.INFO, logger="harness"):
        est = preflight.preflight_duration(cfg, data, torch.device("cpu"), None, None, 30 * 351, 351)
    # 30 epochs x 351 steps x 128 samples at 47 samples/s: about 8 h of training
    assert 7.5 * 3600 < est.train_s < 8.5 * 3600
    assert "estimated duration ~ 8 h" in caplog.text
    warning = next(r.message for r in caplog.records if r.levelno == logging.WARNING)
    assert "sized for a GPU" in warning and "task=quickstart" in warning and "adamp" in warning
    assert est.as_record()["estimated_s"] == pytest.approx(est.total_s, abs=0.01)


def test_format_duration():
    assert progress.format_duration(31_200) == "8 h 40 min"
    assert progress.format_duration(45) == "45 s"
    assert progress.format_duration(12 * 60) == "12 min"
