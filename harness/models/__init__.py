"""Model registry. ``build_model(cfg.model, data)`` returns an ``nn.Module`` for the dataset's
input shape and number of classes (or vocabulary size).

Builders have the signature ``fn(cfg, data: DataBundle) -> nn.Module``. A model may define
``flops_per_sample()`` (forward+backward FLOPs per sample, or per token for language models);
otherwise ``harness.models.flops.estimate_flops`` counts them with torch's FLOP counter.
"""

from __future__ import annotations

from harness.models.registry import MODELS


def build_model(cfg, data):
    return MODELS.get(cfg.name)(cfg, data)


from harness.models import gpt2, resnet, vit  # noqa: E402,F401  (register)

__all__ = ["MODELS", "build_model"]
