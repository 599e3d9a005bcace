"""scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes; UCI ML hand-written
digits, CC BY 4.0): the embedded dataset that needs no download."""

from __future__ import annotations

import torch

from harness.data.base import DataBundle, DeviceImageSplit, split_off_validation
from harness.errors import ConfigError


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    # pixel values are 0..16; scale to 0..255 so the images are ordinary uint8 images
    images = torch.from_numpy((d.images * (255 / 16)).round()).to(torch.uint8).unsqueeze(1)
    return images, torch.from_numpy(d.target).long()


def digits(
    data_dir,
    device,
    seed,
    *,
    train_size: int,
    val_size: int,
    crop_padding: int,
    label_noise: float = 0.0,
    noise_seed: int = 0,
) -> DataBundle:
    """``conf/dataset/digits.yaml``: scikit-learn's 8x8 digits (Alpaydin & Kaynak 1998), a fixed split.
    ``label_noise``: symmetric noise on the training labels after validation is carved
    (``harness.data.base.symmetric_label_noise``)."""
    images, labels = load_digits_tensors()
    # fixed split, independent of the run seed: the first train_size images train, the rest test
    n_train = int(train_size)
    if not 0 < n_train < len(images):
        raise ConfigError(f"dataset.train_size={train_size} must be in [1, {len(images) - 1}]")
    mean, std = (0.3053,), (0.3759,)
    pad = int(crop_padding)
    train = DeviceImageSplit(images[:n_train], labels[:n_train], mean, std, crop_padding=pad, device=device)
    test = DeviceImageSplit(images[n_train:], labels[n_train:], mean, std, device=device)
    train, val = split_off_validation(train, int(val_size), seed=0)
    train = train.with_label_noise(10, label_noise, noise_seed)  # training labels only: val and test stay clean
    return DataBundle(
        name="digits",
        task="classification",
        train=train,
        test=test,
        val=val,
        num_classes=10,
        input_shape=(1, 8, 8),
        class_names=[str(i) for i in range(10)],
        meta={"source": "sklearn.datasets.load_digits", "license": "CC BY 4.0"},
    )
