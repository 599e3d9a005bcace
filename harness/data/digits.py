"""scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes; UCI ML hand-written
digits, CC BY 4.0): the embedded dataset that needs no download."""

from __future__ import annotations

import torch

from harness.data.base import DataBundle, DeviceImageSplit, split_off_validation
from harness.data.registry import DATASETS


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    # pixel values are 0..16; scale to 0..255 so the images are ordinary uint8 images
    images = torch.from_numpy((d.images * (255 / 16)).round()).to(torch.uint8).unsqueeze(1)
    return images, torch.from_numpy(d.target).long()


@DATASETS.register("digits", "scikit-learn 8x8 digits, 1,797 images, fixed 1,437/360 split", "Alpaydin & Kaynak 1998")
def build_digits(cfg, data_dir, device, seed) -> DataBundle:
    images, labels = load_digits_tensors()
    # fixed split, independent of the run seed: the first 1,437 images train, the last 360 test
    n_train = int(cfg.get("train_size", 1437))
    mean, std = (0.3053,), (0.3759,)
    pad = int(cfg.get("crop_padding", 0))
    train = DeviceImageSplit(images[:n_train], labels[:n_train], mean, std, crop_padding=pad, device=device)
    test = DeviceImageSplit(images[n_train:], labels[n_train:], mean, std, device=device)
    train, val = split_off_validation(train, int(cfg.get("val_size", 0)), seed=0)
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
