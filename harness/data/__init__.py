"""Dataset registry. ``build_dataset(cfg.dataset, ...)`` returns a ``DataBundle``.

Each dataset module registers a builder ``fn(cfg, data_dir, device, seed) -> DataBundle`` with
``@DATASETS.register(name)``; importing this package imports every module below.
"""

from __future__ import annotations

from pathlib import Path

import torch

from harness.data.base import DataBundle, DeviceImageSplit, Split, split_off_validation
from harness.registry import Registry

DATASETS = Registry("dataset")


def build_dataset(cfg, data_dir: str | Path, device: torch.device, seed: int) -> DataBundle:
    return DATASETS.get(cfg.name)(cfg, Path(data_dir), device, seed)


from harness.data import digits  # noqa: E402,F401  (registers)

__all__ = ["DATASETS", "DataBundle", "DeviceImageSplit", "Split", "build_dataset", "split_off_validation"]
