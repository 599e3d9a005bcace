"""Train-time regularizers and training targets (config group ``regularization=``).

Design. Each is a ``Technique`` acting through two hooks of the loop:

- ``prepare_batch(batch, ctx)`` rewrites the batch before the forward pass: mixup and cutmix mix the
  images and set ``batch.soft_targets`` (the loop's default loss, ``harness.hooks.soft_cross_entropy``,
  then trains against them). Their mixing coefficient comes from a NumPy generator seeded from
  ``cfg.seed`` and saved in ``state_dict``, so runs and resumes are deterministic; the last sampled
  lambda is kept in ``last_lam``.
- ``loss(logits, batch, ctx)`` replaces cross-entropy: label smoothing, PS-KD, focal, squentropy. Each
  honours ``batch.soft_targets`` when another technique set them (label smoothing of mixup targets, for
  example), and accepts (..., C) logits, so label smoothing and focal also work on language models.

Train-time calibration methods live here rather than in ``calibration=``, which holds the post-hoc
calibrators, so one run can combine e.g. ``regularization=pskd calibration=temperature``.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.errors import ConfigError
from harness.hooks import Batch, RunContext, Technique, soft_cross_entropy


def _check_unknown(tech: Technique, hyperparams: dict[str, Any]) -> None:
    if hyperparams:
        valid = [p for p in inspect.signature(type(tech).__init__).parameters if p not in ("self", "hyperparams")]
        raise ConfigError(
            f"regularization={tech.name} got unknown hyper-parameters {sorted(hyperparams)}; "
            f"valid: {', '.join(valid) or 'none'}"
        )


def _check_range(tech: Technique, key: str, value: float, lo: float, hi: float | None = None) -> float:
    value = float(value)
    if value < lo or (hi is not None and value > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ConfigError(f"regularization={tech.name}: {key}={value} must be {bound}")
    return value


def _require_classification(tech: Technique, ctx: RunContext, images: bool = False) -> None:
    data = ctx.data
    if data is not None and data.task != "classification":
        raise ConfigError(f"regularization={tech.name} applies to classification only, not task {data.task!r}")
    if images and data is not None and len(data.input_shape) != 3:
        raise ConfigError(f"regularization={tech.name} needs (C, H, W) images, got input shape {data.input_shape}")


def targets_of(batch: Batch, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """(N, C) target distribution: ``batch.soft_targets`` when set, else the one-hot labels."""
    if batch.soft_targets is not None:
        return batch.soft_targets.reshape(-1, num_classes).to(dtype)
    return F.one_hot(batch.y.reshape(-1), num_classes).to(dtype)


class Regularizer(Technique):
    def __init__(self, **hyperparams: Any):
        _check_unknown(self, hyperparams)

    def summary(self) -> dict[str, Any]:
        return {}


class LabelSmoothing(Regularizer):
    """Cross-entropy against (1 - eps) * target + eps / C (Szegedy et al. 2016), eps = 0.1 by default.
    Hard labels go through torch's fused ``cross_entropy(label_smoothing=eps)`` (cheap for large
    vocabularies); soft targets (mixup) are smoothed the same way."""

    name = "label_smoothing"

    def __init__(self, epsilon: float = 0.1, **hyperparams: Any):
        super().__init__(**hyperparams)
        self.epsilon = _check_range(self, "epsilon", epsilon, 0.0, 1.0)

    def loss(self, logits: Tensor, batch: Batch, ctx: RunContext) -> Tensor:
        c = logits.shape[-1]
        logits = logits.float().reshape(-1, c)
        if batch.soft_targets is None:
            return F.cross_entropy(logits, batch.y.reshape(-1), label_smoothing=self.epsilon)
        t = targets_of(batch, c) * (1 - self.epsilon) + self.epsilon / c
        return soft_cross_entropy(logits, replace(batch, soft_targets=t))

    def summary(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon}


class PSKD(Regularizer):
    """PS-KD (Kim et al. 2021): at epoch t the target is (1 - a_t) * one-hot + a_t * p_{t-1}(x), where
    p_{t-1}(x) is the model's own softmax output for that training sample in the previous epoch and
    a_t = alpha_T * t / T. As in the official code (lgcnsai/PS-KD-Pytorch), t is the 1-based epoch number
    (ctx.epoch + 1) so the last epoch uses alpha_T, and epoch 0 trains on one-hot targets because there are
    no predictions yet. Predictions of the (augmented) training batch are recorded during ``loss`` into an
    (N_train, C) device buffer indexed by ``batch.index``; since every sample is visited once per epoch,
    reading before writing yields last epoch's prediction. A sample not yet seen (dropped by drop_last)
    falls back to its one-hot label. The buffer is part of ``state_dict``, so resuming is exact."""

    name = "pskd"

    def __init__(self, alpha_T: float = 0.8, **hyperparams: Any):
        super().__init__(**hyperparams)
        self.alpha_T = _check_range(self, "alpha_T", alpha_T, 0.0, 1.0)
        self.predictions: Tensor | None = None  # (N_train, C) softmax outputs, float32, on device
        self.seen: Tensor | None = None  # (N_train,) bool: has a stored prediction
        self.last_alpha = 0.0

    def prepare_model(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        _require_classification(self, ctx)
        if self.predictions is None and ctx.data is not None:
            self._allocate(len(ctx.data.train), ctx.data.num_classes, ctx.device)
        return model

    def _allocate(self, n: int, c: int, device: torch.device) -> None:
        self.predictions = torch.zeros(n, c, device=device)
        self.seen = torch.zeros(n, dtype=torch.bool, device=device)

    def alpha(self, ctx: RunContext) -> float:
        epochs = ctx.epochs or (math.ceil(ctx.total_steps / ctx.steps_per_epoch) if ctx.steps_per_epoch else 1)
        return self.alpha_T * min((ctx.epoch + 1) / max(epochs, 1), 1.0)

    def targets(self, batch: Batch, num_classes: int, ctx: RunContext) -> Tensor:
        onehot = targets_of(replace(batch, soft_targets=None), num_classes)
        if ctx.epoch == 0:
            self.last_alpha = 0.0
            return onehot
        a = self.last_alpha = self.alpha(ctx)
        prev = self.predictions[batch.index]
        soft = (1 - a) * onehot + a * prev
        return torch.where(self.seen[batch.index].unsqueeze(1), soft, onehot)

    def loss(self, logits: Tensor, batch: Batch, ctx: RunContext) -> Tensor:
        if batch.index is None:
            raise RuntimeError("regularization=pskd needs batch.index (each sample's position in the training split)")
        c = logits.shape[-1]
        if self.predictions is None:
            self._allocate(len(ctx.data.train), c, logits.device)
        t = self.targets(batch, c, ctx)
        loss = soft_cross_entropy(logits, replace(batch, soft_targets=t))
        self.predictions[batch.index] = logits.detach().float().softmax(-1)
        self.seen[batch.index] = True
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"predictions": self.predictions, "seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("predictions") is None:
            return
        device = self.predictions.device if self.predictions is not None else state["predictions"].device
        self.predictions = state["predictions"].to(device)
        self.seen = state["seen"].to(device)

    def summary(self) -> dict[str, Any]:
        return {"alpha_T": self.alpha_T, "final_alpha": self.last_alpha}


class FocalLoss(Regularizer):
    """-(1 - p_y)^gamma log p_y (Lin et al. 2017); gamma = 0 is cross-entropy. Mukhoti et al. 2020 show it
    improves calibration; ``adaptive: true`` is their sample-dependent FLSD-53 schedule (gamma = 5 when
    p_y < 0.2, else 3), which ignores ``gamma``. Soft targets t generalise it to -sum_k t_k (1 - p_k)^gamma log p_k."""

    name = "focal"

    def __init__(self, gamma: float = 2.0, adaptive: bool = False, **hyperparams: Any):
        super().__init__(**hyperparams)
        self.gamma = _check_range(self, "gamma", gamma, 0.0)
        self.adaptive = bool(adaptive)

    def loss(self, logits: Tensor, batch: Batch, ctx: RunContext) -> Tensor:
        c = logits.shape[-1]
        logp = logits.float().reshape(-1, c).log_softmax(-1)
        if batch.soft_targets is None:
            logp = logp.gather(1, batch.y.reshape(-1, 1)).squeeze(1)
            p = logp.exp()
            gamma = torch.where(p < 0.2, 5.0, 3.0) if self.adaptive else self.gamma
            return -((1 - p) ** gamma * logp).mean()
        p = logp.exp()
        gamma = torch.where(p < 0.2, 5.0, 3.0) if self.adaptive else self.gamma
        return -(targets_of(batch, c) * (1 - p) ** gamma * logp).sum(-1).mean()

    def summary(self) -> dict[str, Any]:
        return {"gamma": "FLSD-53" if self.adaptive else self.gamma}


class Squentropy(Regularizer):
    """Cross-entropy plus the average square loss over the incorrect classes' logits (Hui et al. 2023):
    L = CE(z, y) + 1/(C - 1) * sum_{j != y} z_j^2. No hyper-parameters. With soft targets t the square term
    is weighted by (1 - t_j), which is the formula above for one-hot t."""

    name = "squentropy"

    def loss(self, logits: Tensor, batch: Batch, ctx: RunContext) -> Tensor:
        c = logits.shape[-1]
        z = logits.float().reshape(-1, c)
        if batch.soft_targets is None:  # no (N, C) one-hot: cheap for large vocabularies
            y = batch.y.reshape(-1)
            square = (z**2).sum(-1) - z.gather(1, y[:, None]).squeeze(1) ** 2
            return F.cross_entropy(z, y) + square.mean() / (c - 1)
        t = targets_of(batch, c)
        return -(t * z.log_softmax(-1)).sum(-1).mean() + ((1 - t) * z**2).sum(-1).mean() / (c - 1)


class _Mixing(Regularizer):
    """Shared sampling for mixup/cutmix: lambda ~ Beta(alpha, alpha) (and cutmix's box) from a NumPy
    generator seeded from cfg.seed (torch has no seeded Beta sampler): host scalars, no copy to the device.
    The permutation of the batch is drawn on the batch's device (``torch.randperm`` with a device
    generator seeded from cfg.seed), so no per-step host-to-device copy stalls the host. Both
    generators' states are checkpointed."""

    def __init__(self, alpha: float = 1.0, prob: float = 1.0, **hyperparams: Any):
        super().__init__(**hyperparams)
        self.alpha = _check_range(self, "alpha", alpha, 0.0)
        if self.alpha == 0:
            raise ConfigError(f"regularization={self.name}: alpha must be > 0, got 0")
        self.prob = _check_range(self, "prob", prob, 0.0, 1.0)
        self.rng: np.random.Generator | None = None
        self.gen: torch.Generator | None = None  # on the batch's device: the permutations
        self._gen_state: Tensor | None = None  # restored from a checkpoint before the generator exists
        self.perm_seed = 0
        self.last_lam: float | None = None
        self.last_perm: Tensor | None = None
        self.applied = 0
        self.steps = 0

    def prepare_model(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        _require_classification(self, ctx, images=True)
        self._seed(ctx)
        return model

    def _seed(self, ctx: RunContext) -> None:
        if self.rng is None:
            seed = int(ctx.cfg.seed) if ctx.cfg is not None else 0
            self.rng = np.random.default_rng([seed, 0x5EED])
            self.perm_seed = seed * 1_000_003 + 0x5EED

    def _permutation(self, n: int, device: torch.device) -> Tensor:
        if self.gen is None or self.gen.device != device:
            self.gen = torch.Generator(device=device)
            self.gen.manual_seed(self.perm_seed)
            if self._gen_state is not None:
                self.gen.set_state(self._gen_state)
                self._gen_state = None
        return torch.randperm(n, device=device, generator=self.gen)

    def prepare_batch(self, batch: Batch, ctx: RunContext) -> Batch:
        self._seed(ctx)
        self.steps += 1
        if self.prob < 1 and self.rng.random() >= self.prob:
            self.last_lam, self.last_perm = None, None
            return batch
        n = batch.x.shape[0]
        lam = float(self.rng.beta(self.alpha, self.alpha))
        perm = self._permutation(n, batch.x.device)
        x, lam = self.mix(batch.x, perm, lam)
        t = targets_of(batch, ctx.data.num_classes)
        self.last_lam, self.last_perm = lam, perm
        self.applied += 1
        return replace(batch, x=x, soft_targets=lam * t + (1 - lam) * t[perm])

    def mix(self, x: Tensor, perm: Tensor, lam: float) -> tuple[Tensor, float]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {
            "rng": self.rng.bit_generator.state if self.rng is not None else None,
            "perm_seed": self.perm_seed,
            "gen": self.gen.get_state() if self.gen is not None else self._gen_state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("rng") is not None:
            self.rng = np.random.default_rng()
            self.rng.bit_generator.state = state["rng"]
        self.perm_seed = int(state.get("perm_seed", self.perm_seed))
        if state.get("gen") is not None:
            self._gen_state = state["gen"].cpu()
            if self.gen is not None:
                self.gen.set_state(self._gen_state)
                self._gen_state = None

    def summary(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "prob": self.prob, "applied_fraction": self.applied / max(self.steps, 1)}


class Mixup(_Mixing):
    """x = lam * x_i + (1 - lam) * x_j, y = lam * y_i + (1 - lam) * y_j with lam ~ Beta(alpha, alpha) and j a
    permutation of the batch (Zhang et al. 2018), alpha = 1.0 by default; applied to a batch with
    probability ``prob``. Also a train-time calibrator (Thulasidasan et al. 2019; Chidambaram & Ge 2024,
    On the Limitations of Temperature Scaling for Distributions with Overlaps)."""

    name = "mixup"

    def mix(self, x: Tensor, perm: Tensor, lam: float) -> tuple[Tensor, float]:
        return lam * x + (1 - lam) * x[perm], lam


class CutMix(_Mixing):
    """Paste a box of the permuted batch's images into each image (Yun et al. 2019): lam ~ Beta(alpha, alpha),
    box of side ratio sqrt(1 - lam) centred uniformly at random and clipped to the image; lam is then
    re-computed from the clipped box area and the targets mix with it. ``prob`` as in the official code."""

    name = "cutmix"

    def mix(self, x: Tensor, perm: Tensor, lam: float) -> tuple[Tensor, float]:
        h, w = x.shape[-2:]
        r = math.sqrt(1.0 - lam)
        ch, cw = int(h * r), int(w * r)
        cy, cx = int(self.rng.integers(h)), int(self.rng.integers(w))
        y1, y2 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x1, x2 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        x = x.clone()
        x[:, :, y1:y2, x1:x2] = x[perm, :, y1:y2, x1:x2]
        return x, 1.0 - (y2 - y1) * (x2 - x1) / (h * w)
