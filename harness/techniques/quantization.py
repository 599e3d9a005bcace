"""Quantization and low-precision training (TECHNIQUES.md QNT-01, QNT-07, QNT-15; 8-bit optimizer states).

- ``fp8``  FP8 training of Linear layers with dynamic scaling, torchao.float8 (tensorwise or rowwise recipe).
  Micikevicius et al. 2022, "FP8 Formats for Deep Learning"; Perez et al. 2023, "Training and inference of
  large language models using 8-bit floating point". Needs compute capability >= 8.9.
- ``qat``  quantization-aware training: Linear layers through torchao's QATConfig (fake-quantised weights,
  int8 per-token activations for the int8 recipe), Conv2d layers through ``FakeQuantConv2d`` below (torch.ao's
  fake-quant primitives, straight-through estimator). Jacob et al. 2018, "Quantization and Training of Neural
  Networks for Efficient Integer-Arithmetic-Only Inference". After training a copy is converted and evaluated.
- ``ptq``  post-training int8 quantization of a copy of the trained model: torchao dynamic int8 (or static,
  with activation scales from a calibration pass over N training batches) for Linear, int8 weights for Conv2d.

What "converted" means here. Linear layers become torchao quantized tensors (int8 weights, or int4 values in
an int8 container: torchao's ``unpacked_to_int8`` layout) and run torchao's int8 paths. Conv2d layers store
int8 weights with one fp32 scale per output channel and dequantize them on the fly; their int8 activation
numerics are simulated (quantize-dequantize), because torchao ships no int8 convolution. Model size is the
bytes of the model's state (parameters and buffers; a tied weight counted once; tensor subclasses by their
inner tensors), i.e. what a checkpoint of the weights holds.

``optimizer_state_bytes(optimizer)`` measures optimizer-state memory the same way (torchao's 8-bit states
are tensor subclasses holding int8 codes, block scales and a quantization map).

torchao is imported inside functions: every run imports this module when the catalogue is loaded.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.errors import ConfigError
from harness.hooks import RunContext, Technique
from harness.metrics.classification import classification_metrics, lm_nll_sum, perplexity

FP8_MIN_CAPABILITY = (8, 9)
FP8_RECIPES = ("tensorwise", "rowwise")
PTQ_MODES = ("dynamic", "static")


# ---------------------------------------------------------------------------------------------- measuring


def tensor_bytes(t: Tensor) -> int:
    """Bytes a tensor holds; a tensor subclass (torchao quantized weights, 8-bit optimizer states) is the
    sum of its inner tensors."""
    if hasattr(t, "__tensor_flatten__") and type(t) not in (Tensor, nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def state_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (its state_dict), a shared (tied) tensor counted once."""
    seen, total = set(), 0
    for t in module.state_dict(keep_vars=True).values():
        if isinstance(t, Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += tensor_bytes(t)
    return total


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's per-parameter state (moments, step counters, quantization
    codes and scales). Wrappers (Lookahead) that keep an inner optimizer are measured through ``.optimizer``,
    composites (MuonWithAdamW) through ``.inner``."""
    seen, total = set(), 0
    opts = [optimizer]
    inner = getattr(optimizer, "optimizer", None)
    if isinstance(inner, torch.optim.Optimizer) and inner is not optimizer:
        opts.append(inner)
    for o in list(opts):  # composite optimizers (MuonWithAdamW: Muon + AdamW) keep their state in ``inner``
        opts.extend(x for x in getattr(o, "inner", ()) if isinstance(x, torch.optim.Optimizer) and x not in opts)
    for opt in opts:
        for state in opt.state.values():
            for v in state.values():
                if isinstance(v, Tensor) and id(v) not in seen:
                    seen.add(id(v))
                    total += tensor_bytes(v)
    return total


@torch.no_grad()
def evaluate(model: nn.Module, split, task: str, batch_size: int, prefix: str = "test_") -> dict[str, float]:
    """Metrics of ``model`` on a whole split in float32 (no autocast): accuracy and loss for classification,
    loss and perplexity for language modelling. Used on the converted (quantized) model, which the
    trainer's own evaluation does not see."""
    was_training = model.training
    model.eval()
    try:
        if task == "lm":  # chunked: harness.metrics.classification.lm_nll_sum
            total, count = None, 0
            for b in split.batches(batch_size, train=False):
                total, n = lm_nll_sum(model, b, total)
                count += n
            loss = total.item() / max(count, 1)
            return {f"{prefix}loss": loss, f"{prefix}ppl": perplexity(loss)}
        logits, labels = [], []
        for b in split.batches(batch_size, train=False):
            logits.append(model(b.x).float())
            labels.append(b.y)
        return classification_metrics(torch.cat(logits), torch.cat(labels), prefix)
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------- layer choice


def select_layers(
    model: nn.Module, kinds: tuple[type, ...], skip, min_features: int, multiple_of: int = 1, group_size: int = 1
):
    """Modules of the given kinds that pass the documented rule: name contains none of ``skip``, every
    weight dimension (out/in features or channels) >= ``min_features`` and divisible by ``multiple_of``,
    and the input dimension divisible by ``group_size``. Returns (selected names, {kept name: reason})."""
    chosen, kept = [], {}
    for name, m in model.named_modules():
        if not isinstance(m, kinds):
            continue
        if any(s and s in name for s in skip or ()):
            kept[name] = "skipped by name"
            continue
        dims = (m.out_features, m.in_features) if isinstance(m, nn.Linear) else (m.out_channels, m.in_channels)
        if min(dims) < min_features:
            kept[name] = f"dims {dims} below min_features={min_features}"
        elif any(d % multiple_of for d in dims):
            kept[name] = f"dims {dims} not multiples of {multiple_of}"
        elif dims[1] % group_size:
            kept[name] = f"input dim {dims[1]} not a multiple of group_size={group_size}"
        else:
            chosen.append(name)
    return chosen, kept


def swap_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


# ---------------------------------------------------------------------------------------------- int conv layers


def symmetric_scale(w: Tensor, bits: int) -> Tensor:
    """Per-output-channel symmetric scale mapping max |w| to the largest positive integer."""
    amax = w.detach().abs().flatten(1).amax(1).float().clamp(min=1e-8)
    return amax / (2 ** (bits - 1) - 1)


def fake_quant_weight(w: Tensor, bits: int) -> Tensor:
    """Per-output-channel symmetric fake-quant with a straight-through gradient (torch.ao primitive)."""
    scale = symmetric_scale(w, bits)
    zp = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(w, scale, zp, 0, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


def fake_quant_activation(x: Tensor, bits: int = 8) -> Tensor:
    """Dynamic asymmetric fake-quant with one scale per sample (the image analogue of per-token), so a
    sample's result does not depend on the rest of the batch; straight-through gradient."""
    xf = x.float()
    flat = xf.detach().flatten(1)
    lo, hi = flat.amin(1).clamp(max=0), flat.amax(1).clamp(min=0)
    qmax = 2**bits - 1
    scale = ((hi - lo) / qmax).clamp(min=1e-8)
    zp = torch.round(-lo / scale).clamp(0, qmax).to(torch.int32)
    return torch.fake_quantize_per_channel_affine(xf, scale, zp, 0, 0, qmax).to(x.dtype)


def static_quant_activation(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int = 8) -> Tensor:
    xf = x.float()
    return torch.fake_quantize_per_tensor_affine(xf, scale, zero_point, 0, 2**bits - 1).to(x.dtype)


class FakeQuantConv2d(nn.Conv2d):
    """Conv2d trained with fake-quantised weights (per output channel, symmetric, ``weight_bits``) and,
    when ``act_bits`` is set, fake-quantised inputs (per sample, asymmetric); gradients pass straight through."""

    weight_bits: int = 8
    act_bits: int | None = None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, weight_bits: int, act_bits: int | None) -> FakeQuantConv2d:
        new = copy.copy(conv)  # same parameters and settings, new class
        new.__class__ = cls
        new.weight_bits, new.act_bits = weight_bits, act_bits
        return new

    def forward(self, x: Tensor) -> Tensor:
        if self.act_bits:
            x = fake_quant_activation(x, self.act_bits)
        return self._conv_forward(x, fake_quant_weight(self.weight, self.weight_bits), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight_bits={self.weight_bits}, act_bits={self.act_bits}"


class QuantizedConv2d(nn.Module):
    """Inference Conv2d with int8-stored weights (values within ``weight_bits``) and a per-output-channel fp32
    scale, dequantized on the fly. Activations: ``dynamic`` per-sample or ``static`` per-tensor
    quantize-dequantize (calibrated scale), or none."""

    def __init__(self, conv: nn.Conv2d, weight_bits: int = 8, act: str | None = None, act_scale=None, act_zp=None):
        super().__init__()
        w = conv.weight.detach()
        scale = symmetric_scale(w, weight_bits)
        q = torch.round(w.float() / scale.view(-1, *[1] * (w.ndim - 1))).clamp(
            -(2 ** (weight_bits - 1)), 2 ** (weight_bits - 1) - 1
        )
        self.register_buffer("weight_int8", q.to(torch.int8))
        self.register_buffer("weight_scale", scale)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.padding_mode = conv.padding_mode
        if self.padding_mode != "zeros":
            raise ConfigError(f"QuantizedConv2d supports padding_mode='zeros' only, got {self.padding_mode!r}")
        self.weight_bits, self.act = weight_bits, act
        if act == "static":
            self.register_buffer("act_scale", torch.as_tensor(act_scale, dtype=torch.float32).reshape(()))
            self.register_buffer("act_zp", torch.as_tensor(act_zp, dtype=torch.int32).reshape(()))

    def forward(self, x: Tensor) -> Tensor:
        if self.act == "dynamic":
            x = fake_quant_activation(x)
        elif self.act == "static":
            x = static_quant_activation(x, self.act_scale, self.act_zp)
        w = (self.weight_int8.float() * self.weight_scale.view(-1, 1, 1, 1)).to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        o, i = self.weight_int8.shape[:2]
        return f"{i * self.groups}, {o}, kernel_size={tuple(self.weight_int8.shape[2:])}, weight_bits={self.weight_bits}, act={self.act}"


# ---------------------------------------------------------------------------------------------- shared base


class _Quantized(Technique):
    """Bookkeeping shared by QAT and PTQ: the converted copy is evaluated and measured in ``finalize``."""

    def __init__(
        self, skip=("lm_head",), min_features: int = 1, convs: bool = True, eval_batch_size: int | None = None
    ):
        self.skip = list(skip or [])
        self.min_features = int(min_features)
        self.convs = bool(convs)
        self.eval_batch_size = eval_batch_size
        self.linears: list[str] = []
        self.conv_layers: list[str] = []
        self.kept: dict[str, str] = {}

    def _eval(self, model: nn.Module, ctx: RunContext, prefix: str) -> dict[str, float]:
        data = ctx.data
        split = data.test if data.test is not None else data.val
        bs = int(self.eval_batch_size or ctx.cfg.trainer.eval_batch_size)
        return evaluate(model, split, data.task, bs, prefix)

    def _layer_bytes(self, model: nn.Module) -> int:
        return sum(state_bytes(model.get_submodule(n)) for n in self.linears + self.conv_layers)

    def _measure(self, float_model: nn.Module, convert, ctx: RunContext) -> dict[str, Any]:
        """Evaluate and size ``float_model`` (fake-quant or float), convert a copy with ``convert(copy)``,
        evaluate and size that; returns the record's metrics."""
        before = self._eval(float_model, ctx, "test_")
        bytes_before, layers_before = state_bytes(float_model), self._layer_bytes(float_model)
        qmodel = copy.deepcopy(float_model)
        convert(qmodel)
        after = self._eval(qmodel, ctx, "test_")
        bytes_after, layers_after = state_bytes(qmodel), self._layer_bytes(qmodel)
        m: dict[str, Any] = {}
        for k, v in before.items():
            m[f"{k}_before_quant"] = v
            m[f"{k}_after_quant"] = after[k]
        m.update(
            model_bytes_before_quant=bytes_before,
            model_bytes_after_quant=bytes_after,
            quantized_layers_bytes_before=layers_before,
            quantized_layers_bytes_after=layers_after,
            quantized_layers_compression=layers_before / max(layers_after, 1),
        )
        return m

    def summary(self) -> dict[str, Any]:
        return {
            "linear_layers": self.linears,
            "conv_layers": self.conv_layers,
            "kept_high_precision": self.kept,
        }


# ---------------------------------------------------------------------------------------------- QAT


class QAT(_Quantized):
    name = "qat"

    def __init__(self, weight_bits: int = 8, activation_bits: int | None = 8, group_size: int | None = None, **kw):
        super().__init__(**kw)
        if weight_bits not in (4, 8):
            raise ConfigError(f"quantization.weight_bits={weight_bits}; valid choices: 4, 8")
        if activation_bits not in (None, 8):
            raise ConfigError(f"quantization.activation_bits={activation_bits}; valid choices: 8, null (weight-only)")
        if group_size is not None and (int(group_size) < 1 or int(group_size) & (int(group_size) - 1)):
            raise ConfigError(f"quantization.group_size={group_size} must be a power of two or null (per channel)")
        self.weight_bits, self.activation_bits = int(weight_bits), activation_bits
        self.group_size = None if group_size is None else int(group_size)

    def base_config(self):
        """The torchao PTQ config the QAT prepare/convert steps are derived from."""
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
        from torchao.quantization.granularity import PerAxis, PerGroup

        dtype = torch.int8 if self.weight_bits == 8 else torch.int4
        gran = PerGroup(self.group_size) if self.group_size else PerAxis(0)
        if self.activation_bits == 8:  # int8 per-token asymmetric activations, symmetric weights
            return Int8DynamicActivationIntxWeightConfig(weight_dtype=dtype, weight_granularity=gran)
        return IntxWeightOnlyConfig(weight_dtype=dtype, granularity=gran)

    def _filter(self, module: nn.Module, fqn: str) -> bool:
        return fqn in self._linear_set

    def prepare_model(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        from torchao.quantization import quantize_
        from torchao.quantization.qat import QATConfig

        self.linears, kept = select_layers(
            model, (nn.Linear,), self.skip, self.min_features, group_size=self.group_size or 1
        )
        self.kept.update(kept)
        self._linear_set = set(self.linears)
        if self.convs:
            self.conv_layers, kept = select_layers(model, (nn.Conv2d,), self.skip, self.min_features)
            self.kept.update(kept)
            for name in self.conv_layers:
                swap_module(
                    model,
                    name,
                    FakeQuantConv2d.from_conv(model.get_submodule(name), self.weight_bits, self.activation_bits),
                )
        if not self.linears and not self.conv_layers:
            raise ConfigError(
                f"quantization=qat: no layer of this model qualifies (kept in high precision: {self.kept})"
            )
        if self.linears:
            quantize_(model, QATConfig(self.base_config(), step="prepare"), filter_fn=self._filter)
        return model

    def convert(self, model: nn.Module) -> None:
        from torchao.quantization import quantize_
        from torchao.quantization.qat import QATConfig

        if self.linears:
            quantize_(model, QATConfig(self.base_config(), step="convert"), filter_fn=self._filter)
        act = "dynamic" if self.activation_bits else None
        for name in self.conv_layers:
            swap_module(model, name, QuantizedConv2d(model.get_submodule(name), self.weight_bits, act))

    def finalize(self, model: nn.Module, ctx: RunContext) -> dict[str, Any]:
        metrics = self._measure(model, self.convert, ctx)
        return {
            "metrics": metrics,
            "params": {"weight_bits": self.weight_bits, "activation_bits": self.activation_bits},
        }

    def summary(self) -> dict[str, Any]:
        s = super().summary()
        s["recipe"] = f"w{self.weight_bits}" + (f"a{self.activation_bits}" if self.activation_bits else " weight-only")
        s["granularity"] = f"group {self.group_size}" if self.group_size else "per channel"
        return s


# ---------------------------------------------------------------------------------------------- PTQ


class PTQ(_Quantized):
    name = "ptq"

    def __init__(self, mode: str = "dynamic", calibration_batches: int = 8, **kw):
        super().__init__(**kw)
        if mode not in PTQ_MODES:
            raise ConfigError(f"quantization.mode={mode!r}; valid choices: {', '.join(PTQ_MODES)}")
        if int(calibration_batches) < 1:
            raise ConfigError(f"quantization.calibration_batches={calibration_batches} must be >= 1")
        self.mode, self.calibration_batches = mode, int(calibration_batches)

    @torch.no_grad()
    def calibrate(self, model: nn.Module, ctx: RunContext) -> dict[str, tuple[float, float]]:
        """Input (min, max) of every selected layer over ``calibration_batches`` un-augmented training batches."""
        ranges: dict[str, list[float]] = {}
        self.input_ndim: dict[str, int] = {}

        def hook(name):
            def fn(_m, args):
                x = args[0].detach().float()
                lo, hi = x.min().item(), x.max().item()
                r = ranges.setdefault(name, [lo, hi])
                r[0], r[1] = min(r[0], lo), max(r[1], hi)
                self.input_ndim[name] = x.ndim

            return fn

        handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in self.linears + self.conv_layers]
        was_training = model.training
        model.eval()
        bs = int(ctx.cfg.trainer.batch_size)
        try:
            for i, b in enumerate(ctx.data.train.batches(bs, train=False)):
                if i >= self.calibration_batches:
                    break
                model(b.x)
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        return {k: (v[0], v[1]) for k, v in ranges.items()}

    def convert(self, model: nn.Module, ranges: dict[str, tuple[float, float]] | None) -> None:
        from torchao.quantization import (
            Int8DynamicActivationInt8WeightConfig,
            Int8StaticActivationInt8WeightConfig,
            quantize_,
        )
        from torchao.quantization.granularity import PerRow, PerTensor

        device = next(model.parameters()).device
        for name in self.linears:
            if self.mode == "dynamic":
                cfg = Int8DynamicActivationInt8WeightConfig(
                    set_inductor_config=False
                )  # per-token int8 activations, per-channel int8 weights
            else:  # symmetric per-tensor activation scale from the calibration range
                amax = max(abs(ranges[name][0]), abs(ranges[name][1]), 1e-8)
                # torchao wants the scale with the activation's rank: (1, 1) for (B, C), (1, 1, 1) for (B, T, C)
                scale = torch.full([1] * self.input_ndim.get(name, 2), amax / 127.0, device=device)
                cfg = Int8StaticActivationInt8WeightConfig(
                    act_quant_scale=scale, granularity=[PerTensor(), PerRow()], set_inductor_config=False
                )
            quantize_(model, cfg, filter_fn=lambda _m, fqn, name=name: fqn == name)
        for name in self.conv_layers:
            conv = model.get_submodule(name)
            if self.mode == "dynamic":
                swap_module(model, name, QuantizedConv2d(conv, 8, "dynamic"))
            else:  # asymmetric per-tensor uint8 range from calibration
                lo, hi = min(ranges[name][0], 0.0), max(ranges[name][1], 0.0)
                scale = max((hi - lo) / 255.0, 1e-8)
                zp = int(min(max(round(-lo / scale), 0), 255))
                swap_module(model, name, QuantizedConv2d(conv, 8, "static", scale, zp))

    def finalize(self, model: nn.Module, ctx: RunContext) -> dict[str, Any]:
        self.linears, kept = select_layers(model, (nn.Linear,), self.skip, self.min_features)
        self.kept.update(kept)
        if self.convs:
            self.conv_layers, kept = select_layers(model, (nn.Conv2d,), self.skip, self.min_features)
            self.kept.update(kept)
        if not self.linears and not self.conv_layers:
            raise ConfigError(
                f"quantization=ptq: no layer of this model qualifies (kept in high precision: {self.kept})"
            )
        ranges = self.calibrate(model, ctx) if self.mode == "static" else None
        metrics = self._measure(model, lambda m: self.convert(m, ranges), ctx)
        params = {"mode": self.mode}
        if ranges is not None:
            params["calibration_batches"] = self.calibration_batches
        return {"metrics": metrics, "params": params}

    def summary(self) -> dict[str, Any]:
        return {"mode": self.mode, **super().summary()}


# ---------------------------------------------------------------------------------------------- FP8


def fp8_support() -> tuple[bool, str]:
    """(supported, description of this machine's GPU)."""
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is available"
    cap = torch.cuda.get_device_capability()
    name = torch.cuda.get_device_name()
    return cap >= FP8_MIN_CAPABILITY, f"{name} has compute capability {cap[0]}.{cap[1]}"


def fp8_layer_rule(recipe: str, skip) -> tuple:
    """torchao's recommended per-layer filter for ``recipe`` (``torchao.float8._auto_filter_for_recipe``,
    from its H100 benchmarks): a Linear is converted when its name contains none of ``skip``, both
    dimensions are multiples of 16, and its GEMM is large enough to gain from FP8: tensorwise skips
    K <= 4096 with N <= 1024; rowwise skips N <= 2048, K <= 1024, and N <= 4096 with K <= 2048
    (N = out_features, K = in_features). Returns (the filter, a function naming why a layer is kept)."""
    from torchao.float8 import _auto_filter_for_recipe

    keep = _auto_filter_for_recipe(recipe, filter_fqns=list(skip))

    def why_kept(name: str, m: nn.Linear) -> str:
        n, k = m.weight.shape
        if any(s and s in name for s in skip):
            return "skipped by name"
        if n % 16 or k % 16:
            return f"(N, K) = ({n}, {k}) not multiples of 16"
        return f"(N, K) = ({n}, {k}) below torchao's {recipe} size thresholds (slower in FP8)"

    return keep, why_kept


class FP8Training(Technique):
    """Swap ``nn.Linear`` layers for torchao ``Float8Linear`` (e4m3 forward, e5m2 gradients, scales from the
    current amax each step), choosing layers with torchao's recommended filter for the recipe
    (:func:`fp8_layer_rule`; on GPT-2-small: 24 of 49 Linears for tensorwise, none for rowwise).
    ``min_features`` optionally adds a floor on both dimensions. Needs an FP8 GPU (refused at construction
    elsewhere) and ``trainer.compile=true`` (torchao's casts and scaling are fused only by torch.compile;
    eager float8 is slower than bf16). When no layer qualifies the run is refused, so bf16 training is
    never recorded under the fp8 label. The record lists converted and kept layers with the reason."""

    name = "fp8"

    def __init__(self, recipe: str = "tensorwise", min_features: int | None = None, skip=("lm_head",)):
        if recipe not in FP8_RECIPES:
            raise ConfigError(f"quantization.recipe={recipe!r}; valid choices: {', '.join(FP8_RECIPES)}")
        ok, where = fp8_support()
        if not ok:
            raise ConfigError(
                "quantization=fp8 needs an NVIDIA GPU with FP8 tensor cores, compute capability >= "
                f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} (Ada, Hopper H100/H200, Blackwell); {where}"
            )
        self.recipe, self.skip = recipe, list(skip or [])
        self.min_features = None if min_features is None else int(min_features)
        self.converted: list[str] = []
        self.kept: dict[str, str] = {}

    def select(self, model: nn.Module) -> tuple[list[str], dict[str, str]]:
        keep, why_kept = fp8_layer_rule(self.recipe, self.skip)
        chosen, kept = [], {}
        for name, m in model.named_modules():
            if not isinstance(m, nn.Linear):
                continue
            if not keep(m, name):
                kept[name] = why_kept(name, m)
            elif self.min_features is not None and min(m.weight.shape) < self.min_features:
                kept[name] = f"(N, K) = {tuple(m.weight.shape)} below min_features={self.min_features}"
            else:
                chosen.append(name)
        return chosen, kept

    def prepare_model(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        if not bool(ctx.cfg.trainer.compile):
            raise ConfigError(
                "quantization=fp8 needs trainer.compile=true: torchao's float8 casts and scaling are fused only "
                "under torch.compile, and eager float8 training is slower than bf16"
            )
        self.converted, self.kept = self.select(model)
        if not self.converted:
            raise ConfigError(
                f"quantization=fp8 (recipe={self.recipe}): no Linear layer of this model qualifies under torchao's "
                f"{self.recipe} filter, so the run would train in bf16 under the fp8 label; kept: {self.kept}. "
                + ("Try quantization=fp8 (tensorwise)." if self.recipe == "rowwise" else "Use a larger model.")
            )
        chosen = set(self.converted)
        config = Float8LinearConfig.from_recipe_name(self.recipe)
        return convert_to_float8_training(model, module_filter_fn=lambda _m, fqn: fqn in chosen, config=config)

    def finalize(self, model: nn.Module, ctx: RunContext) -> dict[str, Any]:
        return {"metrics": {"model_bytes": state_bytes(model)}}

    def summary(self) -> dict[str, Any]:
        rule = f"torchao _auto_filter_for_recipe({self.recipe!r}), name not in {self.skip}"
        if self.min_features is not None:
            rule += f", both dims >= {self.min_features}"
        return {"recipe": self.recipe, "rule": rule, "converted": self.converted, "kept_high_precision": self.kept}


__all__ = [
    "FP8Training",
    "FakeQuantConv2d",
    "PTQ",
    "QAT",
    "QuantizedConv2d",
    "evaluate",
    "fp8_layer_rule",
    "fp8_support",
    "optimizer_state_bytes",
    "state_bytes",
    "tensor_bytes",
]
