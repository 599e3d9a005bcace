"""Normalization layers, normalizer-free training and initialization (config group ``normalization=``).

Design. Each choice is a ``Technique`` acting in ``prepare_model``: it finds the model's normalization
layers by type (``nn.BatchNorm2d`` in CNNs, ``nn.LayerNorm`` in ViT / GPT-2), so it works on every
model of a family, and swaps them in place. Choices that change the residual structure (Fixup,
SkipInit, NF-ResNet) rebuild torchvision's ``BasicBlock``/``Bottleneck`` blocks
(``harness.techniques.norm_layers``); post-LN re-orders the transformer blocks. The model family comes from
``model.family`` (``cnn``; ``vit`` / ``transformer`` are transformers) or, when absent, from the
layer types. A choice that does not apply to the model raises ``ConfigError`` naming the valid
choices for it; the record's ``techniques`` entry holds the kind and the number of layers replaced.

``normalization=default`` (no technique) keeps the model's own layers: BatchNorm for CNNs, pre-LN
LayerNorm for transformers. ``normalization=none`` registers as ``no_norm`` because the technique
builder reads the name ``none`` as "no technique".
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from harness.errors import ConfigError
from harness.hooks import RunContext, Technique
from harness.techniques.norm_layers import (
    RESIDUAL_BLOCKS,
    BatchRenorm2d,
    ChannelBias,
    FixNorm,
    FixupBlock,
    Gain,
    GammaReLU,
    NFBlock,
    PostNormBlock,
    ScalarBias,
    ScaleBias,
    ScaleNorm,
    scaled_std_conv,
)

CNN_CHOICES = (
    "batchnorm",
    "groupnorm",
    "layernorm",
    "instancenorm",
    "batchrenorm",
    "weightnorm",
    "ws_groupnorm",
    "none",
    "none_fixup",
    "skipinit",
    "nf",
)
TRANSFORMER_CHOICES = ("layernorm", "postln", "rmsnorm", "scalenorm", "none")
RESIDUAL_ONLY = ("skipinit", "nf")  # need residual blocks (ResNets); Fixup also handles plain conv nets
TRANSFORMER_FAMILIES = ("vit", "transformer", "gpt")


# ----------------------------------------------------------------------------- model inspection


def model_family(model: nn.Module, cfg: Any = None) -> str:
    """``cnn`` or ``transformer``: from ``cfg.model.family`` when set, else from the layer types."""
    fam = None
    if cfg is not None and cfg.get("model") is not None:
        fam = cfg.model.get("family")
    if fam is not None:
        return "transformer" if str(fam) in TRANSFORMER_FAMILIES else str(fam)
    if any(isinstance(m, _BatchNorm) for m in model.modules()):
        return "cnn"
    if any(isinstance(m, nn.LayerNorm) for m in model.modules()):
        return "transformer"
    return "cnn" if any(isinstance(m, nn.Conv2d) for m in model.modules()) else "unknown"


def has_residual_blocks(model: nn.Module) -> bool:
    return any(isinstance(m, RESIDUAL_BLOCKS) for m in model.modules())


def valid_choices(model: nn.Module, family: str) -> list[str]:
    """The ``normalization=`` choices that apply to ``model`` (``default`` always does)."""
    if family == "cnn":
        residual = has_residual_blocks(model)
        return ["default"] + [c for c in CNN_CHOICES if residual or c not in RESIDUAL_ONLY]
    if family == "transformer":
        return ["default", *TRANSFORMER_CHOICES]
    return ["default"]


def is_norm(m: nn.Module) -> bool:
    return isinstance(m, (_BatchNorm, _InstanceNorm, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm, ScaleNorm, BatchRenorm2d))


def count_norms(model: nn.Module) -> dict[str, int]:
    """Normalization layers by class name, plus weight-normalized / weight-standardized layers."""
    from timm.layers import ScaledStdConv2d, StdConv2d

    c: Counter[str] = Counter()
    for m in model.modules():
        if is_norm(m) or isinstance(m, (StdConv2d, ScaledStdConv2d)):
            c[type(m).__name__] += 1
        if parametrize.is_parametrized(m, "weight") and any(
            type(p).__name__ == "_WeightNorm" for p in m.parametrizations.weight
        ):
            c["WeightNorm"] += 1
    return dict(sorted(c.items()))


def swap(
    model: nn.Module, match: Callable[[nn.Module], bool], make: Callable[[nn.Module], nn.Module], skip: tuple = ()
) -> int:
    """Replace every submodule for which ``match`` holds by ``make(old)``; do not descend into
    modules of the types in ``skip``. Returns the number replaced."""
    found: list[str] = []

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if match(child):
                found.append(full)
            elif not isinstance(child, skip):
                walk(child, full + ".")

    walk(model, "")
    for name in found:
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, attr, make(getattr(owner, attr)))
    return len(found)


def pick_groups(channels: int, groups: int) -> int:
    """GroupNorm needs a group count dividing the channels: min(groups, channels), falling back to
    gcd(channels, groups) when that does not divide (e.g. 48 channels, 32 groups -> 16)."""
    g = min(groups, channels)
    return g if channels % g == 0 else math.gcd(channels, g)


def _bn(m: nn.Module) -> bool:
    return isinstance(m, _BatchNorm)


def _ln(m: nn.Module) -> bool:
    return isinstance(m, nn.LayerNorm)  # also timm's LayerNorm subclass (ViT); CNNs have none


def _he_init(conv: nn.Conv2d) -> nn.Conv2d:
    # fan_out, as the official Fixup code (fan_in makes a plain net diverge at BN learning rates)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


# ----------------------------------------------------------------------------- base class


class Normalization(Technique):
    """Checks that the choice applies to the model, calls ``apply`` and reports what changed."""

    name = "normalization"
    choice = ""  # the conf/normalization/<choice>.yaml name the user types
    kind = ""  # the normalization the model ends up with (record)

    def __init__(self):
        self.replaced = 0
        self.family = ""
        self.layers: dict[str, int] = {}
        self.extra: dict[str, Any] = {}

    def prepare_model(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        self.family = model_family(model, ctx.cfg if ctx is not None else None)
        valid = valid_choices(model, self.family)
        if self.choice not in valid:
            mname = (
                ctx.cfg.model.get("name", type(model).__name__)
                if ctx is not None and ctx.cfg is not None
                else type(model).__name__
            )
            why = " (needs residual blocks)" if self.choice in RESIDUAL_ONLY and self.family == "cnn" else ""
            raise ConfigError(
                f"normalization={self.choice}{why} does not apply to model={mname} (family {self.family}). "
                f"Valid choices for this model: {', '.join(valid)}"
            )
        self.replaced = self.apply(model, ctx)
        self.layers = count_norms(model)
        return model

    def apply(self, model: nn.Module, ctx: RunContext | None) -> int:
        raise NotImplementedError

    def summary(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "replaced": self.replaced,
            "family": self.family,
            "layers": self.layers,
            **self.extra,
        }


def _register(choice: str, description: str, paper: str, registry_name: str | None = None):
    def wrap(cls):
        cls.name, cls.choice, cls.description, cls.paper = registry_name or choice, choice, description, paper
        return cls

    return wrap


# ----------------------------------------------------------------------------- CNN layer swaps


@_register("batchnorm", "Batch normalization (explicit; the CNN default)", "Ioffe & Szegedy 2015, Batch Normalization")
class BatchNormSwap(Normalization):
    kind = "BatchNorm2d"

    def __init__(self, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.momentum, self.eps = float(momentum), float(eps)

    def apply(self, model, ctx):
        return swap(model, _bn, lambda m: nn.BatchNorm2d(m.num_features, eps=self.eps, momentum=self.momentum))


@_register("groupnorm", "Group normalization in place of BatchNorm", "Wu & He 2018, Group Normalization")
class GroupNormSwap(Normalization):
    kind = "GroupNorm"

    def __init__(self, groups: int = 32, eps: float = 1e-5):
        super().__init__()
        if int(groups) < 1:
            raise ConfigError(f"normalization=groupnorm: groups={groups} must be >= 1")
        self.groups, self.eps = int(groups), float(eps)

    def make(self, m: nn.Module) -> nn.Module:
        return nn.GroupNorm(pick_groups(m.num_features, self.groups), m.num_features, eps=self.eps)

    def apply(self, model, ctx):
        n = swap(model, _bn, self.make)
        self.extra["groups"] = sorted({m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)})
        return n


@_register(
    "layernorm",
    "Layer normalization: BN->LN over channels in CNNs; pre-LN LayerNorm in transformers",
    "Ba et al. 2016, Layer Normalization",
)
class LayerNormSwap(Normalization):
    def __init__(self, over: str = "channels", eps: float | None = None):
        super().__init__()
        if over not in ("channels", "chw"):
            raise ConfigError(f"normalization=layernorm: over={over!r}; valid choices: channels, chw")
        self.over, self.eps = over, eps

    def apply(self, model, ctx):
        from timm.layers import LayerNorm2d

        if self.family == "transformer":  # fresh pre-LN LayerNorms (the transformer default, made explicit)
            self.kind = "LayerNorm"
            self.extra["placement"] = "pre"
            return swap(
                model, _ln, lambda m: nn.LayerNorm(m.normalized_shape, eps=self.eps or m.eps, bias=m.bias is not None)
            )
        eps = self.eps or 1e-5
        if self.over == "chw":  # over (C, H, W) of each sample, as in Wu & He's LN baseline
            self.kind = "GroupNorm(1)"
            return swap(model, _bn, lambda m: nn.GroupNorm(1, m.num_features, eps=eps))
        self.kind = "LayerNorm2d"  # over C at each position (ConvNeXt style)
        return swap(model, _bn, lambda m: LayerNorm2d(m.num_features, eps=eps))


@_register(
    "instancenorm", "Instance normalization in place of BatchNorm", "Ulyanov et al. 2016, Instance Normalization"
)
class InstanceNormSwap(Normalization):
    kind = "InstanceNorm2d"

    def __init__(self, affine: bool = True, eps: float = 1e-5):
        super().__init__()
        self.affine, self.eps = bool(affine), float(eps)

    def apply(self, model, ctx):
        return swap(model, _bn, lambda m: nn.InstanceNorm2d(m.num_features, eps=self.eps, affine=self.affine))


@_register("batchrenorm", "Batch renormalization in place of BatchNorm", "Ioffe 2017, Batch Renormalization")
class BatchRenormSwap(Normalization):
    kind = "BatchRenorm2d"

    def __init__(
        self, r_max: float = 3.0, d_max: float = 5.0, ramp_steps: int = 5000, momentum: float = 0.01, eps: float = 1e-5
    ):
        super().__init__()
        if float(r_max) < 1 or float(d_max) < 0:
            raise ConfigError(
                f"normalization=batchrenorm: need r_max >= 1 and d_max >= 0, got r_max={r_max}, d_max={d_max}"
            )
        self.kw = dict(
            r_max=float(r_max), d_max=float(d_max), ramp_steps=int(ramp_steps), momentum=float(momentum), eps=float(eps)
        )

    def apply(self, model, ctx):
        return swap(model, _bn, lambda m: BatchRenorm2d(m.num_features, **self.kw))


@_register(
    "weightnorm",
    "Weight normalization of every conv/linear layer, BN removed (per-channel biases kept)",
    "Salimans & Kingma 2016, Weight Normalization",
)
class WeightNormSwap(Normalization):
    kind = "WeightNorm"

    def __init__(self, data_init: bool = True, init_batch: int = 256):
        super().__init__()
        self.data_init, self.init_batch = bool(data_init), int(init_batch)

    def apply(self, model, ctx):
        n = swap(model, _bn, lambda m: ChannelBias(m.num_features))
        layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        for m in layers:
            weight_norm(m, "weight", dim=0)
        self.extra["weight_normalized"] = len(layers)
        if self.data_init and ctx is not None and ctx.data is not None and ctx.data.task == "classification":
            batch = next(iter(ctx.data.train.batches(self.init_batch, train=True, epoch=0, seed=int(ctx.cfg.seed))))
            data_dependent_init(model.to(ctx.device), batch.x)
            self.extra["data_init"] = True
        return n


@torch.no_grad()
def data_dependent_init(model: nn.Module, x: torch.Tensor) -> None:
    """Salimans & Kingma's initialisation, done in one forward pass: each weight-normalized conv's
    g is divided by the std of its output channels and the per-channel bias after it is set to minus
    the mean, so every pre-activation starts with zero mean and unit variance on ``x``."""
    hooks = []

    def conv_hook(mod, inp, out):
        std = out.transpose(0, 1).flatten(1).std(1).clamp_min(1e-6)
        mod.parametrizations.weight.original0.div_(std.view(-1, *([1] * (out.dim() - 1))))
        return out / std.view(1, -1, *([1] * (out.dim() - 2)))

    def bias_hook(mod, inp, out):
        mod.bias.copy_(-inp[0].transpose(0, 1).flatten(1).mean(1))
        return out - out.transpose(0, 1).flatten(1).mean(1).view(1, -1, *([1] * (out.dim() - 2)))

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, ChannelBias):
            hooks.append(m.register_forward_hook(bias_hook))
    was_training = model.training
    model.train()
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)


@_register(
    "ws_groupnorm",
    "Weight standardization of every conv + GroupNorm in place of BatchNorm",
    "Qiao et al. 2019, Micro-Batch Training with Batch-Channel Normalization and Weight Standardization; Wu & He 2018",
)
class WSGroupNormSwap(GroupNormSwap):
    kind = "GroupNorm+WS"

    def __init__(self, groups: int = 32, eps: float = 1e-5, ws_eps: float = 1e-6):
        super().__init__(groups, eps)
        self.ws_eps = float(ws_eps)

    def apply(self, model, ctx):
        from timm.layers import StdConv2d

        def std_conv(c: nn.Conv2d) -> nn.Module:
            new = StdConv2d(
                c.in_channels,
                c.out_channels,
                c.kernel_size,
                c.stride,
                c.padding,
                c.dilation,
                c.groups,
                c.bias is not None,
                eps=self.ws_eps,
            )
            new.load_state_dict(c.state_dict())
            return new

        self.extra["standardized_convs"] = swap(model, lambda m: type(m) is nn.Conv2d, std_conv)
        return super().apply(model, ctx)


@_register(
    "none",
    "No normalization: normalization layers removed (plain nets, to show the failure)",
    "",
    registry_name="no_norm",
)
class NoNorm(Normalization):
    kind = "none"

    def apply(self, model, ctx):
        return swap(model, _ln if self.family == "transformer" else _bn, lambda m: nn.Identity())


# ----------------------------------------------------------------------------- normalizer-free CNNs


@_register(
    "none_fixup",
    "Fixup initialization: no normalization, zero-init residual branches, scaled inner layers, scalar biases/multipliers",
    "Zhang, Dauphin & Ma 2019, Fixup Initialization: Residual Learning Without Normalization",
)
class Fixup(Normalization):
    """ResNets: every residual block becomes a ``FixupBlock``. Outside the blocks (stem, or a plain
    conv net without residual blocks such as ``small_cnn``) the Fixup rules that do not depend on
    residual branches apply: each BatchNorm becomes a scalar multiplier and bias (before the
    activation), each conv / linear gets a scalar input bias, convs are He-initialised, and the
    classifier (the last linear layer) is zero-initialised."""

    kind = "none (Fixup)"

    def apply(self, model, ctx):
        blocks = sum(isinstance(m, RESIDUAL_BLOCKS) for m in model.modules())
        removed = sum(isinstance(m, _BatchNorm) for m in model.modules())
        swap(model, lambda m: isinstance(m, RESIDUAL_BLOCKS), lambda b: FixupBlock(b, blocks))
        swap(model, _bn, lambda m: ScaleBias(), skip=(FixupBlock,))
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if linears:  # zero-init classifier (Fixup rule 1)
            nn.init.zeros_(linears[-1].weight)
            if linears[-1].bias is not None:
                nn.init.zeros_(linears[-1].bias)
        swap(
            model,
            lambda m: isinstance(m, (nn.Conv2d, nn.Linear)),
            lambda m: nn.Sequential(ScalarBias(), _he_init(m) if isinstance(m, nn.Conv2d) else m),
            skip=(FixupBlock,),
        )
        self.extra["residual_branches"] = blocks
        return removed


@_register(
    "skipinit",
    "SkipInit: no normalization, a learnable residual gain initialised to zero on each branch",
    "De & Smith 2020, Batch Normalization Biases Residual Blocks Towards the Identity Function in Deep Networks",
)
class SkipInit(Normalization):
    """Every BatchNorm becomes a per-channel bias; the last one of each residual branch (bn2 of a
    BasicBlock, bn3 of a Bottleneck) is followed by the gain alpha (init ``gain_init``), so a block
    computes relu(alpha * branch(x) + shortcut(x)) and is the identity at initialisation."""

    kind = "none (SkipInit)"

    def __init__(self, gain_init: float = 0.0):
        super().__init__()
        self.gain_init = float(gain_init)

    def apply(self, model, ctx):
        removed = sum(isinstance(m, _BatchNorm) for m in model.modules())
        for block in [m for m in model.modules() if isinstance(m, RESIDUAL_BLOCKS)]:
            last = "bn3" if hasattr(block, "bn3") else "bn2"
            setattr(block, last, nn.Sequential(ChannelBias(getattr(block, last).num_features), Gain(self.gain_init)))
        swap(model, _bn, lambda m: ChannelBias(m.num_features))
        return removed


@_register(
    "nf",
    "Normalizer-free ResNet: Scaled WS convs, pre-activation blocks h + alpha*f(h/beta) (use with clip=agc)",
    "Brock, De & Smith 2021, Characterizing signal propagation to close the performance gap in unnormalized ResNets",
)
class NormFree(Normalization):
    """beta_i = sqrt(Var(h_i)) is predicted analytically: Var(h) starts at 1 (the stem's Scaled WS
    conv of standardized images), grows by alpha^2 per block and resets to 1 + alpha^2 at each
    transition block. The stem's BN and ReLU are removed (blocks pre-activate) and a gamma-scaled ReLU
    is applied before the global pool."""

    kind = "none (NF)"

    def __init__(self, alpha: float = 0.2):
        super().__init__()
        if not float(alpha) > 0:
            raise ConfigError(f"normalization=nf: alpha={alpha} must be > 0")
        self.alpha = float(alpha)

    def apply(self, model, ctx):
        from torchvision.models.resnet import ResNet

        if not isinstance(model, ResNet):
            raise ConfigError(f"normalization=nf rebuilds torchvision ResNets; got {type(model).__name__}")
        removed = sum(isinstance(m, _BatchNorm) for m in model.modules())
        var, betas = 1.0, []

        def make(block: nn.Module) -> nn.Module:
            nonlocal var
            beta = math.sqrt(var)
            betas.append(round(beta, 4))
            var = 1.0 + self.alpha**2 if block.downsample is not None else var + self.alpha**2
            return NFBlock(block, self.alpha, beta)

        swap(model, lambda m: isinstance(m, RESIDUAL_BLOCKS), make)
        model.conv1 = scaled_std_conv(model.conv1)
        model.bn1, model.relu = nn.Identity(), nn.Identity()
        model.avgpool = nn.Sequential(GammaReLU(), model.avgpool)
        self.extra.update(alpha=self.alpha, betas=betas)
        return removed


# ----------------------------------------------------------------------------- transformers


def _transformer_blocks(model: nn.Module) -> list[str]:
    """Names of pre-LN blocks: timm ViT ``Block`` (norm1/attn/norm2/mlp) or GPT-2 (ln_1/attn/ln_2/mlp)."""
    return [
        n
        for n, m in model.named_modules()
        if n and hasattr(m, "attn") and hasattr(m, "mlp") and (hasattr(m, "norm1") or hasattr(m, "ln_1"))
    ]


@_register(
    "postln",
    "Post-LN transformer blocks: x = LN(x + sublayer(x))",
    "Vaswani et al. 2017; Xiong et al. 2020, On Layer Normalization in the Transformer Architecture",
)
class PostLN(Normalization):
    """The blocks keep their LayerNorms but apply them after each residual addition; the final
    LayerNorm before the head (ViT ``norm``, GPT-2 ``ln_f``) is removed since the last block's output
    is already normalized."""

    kind = "LayerNorm"

    def apply(self, model, ctx):
        names = set(_transformer_blocks(model))
        n = 0
        for name in names:
            parent, _, attr = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            setattr(owner, attr, PostNormBlock(getattr(owner, attr)))
            n += 2
        final = [a for a in ("norm", "transformer.ln_f") if isinstance(getattr_path(model, a), nn.LayerNorm)]
        for a in final:
            parent, _, attr = a.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, nn.Identity())
        self.extra.update(placement="post", blocks=len(names), removed_final=len(final))
        return n


def getattr_path(model: nn.Module, path: str) -> Any:
    obj: Any = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


@_register(
    "rmsnorm",
    "RMSNorm in place of LayerNorm (pre-norm)",
    "Zhang & Sennrich 2019, Root Mean Square Layer Normalization; Jiang et al. 2023, Pre-RMSNorm and Pre-CRMSNorm Transformers",
)
class RMSNormSwap(Normalization):
    kind = "RMSNorm"

    def __init__(self, eps: float | None = None):
        super().__init__()
        self.eps = eps

    def apply(self, model, ctx):
        return swap(model, _ln, lambda m: nn.RMSNorm(m.normalized_shape, eps=self.eps or m.eps))


@_register(
    "scalenorm",
    "ScaleNorm (g*x/||x||, one scalar g = sqrt(d)) in place of LayerNorm, with FixNorm on word embeddings",
    "Nguyen & Salazar 2019, Transformers without Tears; Nguyen & Chiang 2018, Improving Lexical Choice in NMT (FixNorm)",
)
class ScaleNormSwap(Normalization):
    """``fixnorm``: auto (on where the model has word embeddings, i.e. GPT-2; ViT has none), true, false.
    FixNorm fixes each token embedding row to length ``fixnorm_radius``; with GPT-2's tied output
    layer the parametrization is shared, so the logits use the same fixed-length rows."""

    kind = "ScaleNorm"

    def __init__(self, eps: float = 1e-5, fixnorm: Any = "auto", fixnorm_radius: float = 1.0):
        super().__init__()
        if fixnorm not in ("auto", True, False):
            raise ConfigError(f"normalization=scalenorm: fixnorm={fixnorm!r}; valid choices: auto, true, false")
        self.eps, self.fixnorm, self.radius = float(eps), fixnorm, float(fixnorm_radius)

    def apply(self, model, ctx):
        n = swap(model, _ln, lambda m: ScaleNorm(m.normalized_shape[-1], eps=self.eps))
        wte = getattr_path(model, "transformer.wte")
        if self.fixnorm is True and not isinstance(wte, nn.Embedding):
            raise ConfigError(
                "normalization=scalenorm fixnorm=true needs a model with word embeddings (GPT-2); use fixnorm=auto"
            )
        use = isinstance(wte, nn.Embedding) and self.fixnorm in ("auto", True)
        if use:
            fn = FixNorm(self.radius)
            head = getattr(model, "lm_head", None)
            tied = head is not None and head.weight is wte.weight
            parametrize.register_parametrization(wte, "weight", fn)
            if tied:  # one shared original tensor, both views fixed-length
                parametrize.register_parametrization(head, "weight", fn)
        self.extra["fixnorm"] = use
        return n
