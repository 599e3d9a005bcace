"""Optimizers: any ``torch.optim.Optimizer`` class reached through ``_target_`` in
``conf/optimizer/<name>.yaml`` (torch.optim, timm.optim, pytorch-optimizer), built by
``build_optimizer``. Keys below are the harness's own and are not passed to the class.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from torch import nn

from harness.errors import ConfigError

# keys of an optimizer YAML that configure the harness, not the optimizer class
HARNESS_KEYS = (
    "name",
    "source",
    "paper",
    "description",
    "decay_all",
    "lr_scaling",
    "base_batch_size",
    "lookahead",
    "needs_total_steps",
    "total_steps_key",
    "schedule_free",
    "second_order",
)


def param_groups(model: nn.Module, weight_decay: float, decay_all: bool) -> list[dict[str, Any]]:
    """Two groups: weights that are decayed and biases / normalization gains that are not
    (decaying scale parameters of normalization layers only shrinks them; common practice since
    Goyal et al. 2017). ``decay_all`` puts everything in the decayed group."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if decay_all or p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def scaled_lr(lr: float, rule: str, batch_size: int, base_batch_size: int) -> float:
    """Batch-size learning-rate scaling: linear (Goyal et al. 2017) or square root
    (Krizhevsky 2014; Granziol et al. 2022 for adaptive methods)."""
    if rule in (None, "none"):
        return lr
    ratio = batch_size / base_batch_size
    if rule == "linear":
        return lr * ratio
    if rule == "sqrt":
        return lr * math.sqrt(ratio)
    raise ConfigError(f"optimizer.lr_scaling={rule!r}; valid choices: none, linear, sqrt")


def build_optimizer(cfg: DictConfig, model: nn.Module, *, batch_size: int, total_steps: int) -> torch.optim.Optimizer:
    spec = OmegaConf.to_container(cfg, resolve=True)
    if "_target_" not in spec:
        raise ConfigError(f"optimizer config has no _target_: {sorted(spec)}")
    opts = {k: v for k, v in spec.items() if k not in HARNESS_KEYS and k != "_target_"}
    for key in ("lr", "weight_decay"):
        if key in opts and (not isinstance(opts[key], int | float) or opts[key] < 0):
            raise ConfigError(f"optimizer.{key}={opts[key]!r} must be a non-negative number")
    if "lr" in opts:
        opts["lr"] = scaled_lr(
            opts["lr"], spec.get("lr_scaling", "none"), batch_size, int(spec.get("base_batch_size", batch_size))
        )
    for key in ("betas",):
        if key in opts and isinstance(opts[key], list):
            opts[key] = tuple(opts[key])
    if spec.get("needs_total_steps"):
        opts[spec.get("total_steps_key", "num_iterations")] = total_steps
    cls = get_class(spec["_target_"])
    wd = float(opts.pop("weight_decay", 0.0))
    return cls(param_groups(model, wd, bool(spec.get("decay_all", False))), **opts)
