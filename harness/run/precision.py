"""Numeric precision of a run: ``auto`` resolves to bf16 autocast on a CUDA GPU that supports it and
fp32 elsewhere; fp16 autocast is paired with a gradient scaler by the trainer."""

from __future__ import annotations

from contextlib import nullcontext

import torch


def resolve_precision(name: str, device: torch.device) -> str:
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return name


def autocast_for(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp16":
        return torch.autocast(device.type, dtype=torch.float16)
    return nullcontext()
