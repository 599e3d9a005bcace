"""Models. ``build_model(cfg.model, data)`` returns an ``nn.Module`` for the dataset's input shape
and number of classes (or vocabulary size).

``conf/model/<name>.yaml`` names a builder ``fn(data: DataBundle, *, <hyper-parameters>) -> nn.Module``
in ``_target_`` (``harness.models.resnet.resnet``, ``.vit.vit``, ``.gpt2.gpt``, ...) and holds its
hyper-parameters; ``hydra.utils.instantiate(..., _partial_=True)`` binds them and the data bundle is
passed at run time. ``name`` and ``family`` (``harness.schemas.ModelConfig``) are the harness's keys.
A model may define ``flops_per_sample()`` (forward+backward FLOPs per sample, or per token for
language models); otherwise ``harness.models.flops.estimate_flops`` counts them with torch's FLOP counter.
"""

from __future__ import annotations

from torch import nn

from harness import build


def build_model(cfg, data) -> nn.Module:
    h, params = build.split("model", build.spec_of("model", cfg))
    label = h.name or str(params.get("_target_"))
    factory = build.instantiate("model", params, label, partial=True)
    return build.call("model", label, factory, data)


__all__ = ["build_model"]
