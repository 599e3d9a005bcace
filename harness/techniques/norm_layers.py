"""Layers and residual blocks used by the normalization techniques (``harness.techniques.normalization``).

Normalization layers: ScaleNorm (Nguyen & Salazar 2019), FixNorm (Nguyen & Chiang 2018), Batch
Renormalization (Ioffe 2017). Residual blocks rebuilt from torchvision's ``BasicBlock``/``Bottleneck``
convolutions: Fixup (Zhang et al. 2019) and NF-ResNet (Brock et al. 2021a). Post-LN wrappers for the
pre-LN transformer blocks of timm's ViT and ``harness.models.gpt2``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

RESIDUAL_BLOCKS = (BasicBlock, Bottleneck)
# ReLU gain of NF-ResNets: makes Var(gamma * relu(x)) = 1 for x ~ N(0, 1) (Brock et al. 2021a, appendix D)
RELU_GAMMA = math.sqrt(2.0 / (1.0 - 1.0 / math.pi))


class ScalarBias(nn.Module):
    """One learned scalar added to the input (Fixup's biases, init 0)."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.bias


class ScaleBias(nn.Module):
    """x * scale + bias with learned scalars (init 1 and 0): Fixup's multiplier and bias."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale + self.bias


class ChannelBias(nn.Module):
    """A learned per-channel bias (init 0) for (N, C, ...) maps: what a conv keeps of BN when BN is removed."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.bias.view(1, -1, *([1] * (x.dim() - 2)))


class Gain(nn.Module):
    """A learned scalar multiplier; SkipInit's residual gain starts at 0 (De & Smith 2020)."""

    def __init__(self, init: float = 0.0):
        super().__init__()
        self.gain = nn.Parameter(torch.full((1,), float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gain


class GammaReLU(nn.Module):
    """ReLU times the gain that restores unit variance (NF-ResNets' scaled activation)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x) * RELU_GAMMA


class ScaleNorm(nn.Module):
    """ScaleNorm (Nguyen & Salazar 2019, Transformers without Tears): g * x / ||x|| over the last dim,
    one learned scalar g initialised to sqrt(d)."""

    def __init__(self, dim: int, eps: float = 1e-5, scale: float | None = None):
        super().__init__()
        self.eps = eps
        self.g = nn.Parameter(torch.tensor(float(scale if scale is not None else math.sqrt(dim))))

    def forward(self, x: Tensor) -> Tensor:
        return self.g * x / x.norm(dim=-1, keepdim=True).clamp_min(self.eps)


class FixNorm(nn.Module):
    """FixNorm (Nguyen & Chiang 2018) as a parametrization: each embedding row has fixed length ``radius``."""

    def __init__(self, radius: float = 1.0, eps: float = 1e-5):
        super().__init__()
        self.radius, self.eps = radius, eps

    def forward(self, w: Tensor) -> Tensor:
        return self.radius * w / w.norm(dim=-1, keepdim=True).clamp_min(self.eps)


class BatchRenorm2d(nn.Module):
    """Batch Renormalization (Ioffe 2017): BN whose training output is corrected towards the running
    statistics, x_hat = (x - mu_B) / sigma_B * r + d with r = sigma_B / sigma, d = (mu_B - mu) / sigma
    (no gradient through r, d), clipped to [1/r_max, r_max] and [-d_max, d_max]. As in the paper the
    clips open up gradually: r_max from 1 and d_max from 0 to their final values over ``ramp_steps``
    training steps (plain BN at first)."""

    def __init__(
        self,
        channels: int,
        r_max: float = 3.0,
        d_max: float = 5.0,
        ramp_steps: int = 5000,
        momentum: float = 0.01,
        eps: float = 1e-5,
    ):
        super().__init__()
        self.r_max, self.d_max, self.ramp_steps, self.momentum, self.eps = r_max, d_max, ramp_steps, momentum, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1, 1, 1)
        if self.training:
            xf = x.float()
            mu = xf.mean(dim=(0, 2, 3))
            var = xf.var(dim=(0, 2, 3), unbiased=False)
            sigma = (var + self.eps).sqrt()
            run_sigma = (self.running_var + self.eps).sqrt()
            # the clip ramp as device tensors: no .item() host sync (and no graph break under compile) per forward
            t = (self.steps.float() / max(1, self.ramp_steps)).clamp(max=1.0)
            r_max, d_max = 1.0 + t * (self.r_max - 1.0), t * self.d_max
            r = torch.clamp(sigma.detach() / run_sigma, min=1.0 / r_max, max=r_max)
            d = torch.clamp((mu.detach() - self.running_mean) / run_sigma, min=-d_max, max=d_max)
            y = ((xf - mu.view(shape)) / sigma.view(shape) * r.view(shape) + d.view(shape)).to(x.dtype)
            with torch.no_grad():
                n = x.numel() / x.shape[1]
                self.running_mean.lerp_(mu.detach(), self.momentum)
                self.running_var.lerp_(var.detach() * n / max(1.0, n - 1), self.momentum)
                self.steps += 1
        else:
            y = (x - self.running_mean.view(shape)) / (self.running_var.view(shape) + self.eps).sqrt()
        return y * self.weight.view(shape) + self.bias.view(shape)


def _convs_of(block: nn.Module) -> list[nn.Conv2d]:
    return [block.conv1, block.conv2] + ([block.conv3] if isinstance(block, Bottleneck) else [])


class FixupBlock(nn.Module):
    """A torchvision residual block without normalization, initialised by Fixup (Zhang et al. 2019):
    a scalar bias before each conv and each activation, a scalar multiplier on the branch output, the
    branch's last conv zero-initialised and its other convs He-initialised and scaled by
    L^(-1/(2m-2)) (L residual branches in the net, m convs per branch). Forward as the official code:
    relu(scale * branch(x) + bias + shortcut(x + bias_in))."""

    def __init__(self, block: nn.Module, num_branches: int):
        super().__init__()
        convs = _convs_of(block)
        self.convs = nn.ModuleList(convs)
        m = len(convs)
        self.bias_in = nn.ParameterList([nn.Parameter(torch.zeros(1)) for _ in range(m)])
        self.bias_act = nn.ParameterList([nn.Parameter(torch.zeros(1)) for _ in range(m - 1)])
        self.scale = nn.Parameter(torch.ones(1))
        self.bias_out = nn.Parameter(torch.zeros(1))
        self.downsample = block.downsample[0] if block.downsample is not None else None
        factor = num_branches ** (-1.0 / (2 * m - 2))
        with torch.no_grad():
            for conv in convs[:-1]:
                nn.init.normal_(
                    conv.weight, 0.0, math.sqrt(2.0 / (conv.weight.shape[0] * conv.weight[0, 0].numel())) * factor
                )
            nn.init.zeros_(convs[-1].weight)
            if self.downsample is not None:
                w = self.downsample.weight
                nn.init.normal_(w, 0.0, math.sqrt(2.0 / (w.shape[0] * w[0, 0].numel())))

    def branch(self, x: Tensor) -> Tensor:
        out = x
        for i, conv in enumerate(self.convs):
            out = conv(out + self.bias_in[i])
            if i < len(self.convs) - 1:
                out = F.relu(out + self.bias_act[i])
        return out * self.scale + self.bias_out

    def shortcut(self, x: Tensor) -> Tensor:
        return self.downsample(x + self.bias_in[0]) if self.downsample is not None else x

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.branch(x) + self.shortcut(x))


def scaled_std_conv(conv: nn.Conv2d) -> nn.Module:
    """The same convolution as a Scaled Weight Standardized conv (Brock et al. 2021a), with a bias."""
    from timm.layers import ScaledStdConv2d

    return ScaledStdConv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        bias=True,
    )


class NFBlock(nn.Module):
    """Normalizer-free pre-activation residual block (NF-ResNet, Brock et al. 2021a):
    h + alpha * f(h / beta), with beta = sqrt(Var(h)) predicted analytically at initialisation,
    Scaled WS convs and gamma-scaled ReLUs, so f keeps unit variance. A transition block (with a
    downsampling shortcut) applies the shortcut to the normalized, activated input, which resets the
    variance of the residual stream to 1 + alpha^2."""

    def __init__(self, block: nn.Module, alpha: float, beta: float):
        super().__init__()
        self.alpha, self.beta = alpha, beta
        self.convs = nn.ModuleList(scaled_std_conv(c) for c in _convs_of(block))
        self.downsample = scaled_std_conv(block.downsample[0]) if block.downsample is not None else None
        self.act = GammaReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(x / self.beta)
        shortcut = self.downsample(out) if self.downsample is not None else x
        for i, conv in enumerate(self.convs):
            out = conv(out)
            if i < len(self.convs) - 1:
                out = self.act(out)
        return shortcut + self.alpha * out


class PostNormBlock(nn.Module):
    """A pre-LN transformer block run in post-LN order (Vaswani et al. 2017):
    x = norm1(x + attn(x)); x = norm2(x + mlp(x)). Reuses the block's own sub-layers and norms;
    supports timm's ViT ``Block`` (norm1/norm2, layer scale, drop path) and GPT-2's (ln_1/ln_2)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block
        self.timm = hasattr(block, "norm1")

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        b = self.block
        if self.timm:
            x = b.norm1(x + b.drop_path1(b.ls1(b.attn(x, *args, **kwargs))))
            return b.norm2(x + b.drop_path2(b.ls2(b.mlp(x))))
        x = b.ln_1(x + b.attn(x))
        return b.ln_2(x + b.mlp(x))
