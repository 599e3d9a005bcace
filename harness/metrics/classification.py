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


LM_EVAL_CHUNK_TOKENS = 8192  # tokens whose float32 logits exist at once when a language model is evaluated


def lm_nll_sum(forward, batch, total: Tensor | None = None) -> tuple[Tensor, int]:
    """Summed next-token cross-entropy of one evaluation batch, in float64 on the device, computed in chunks
    of ``LM_EVAL_CHUNK_TOKENS`` tokens so that only one chunk's float32 logits exist at a time (GPT-2 at an
    evaluation batch of 512 would otherwise hold about 100 GB of logits). Adds to ``total`` when given;
    returns it and the number of tokens. No host synchronisation."""
    rows = max(1, LM_EVAL_CHUNK_TOKENS // batch.x.shape[1])
    count = 0
    for x, y in zip(batch.x.split(rows), batch.y.split(rows)):
        logits = forward(x).float()
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").double()
        total = ce if total is None else total.to(ce.device) + ce
        count += y.numel()
    return total, count
