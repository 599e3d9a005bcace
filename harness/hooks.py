"""The technique plug-in protocol.

A technique is a small object that acts on a run through a fixed set of hooks, called by the
training loop in this order (see DESIGN.md):

    prepare_model  -> once, after the model is built and before the optimizer exists
                      (normalization swap, QAT, FP8)
    select_samples -> at the start of each epoch: the training positions (a device index tensor) the
                      epoch iterates, or None for the whole split; the first technique that returns
                      an index decides (Progressive Data Dropout). The schedule keeps its length in
                      epochs: a shortened epoch advances it by a whole epoch's steps
    prepare_batch  -> every step, before the forward pass (mixup, cutmix); may return soft targets
    loss           -> every step: the first technique that returns a loss replaces cross-entropy
                      (label smoothing, PS-KD, focal, squentropy)
    after_backward -> every step, after backward (and after unscaling fp16 gradients), before the
                      optimizer step (clipping: norm, AutoClip, AGC)
    after_epoch    -> at the end of each epoch (PS-KD targets, EMA)
    finalize       -> once, after training (temperature scaling, post-training quantization);
                      returns metrics merged into the record

A technique implements only the hooks it needs; the base class methods do nothing. Techniques
keep state that must survive a resume in ``state_dict``/``load_state_dict`` and report
statistics for the record in ``summary``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class RunContext:
    """What a hook may look at. Filled by ``harness.run.experiment`` and updated by the loop."""

    cfg: Any  # the resolved OmegaConf config of the run
    device: torch.device
    data: Any = None  # harness.data.DataBundle
    model: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    scaler: Any = None  # torch.amp.GradScaler when precision is fp16
    total_steps: int = 0
    steps_per_epoch: int = 0
    epochs: int = 0
    epoch: int = 0  # 0-based epoch currently running
    step: int = 0  # optimizer steps taken so far
    run_dir: str = ""
    # free-form values techniques share with each other and with the record
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class Batch:
    """One training batch as the loop sees it.

    ``y`` holds integer class labels (or next-token ids for language models). ``soft_targets``,
    when set by ``prepare_batch``, is a (batch, classes) probability tensor that the loss uses
    instead of ``y``. ``index`` holds each sample's position in the training split (on the device),
    so per-sample state (PS-KD predictions) can be kept.
    """

    x: Tensor
    y: Tensor
    index: Tensor | None = None
    soft_targets: Tensor | None = None


class Technique:
    """Base class: every hook is a no-op. Subclasses set ``name``, ``paper`` and ``description``."""

    name: str = "technique"
    description: str = ""
    paper: str = ""

    def prepare_model(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        return model

    def select_samples(self, ctx: RunContext) -> Tensor | None:
        return None

    def prepare_batch(self, batch: Batch, ctx: RunContext) -> Batch:
        return batch

    def loss(self, logits: Tensor, batch: Batch, ctx: RunContext) -> Tensor | None:
        return None

    def after_backward(self, model: nn.Module, ctx: RunContext) -> None:
        return None

    def after_epoch(self, ctx: RunContext) -> None:
        return None

    def finalize(self, model: nn.Module, ctx: RunContext) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def summary(self) -> dict[str, Any]:
        """Statistics for the record (e.g. fraction of steps clipped)."""
        return {}


def overrides(technique: Technique, hook: str) -> bool:
    """True when ``technique`` implements ``hook`` itself (the loop skips no-op hooks)."""
    return getattr(type(technique), hook) is not getattr(Technique, hook)


CE_CHUNK_TOKENS = 8192  # rows of low-precision logits whose float32 copy exists at once in the LM loss


def _ce_sum(logits: Tensor, y: Tensor) -> Tensor:
    return torch.nn.functional.cross_entropy(logits.float(), y, reduction="sum")


def soft_cross_entropy(logits: Tensor, batch: Batch) -> Tensor:
    """Cross-entropy against ``batch.soft_targets`` when present, else against labels ``y``, in float32.

    Language-model logits (B, T, V) in an autocast dtype are not copied to float32 as a whole (GPT-2 at
    nanoGPT's micro-batch: 12 x 1024 x 50257 x 4 bytes = 2.5 GB, twice with the saved softmax): the loss
    runs over chunks of ``CE_CHUNK_TOKENS`` rows, each cast to float32 inside an activation checkpoint,
    so one chunk's float32 copy exists at a time, in the forward and in the backward; the result equals
    ``cross_entropy(logits.float(), y)`` up to float32 summation order."""
    if batch.soft_targets is not None:
        return -(batch.soft_targets * torch.log_softmax(logits.float(), dim=-1)).sum(-1).mean()
    flat, y = logits.reshape(-1, logits.shape[-1]), batch.y.reshape(-1)
    if logits.ndim < 3 or logits.dtype == torch.float32 or flat.shape[0] <= CE_CHUNK_TOKENS:
        return _ce_sum(flat, y) / y.numel()
    from torch.utils.checkpoint import checkpoint

    total = logits.new_zeros((), dtype=torch.float32)
    for lc, yc in zip(flat.split(CE_CHUNK_TOKENS), y.split(CE_CHUNK_TOKENS)):
        total = total + (
            checkpoint(_ce_sum, lc, yc, use_reentrant=False) if torch.is_grad_enabled() else _ce_sum(lc, yc)
        )
    return total / y.numel()
