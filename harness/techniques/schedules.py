"""Learning-rate schedules stepped once per optimizer step, each a closed-form multiplier of the
base learning rate, applied through ``torch.optim.lr_scheduler.LambdaLR``.

Every schedule takes a linear warmup (Goyal et al. 2017: ``warmup_steps``, or ``warmup_epochs``
converted with the steps per epoch): during the first ``w`` steps the multiplier is scaled by
``(step + 1) / w``. Decaying schedules (cosine, sgdr, linear, polynomial, wsd) measure their progress
from the end of the warmup, so they start at 1 once the warmup is over; ``step`` / ``multistep``
milestones count from the start of training, ``inverse_sqrt`` decays from the warmup length, and
``onecycle`` has its own warmup phase (``pct_start``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from omegaconf import DictConfig

from harness.errors import ConfigError
from harness.registry import Registry

log = logging.getLogger("harness")
SCHEDULES = Registry("schedule")
Multiplier = Callable[[int], float]


def warmup_steps(cfg: DictConfig, steps_per_epoch: int) -> int:
    if cfg.get("warmup_steps") is not None:
        return int(cfg.warmup_steps)
    return int(round(float(cfg.get("warmup_epochs", 0) or 0) * steps_per_epoch))


def _steps(cfg, key: str, spe: int, default_epochs: float) -> int:
    """A length given as ``<key>_steps`` or ``<key>_epochs`` (steps win)."""
    if cfg.get(f"{key}_steps") is not None:
        return max(1, int(cfg.get(f"{key}_steps")))
    return max(1, int(round(float(cfg.get(f"{key}_epochs", default_epochs)) * spe)))


def _progress(step: int, w: int, total: int) -> float:
    """Fraction of the post-warmup steps done, in [0, 1]."""
    return min(max(step - w, 0) / max(total - w, 1), 1.0)


def _fraction(cfg, key: str, default: float) -> float:
    v = float(cfg.get(key, default))
    if not 0.0 <= v <= 1.0:
        raise ConfigError(f"schedule.{key}={v} must be in [0, 1]")
    return v


@SCHEDULES.register("constant", "constant learning rate")
def constant(cfg, total: int, spe: int, w: int) -> Multiplier:
    return lambda step: 1.0


@SCHEDULES.register("cosine", "cosine annealing to min_lr_ratio", "Loshchilov & Hutter 2017, SGDR")
def cosine(cfg, total: int, spe: int, w: int) -> Multiplier:
    lo = _fraction(cfg, "min_lr_ratio", 0.0)
    return lambda step: lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * _progress(step, w, total)))


@SCHEDULES.register("sgdr", "cosine annealing with warm restarts (t0, t_mult)", "Loshchilov & Hutter 2017, SGDR")
def sgdr(cfg, total: int, spe: int, w: int) -> Multiplier:
    t0 = _steps(cfg, "t0", spe, 10)
    t_mult = float(cfg.get("t_mult", 2))
    if t_mult < 1:
        raise ConfigError(f"schedule.t_mult={t_mult} must be >= 1")
    lo = _fraction(cfg, "min_lr_ratio", 0.0)

    def f(step: int) -> float:
        t, period = max(step - w, 0), float(t0)
        while t >= period:  # walk the cycles: T_i = t0 * t_mult**i
            t -= period
            period *= t_mult
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * t / period))

    return f


@SCHEDULES.register("step", "multiply by gamma every step_epochs epochs", "He et al. 2016")
def step_decay(cfg, total: int, spe: int, w: int) -> Multiplier:
    every = _steps(cfg, "step", spe, 30)
    gamma = float(cfg.get("gamma", 0.1))
    return lambda step: gamma ** (step // every)


@SCHEDULES.register("multistep", "multiply by gamma at each milestone", "He et al. 2016")
def multistep(cfg, total: int, spe: int, w: int) -> Multiplier:
    if cfg.get("milestone_epochs") is not None:
        milestones = [int(round(float(e) * spe)) for e in cfg.milestone_epochs]
    else:
        fracs = list(cfg.get("milestone_fractions", [0.5, 0.75]))
        if any(not 0 < float(f) < 1 for f in fracs):
            raise ConfigError(f"schedule.milestone_fractions={fracs} must lie in (0, 1)")
        milestones = [int(round(float(f) * total)) for f in fracs]
    gamma = float(cfg.get("gamma", 0.1))
    return lambda step: gamma ** sum(step >= m for m in milestones)


@SCHEDULES.register("linear", "linear decay to min_lr_ratio", "Defazio et al. 2023, When, Why and How Much?")
def linear(cfg, total: int, spe: int, w: int) -> Multiplier:
    lo = _fraction(cfg, "min_lr_ratio", 0.0)
    return lambda step: lo + (1 - lo) * (1 - _progress(step, w, total))


@SCHEDULES.register("polynomial", "polynomial decay (1 - t)**power", "Chen et al. 2017, DeepLab")
def polynomial(cfg, total: int, spe: int, w: int) -> Multiplier:
    lo = _fraction(cfg, "min_lr_ratio", 0.0)
    power = float(cfg.get("power", 0.9))
    return lambda step: lo + (1 - lo) * (1 - _progress(step, w, total)) ** power


@SCHEDULES.register("wsd", "warmup-stable-decay: constant, then a short cooldown", "Hägele et al. 2024")
def wsd(cfg, total: int, spe: int, w: int) -> Multiplier:
    lo = _fraction(cfg, "min_lr_ratio", 0.0)
    frac = _fraction(cfg, "decay_fraction", 0.2)
    shape = cfg.get("decay_shape", "linear")
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


@SCHEDULES.register("inverse_sqrt", "constant until timescale, then sqrt(timescale / step)", "Vaswani et al. 2017")
def inverse_sqrt(cfg, total: int, spe: int, w: int) -> Multiplier:
    tau = int(cfg.get("timescale") or w or spe)
    return lambda step: math.sqrt(tau / max(step + 1, tau))


@SCHEDULES.register("onecycle", "one cycle: cosine up to the lr, then down", "Smith & Topin 2019, Super-Convergence")
def onecycle(cfg, total: int, spe: int, w: int) -> Multiplier:
    """The lr curve of ``torch.optim.lr_scheduler.OneCycleLR`` (cosine annealing, two phases) as a
    multiplier of the peak lr; momentum is not cycled."""
    pct = _fraction(cfg, "pct_start", 0.3)
    div, final_div = float(cfg.get("div_factor", 25.0)), float(cfg.get("final_div_factor", 1e4))
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
    w = warmup_steps(cfg, steps_per_epoch)
    if w < 0:
        raise ConfigError(f"schedule warmup={w} must be >= 0")
    base = SCHEDULES.get(cfg.name)(cfg, int(total_steps), max(int(steps_per_epoch), 1), w)

    def f(step: int) -> float:
        m = base(step)
        return m * (step + 1) / w if step < w else m

    return f


def build_schedule(cfg: DictConfig, optimizer: torch.optim.Optimizer, total_steps: int, steps_per_epoch: int):
    from harness.techniques.optimizers import is_schedule_free

    if is_schedule_free(optimizer) and cfg.name not in ("constant", "inverse_sqrt"):
        log.warning(
            f"schedule={cfg.name} with a schedule-free optimizer: the method is designed for a constant lr "
            "(Defazio et al. 2024); use schedule=constant to follow the paper"
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg, total_steps, steps_per_epoch))
