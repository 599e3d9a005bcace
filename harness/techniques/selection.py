"""Data selection: Progressive Data Dropout (``regularization=pdd``, EFF-01).

Shriram M S, Hao, Hou, Lu, Sevilla-Lara, Arnab & Gowda 2025, "Progressive Data Dropout: An Embarrassingly
Simple Approach to Faster Training" (arXiv 2505.22342, NeurIPS 2025; code: bazyagami/LearningWithRevision).
Its difficulty-based variant (DBPD) trains epoch t on D_t = {(x_i, y_i) : p_t(x_i) < tau}, p_t the model's
softmax probability of the true class, and on the whole training set again from a revision epoch on;
tau = 0 keeps the misclassified samples (the authors' ``--threshold 0``). Cost is counted in effective
epochs: samples back-propagated / training-set size.

How the harness runs it. At the start of every epoch before the revision the technique scores the whole
training split in one batched pass in evaluation mode (no augmentation, no gradients, on the device:
``ctx.extras["predict"]``), keeps the positions with p_true < threshold (argmax != label for threshold 0)
as a device index tensor, and the loop iterates only those (``Technique.select_samples``; the split's
``batches(..., index=)``). The last ``revision_epochs`` epochs train on the whole split (the authors'
``--start_revision 29`` of 30 epochs is ``revision_epochs=1``).

Differences from the authors' code, on purpose: it scores each batch just before training on it, in
training mode on the augmented images, and back-propagates only the batch's kept samples (variable batch
sizes); here scoring is per epoch, in evaluation mode on clean images, and the kept samples form full
batches (fixed batch size, ``drop_last`` as in every epoch). Both spend one forward pass per training
sample per epoch on scoring; the record counts it apart (``scoring_sample_passes``) and the paper's
effective epochs count back-propagated samples only (the record's top-level ``effective_epochs``).

Budget. Epochs shrink, the budget stays in epochs: the run has the baseline's epochs, and the learning
rate schedule keeps its length in epochs (a shortened epoch advances it by a whole epoch's steps), so the
LR at the end of epoch t equals the baseline's, as with the authors' per-epoch StepLR.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from harness.errors import ConfigError
from harness.hooks import RunContext, Technique
from harness.infra import distributed


def keep_mask(logits: Tensor, labels: Tensor, threshold: float) -> Tensor:
    """DBPD's rule: True where a sample stays in the next epoch. ``threshold`` 0: misclassified
    (argmax != label); otherwise the softmax probability of the true class is below ``threshold``."""
    if threshold == 0:
        return logits.argmax(dim=1) != labels
    p_true = torch.softmax(logits.float(), dim=1).gather(1, labels.view(-1, 1)).squeeze(1)
    return p_true < threshold


class ProgressiveDataDropout(Technique):
    name = "pdd"
    description = "Progressive Data Dropout (DBPD): each epoch trains only on samples with p_true < threshold; full revision epochs at the end"
    paper = "Shriram M S et al. 2025, Progressive Data Dropout: An Embarrassingly Simple Approach to Faster Training (arXiv 2505.22342)"

    def __init__(self, threshold: float = 0.3, revision_epochs: int = 1):
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0.0 <= threshold <= 1.0:
            raise ConfigError(
                f"regularization=pdd: threshold={threshold!r} must be in [0, 1] (0 keeps the misclassified samples)"
            )
        if isinstance(revision_epochs, bool) or not isinstance(revision_epochs, int) or revision_epochs < 0:
            raise ConfigError(f"regularization=pdd: revision_epochs={revision_epochs!r} must be an integer >= 0")
        if distributed.env_world_size() > 1:
            raise ConfigError("regularization=pdd runs in one process only (torchrun shards are not selectable yet)")
        self.threshold = float(threshold)
        self.revision_epochs = int(revision_epochs)
        self.kept: Tensor | None = None  # the current epoch's kept positions (restored on resume)
        self.kept_epoch = -1
        self.kept_per_epoch: list[int] = []  # samples kept, per epoch (the training-set size on revision epochs)
        self.scoring_passes = 0  # forward-only sample passes spent on scoring
        self.train_size = 0

    def _check(self, ctx: RunContext) -> None:
        from harness.data.base import DeviceImageSplit

        data = ctx.data
        if data.task != "classification":
            raise ConfigError(f"regularization=pdd applies to classification only, not task {data.task!r}")
        if not isinstance(data.train, DeviceImageSplit):
            raise ConfigError(
                f"regularization=pdd needs a device-resident training split (digits, cifar10, cifar100, synthetic); "
                f"dataset={data.name} is a {type(data.train).__name__}"
            )

    def select_samples(self, ctx: RunContext) -> Tensor | None:
        self._check(ctx)
        self.train_size = len(ctx.data.train)
        if ctx.epoch == self.kept_epoch:  # resumed inside this epoch: the same samples as before the checkpoint
            return self.kept
        self.kept_epoch = ctx.epoch
        if ctx.epoch >= ctx.epochs - self.revision_epochs:  # revision: the whole training set
            self.kept = None
            self.kept_per_epoch.append(self.train_size)
            return None
        logits, labels = ctx.extras["predict"](ctx.data.train)  # evaluation mode, clean images, in order
        self.scoring_passes += len(labels)
        self.kept = keep_mask(logits, labels, self.threshold).nonzero().squeeze(1)  # one host sync per epoch
        self.kept_per_epoch.append(len(self.kept))
        return self.kept

    def state_dict(self) -> dict[str, Any]:
        return {
            "kept": None if self.kept is None else self.kept.cpu(),
            "kept_epoch": self.kept_epoch,
            "kept_per_epoch": list(self.kept_per_epoch),
            "scoring_passes": self.scoring_passes,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        kept = state.get("kept")
        self.kept = None if kept is None else torch.as_tensor(kept)
        self.kept_epoch = int(state.get("kept_epoch", -1))
        self.kept_per_epoch = list(state.get("kept_per_epoch", []))
        self.scoring_passes = int(state.get("scoring_passes", 0))

    def summary(self) -> dict[str, Any]:
        n = max(self.train_size, 1)
        return {
            "threshold": self.threshold,
            "revision_epochs": self.revision_epochs,
            "kept_per_epoch": self.kept_per_epoch,
            "kept_fraction_per_epoch": [round(k / n, 4) for k in self.kept_per_epoch],
            "scoring_sample_passes": self.scoring_passes,  # forward-only, not in effective_epochs
            "scoring_epochs": round(self.scoring_passes / n, 4),
        }
