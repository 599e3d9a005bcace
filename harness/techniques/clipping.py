"""Gradient clipping (``clip=`` group): an ``after_backward`` hook that runs after fp16 gradients are
unscaled and before the optimizer step.

The clipping itself is the libraries': ``torch.nn.utils.clip_grad_norm_`` (norm),
``clip_grad_value_`` (value), ``clip_grads_with_norm_`` (AutoClip's percentile threshold) and
``timm.utils.adaptive_clip_grad`` (AGC); ZClip has no maintained implementation and is written here.
Around them the harness keeps its statistics (fraction of steps clipped, mean pre-clip norm).

No host synchronisation in the step: the norm, the threshold and the clip decision stay device
tensors (torch's clip multiplies by ``min(1, threshold / norm)`` unconditionally) and the statistics
for the record are accumulated on the device and read once by ``summary``.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.utils.agc import adaptive_clip_grad, unitwise_norm
from torch import Tensor, nn
from torch.nn.utils import clip_grad_norm_, clip_grad_value_, clip_grads_with_norm_, get_total_norm

from harness.errors import ConfigError
from harness.hooks import RunContext, Technique
from harness.techniques.optimizers import final_layer


def _grads(model: nn.Module) -> list[Tensor]:
    return [p.grad for p in model.parameters() if p.grad is not None]


def _with_grads(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.grad is not None]


def global_norm(grads: list[Tensor]) -> Tensor:
    """L2 norm of all gradients together (``torch.nn.utils.get_total_norm``), a device tensor."""
    if not grads:
        return torch.zeros(())
    return get_total_norm(grads, 2.0)


def scale_(grads: list[Tensor], factor: Tensor) -> None:
    if grads:
        torch._foreach_mul_(grads, factor.to(grads[0].dtype))


class _Clip(Technique):
    """Shared statistics: steps seen, steps clipped and the sum of pre-clip global norms (on device)."""

    def __init__(self):
        self.steps = 0  # host counter: incremented without reading the device
        self._clipped: Tensor | None = None
        self._norm_sum: Tensor | None = None

    def _record(self, norm: Tensor, clipped: Tensor) -> None:
        if self._clipped is None:
            self._clipped = torch.zeros((), device=norm.device)
            self._norm_sum = torch.zeros((), device=norm.device)
        self._clipped = self._clipped.to(norm.device) + clipped.float()
        finite = torch.isfinite(norm)
        self._norm_sum = self._norm_sum.to(norm.device) + torch.where(finite, norm, torch.zeros_like(norm))
        self.steps += 1

    def summary(self) -> dict[str, Any]:
        n = max(self.steps, 1)
        return {
            "steps": self.steps,
            "clip_fraction": float(self._clipped) / n if self._clipped is not None else 0.0,
            "mean_grad_norm": float(self._norm_sum) / n if self._norm_sum is not None else None,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "clipped": self._clipped, "norm_sum": self._norm_sum}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.steps, self._clipped, self._norm_sum = state["steps"], state["clipped"], state["norm_sum"]


class NormClip(_Clip):
    name = "clip_norm"

    def __init__(self, max_norm: float = 1.0):
        super().__init__()
        if max_norm <= 0:
            raise ConfigError(f"clip.max_norm={max_norm} must be > 0")
        self.max_norm = float(max_norm)

    def after_backward(self, model: nn.Module, ctx: RunContext) -> None:
        params = _with_grads(model)
        if not params:
            return
        norm = clip_grad_norm_(params, self.max_norm)  # returns the pre-clip total norm, on the device
        self._record(norm, norm > self.max_norm)


class ValueClip(_Clip):
    name = "clip_value"

    def __init__(self, clip_value: float = 1.0):
        super().__init__()
        if clip_value <= 0:
            raise ConfigError(f"clip.clip_value={clip_value} must be > 0")
        self.clip_value = float(clip_value)

    def after_backward(self, model: nn.Module, ctx: RunContext) -> None:
        params = _with_grads(model)
        if not params:
            return
        grads = [p.grad for p in params]
        norm = global_norm(grads)
        peak = get_total_norm(grads, float("inf"))  # the largest |g|, before clipping
        clip_grad_value_(params, self.clip_value)
        self._record(norm, peak > self.clip_value)


class AutoClip(_Clip):
    """AutoClip: the threshold at step t is the ``percentile``-th percentile of the global gradient
    norms of steps 1..t (the current one included, as in the reference implementation). The history
    is a preallocated device buffer, so neither the percentile nor the clip syncs with the host;
    non-finite norms (fp16 overflow steps, which the scaler skips) are kept out of the history."""

    name = "autoclip"

    def __init__(self, percentile: float = 10.0):
        super().__init__()
        if not 0 < percentile <= 100:
            raise ConfigError(f"clip.percentile={percentile} must be in (0, 100]")
        self.percentile = float(percentile)
        self.history: Tensor | None = None
        self.count = 0
        self.threshold: Tensor | None = None

    def _buffer(self, device: torch.device, needed: int) -> Tensor:
        if self.history is None or self.history.numel() < needed:
            old = self.history
            self.history = torch.full((max(needed, 1024),), float("nan"), device=device)
            if old is not None:
                self.history[: old.numel()] = old.to(device)
        elif self.history.device != device:
            self.history = self.history.to(device)
        return self.history

    def after_backward(self, model: nn.Module, ctx: RunContext) -> None:
        grads = _grads(model)
        if not grads:
            return
        norm = global_norm(grads)
        hist = self._buffer(norm.device, max(int(ctx.total_steps), self.count + 1))
        hist[self.count] = torch.where(torch.isfinite(norm), norm, torch.full_like(norm, float("nan")))
        self.count += 1
        self.threshold = torch.nanquantile(hist[: self.count], self.percentile / 100.0)
        clip_grads_with_norm_(_with_grads(model), self.threshold, norm)
        self._record(norm, norm > self.threshold)

    def summary(self) -> dict[str, Any]:
        out = super().summary()
        out["percentile"] = self.percentile
        out["final_threshold"] = float(self.threshold) if self.threshold is not None else None
        return out

    def state_dict(self) -> dict[str, Any]:
        hist = self.history[: self.count].cpu() if self.history is not None else None
        return {**super().state_dict(), "history": hist, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            super().load_state_dict(state)
            self.count, self.history = state["count"], state["history"]


class AGC(_Clip):
    """Adaptive gradient clipping (Brock et al. 2021): for every unit i (an output row of a weight;
    a whole bias or gain vector, as in the official NFNets code), if ||G_i|| / max(||W_i||, eps) >
    clip_factor, rescale G_i to clip_factor * max(||W_i||, eps). The clipping is
    ``timm.utils.adaptive_clip_grad``; the final classifier layer is not clipped (paper). The statistic
    recorded is the fraction of steps in which any unit was clipped, computed from the same unit-wise
    norms before timm clips (one extra norm per parameter, no host sync)."""

    name = "agc"

    def __init__(self, clip_factor: float = 0.01, eps: float = 1e-3, exclude_final: bool = True):
        super().__init__()
        if clip_factor <= 0:
            raise ConfigError(f"clip.clip_factor={clip_factor} must be > 0")
        self.clip_factor, self.eps, self.exclude_final = float(clip_factor), float(eps), bool(exclude_final)
        self._params: list[nn.Parameter] | None = None

    def clipped_params(self, model: nn.Module) -> list[nn.Parameter]:
        head = final_layer(model) if self.exclude_final else None
        skip = {id(p) for p in head.parameters()} if head is not None else set()
        return [p for p in model.parameters() if p.requires_grad and id(p) not in skip]

    unitwise_norm = staticmethod(unitwise_norm)  # timm's: per output unit; a 1-D tensor is one unit

    @torch.no_grad()
    def after_backward(self, model: nn.Module, ctx: RunContext) -> None:
        if self._params is None:
            self._params = self.clipped_params(model)
        params = [p for p in self._params if p.grad is not None]
        if not params:
            return
        norm = global_norm(_grads(model))
        over = [
            (unitwise_norm(p.grad.detach()) > unitwise_norm(p.detach()).clamp(min=self.eps) * self.clip_factor).any()
            for p in params
        ]
        adaptive_clip_grad(params, clip_factor=self.clip_factor, eps=self.eps)
        self._record(norm, torch.stack(over).any())


class ZClip(_Clip):
    """ZClip (Kumar et al. 2025): keep EMAs (``alpha``) of the mean and variance of the global gradient
    norm; after ``warmup_steps`` steps (which only collect statistics), a norm whose z-score exceeds
    ``z_thresh`` is clipped to ``mean + z_thresh**2 / z * std`` (the paper's reciprocal rule, package
    default) and the clipped norm updates the EMAs."""

    name = "zclip"

    def __init__(self, alpha: float = 0.97, z_thresh: float = 2.5, warmup_steps: int = 25, eps: float = 1e-6):
        super().__init__()
        if not 0 < alpha < 1 or z_thresh <= 0 or warmup_steps < 1:
            raise ConfigError(
                f"clip=zclip needs 0 < alpha < 1, z_thresh > 0, warmup_steps >= 1 (got {alpha}, {z_thresh}, {warmup_steps})"
            )
        self.alpha, self.z_thresh, self.warmup, self.eps = float(alpha), float(z_thresh), int(warmup_steps), float(eps)
        self.mean: Tensor | None = None
        self.var: Tensor | None = None
        self.warm: list[Tensor] = []

    def after_backward(self, model: nn.Module, ctx: RunContext) -> None:
        grads = _grads(model)
        if not grads:
            return
        norm = global_norm(grads)
        if self.mean is None:  # warm-up: collect norms, then initialise mean and variance from them
            self.warm.append(norm.detach())
            if len(self.warm) >= self.warmup:
                w = torch.stack(self.warm)
                w = torch.where(torch.isfinite(w), w, torch.full_like(w, float("nan")))  # skip fp16 overflow steps
                mean = w.nanmean()
                self.mean, self.var, self.warm = mean, ((w - mean) ** 2).nanmean(), []
            self._record(norm, torch.zeros((), dtype=torch.bool, device=norm.device))
            return
        self.mean, self.var = self.mean.to(norm.device), self.var.to(norm.device)  # after a resume: cpu
        std = self.var.sqrt()
        z = (norm - self.mean) / (std + self.eps)
        spike = (z > self.z_thresh) & torch.isfinite(norm)
        target = self.mean + (self.z_thresh**2 / z.clamp(min=self.eps)) * std
        clipped_norm = torch.where(spike, target, norm)
        scale_(grads, torch.where(spike, clipped_norm / (norm + 1e-6), torch.ones_like(norm)))
        ok = torch.isfinite(clipped_norm)
        new_mean = self.alpha * self.mean + (1 - self.alpha) * clipped_norm
        new_var = self.alpha * self.var + (1 - self.alpha) * (clipped_norm - new_mean) ** 2
        self.mean, self.var = torch.where(ok, new_mean, self.mean), torch.where(ok, new_var, self.var)
        self._record(norm, spike)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "mean": self.mean, "var": self.var, "warm": list(self.warm)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            super().load_state_dict(state)
            self.mean, self.var, self.warm = state["mean"], state["var"], list(state["warm"])
