"""Optimizers: any ``torch.optim.Optimizer`` class reached through ``_target_`` in
``conf/optimizer/<name>.yaml`` (torch.optim, timm.optim, pytorch-optimizer, torchao), built by
``build_optimizer`` with ``hydra.utils.instantiate(..., _partial_=True)`` and called with the model's
parameter groups (and the run's total steps where the YAML asks for them).

Adding an optimizer a library already has is one YAML file: ``_target_``, the paper's
hyper-parameters, ``name``/``description``/``paper``/``source``. ``optimizer=registry
optimizer.name=<name>`` reaches every optimizer pytorch-optimizer registers without a YAML of its own.
The harness's keys (``harness.schemas.OptimizerConfig``, with their defaults) are not passed to the class:

- ``lr_scaling`` (none | linear | sqrt) and ``base_batch_size``: batch-size learning-rate rule;
- ``decay_all``: also decay biases, normalization gains and a model's ``no_weight_decay()`` parameters;
- ``lookahead``: null, true, or ``{k: 5, alpha: 0.5}`` wraps the optimizer in Lookahead (Zhang et al. 2019);
- ``total_steps_key``: the constructor argument that receives the run's total optimizer steps
  (Ranger21's ``num_iterations``);
- ``warmup_fraction``: fraction of the total steps passed as ``warmup_steps`` (schedule-free optimizers);
- ``second_order``: the optimizer needs ``loss.backward(create_graph=True)`` (SophiaH, AdaHessian);
- ``takes_model``: the class takes the model, not parameter groups (``MuonWithAdamW``).

``lr`` or ``weight_decay`` set to null means "the optimizer class's own default". ``check_optimizer``
builds the optimizer on a dummy model before any data loads, so a hyper-parameter the class refuses
(``momentum=-1``, ``betas=[2, 3]``) is a ConfigError, not a failed run.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
from typing import Any

import torch
from omegaconf import DictConfig
from timm.optim import param_groups_weight_decay
from torch import nn

from harness import build
from harness.errors import ConfigError
from harness.registry import unknown_choice_message

log = logging.getLogger("harness")

FUSED_ON_CUDA = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)  # torch.optim classes with a fused CUDA step
LOOKAHEAD_DEFAULTS = {"k": 5, "alpha": 0.5, "pullback_momentum": "none"}
# valid ranges of hyper-parameters many optimizers share, checked before the constructor sees them
# (its own message may not name the range): key -> (low, high, high_inclusive)
RANGES = {
    "lr": (0.0, math.inf, False),
    "weight_decay": (0.0, math.inf, False),
    "momentum": (0.0, 1.0, False),
    "dampening": (0.0, 1.0, True),
    "eps": (0.0, math.inf, False),  # timm's AdamP/SGDP do not check it themselves
    "betas": (0.0, 1.0, False),
    "adamw_lr": (0.0, math.inf, False),
    "adamw_betas": (0.0, 1.0, False),
    "adamw_weight_decay": (0.0, math.inf, False),
}


def final_layer(model: nn.Module) -> nn.Module | None:
    """The classifier / output layer: a conventional attribute (``lm_head``, ``head``, ``fc``,
    ``classifier``) holding an ``nn.Linear``, else the last ``nn.Linear`` in module order.
    Muon keeps it on AdamW and AGC does not clip it (Brock et al. 2021)."""
    for attr in ("lm_head", "head", "fc", "classifier"):
        m = getattr(model, attr, None)
        if isinstance(m, nn.Linear):
            return m
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def param_groups(model: nn.Module, weight_decay: float | None, decay_all: bool) -> list[dict[str, Any]]:
    """``timm.optim.param_groups_weight_decay``: weights are decayed; biases, normalization gains
    (every parameter with ndim <= 1; decaying them only shrinks scales, Goyal et al. 2017) and the
    parameters a model names in ``no_weight_decay()`` (a ViT's position embedding and class token)
    are not. ``decay_all`` puts everything in one decayed group. ``weight_decay=None`` leaves the
    decayed group without a ``weight_decay`` key, so the optimizer class's own default applies."""
    trainable = [p for p in model.parameters() if p.requires_grad]  # .parameters() dedups tied weights
    if decay_all:
        return [{"params": trainable, **({} if weight_decay is None else {"weight_decay": weight_decay})}]
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    # placeholder 1.0 when the class default applies (timm puts everything in the undecayed group for 0/None)
    groups = param_groups_weight_decay(model, 1.0 if weight_decay is None else weight_decay, no_weight_decay_list=skip)
    if weight_decay is None:  # drop the placeholder from the decayed group (the undecayed one has 0.0)
        for g in groups:
            if g["weight_decay"]:
                del g["weight_decay"]
    return groups


def _unique_trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]  # .parameters() already dedups tied weights


def lr_factor(rule: str, batch_size: int, base_batch_size: int) -> float:
    """Batch-size learning-rate scaling: linear (Goyal et al. 2017) or square root
    (Krizhevsky 2014; Granziol et al. 2022 for adaptive methods)."""
    if rule in (None, "none"):
        return 1.0
    ratio = batch_size / base_batch_size
    if rule == "linear":
        return ratio
    if rule == "sqrt":
        return math.sqrt(ratio)
    raise ConfigError(f"optimizer.lr_scaling={rule!r}; valid choices: none, linear, sqrt")


def scaled_lr(lr: float, rule: str, batch_size: int, base_batch_size: int) -> float:
    return lr * lr_factor(rule, batch_size, base_batch_size)


# ----------------------------------------------------------------------------- Muon
class MuonND(torch.optim.Muon):
    """``torch.optim.Muon`` for weights of any rank >= 2: a conv kernel (out, in, kh, kw) is updated as
    the (out, in * kh * kw) matrix it multiplies inputs with, as in Keller Jordan's airbench94_muon
    (``g.view(len(g), -1)`` before the Newton-Schulz orthogonalisation). torch's Muon accepts 2-D
    parameters only, so each step views the kernels and their gradients as matrices, runs torch's own
    update on them, and restores the shapes; momentum buffers are kept as matrices."""

    def __init__(self, params, **kwargs):
        params = list(params)
        self._shapes = {id(p): p.shape for p in params if p.ndim > 2}
        with self._as_matrices(params):
            super().__init__(params, **kwargs)

    @contextlib.contextmanager
    def _as_matrices(self, params):
        nd = [p for p in params if id(p) in self._shapes]
        for p in nd:
            p.data = p.data.view(p.shape[0], -1)
            if p.grad is not None:
                p.grad = p.grad.view(p.shape[0], -1)
        try:
            yield
        finally:
            for p in nd:
                shape = self._shapes[id(p)]
                p.data = p.data.view(shape)
                if p.grad is not None:
                    p.grad = p.grad.view(shape)

    @torch.no_grad()
    def step(self, closure=None):
        with self._as_matrices([p for g in self.param_groups for p in g["params"]]):
            return super().step(closure)


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon on the hidden weight matrices and conv kernels (``MuonND``: torch.optim.Muon, kernels as
    (out, in * kh * kw) matrices as in airbench94_muon) and ``torch.optim.AdamW`` on everything else
    (embeddings, the classifier head, biases, normalization gains), as in Keller Jordan's recipe
    (Jordan et al. 2024, "Muon: An optimizer for hidden layers").

    One optimizer object for the loop, the LR scheduler and checkpoints: ``param_groups`` holds the
    inner optimizers' group dicts themselves, so a scheduler's lr changes reach both; the AdamW groups
    start at ``adamw_lr`` and follow the same schedule multiplier."""

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        weight_decay: float = 0.0,
        adjust_lr_fn: str | None = None,
        adamw_lr: float = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-10,
        adamw_weight_decay: float = 0.0,
    ):
        head = final_layer(model)
        skip = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
        skip |= {id(p) for p in head.parameters()} if head is not None else set()
        params = _unique_trainable(model)
        convs = {id(m.weight) for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)}
        hidden = [p for p in params if id(p) not in skip and (p.ndim == 2 or (p.ndim > 2 and id(p) in convs))]
        chosen = {id(p) for p in hidden}
        rest = [p for p in params if id(p) not in chosen]
        self.muon = None
        if hidden:
            self.muon = MuonND(
                hidden,
                lr=lr,
                momentum=momentum,
                nesterov=nesterov,
                ns_steps=ns_steps,
                weight_decay=weight_decay,
                adjust_lr_fn=adjust_lr_fn,
            )
        decayed = [p for p in rest if p.ndim >= 2]
        adam_groups = [
            {"params": decayed, "weight_decay": adamw_weight_decay},
            {"params": [p for p in rest if p.ndim < 2], "weight_decay": 0.0},
        ]
        self.adamw = torch.optim.AdamW(
            [g for g in adam_groups if g["params"]], lr=adamw_lr, betas=tuple(adamw_betas), eps=adamw_eps
        )
        self.inner = [o for o in (self.muon, self.adamw) if o is not None]
        # the base class registers the very same group dicts (add_param_group keeps the dict object)
        super().__init__([g for o in self.inner for g in o.param_groups], {})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for o in self.inner:
            o.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"inner": [o.state_dict() for o in self.inner]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state.get("inner", ())) != len(self.inner):
            raise ValueError("Muon checkpoint does not match this model's parameter split")
        for o, s in zip(self.inner, state["inner"]):
            o.load_state_dict(s)


# ----------------------------------------------------------------------------- Lookahead
def _lookahead_class():
    from pytorch_optimizer import Lookahead as _Lookahead

    class Lookahead(_Lookahead):
        """pytorch-optimizer's Lookahead (Zhang et al. 2019: k fast steps, then slow <- slow + alpha
        (fast - slow) and fast <- slow). ``param_groups`` are the inner optimizer's, so the LR schedule
        drives the inner lr; ``eval``/``train`` reach a schedule-free inner optimizer. Evaluation uses
        the current (fast) weights, which equal the slow weights right after each synchronisation."""

        def eval(self):
            fn = getattr(self.optimizer, "eval", None)
            if callable(fn):
                fn()

        def train(self):
            fn = getattr(self.optimizer, "train", None)
            if callable(fn):
                fn()

    return Lookahead


# ----------------------------------------------------------------------------- building
def by_name(params, *, optimizer: str, **kwargs) -> torch.optim.Optimizer:
    """``conf/optimizer/registry.yaml``'s target: the pytorch-optimizer optimizer called ``optimizer``."""
    return pytorch_optimizer_class(optimizer)(params, **kwargs)


def pytorch_optimizer_class(name: str) -> type:
    import pytorch_optimizer

    supported = pytorch_optimizer.get_supported_optimizers()
    if str(name).lower() not in supported:
        raise ConfigError(unknown_choice_message("pytorch-optimizer optimizer (optimizer.name)", name, supported))
    return pytorch_optimizer.load_optimizer(str(name).lower())


def check_ranges(params: dict[str, Any]) -> None:
    """Refuse non-finite learning rates and out-of-range shared hyper-parameters, naming the range."""
    for key, (lo, hi, hi_incl) in RANGES.items():
        value = params.get(key)
        if value is None:
            continue
        values = value if isinstance(value, list | tuple) else [value]
        for v in (v for v in values if v is not None):  # Adafactor's eps=(None, 1e-3): None is its own default
            ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= lo
            ok = ok and (v <= hi if hi_incl else v < hi)
            if not ok:
                span = f"[{lo:g}, {hi:g}{']' if hi_incl else ')'}"
                what = "each value" if isinstance(value, list | tuple) else "a finite number"
                raise ConfigError(f"optimizer.{key}={value!r} is invalid: {what} must be in {span}")


def lookahead_options(value: Any) -> dict[str, Any] | None:
    if value in (None, False, "none", "null"):
        return None
    if value is True:
        return dict(LOOKAHEAD_DEFAULTS)
    if not isinstance(value, dict):
        raise ConfigError(f"optimizer.lookahead={value!r}: use null, true or {{k: 5, alpha: 0.5}}")
    unknown = set(value) - set(LOOKAHEAD_DEFAULTS)
    if unknown:
        raise ConfigError(
            f"optimizer.lookahead has unknown keys {sorted(unknown)}; valid: {sorted(LOOKAHEAD_DEFAULTS)}"
        )
    opts = {**LOOKAHEAD_DEFAULTS, **value}
    if not (isinstance(opts["k"], int) and opts["k"] >= 1) or not (0.0 < float(opts["alpha"]) <= 1.0):
        raise ConfigError(
            f"optimizer.lookahead k={opts['k']!r} must be an integer >= 1 and alpha={opts['alpha']!r} in (0, 1]"
        )
    return opts


def is_second_order(opt: torch.optim.Optimizer, declared: bool) -> bool:
    """SophiaH / AdaHessian estimate the Hessian diagonal with Hutchinson's trick, which needs the
    backward graph of the gradients (``loss.backward(create_graph=True)``): declared in the YAML, or
    recognised by a ``hessian`` argument of ``step`` (an optimizer reached through the registry)."""
    return declared or "hessian" in inspect.signature(opt.step).parameters


def _dummy_model() -> nn.Module:
    """Big enough for every parameter split: a hidden matrix (Muon), a head, biases."""
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


def check_optimizer(
    cfg: DictConfig, *, precision: str = "fp32", world_size: int = 1, compile: bool = False
) -> torch.optim.Optimizer:
    """Build the optimizer on a dummy model, so a bad optimizer config (unknown class or key, a value
    out of range, a bad Lookahead or lr_scaling) fails before data is loaded, and refuse what a
    second-order optimizer cannot run with (:func:`check_second_order`). Raises ConfigError."""
    spec = build.spec_of("optimizer", cfg)
    harness, _ = build.split("optimizer", spec)
    opt = build_optimizer(spec, _dummy_model(), batch_size=int(harness.base_batch_size), total_steps=1000)
    if opt.second_order:
        check_second_order(harness.name or str(spec.get("_target_")), precision, world_size, compile)
    return opt


def check_second_order(name: str, precision: str, world_size: int, compile: bool) -> None:
    """SophiaH and AdaHessian take Hessian-vector products through ``loss.backward(create_graph=True)``:

    - under fp16 the GradScaler scales the loss (by 65,536 at first), so the Hessian estimate is that
      many times too large, and its overflow skips steps; bf16 and fp32 need no scaler;
    - DistributedDataParallel does not support double backward (pytorch/pytorch#63929);
    - torch.compile does not trace double backward.

    Refused before any work, naming the combinations that work."""
    works = "it runs with precision=fp32, bf16 or auto, in one process (no torchrun), trainer.compile=false"
    if precision == "fp16":
        raise ConfigError(
            f"optimizer={name} is second order (Hessian-vector products of the loss) and precision=fp16 scales "
            f"the loss by the GradScaler's factor (65,536 at first), so its Hessian estimate would be that much "
            f"too large; {works}"
        )
    if world_size > 1:
        raise ConfigError(
            f"optimizer={name} is second order (loss.backward(create_graph=True)), which DistributedDataParallel "
            f"does not support (pytorch/pytorch#63929), and this is a torchrun job of WORLD_SIZE={world_size}; {works}"
        )
    if compile:
        raise ConfigError(
            f"optimizer={name} is second order (double backward), which torch.compile does not trace; {works}"
        )


def build_optimizer(cfg: DictConfig, model: nn.Module, *, batch_size: int, total_steps: int) -> torch.optim.Optimizer:
    spec = build.spec_of("optimizer", cfg)
    h, params = build.split("optimizer", spec)
    label = h.name or str(params.get("_target_"))
    params = {k: v for k, v in params.items() if not (k in ("lr", "weight_decay") and v is None)}  # null: class default
    check_ranges(params)
    factor = lr_factor(h.lr_scaling, batch_size, int(h.base_batch_size))
    lookahead = lookahead_options(spec.get("lookahead"))
    factory = build.instantiate("optimizer", params, label, partial=True)
    runtime: dict[str, Any] = {}
    if h.total_steps_key:  # optimizers with a built-in schedule (Ranger21) or warmup
        runtime[h.total_steps_key] = int(total_steps)
    if h.warmup_fraction is not None:
        runtime["warmup_steps"] = int(round(float(h.warmup_fraction) * total_steps))
    runtime.update(fused_kwargs(factory.func, factory.keywords, _device_of(model)))
    if h.takes_model:
        first = model
    else:
        first = param_groups(model, params.get("weight_decay"), bool(h.decay_all))
        if "weight_decay" in factory.keywords:
            factory.keywords.pop("weight_decay")  # carried by the groups: biases and gains get 0
    opt = build.call("optimizer", label, factory, first, refuse=(TypeError, ValueError), **runtime)
    if factor != 1.0:  # after construction, so lr=null (the class default) scales too
        for g in opt.param_groups:
            g["lr"] = g["lr"] * factor
    opt.second_order = is_second_order(opt, bool(h.second_order))
    if lookahead is not None:
        inner = opt
        opt = _lookahead_class()(inner, **lookahead)
        opt.second_order = inner.second_order
    return opt


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def fused_kwargs(cls: Any, given: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """``{"fused": True}`` for a torch.optim class with a fused CUDA kernel (Adam, AdamW, SGD)
    on a CUDA model, unless the YAML or command line chose ``fused``/``foreach`` itself: one kernel for
    every parameter instead of several per tensor (foreach, torch's default on CUDA, is the fallback).
    Adagrad's fused kernel is CPU-only, hence the explicit list."""
    if device.type != "cuda" or cls not in FUSED_ON_CUDA or {"fused", "foreach"} & set(given):
        return {}
    return {"fused": True}


def is_schedule_free(optimizer: torch.optim.Optimizer) -> bool:
    inner = getattr(optimizer, "optimizer", optimizer)
    return any("train_mode" in g for g in inner.param_groups) and callable(getattr(inner, "eval", None))
