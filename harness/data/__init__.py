"""Datasets. ``build_dataset(cfg.dataset, data_dir, device, seed)`` returns a ``DataBundle``.

``conf/dataset/<name>.yaml`` names a builder ``fn(data_dir, device, seed, *, <options>) -> DataBundle``
in ``_target_`` (``harness.data.cifar.cifar10``, ``.digits.digits``, ...) and holds its options;
``hydra.utils.instantiate(..., _partial_=True)`` binds them and the run supplies the data directory,
device and seed. ``train_subset`` (added with ``+dataset.train_subset=N``) is applied here, to any
image dataset.
"""

from __future__ import annotations

from pathlib import Path

import torch

from harness import build
from harness.data.base import DataBundle, DeviceImageSplit, Split, split_off_validation
from harness.errors import ConfigError


def build_dataset(cfg, data_dir: str | Path, device: torch.device, seed: int) -> DataBundle:
    spec = build.spec_of("dataset", cfg)
    n = spec.pop("train_subset", None)
    h, params = build.split("dataset", spec)
    label = h.name or str(params.get("_target_"))
    factory = build.instantiate("dataset", params, label, partial=True)
    bundle = build.call("dataset", label, factory, Path(data_dir), device, seed)
    if n:  # a fixed random subset of the training split (same for every seed), for quick experiments
        if not hasattr(bundle.train, "subset"):
            raise ConfigError(f"dataset.train_subset is supported by image datasets only, not by {label}")
        if int(n) > len(bundle.train):
            raise ConfigError(f"dataset.train_subset={n} must be at most the training split size ({len(bundle.train)})")
        g = torch.Generator().manual_seed(0)
        bundle.train = bundle.train.subset(torch.randperm(len(bundle.train), generator=g)[: int(n)])
        bundle.meta["train_subset"] = int(n)
    return bundle


__all__ = ["DataBundle", "DeviceImageSplit", "Split", "build_dataset", "split_off_validation"]
