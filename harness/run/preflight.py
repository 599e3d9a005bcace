"""Pre-flight: checks that need no data, run before anything loads.

Memory: the peak of one training step is estimated from the model built on PyTorch's ``meta`` device
(shapes only, no memory): parameters, gradients and optimizer state in float32, the activations the
forward pass keeps for backward (the outputs of every leaf module at the micro-batch size, in the
autocast dtype), the loss's float32 copy of the logits (the term that dominates a language model with a
large vocabulary), the evaluation's peak, the dataset's resident tensors and, on the CPU, the process's
current footprint. Over the device's memory (free GPU memory, or what the host can still give this
process) the run is refused with the estimate, the limit and what to lower, so no run of the harness is
killed by the OOM killer with nothing written. The estimate is recorded next to the measured peak.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from harness.data.spec import DataSpec
from harness.errors import ConfigError
from harness.run.precision import resolve_precision

log = logging.getLogger("harness")

GB = 1024**3
HEADROOM = 0.9  # refuse above this fraction of the available memory
# optimizer state per parameter, in parameter-sized float32 tensors (Adam-family: two moments)
STATE_FACTORS = {"sgd": 1, "sgd_nesterov": 1, "lion": 1, "adafactor": 0.1, "adamw8bit": 0.5, "rmsprop": 1, "adagrad": 1}
DEFAULT_STATE_FACTOR = 2
LM_EVAL_CHUNK_TOKENS = 8192  # harness.run.trainer evaluates language models in chunks of this many tokens


@dataclass
class MemoryEstimate:
    parts: dict[str, int] = field(default_factory=dict)  # bytes per component
    limit_bytes: int | None = None
    device: str = "cpu"
    note: str = ""

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def as_record(self) -> dict[str, Any]:
        return {"estimated_peak_bytes": self.total, "estimate_parts": dict(self.parts), "limit_bytes": self.limit_bytes}


def _leaf_outputs(model: nn.Module, x: torch.Tensor, elem: int) -> tuple[int, int, int]:
    """(sum of leaf-module output bytes, largest single leaf output, final output elements) of one forward."""
    sizes: list[int] = []

    def hook(_m, _inp, out):
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                sizes.append(t.numel() * elem)

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    out = out[0] if isinstance(out, (tuple, list)) else out
    return sum(sizes), max(sizes, default=0), out.numel()


def _rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def host_limit_bytes() -> int | None:
    """What this process may grow to: its footprint now plus the host's available memory (or the cgroup's
    remaining allowance when smaller)."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        available = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(path).read_text().strip()
            usage_path = Path(path).with_name("memory.current" if path.endswith("max") else "memory.usage_in_bytes")
            if raw.isdigit() and int(raw) < 2**60:
                available = min(available, int(raw) - int(usage_path.read_text().strip()))
        except (OSError, ValueError):
            continue
    return _rss_bytes() + available


def device_limit_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return host_limit_bytes()


def estimate_memory(cfg, spec: DataSpec, device: torch.device, build_model) -> MemoryEstimate:
    """Peak bytes of one training step of ``cfg`` on ``device`` (see the module docstring)."""
    t = cfg.trainer
    precision = resolve_precision(cfg.precision.name, device)
    elem = 2 if precision in ("bf16", "fp16") else 4
    micro = max(1, int(t.batch_size) // int(t.grad_accum_steps))
    stub = SimpleNamespace(
        name=str(cfg.dataset.name), task=spec.task, input_shape=spec.input_shape, num_classes=spec.num_classes
    )
    with torch.device("meta"):
        model = build_model(cfg.model, stub)
        dtype = torch.long if spec.task == "lm" else torch.float32
        x = torch.zeros((micro, *spec.input_shape), dtype=dtype)
        acts, _, out_elems = _leaf_outputs(model, x, elem)
        ex = torch.zeros((min(int(t.eval_batch_size), 4096), *spec.input_shape), dtype=dtype)
        if spec.task == "lm":
            ex = ex[: max(1, LM_EVAL_CHUNK_TOKENS // spec.input_shape[0])]
        _, eval_largest, eval_out = _leaf_outputs(model, ex, elem)
    params = sum(p.numel() for p in model.parameters()) * 4
    factor = STATE_FACTORS.get(str(cfg.optimizer.get("name", "")), DEFAULT_STATE_FACTOR)
    second_order = bool(cfg.optimizer.get("second_order", False))
    parts = {
        "parameters": params,
        "gradients": params * (2 if second_order else 1),
        "optimizer_state": int(params * factor),
        "activations": acts * (2 if second_order else 1),
        "loss_logits": out_elems * 4 * 2,  # float32 log-softmax and its gradient
        "evaluation": max(eval_largest * 2, eval_out * 4 * 2),
        "data": spec.resident_bytes,
    }
    if device.type == "cpu":
        parts["process"] = _rss_bytes()
    return MemoryEstimate(parts=parts, limit_bytes=device_limit_bytes(device), device=device.type)


def check_memory(cfg, est: MemoryEstimate, spec: DataSpec) -> None:
    """Refuse (ConfigError, exit 2) a run whose estimate exceeds the device's memory."""
    if est.limit_bytes is None or est.total <= HEADROOM * est.limit_bytes:
        return
    t = cfg.trainer
    parts = ", ".join(
        f"{k.replace('_', ' ')} {v / GB:.2f}" for k, v in sorted(est.parts.items(), key=lambda kv: -kv[1]) if v
    )
    where = "the GPU's free memory" if est.device == "cuda" else "the memory this host can still give the process"
    shape = f"batch {t.batch_size}" + (
        f" x context {spec.input_shape[0]} x vocabulary {spec.num_classes:,}" if spec.task == "lm" else ""
    )
    raise ConfigError(
        f"estimated peak memory {est.total / GB:.1f} GB ({parts} GB; {shape}) exceeds {HEADROOM:.0%} of {where} "
        f"({est.limit_bytes / GB:.1f} GB). Lower trainer.batch_size, or keep the batch and set "
        f"trainer.grad_accum_steps=N (1/N of the activations per micro-batch)"
        + (", or a shorter dataset.context" if spec.task == "lm" else "")
        + "; trainer.memory_check=false skips this check."
    )


def preflight_memory(cfg, spec: DataSpec, device: torch.device, build_model) -> MemoryEstimate | None:
    """Estimate and check; None (with a log line) when the model cannot be built on the meta device."""
    try:
        est = estimate_memory(cfg, spec, device, build_model)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001  an estimate that cannot be made does not block the run
        log.warning(f"memory estimate unavailable ({type(e).__name__}: {e}); the run is not checked against memory")
        return None
    available = f" of {est.limit_bytes / GB:.1f} GB available" if est.limit_bytes else ""
    log.info(f"memory estimate {est.total / GB:.2f} GB{available} on {est.device}")
    if bool(cfg.trainer.memory_check):
        check_memory(cfg, est, spec)
    return est
