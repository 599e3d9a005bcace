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


# ----------------------------------------------------------------------------------------- speed accounting
def _record(precision="bf16", family="transformer", world=1, lm=True, converted=None):
    return {
        "precision": precision,
        "config": {"model": {"family": family}},
        "dataset_info": {"task": "lm" if lm else "classification"},
        "model_info": {"flops_per_sample": 1e9},
        "throughput": {"samples_per_s": 1000.0, "tokens_per_s": 400_000.0},
        "hardware": {"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "world_size": world},
        "techniques": {"quantization": {"converted": converted}} if converted else {},
    }


def test_mfu_is_per_gpu_against_the_peak_of_the_math_used(monkeypatch):
    from harness.infra import hardware

    one, four = _record(), _record(world=4)
    hardware.add_mfu(one)
    hardware.add_mfu(four)
    assert one["throughput"]["mfu"] == pytest.approx(1e9 * 400_000 / 989.5e12)
    assert four["throughput"]["mfu"] == pytest.approx(one["throughput"]["mfu"] / 4)  # global rate over 4 GPUs
    assert "world_size 4" in four["throughput"]["mfu_basis"]
    fp8 = _record(converted=["blocks.0.mlp.fc"])
    hardware.add_mfu(fp8)
    assert fp8["hardware"]["peak_flops_precision"] == "fp8" and fp8["hardware"]["peak_flops"] == pytest.approx(1979e12)

    settings = {
        "float32_matmul_precision": "highest",
        "cuda_matmul_allow_tf32": False,
        "cudnn_allow_tf32": True,
        "cudnn_benchmark": True,
        "cudnn_deterministic": False,
    }
    monkeypatch.setattr(hardware, "numerics_settings", lambda: dict(settings))
    cnn = _record("fp32", "cnn", lm=False)
    hardware.add_mfu(cnn)  # cuDNN convolutions run in TF32 by default: the TF32 peak, not FP32's (7x lower)
    assert cnn["hardware"]["peak_flops_precision"] == "tf32" and cnn["hardware"]["peak_flops"] == pytest.approx(
        494.5e12
    )
    assert cnn["hardware"]["numerics"]["cudnn_allow_tf32"] is True
    gpt = _record("fp32", "transformer")
    hardware.add_mfu(gpt)  # matmuls at "highest": true FP32
    assert gpt["hardware"]["peak_flops_precision"] == "fp32"
    settings["float32_matmul_precision"] = "high"
    gpt = _record("fp32", "transformer")
    hardware.add_mfu(gpt)
    assert gpt["hardware"]["peak_flops_precision"] == "tf32"


def test_adam_adamw_sgd_are_fused_on_cuda_unless_chosen_otherwise():
    import torch

    from harness.techniques.optimizers import fused_kwargs

    cuda = torch.device("cuda", 0)
    for cls in (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD):
        assert fused_kwargs(cls, {}, cuda) == {"fused": True}
        assert fused_kwargs(cls, {}, torch.device("cpu")) == {}
    assert fused_kwargs(torch.optim.AdamW, {"foreach": False}, cuda) == {}  # the YAML's own choice wins
    assert fused_kwargs(torch.optim.Adagrad, {}, cuda) == {}  # fused Adagrad is CPU-only


def test_compiled_run_records_warmup_apart_from_training(tmp_path):
    """trainer.compile=true on CPU: the first steps (compilation) are timed as warm-up and excluded from
    train_s, samples/s and time to target; both are recorded."""
    proc = harness(
        "run", *QUICK, "trainer.epochs=2", "trainer.compile=true", f"results_dir={tmp_path}", env=ENV, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (rec,) = records(tmp_path)
    t = rec["timing"]
    steps_after = rec["steps"] - t["warmup_steps"]
    assert t["warmup_steps"] == 2 and t["train_s"] > 0, t
    # a compiling step (even from inductor's cache) takes far longer than a compiled one
    assert t["warmup_s"] / 2 > 5 * t["train_s"] / steps_after, t
    assert t["total_s"] == pytest.approx(t["train_s"] + t["warmup_s"] + t["eval_s"], abs=1e-3)
    assert rec["throughput"]["samples_per_s"] == pytest.approx(steps_after * 64 / t["train_s"], rel=0.05)
    if t["time_to_target_s"] is not None:
        assert t["time_to_target_with_warmup_s"] == pytest.approx(t["time_to_target_s"] + t["warmup_s"], abs=1e-3)
    assert rec["hardware"]["numerics"]["float32_matmul_precision"] in ("highest", "high", "medium")
