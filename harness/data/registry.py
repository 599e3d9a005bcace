"""The dataset registry: each dataset module registers a builder
``fn(cfg, data_dir, device, seed) -> DataBundle`` with ``@DATASETS.register(name)``."""

from harness.registry import Registry

DATASETS = Registry("dataset")
