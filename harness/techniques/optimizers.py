"""Optimizers: any ``torch.optim.Optimizer`` class reached through ``_target_`` in
``conf/optimizer/<name>.yaml`` (torch.optim, timm.optim, pytorch-optimizer), built by ``build_optimizer``.

Adding an optimizer a library already has is one YAML file. ``optimizer=registry optimizer.name=<name>``
reaches every optimizer pytorch-optimizer registers without a YAML of its own. The keys in
``HARNESS_KEYS`` configure the harness and are not passed to the optimizer class:

- ``lr_scaling`` (none | linear | sqrt) and ``base_batch_size``: batch-size learning-rate rule;
- ``decay_all``: also decay biases and normalization gains;
- ``lookahead``: null, true, or ``{k: 5, alpha: 0.5}`` wraps the optimizer in Lookahead (Zhang et al. 2019);
- ``total_steps_key``: the constructor argument that receives the run's total optimizer steps
  (Ranger21's ``num_iterations``; filled automatically when the class requires it);
- ``warmup_fraction``: fraction of the total steps passed as ``warmup_steps`` (schedule-free optimizers);
- ``second_order``: the optimizer needs ``loss.backward(create_graph=True)`` (SophiaH, AdaHessian).

``lr`` or ``weight_decay`` set to null means "the optimizer class's own default".
"""

from __future__ import annotations

import inspect
import logging
import math
from typing import Any

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from torch import nn

from harness.errors import ConfigError
from harness.registry import unknown_choice_message

log = logging.getLogger("harness")

# keys of an optimizer YAML that configure the harness, not the optimizer class
HARNESS_KEYS = (
    "name",
    "source",
    "paper",
    "description",
    "decay_all",
    "lr_scaling",
    "base_batch_size",
    "lookahead",
    "needs_total_steps",
    "total_steps_key",
    "warmup_fraction",
    "schedule_free",
    "second_order",
)
# constructor arguments that mean "the total number of optimizer steps of the run"
TOTAL_STEPS_ARGS = ("num_iterations", "total_steps", "num_training_steps")
LOOKAHEAD_DEFAULTS = {"k": 5, "alpha": 0.5, "pullback_momentum": "none"}


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


def param_groups(model: nn.Module, weight_decay: float, decay_all: bool) -> list[dict[str, Any]]:
    """Two groups: weights that are decayed and biases / normalization gains that are not
    (decaying scale parameters of normalization layers only shrinks them; common practice since
    Goyal et al. 2017). Parameters a model names in timm's ``no_weight_decay()`` (a ViT's position
    embedding and class token) are not decayed either. ``decay_all`` puts everything in the decayed group."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    excluded = {id(p) for n, p in model.named_parameters() if n in skip}
    decay, no_decay = [], []
    for p in _unique_trainable(model):
        (decay if decay_all or (p.ndim >= 2 and id(p) not in excluded) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _unique_trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]  # .parameters() already dedups tied weights


def scaled_lr(lr: float, rule: str, batch_size: int, base_batch_size: int) -> float:
    """Batch-size learning-rate scaling: linear (Goyal et al. 2017) or square root
    (Krizhevsky 2014; Granziol et al. 2022 for adaptive methods)."""
    if rule in (None, "none"):
        return lr
    ratio = batch_size / base_batch_size
    if rule == "linear":
        return lr * ratio
    if rule == "sqrt":
        return lr * math.sqrt(ratio)
    raise ConfigError(f"optimizer.lr_scaling={rule!r}; valid choices: none, linear, sqrt")


# ----------------------------------------------------------------------------- Muon
class MuonWithAdamW(torch.optim.Optimizer):
    """``torch.optim.Muon`` on the hidden 2-D weight matrices and ``torch.optim.AdamW`` on everything
    else (embeddings, the classifier head, biases, gains, conv kernels, which torch's Muon rejects),
    as in Keller Jordan's recipe (Jordan et al. 2024, "Muon: An optimizer for hidden layers").

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
        hidden = [p for p in params if p.ndim == 2 and id(p) not in skip]
        rest = [p for p in params if p.ndim != 2 or id(p) in skip]
        self.muon = None
        if hidden:
            self.muon = torch.optim.Muon(
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


# ----------------------------------------------------------------------------- building
def pytorch_optimizer_class(name: str) -> type:
    import pytorch_optimizer

    supported = pytorch_optimizer.get_supported_optimizers()
    if str(name).lower() not in supported:
        raise ConfigError(unknown_choice_message("pytorch-optimizer optimizer (optimizer.name)", name, supported))
    return pytorch_optimizer.load_optimizer(str(name).lower())


def optimizer_class(spec: dict[str, Any]) -> type:
    target = spec.get("_target_")
    if target is None:  # conf/optimizer/registry.yaml: a pytorch-optimizer name
        if not spec.get("name"):
            raise ConfigError("optimizer config needs _target_ (a class) or name (a pytorch-optimizer optimizer)")
        return pytorch_optimizer_class(spec["name"])
    try:
        return get_class(target)
    except Exception as e:  # noqa: BLE001  (hydra wraps import errors in several types)
        raise ConfigError(f"optimizer._target_={target!r} cannot be imported: {e}") from e


def is_second_order(cls: type, spec: dict[str, Any]) -> bool:
    """SophiaH / AdaHessian estimate the Hessian diagonal with Hutchinson's trick, which needs the
    backward graph of the gradients (``loss.backward(create_graph=True)``)."""
    return bool(spec.get("second_order")) or "hessian" in inspect.signature(cls.step).parameters


def check_optimizer(cfg: DictConfig) -> None:
    """The checks that need no model (class, lr scaling rule, lookahead, second order), so a bad optimizer
    config fails before data is loaded. Raises ConfigError."""
    spec = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    optimizer_class(spec)
    scaled_lr(1.0, spec.get("lr_scaling", "none"), 1, 1)
    lookahead_options(spec.get("lookahead"))


def build_optimizer(cfg: DictConfig, model: nn.Module, *, batch_size: int, total_steps: int) -> torch.optim.Optimizer:
    spec = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    cls = optimizer_class(spec)
    opts = {k: v for k, v in spec.items() if k not in HARNESS_KEYS and k != "_target_"}
    params_sig = inspect.signature(cls.__init__).parameters
    for key in ("lr", "weight_decay"):
        if key in opts and opts[key] is None:  # null: the class's own default
            opts.pop(key)
        elif key in opts and (isinstance(opts[key], bool) or not isinstance(opts[key], int | float) or opts[key] < 0):
            raise ConfigError(f"optimizer.{key}={opts[key]!r} must be a non-negative number")
    rule = spec.get("lr_scaling", "none")
    base_bs = int(spec.get("base_batch_size") or batch_size)
    for key in ("lr", "adamw_lr"):
        lr = opts.get(key, _default(params_sig, key))
        if isinstance(lr, int | float) and not isinstance(lr, bool):
            scaled = scaled_lr(float(lr), rule, batch_size, base_bs)
            if key in opts or scaled != lr:
                opts[key] = scaled
        elif rule not in (None, "none") and key == "lr":
            raise ConfigError(f"optimizer.lr_scaling={rule!r} needs a numeric lr; {cls.__name__} has none")
    opts = {k: tuple(v) if isinstance(v, list) else v for k, v in opts.items()}  # YAML lists: betas, eps pairs
    # the run's total steps, for optimizers with a built-in schedule (Ranger21) or warmup
    steps_key = spec.get("total_steps_key") or next((k for k in TOTAL_STEPS_ARGS if k in params_sig), None)
    if steps_key and (spec.get("needs_total_steps") or steps_key in params_sig) and opts.get(steps_key) is None:
        opts[steps_key] = int(total_steps)
    if spec.get("warmup_fraction") is not None:
        if "warmup_steps" not in params_sig:
            raise ConfigError(f"optimizer.warmup_fraction is set but {cls.__name__} takes no warmup_steps")
        opts["warmup_steps"] = int(round(float(spec["warmup_fraction"]) * total_steps))
    wd = opts.pop("weight_decay", None)
    try:
        if cls is MuonWithAdamW:
            opt = cls(model, **opts, **({} if wd is None else {"weight_decay": wd}))
        else:
            groups = param_groups(
                model,
                float(_default(params_sig, "weight_decay", 0.0) if wd is None else wd),
                bool(spec.get("decay_all", False)),
            )
            if wd is None and "weight_decay" not in params_sig:
                groups = [{"params": [p for g in groups for p in g["params"]]}]
            opt = cls(groups, **opts)
    except TypeError as e:
        raise ConfigError(f"bad hyper-parameters for optimizer {spec.get('name') or cls.__name__}: {e}") from e
    opt.second_order = is_second_order(cls, spec)
    la = lookahead_options(spec.get("lookahead"))
    if la is not None:
        opt = _lookahead_class()(opt, **la)
        opt.second_order = getattr(opt.optimizer, "second_order", False)
    return opt


def _default(sig_params, key: str, fallback: Any = None) -> Any:
    p = sig_params.get(key)
    return p.default if p is not None and p.default is not inspect.Parameter.empty else fallback


def is_schedule_free(optimizer: torch.optim.Optimizer) -> bool:
    inner = getattr(optimizer, "optimizer", optimizer)
    return any("train_mode" in g for g in inner.param_groups) and callable(getattr(inner, "eval", None))
