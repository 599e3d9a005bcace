"""Metrics computed from logits kept on the device: accuracy, loss, perplexity, calibration,
throughput helpers. Everything returns Python floats (one host sync per call, at log points)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def topk_correct(logits: Tensor, labels: Tensor, k: int) -> Tensor:
    """Number of samples whose label is among the top-k logits (a device scalar, no sync)."""
    k = min(k, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices
    return (top == labels.unsqueeze(-1)).any(-1).sum()


@torch.no_grad()
def classification_metrics(logits: Tensor, labels: Tensor, prefix: str = "test_") -> dict[str, float]:
    """Accuracy (top-1, and top-5 when there are more than 10 classes) and mean cross-entropy of
    a whole split's logits."""
    logits = logits.float()
    n = labels.numel()
    out = {
        f"{prefix}acc": topk_correct(logits, labels, 1).item() / n,
        f"{prefix}loss": F.cross_entropy(logits, labels).item(),
    }
    if logits.shape[-1] > 10:
        out[f"{prefix}top5"] = topk_correct(logits, labels, 5).item() / n
    return out


def perplexity(loss_per_token: float) -> float:
    return math.exp(loss_per_token) if loss_per_token < 100 else float("inf")
