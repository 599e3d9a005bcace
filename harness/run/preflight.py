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
from harness.metrics.classification import LM_EVAL_CHUNK_TOKENS
from harness.run.precision import resolve_precision

log = logging.getLogger("harness")

GB = 1024**3
HEADROOM = 0.9  # refuse above this fraction of the available memory
# optimizer state per parameter, in parameter-sized float32 tensors (Adam-family: two moments)
STATE_FACTORS = {"sgd": 1, "sgd_nesterov": 1, "lion": 1, "adafactor": 0.1, "adamw8bit": 0.5, "rmsprop": 1, "adagrad": 1}
DEFAULT_STATE_FACTOR = 2


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


# ------------------------------------------------------------------------------------------ duration
CPU_WARN_S = 30 * 60  # on a CPU, a run estimated above this is announced plainly, with the CPU-sized tasks
TRAIN_PROBE_S, EVAL_PROBE_S = 0.5, 0.25  # seconds of timed steps (after one warm-up step) in the calibration
CPU_PROBE_BATCH, CPU_PROBE_EVAL_BATCH = 32, 128  # on a CPU throughput hardly depends on the batch: probe small


@dataclass
class DurationEstimate:
    """A run's expected duration: its training samples at the measured training speed, plus its evaluations
    at the measured evaluation speed (a few steps of the run's model and optimizer on random inputs)."""

    train_s: float
    eval_s: float
    steps: int
    batch_size: int
    samples_per_s: float  # training, measured
    eval_samples_per_s: float
    device: str
    flops_per_s: float | None = None  # training FLOP/s achieved in the measurement
    total_flops: float | None = None

    @property
    def total_s(self) -> float:
        return self.train_s + self.eval_s

    def as_record(self) -> dict[str, Any]:
        return {
            "estimated_s": round(self.total_s, 2),
            "estimate": {
                "train_s": round(self.train_s, 2),
                "eval_s": round(self.eval_s, 2),
                "samples_per_s": round(self.samples_per_s, 2),
                "eval_samples_per_s": round(self.eval_samples_per_s, 2),
                "flops_per_s": self.flops_per_s,
                "total_flops": self.total_flops,
            },
        }

    def describe(self) -> str:
        from harness.run.progress import format_duration

        speed = f"{self.samples_per_s:,.0f} samples/s"
        if self.flops_per_s:
            speed += f", {self.flops_per_s / 1e9:,.1f} GFLOP/s"
        return (
            f"estimated duration ~ {format_duration(self.total_s)} ({self.steps:,} steps x {self.batch_size} samples "
            f"at {speed} measured on {self.device}; evaluation ~ {format_duration(self.eval_s)})"
        )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_per_call(fn, device: torch.device, min_s: float, max_calls: int = 50) -> float:
    """Seconds per call of ``fn``: one warm-up call, then calls until ``min_s`` has passed (at least three);
    the median call, so a moment when another process holds the CPU does not count."""
    import statistics
    import time

    fn()
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_s and len(times) < max_calls):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_speed(cfg, data, device: torch.device, build_model, build_optimizer) -> tuple[float, float, int | None]:
    """(training samples/s, evaluation samples/s, training FLOPs per sample) of the run's model, optimizer
    and precision on ``device``, timed on random inputs of the run's shapes. The run's random state is
    left untouched (the model is built under a forked RNG and thrown away)."""
    from harness.models.flops import training_flops_per_sample
    from harness.run.precision import autocast_for

    t = cfg.trainer
    precision = resolve_precision(cfg.precision.name, device)
    lm = data.task == "lm"
    micro = max(1, int(t.batch_size) // int(t.grad_accum_steps))
    eval_bs = int(t.eval_batch_size)
    if lm:
        eval_bs = max(1, min(eval_bs, LM_EVAL_CHUNK_TOKENS // data.input_shape[0]))
    if device.type == "cpu":
        micro, eval_bs = min(micro, CPU_PROBE_BATCH), min(eval_bs, CPU_PROBE_EVAL_BATCH)
    classes = int(data.num_classes)

    def inputs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if lm:
            x = torch.randint(0, classes, (n, *data.input_shape), device=device)
            return x, torch.randint(0, classes, (n, *data.input_shape), device=device)
        return torch.randn((n, *data.input_shape), device=device), torch.randint(0, classes, (n,), device=device)

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model = build_model(cfg.model, data).to(device)
        optimizer = build_optimizer(cfg.optimizer, model, batch_size=int(t.batch_size), total_steps=10)
        second_order = bool(getattr(optimizer, "second_order", False) or cfg.optimizer.get("second_order", False))
        x, y = inputs(micro)

        def train_step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with autocast_for(precision, device):
                out = model(x)
            out = out[0] if isinstance(out, (tuple, list)) else out
            loss = nn.functional.cross_entropy(out.float().reshape(-1, out.shape[-1]), y.reshape(-1))
            loss.backward(create_graph=second_order)
            optimizer.step()

        model.train()
        train_step_s = time_per_call(train_step, device, TRAIN_PROBE_S)
        ex, _ = inputs(eval_bs)

        def eval_step() -> None:
            with torch.no_grad(), autocast_for(precision, device):
                out = model(ex)
            out = out[0] if isinstance(out, (tuple, list)) else out
            out.float().log_softmax(-1)

        model.eval()
        eval_step_s = time_per_call(eval_step, device, EVAL_PROBE_S)
        try:
            flops = training_flops_per_sample(model, tuple(data.input_shape))
        except Exception:  # noqa: BLE001  FLOPs are for the message only
            flops = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return micro / train_step_s, eval_bs / eval_step_s, flops


def _split_samples(split, batch_size: int) -> int:
    try:
        return len(split)
    except TypeError:
        return split.num_batches(batch_size, False) * batch_size


def estimate_duration(
    cfg, data, device: torch.device, build_model, build_optimizer, total_steps: int, steps_per_epoch: int
) -> DurationEstimate:
    """The run's duration: ``total_steps`` optimizer steps of ``trainer.batch_size`` samples, plus every
    evaluation (validation every ``trainer.eval_every`` epochs and at the end, test once), at the speeds
    :func:`measure_speed` measures. Compilation, data loading and checkpoints are not counted."""
    t = cfg.trainer
    sps, eval_sps, flops = measure_speed(cfg, data, device, build_model, build_optimizer)
    world = 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
    samples = total_steps * int(t.batch_size) / world  # each rank trains on its share of the global batch
    epochs = -(-total_steps // max(steps_per_epoch, 1))
    evals = sum(1 for e in range(1, epochs + 1) if e % int(t.eval_every) == 0 or e == epochs)
    ebs = int(t.eval_batch_size)
    test = _split_samples(data.test, ebs) if data.test is not None else 0
    each = _split_samples(data.val, ebs) if data.val is not None else test
    eval_samples = evals * each + (test if data.val is not None else 0)
    per_sample = data.input_shape[0] if data.task == "lm" else 1  # FLOPs of a language model are per token
    return DurationEstimate(
        train_s=samples / sps,
        eval_s=eval_samples / eval_sps,
        steps=total_steps,
        batch_size=int(t.batch_size),
        samples_per_s=sps,
        eval_samples_per_s=eval_sps,
        device=device.type,
        flops_per_s=flops * per_sample * sps if flops else None,
        total_flops=float(flops * per_sample * samples) if flops else None,
    )


def cpu_tasks() -> list[str]:
    """Tasks whose description says they are sized for a CPU."""
    from harness.config import task_index

    return [name for name, t in task_index().items() if "CPU" in t["description"]]


def preflight_duration(
    cfg, data, device: torch.device, build_model, build_optimizer, total_steps: int, steps_per_epoch: int
) -> DurationEstimate | None:
    """Estimate and print the run's duration before training; on a CPU, a run over ``CPU_WARN_S`` is said
    plainly to be GPU-sized, with the CPU-sized tasks. None (with a log line) when it cannot be measured."""
    try:
        est = estimate_duration(cfg, data, device, build_model, build_optimizer, total_steps, steps_per_epoch)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001  an estimate that cannot be made does not block the run
        log.warning(f"duration estimate unavailable ({type(e).__name__}: {e})")
        return None
    log.info(est.describe())
    if device.type == "cpu" and est.total_s > CPU_WARN_S:
        from harness.run.progress import format_duration

        tasks = ", ".join(cpu_tasks()) or "quickstart"
        log.warning(
            f"this run would train for about {format_duration(est.total_s)} on this CPU: "
            f"task={cfg.task.name} is sized for a GPU. The CPU-sized tasks take minutes: {tasks} "
            f"(e.g. harness run task=quickstart optimizer={cfg.optimizer.get('name', 'sgd')}); "
            "or lower the budget (trainer.epochs, trainer.max_steps)."
        )
    return est
