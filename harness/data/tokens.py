"""Language-model data: a token array kept on the device and cut into contiguous windows there.

``TokenSplit`` is the LM counterpart of ``DeviceImageSplit``: the whole split is one int32 tensor
on the device; a batch is ``Batch(x=(B, T) int64, y=(B, T) int64)`` with ``y`` the next token of
each position of ``x``. Training windows start at random offsets drawn from
``epoch_generator(seed, epoch)`` (so an epoch is a pure function of (seed, epoch) and resume is
exact); evaluation windows are non-overlapping, in order, and cover every token of the split.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from harness.data.base import epoch_generator
from harness.errors import ConfigError
from harness.hooks import Batch


class TokenSplit:
    def __init__(
        self, ids: Tensor | np.ndarray, context: int, device: torch.device | str = "cpu", steps_per_epoch=None
    ):
        ids = torch.from_numpy(np.asarray(ids).astype(np.int32)) if isinstance(ids, np.ndarray) else ids
        if ids.ndim != 1:
            raise ValueError(f"token ids must be 1-D, got shape {tuple(ids.shape)}")
        if context < 1 or len(ids) < context + 1:
            raise ConfigError(f"dataset.context={context} needs at least context+1 tokens; this split has {len(ids)}")
        self.device = torch.device(device)
        self.ids = ids.to(self.device, torch.int32)  # int32 halves the memory of int64; windows are cast per batch
        self.context = int(context)
        self.steps_per_epoch = None if steps_per_epoch is None else int(steps_per_epoch)
        self.tokens = len(ids)
        self._arange = torch.arange(self.context + 1, device=self.device)

    def __len__(self) -> int:
        """Number of evaluation windows (the last one may be shorter than ``context``)."""
        return -(-(self.tokens - 1) // self.context)

    def num_batches(self, batch_size: int, train: bool) -> int:
        if train:
            return self.steps_per_epoch or max(1, (self.tokens - 1) // (batch_size * self.context))
        full, tail = divmod(self.tokens - 1, self.context)
        return -(-full // batch_size) + (1 if tail else 0)

    def _windows(self, starts: Tensor, length: int) -> tuple[Tensor, Tensor]:
        w = self.ids[starts[:, None] + self._arange[: length + 1]].long()
        return w[:, :-1], w[:, 1:]

    def batches(self, batch_size: int, *, train: bool, epoch: int = 0, seed: int = 0) -> Iterator[Batch]:
        t = self.context
        if train:
            g = epoch_generator(seed, epoch)
            n = self.num_batches(batch_size, True)
            # every offset of the epoch in one draw and one host-to-device copy
            starts = torch.randint(0, self.tokens - t, (n, batch_size), generator=g).to(self.device)
            for i in range(n):
                x, y = self._windows(starts[i], t)
                yield Batch(x=x, y=y, index=starts[i])
        else:
            full, tail = divmod(self.tokens - 1, t)
            for i in range(0, full, batch_size):
                win = torch.arange(i, min(i + batch_size, full), device=self.device)
                x, y = self._windows(win * t, t)
                yield Batch(x=x, y=y, index=win)
            if tail:  # the last partial window, so the evaluation covers every token exactly once
                x, y = self._windows(torch.tensor([full * t], device=self.device), tail)
                yield Batch(x=x, y=y, index=torch.tensor([full], device=self.device))


def unigram_perplexity(ids: np.ndarray, vocab_size: int) -> float:
    """exp of the entropy of the split's unigram distribution: the perplexity of the best
    context-free model fitted to it, the bar a language model must clear."""
    p = np.bincount(ids, minlength=vocab_size).astype(np.float64)
    p = p[p > 0] / p.sum()
    return float(math.exp(-(p * np.log(p)).sum()))


def unigram_model_perplexity(train_ids: np.ndarray, eval_ids: np.ndarray, vocab_size: int) -> float:
    """Perplexity on ``eval_ids`` of the unigram model fitted to ``train_ids`` (add-one smoothed, so
    tokens unseen in training keep it finite): the context-free baseline for a validation perplexity."""
    counts = np.bincount(train_ids, minlength=vocab_size).astype(np.float64) + 1
    logp = np.log(counts / counts.sum())
    return float(math.exp(-logp[eval_ids].mean()))


def smallest_uint(vocab_size: int) -> type:
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32
