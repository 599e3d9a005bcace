"""Learning-rate schedules stepped once per optimizer step, each a closed-form multiplier of the
base learning rate with an optional linear warmup (Goyal et al. 2017), applied through
``torch.optim.lr_scheduler.LambdaLR``."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from omegaconf import DictConfig

from harness.errors import ConfigError
from harness.registry import Registry

SCHEDULES = Registry("schedule")


def warmup_steps(cfg: DictConfig, steps_per_epoch: int) -> int:
    if cfg.get("warmup_steps") is not None:
        return int(cfg.warmup_steps)
    return int(round(float(cfg.get("warmup_epochs", 0) or 0) * steps_per_epoch))


@SCHEDULES.register("constant", "constant learning rate")
def constant(cfg, total: int, spe: int) -> Callable[[int], float]:
    return lambda step: 1.0


@SCHEDULES.register("cosine", "cosine annealing to min_lr_ratio", "Loshchilov & Hutter 2017, SGDR")
def cosine(cfg, total: int, spe: int) -> Callable[[int], float]:
    lo = float(cfg.get("min_lr_ratio", 0.0))
    w = warmup_steps(cfg, spe)

    def f(step: int) -> float:
        t = min(max(step - w, 0) / max(total - w, 1), 1.0)
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * t))

    return f


@SCHEDULES.register("step", "multiply by gamma every step_epochs epochs", "He et al. 2016")
def step_decay(cfg, total: int, spe: int) -> Callable[[int], float]:
    every = max(1, int(cfg.get("step_epochs", 30)) * spe)
    gamma = float(cfg.get("gamma", 0.1))
    return lambda step: gamma ** (step // every)


def lr_multiplier(cfg: DictConfig, total_steps: int, steps_per_epoch: int) -> Callable[[int], float]:
    """The schedule as a function of the optimizer step, warmup included."""
    base = SCHEDULES.get(cfg.name)(cfg, total_steps, steps_per_epoch)
    w = warmup_steps(cfg, steps_per_epoch)
    if w < 0:
        raise ConfigError(f"schedule warmup={w} must be >= 0")

    def f(step: int) -> float:
        m = base(step)
        return m * (step + 1) / w if step < w else m

    return f


def build_schedule(cfg: DictConfig, optimizer: torch.optim.Optimizer, total_steps: int, steps_per_epoch: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg, total_steps, steps_per_epoch))
