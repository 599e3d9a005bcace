"""Dataset registry. ``build_dataset(cfg.dataset, ...)`` returns a ``DataBundle``.

Each dataset module registers a builder ``fn(cfg, data_dir, device, seed) -> DataBundle`` with
``@DATASETS.register(name)``; importing this package imports every module below.
"""

from __future__ import annotations

from pathlib import Path

import torch

from harness.data.base import DataBundle, DeviceImageSplit, Split, split_off_validation
from harness.data.registry import DATASETS
from harness.errors import ConfigError


def build_dataset(cfg, data_dir: str | Path, device: torch.device, seed: int) -> DataBundle:
    bundle = DATASETS.get(cfg.name)(cfg, Path(data_dir), device, seed)
    n = cfg.get("train_subset")
    if n:  # a fixed random subset of the training split (same for every seed), for quick experiments
        if not hasattr(bundle.train, "subset"):
            raise ConfigError(f"dataset.train_subset is supported by image datasets only, not by {cfg.name}")
        if int(n) > len(bundle.train):
            raise ConfigError(f"dataset.train_subset={n} must be at most the training split size ({len(bundle.train)})")
        g = torch.Generator().manual_seed(0)
        bundle.train = bundle.train.subset(torch.randperm(len(bundle.train), generator=g)[: int(n)])
        bundle.meta["train_subset"] = int(n)
    return bundle


from harness.data import cifar, digits, imagefolder, synthetic, wikitext  # noqa: E402,F401  (registers)

__all__ = ["DATASETS", "DataBundle", "DeviceImageSplit", "Split", "build_dataset", "split_off_validation"]
