"""Random uint8 images with random labels, of any shape and size, for speed tests: the data path
costs nothing and nothing is read from disk. Accuracy on it is meaningless (chance level)."""

from __future__ import annotations

import torch

from harness.data.base import DataBundle, DeviceImageSplit
from harness.data.registry import DATASETS
from harness.errors import ConfigError


@DATASETS.register("synthetic", "random uint8 images and labels of configurable shape, for speed tests")
def build_synthetic(cfg, data_dir, device, seed) -> DataBundle:
    c, size, k = int(cfg.get("channels", 3)), int(cfg.get("image_size", 32)), int(cfg.get("num_classes", 10))
    n_train, n_test = int(cfg.get("train_size", 10_000)), int(cfg.get("test_size", 1_000))
    for key, v in dict(channels=c, image_size=size, num_classes=k, train_size=n_train, test_size=n_test).items():
        if v < 1:
            raise ConfigError(f"dataset.{key}={v} must be a positive integer")
    # a fixed generator (dataset.seed, not the run seed) so every run of a speed test sees the same data
    g = torch.Generator().manual_seed(int(cfg.get("seed", 0)))
    images = torch.randint(0, 256, (n_train + n_test, c, size, size), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, k, (n_train + n_test,), generator=g)
    mean, std = (0.5,) * c, (0.2887,) * c  # moments of the uniform distribution on [0, 1]
    aug = dict(crop_padding=int(cfg.get("crop_padding", 0)), flip=bool(cfg.get("flip", False)))
    train = DeviceImageSplit(images[:n_train], labels[:n_train], mean, std, device=device, **aug)
    test = DeviceImageSplit(images[n_train:], labels[n_train:], mean, std, device=device)
    return DataBundle(
        name="synthetic",
        task="classification",
        train=train,
        test=test,
        val=None,
        num_classes=k,
        input_shape=(c, size, size),
        class_names=[str(i) for i in range(k)],
        meta={"source": "torch.randint", "license": "n/a (generated)"},
    )
