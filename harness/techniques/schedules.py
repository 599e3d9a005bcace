"""Learning-rate schedules stepped once per optimizer step, each a closed-form multiplier of the
base learning rate, applied through ``torch.optim.lr_scheduler.LambdaLR``.

A schedule is a function ``f(total_steps, steps_per_epoch, warmup_steps, *, <hyper-parameters>) ->
(step -> multiplier)`` named by ``_target_`` in ``conf/schedule/<name>.yaml``; the YAML holds its
hyper-parameters (the functions have no defaults of their own), ``hydra.utils.instantiate(...,
_partial_=True)`` binds them and the run supplies the step counts.

Every schedule takes a linear warmup (Goyal et al. 2017: ``warmup_steps``, or ``warmup_epochs``
converted with the steps per epoch; keys of ``harness.schemas.ScheduleConfig``): during the first
``w`` steps the multiplier is scaled by ``(step + 1) / w``. Decaying schedules (cosine, sgdr, linear,
polynomial, wsd) measure their progress from the end of the warmup, so they start at 1 once the
warmup is over; ``step`` / ``multistep`` milestones count from the start of training,
``inverse_sqrt`` decays from the warmup length, and ``onecycle`` has its own warmup phase (``pct_start``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from omegaconf import DictConfig

from harness import build
from harness.errors import ConfigError

log = logging.getLogger("harness")
Multiplier = Callable[[int], float]


def warmup_steps(cfg, steps_per_epoch: int) -> int:
    """The warmup length in steps: ``warmup_steps`` when set, else ``warmup_epochs`` epochs."""
    if cfg.warmup_steps is not None:
        return int(cfg.warmup_steps)
    return int(round(float(cfg.warmup_epochs or 0) * steps_per_epoch))


def _steps(key: str, steps: int | None, epochs: float, spe: int) -> int:
    """A length given as ``<key>_steps`` or ``<key>_epochs`` (steps win)."""
    if steps is not None:
        return max(1, int(steps))
    return max(1, int(round(float(epochs) * spe)))


def _progress(step: int, w: int, total: int) -> float:
    """Fraction of the post-warmup steps done, in [0, 1]."""
    return min(max(step - w, 0) / max(total - w, 1), 1.0)


def _fraction(key: str, value: float) -> float:
    v = float(value)
    if not 0.0 <= v <= 1.0:
        raise ConfigError(f"schedule.{key}={v} must be in [0, 1]")
    return v


def constant(total: int, spe: int, w: int) -> Multiplier:
    """Constant learning rate (after the optional warmup)."""
    return lambda step: 1.0


def cosine(total: int, spe: int, w: int, *, min_lr_ratio: float) -> Multiplier:
    """Cosine annealing to ``min_lr_ratio`` (Loshchilov & Hutter 2017, SGDR)."""
    lo = _fraction("min_lr_ratio", min_lr_ratio)
    return lambda step: lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * _progress(step, w, total)))


def sgdr(
    total: int, spe: int, w: int, *, t0_epochs: float, t0_steps: int | None, t_mult: float, min_lr_ratio: float
) -> Multiplier:
    """Cosine annealing with warm restarts, cycle i lasting t0 * t_mult**i (Loshchilov & Hutter 2017)."""
    t0 = _steps("t0", t0_steps, t0_epochs, spe)
    t_mult = float(t_mult)
    if t_mult < 1:
        raise ConfigError(f"schedule.t_mult={t_mult} must be >= 1")
    lo = _fraction("min_lr_ratio", min_lr_ratio)

    def f(step: int) -> float:
        t, period = max(step - w, 0), float(t0)
        while t >= period:  # walk the cycles: T_i = t0 * t_mult**i
            t -= period
            period *= t_mult
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * t / period))

    return f


def step_decay(total: int, spe: int, w: int, *, step_epochs: float, step_steps: int | None, gamma: float) -> Multiplier:
    """Multiply by ``gamma`` every ``step_epochs`` epochs (He et al. 2016)."""
    every = _steps("step", step_steps, step_epochs, spe)
    gamma = float(gamma)
    return lambda step: gamma ** (step // every)


def multistep(
    total: int,
    spe: int,
    w: int,
    *,
    milestone_fractions: list[float],
    milestone_epochs: list[float] | None,
    gamma: float,
) -> Multiplier:
    """Multiply by ``gamma`` at each milestone (He et al. 2016)."""
    if milestone_epochs is not None:
        milestones = [int(round(float(e) * spe)) for e in milestone_epochs]
    else:
        fracs = list(milestone_fractions)
        if any(not 0 < float(f) < 1 for f in fracs):
            raise ConfigError(f"schedule.milestone_fractions={fracs} must lie in (0, 1)")
        milestones = [int(round(float(f) * total)) for f in fracs]
    gamma = float(gamma)
    return lambda step: gamma ** sum(step >= m for m in milestones)


def linear(total: int, spe: int, w: int, *, min_lr_ratio: float) -> Multiplier:
    """Linear decay to ``min_lr_ratio`` (Defazio et al. 2023)."""
    lo = _fraction("min_lr_ratio", min_lr_ratio)
    return lambda step: lo + (1 - lo) * (1 - _progress(step, w, total))


def polynomial(total: int, spe: int, w: int, *, power: float, min_lr_ratio: float) -> Multiplier:
    """Polynomial decay ``(1 - t)**power`` (Chen et al. 2017, DeepLab)."""
    lo = _fraction("min_lr_ratio", min_lr_ratio)
    power = float(power)
    return lambda step: lo + (1 - lo) * (1 - _progress(step, w, total)) ** power


def wsd(total: int, spe: int, w: int, *, decay_fraction: float, decay_shape: str, min_lr_ratio: float) -> Multiplier:
    """Warmup-stable-decay: constant, then a cooldown over the last ``decay_fraction`` (Hägele et al. 2024)."""
    lo = _fraction("min_lr_ratio", min_lr_ratio)
    frac = _fraction("decay_fraction", decay_fraction)
    shape = decay_shape
    if shape not in ("linear", "sqrt", "cosine"):
        raise ConfigError(f"schedule.decay_shape={shape!r}; valid choices: linear, sqrt, cosine")
    n = max(total - w, 1)
    decay = max(int(round(frac * n)), 1) if frac > 0 else 0
    start = w + n - decay  # first step of the cooldown

    def f(step: int) -> float:
        if step < start or decay == 0:
            return 1.0
        p = min((step - start) / decay, 1.0)
        drop = {"linear": p, "sqrt": math.sqrt(p), "cosine": 0.5 * (1 - math.cos(math.pi * p))}[shape]
        return lo + (1 - lo) * (1 - drop)

    return f


def inverse_sqrt(total: int, spe: int, w: int, *, timescale: int | None) -> Multiplier:
    """Constant until ``timescale`` (null: the warmup, else one epoch), then sqrt(timescale / step) (Vaswani et al. 2017)."""
    tau = int(timescale or w or spe)
    return lambda step: math.sqrt(tau / max(step + 1, tau))


def onecycle(
    total: int, spe: int, w: int, *, pct_start: float, div_factor: float, final_div_factor: float
) -> Multiplier:
    """The lr curve of ``torch.optim.lr_scheduler.OneCycleLR`` (cosine annealing, two phases) as a
    multiplier of the peak lr; momentum is not cycled (Smith & Topin 2019)."""
    pct = _fraction("pct_start", pct_start)
    div, final_div = float(div_factor), float(final_div_factor)
    start, end = 1.0 / div, 1.0 / (div * final_div)
    up_end = float(pct * total) - 1  # the same phase boundaries as OneCycleLR
    down_end = float(total - 1)

    def anneal(a: float, b: float, t: float) -> float:
        return b + (a - b) / 2.0 * (1 + math.cos(math.pi * t))

    def f(step: int) -> float:
        if step <= up_end:
            return anneal(start, 1.0, step / up_end if up_end > 0 else 1.0)
        return anneal(1.0, end, min((step - up_end) / max(down_end - up_end, 1e-9), 1.0))

    return f


def lr_multiplier(cfg: DictConfig, total_steps: int, steps_per_epoch: int) -> Multiplier:
    """The schedule as a function of the optimizer step (0-based), warmup included."""
    h, params = build.split("schedule", build.spec_of("schedule", cfg))
    label = h.name or str(params.get("_target_"))
    spe = max(int(steps_per_epoch), 1)
    w = warmup_steps(h, spe)
    if w < 0:
        raise ConfigError(f"schedule warmup={w} must be >= 0 (schedule.warmup_steps / schedule.warmup_epochs)")
    factory = build.instantiate("schedule", params, label, partial=True)
    base = build.call("schedule", label, factory, int(total_steps), spe, w, refuse=(TypeError, ValueError))

    def f(step: int) -> float:
        m = base(step)
        return m * (step + 1) / w if step < w else m

    return f


def check_schedule(cfg: DictConfig) -> None:
    """Build the schedule for a nominal run (1,000 steps of 10 per epoch) and evaluate it, so a bad
    schedule config fails before data is loaded. Raises ConfigError."""
    f = lr_multiplier(cfg, 1000, 10)
    for step in (0, 500, 999):
        f(step)


def build_schedule(cfg: DictConfig, optimizer: torch.optim.Optimizer, total_steps: int, steps_per_epoch: int):
    from harness.techniques.optimizers import is_schedule_free

    if is_schedule_free(optimizer) and cfg.get("name") not in ("constant", "inverse_sqrt"):
        log.warning(
            f"schedule={cfg.get('name')} with a schedule-free optimizer: the method is designed for a constant lr "
            "(Defazio et al. 2024); use schedule=constant to follow the paper"
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg, total_steps, steps_per_epoch))
