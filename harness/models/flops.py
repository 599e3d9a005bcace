"""FLOPs per sample for MFU and the record: a model's own analytic ``flops_per_sample()`` when it
has one (GPT-2: 6·N plus attention per token), else counted with torch's FLOP counter on one
forward pass and multiplied by 3 (backward costs about twice the forward)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """Parameters counted once (tied weights are one tensor)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@torch.no_grad()
def training_flops_per_sample(model: nn.Module, input_shape: tuple[int, ...], dtype=torch.float32) -> int | None:
    if hasattr(model, "flops_per_sample"):
        return int(model.flops_per_sample())
    device = next(model.parameters()).device
    x = torch.zeros((2, *input_shape), device=device, dtype=dtype)
    was_training = model.training
    model.eval()  # no BatchNorm statistics update
    try:
        with FlopCounterMode(display=False) as counter:
            model(x)
    except Exception:  # a model the counter cannot trace: leave the figure out rather than guess
        return None
    finally:
        model.train(was_training)
    return int(3 * counter.get_total_flops() / 2)
