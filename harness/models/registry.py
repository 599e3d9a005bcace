"""The model registry: builders ``fn(cfg, data: DataBundle) -> nn.Module`` register with
``@MODELS.register(name)``."""

from harness.registry import Registry

MODELS = Registry("model")
