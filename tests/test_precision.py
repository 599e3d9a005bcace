"""Honest precision: an fp16 run that diverges, by a non-finite loss or by a gradient scaler that skips
step after step, ends ``diverged`` with exit 1; a second-order optimizer with fp16, under torchrun or
with torch.compile is refused before any work (exit 2, no record), naming what works. fp16 autocast
runs on the CPU (torch >= 2.x), so all of it is checked here."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from conftest import harness, records
from omegaconf import OmegaConf

from harness.config import CONF_DIR
from harness.errors import ConfigError
from harness.techniques.optimizers import check_optimizer

QUICK = ["task=quickstart", "trainer.progress=none", "trainer.checkpoint_every=0", "trainer.epochs=3"]
ENV = {"OMP_NUM_THREADS": "1"}


def test_fp16_with_a_diverging_learning_rate_ends_diverged_with_exit_1(tmp_path):
    proc = harness("run", *QUICK, "precision=fp16", "optimizer.lr=1e4", f"results_dir={tmp_path}", env=ENV)
    assert proc.returncode == 1, proc.stderr[-2000:]
    (rec,) = records(tmp_path)
    assert rec["status"] == "diverged" and "non-finite" in rec["error"]
    assert rec["precision"] == "fp16" and "grad_scaler" in rec


def test_fp16_collapsing_scale_ends_diverged_although_the_loss_stays_finite(tmp_path):
    """Gradients that overflow at every scale the scaler tries: every step is skipped, the weights never
    change and the loss stays finite; 20 skips in a row end the run."""
    proc = harness("run", *QUICK, "precision=fp16", "precision.init_scale=1e30", f"results_dir={tmp_path}", env=ENV)
    assert proc.returncode == 1, proc.stderr[-2000:]
    (rec,) = records(tmp_path)
    assert rec["status"] == "diverged", rec.get("error")
    assert "loss scale collapsed" in rec["error"] and "max_consecutive_skips=20" in rec["error"]
    assert rec["grad_scaler"]["max_consecutive_skipped"] >= 20


def test_fp16_healthy_run_is_ok_and_records_its_skips(tmp_path):
    proc = harness("run", *QUICK, "trainer.epochs=1", "precision=fp16", f"results_dir={tmp_path}", env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (rec,) = records(tmp_path)
    assert rec["status"] == "ok"
    assert rec["grad_scaler"]["max_consecutive_skipped"] < 20


@pytest.mark.parametrize("optimizer", ["sophiah", "adahessian"])
def test_fp16_with_a_second_order_optimizer_is_refused_before_any_work(tmp_path, optimizer):
    proc = harness("run", *QUICK, "precision=fp16", f"optimizer={optimizer}", f"results_dir={tmp_path}", env=ENV)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"optimizer={optimizer} is second order" in proc.stderr
    assert "precision=fp32, bf16 or auto" in proc.stderr
    assert not tmp_path.exists() or not list(tmp_path.rglob("result.json"))


def test_second_order_under_ddp_or_compile_is_refused_in_preflight():
    cfg = OmegaConf.load(CONF_DIR / "optimizer" / "sophiah.yaml")
    with pytest.raises(ConfigError, match=r"pytorch/pytorch#63929.*one process"):
        check_optimizer(cfg, precision="fp32", world_size=2)
    with pytest.raises(ConfigError, match="torch.compile"):
        check_optimizer(cfg, precision="bf16", compile=True)
    assert check_optimizer(cfg, precision="bf16").second_order  # the working combination passes
    check_optimizer(OmegaConf.load(CONF_DIR / "optimizer" / "adamw.yaml"), precision="fp16", world_size=2)


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")
def test_torchrun_with_sophiah_exits_2_before_any_work(tmp_path):
    cmd = ["torchrun", "--standalone", "--nproc_per_node=2", "-m", "harness", "run", *QUICK, "optimizer=sophiah",
           f"results_dir={tmp_path}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "pytorch/pytorch#63929" in proc.stderr, proc.stderr[-3000:]
    assert not list(tmp_path.rglob("result.json"))
