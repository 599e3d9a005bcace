"""Random uint8 images with random labels, of any shape and size, for speed tests: the data path
costs nothing and nothing is read from disk. Accuracy on it is meaningless (chance level)."""

from __future__ import annotations

import torch

from harness.data.base import DataBundle, DeviceImageSplit, split_off_validation
from harness.errors import ConfigError


def synthetic(
    data_dir,
    device,
    seed,
    *,
    channels: int,
    image_size: int,
    num_classes: int,
    train_size: int,
    test_size: int,
    data_seed: int,
    crop_padding: int,
    flip: bool,
    val_size: int,
    label_noise: float = 0.0,
    noise_seed: int = 0,
) -> DataBundle:
    """``conf/dataset/synthetic.yaml``: random uint8 images and labels of configurable shape, for speed tests."""
    c, size, k = int(channels), int(image_size), int(num_classes)
    n_train, n_test = int(train_size), int(test_size)
    for key, v in dict(channels=c, image_size=size, num_classes=k, train_size=n_train, test_size=n_test).items():
        if v < 1:
            raise ConfigError(f"dataset.{key}={v} must be a positive integer")
    # a fixed generator (dataset.data_seed, not the run seed) so every run of a speed test sees the same data
    g = torch.Generator().manual_seed(int(data_seed))
    images = torch.randint(0, 256, (n_train + n_test, c, size, size), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, k, (n_train + n_test,), generator=g)
    mean, std = (0.5,) * c, (0.2887,) * c  # moments of the uniform distribution on [0, 1]
    aug = dict(crop_padding=int(crop_padding), flip=bool(flip))
    train = DeviceImageSplit(images[:n_train], labels[:n_train], mean, std, device=device, **aug)
    test = DeviceImageSplit(images[n_train:], labels[n_train:], mean, std, device=device)
    train, val = split_off_validation(train, int(val_size), seed=0)
    train = train.with_label_noise(k, label_noise, noise_seed)  # training labels only: val and test stay clean
    return DataBundle(
        name="synthetic",
        task="classification",
        train=train,
        test=test,
        val=val,
        num_classes=k,
        input_shape=(c, size, size),
        class_names=[str(i) for i in range(k)],
        meta={"source": "torch.randint", "license": "n/a (generated)"},
    )
