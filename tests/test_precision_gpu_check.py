"""scripts/gpu_check.py: without a GPU it refuses its GPU parts (exit 2, a clear message, no files); its
CPU-safe parts (--cpu-smoke) run here and write the JSON and Markdown reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

SCRIPT = ROOT / "scripts" / "gpu_check.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HARNESS_OFFLINE": "1"}


def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs a machine without a CUDA GPU")
def test_without_a_gpu_the_gpu_parts_are_refused_with_exit_2(tmp_path):
    proc = run("--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "no CUDA GPU is available" in proc.stderr and "--cpu-smoke" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_cpu_smoke_runs_the_cpu_safe_checks_and_writes_both_reports(tmp_path):
    only = "gpt2_small_fp8_tensorwise,gpt2_small_fp8_rowwise,fp16_autocast,ddp_gloo,augmentation_cpu,gpt2_tiny_fp32"
    proc = run("--cpu-smoke", "--out", str(tmp_path), "--only", only)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["mode"] == "cpu-smoke" and report["commit"]
    by = {c["name"]: c for c in report["checks"]}
    assert set(by) == set(only.split(","))
    assert all(c["status"] == "ok" for c in by.values()), {k: v.get("note") for k, v in by.items()}
    assert by["gpt2_small_fp8_tensorwise"]["metrics"]["converted"] == 4  # c_attn + mlp.c_fc of 2 blocks
    assert by["gpt2_small_fp8_rowwise"]["metrics"]["converted"] == 0  # torchao's rowwise filter: none
    assert by["ddp_gloo"]["metrics"]["max_param_diff"] == 0.0
    assert by["augmentation_cpu"]["metrics"]["images_per_s"] > 0
    assert by["fp16_autocast"]["metrics"]["test_acc"] > 0.5
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| gpt2_small_fp8_tensorwise | ok |" in md and "cpu-smoke" in md


@pytest.mark.slow
def test_cpu_smoke_all_checks(tmp_path):
    proc = run("--cpu-smoke", "--out", str(tmp_path))
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    assert {"loop_overhead", "resnet18_throughput", "grad_accumulation"} <= set(statuses)
    assert proc.returncode == 0 and set(statuses.values()) == {"ok"}, statuses
