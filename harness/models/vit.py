"""Vision Transformers (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words"), built with timm's
``VisionTransformer``: learned position embeddings, pre-LN blocks, fused scaled-dot-product attention.

Sizes follow DeiT (Touvron et al. 2021): tiny 192 wide / 3 heads, small 384 / 6 heads, 12 blocks.
``model.patch_size: auto`` picks the patch from the input size: 2 below 16 px (8-px digits: 4x4
tokens), 4 up to 32 px (CIFAR: 8x8 tokens), 8 below 160 px (64-px Tiny ImageNet: 8x8), 16 from
160 px (Imagenette-160, ImageNet). ``model.pool``: ``token`` (class token) or ``avg`` (global average
pooling of the patch tokens, no class token; Beyer et al. 2022, "Better plain ViT baselines").

Normalization layers are timm's ``nn.LayerNorm`` modules ``blocks.<i>.norm1``, ``blocks.<i>.norm2`` and
the final ``norm`` (``fc_norm`` with avg pooling), listed by ``model.norm_layers()``.
"""

from __future__ import annotations

from timm.models.vision_transformer import VisionTransformer
from torch import nn

from harness.errors import ConfigError

POOLS = ("token", "avg")


def auto_patch_size(image_size: int) -> int:
    if image_size < 16:
        return 2
    if image_size <= 32:
        return 4
    if image_size < 160:
        return 8
    return 16


class ViT(VisionTransformer):
    """timm's VisionTransformer plus the analytic FLOPs the record needs (torch's FLOP counter does
    not see CPU attention kernels, so a counted figure would differ between CPU and GPU)."""

    def flops_per_sample(self) -> int:
        """Training FLOPs per image, 3x the forward matmul FLOPs: patch embedding, per block
        2*12*D^2 per token (qkv, projection, 4x MLP) and 2*2*N^2*D for attention scores and values,
        and the head. Norms, softmax and activations are left out (a few %), as in Kaplan et al. 2020."""
        d, n = self.embed_dim, self.patch_embed.num_patches + self.num_prefix_tokens
        mlp = self.blocks[0].mlp.fc1.out_features
        patch = 2 * self.patch_embed.proj.weight[0].numel() * d * self.patch_embed.num_patches
        block = 2 * n * (4 * d * d + 2 * d * mlp) + 4 * n * n * d
        head = 2 * d * self.num_classes
        return 3 * (patch + len(self.blocks) * block + head)

    def norm_layers(self) -> dict[str, nn.Module]:
        """Every normalization module by name (``blocks.0.norm1``, ..., ``norm`` or ``fc_norm``)."""
        return {n: m for n, m in self.named_modules() if isinstance(m, nn.LayerNorm)}


def vit(
    data,
    *,
    embed_dim: int,
    depth: int,
    num_heads: int,
    mlp_ratio: float,
    patch_size: int | str,
    pool: str,
    drop_rate: float,
    drop_path_rate: float,
) -> ViT:
    """``conf/model/vit_*.yaml``: a ViT for the dataset's images and classes."""
    if data.task != "classification" or len(data.input_shape) != 3:
        raise ConfigError(
            f"a ViT needs images (C, H, W); dataset {data.name!r} gives {data.task} data of shape {data.input_shape}"
        )
    c, h, w = data.input_shape
    patch = auto_patch_size(min(h, w)) if patch_size in (None, "auto") else int(patch_size)
    if h % patch or w % patch:
        raise ConfigError(
            f"model.patch_size={patch} does not divide the {h}x{w} input; choose a divisor or patch_size=auto"
        )
    pool = str(pool)
    if pool not in POOLS:
        raise ConfigError(f"model.pool={pool!r}; valid choices: {', '.join(POOLS)}")
    return ViT(
        img_size=(h, w),
        patch_size=patch,
        in_chans=c,
        num_classes=data.num_classes,
        global_pool=pool,
        class_token=pool == "token",
        embed_dim=int(embed_dim),
        depth=int(depth),
        num_heads=int(num_heads),
        mlp_ratio=float(mlp_ratio),
        qkv_bias=True,
        drop_rate=float(drop_rate),
        drop_path_rate=float(drop_path_rate),
    )
