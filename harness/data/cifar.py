"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009, "Learning Multiple Layers of Features from Tiny Images"),
read from the official python-pickle release. The batch files are read here (not via torchvision,
whose md5 check of the extracted files refuses rebuilt copies); when they are missing the official
archive is downloaded, md5-checked and unpacked into ``data_dir``.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from harness.data import download
from harness.data.base import DataBundle, DeviceImageSplit, split_off_validation
from harness.data.registry import DATASETS
from harness.errors import DataMissingError

SPECS = {
    "cifar10": dict(
        dir="cifar-10-batches-py",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        train=[f"data_batch_{i}" for i in range(1, 6)],
        test=["test_batch"],
        meta="batches.meta",
        names_key=b"label_names",
        label_key=b"labels",
        num_classes=10,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
    ),
    "cifar100": dict(
        dir="cifar-100-python",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        train=["train"],
        test=["test"],
        meta="meta",
        names_key=b"fine_label_names",
        label_key=b"fine_labels",
        num_classes=100,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
    ),
}


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def read_batches(root: Path, files: list[str], label_key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate official batch files into uint8 (N, 3, 32, 32) images and int64 labels."""
    images, labels = [], []
    for name in files:
        d = _unpickle(root / name)
        images.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(d[label_key], dtype=np.int64))
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def ensure_cifar(name: str, data_dir: Path) -> Path:
    """The release directory under ``data_dir``, downloaded first when any file is missing."""
    s = SPECS[name]
    root = data_dir / s["dir"]
    files = [*s["train"], *s["test"], s["meta"]]
    if all((root / f).is_file() for f in files):
        return root
    expected = f"{root}/ with {', '.join(files)}"
    download.download_and_extract(s["url"], data_dir, s["md5"], what=name, expected=expected)
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise DataMissingError(f"{name}: the archive unpacked but {root} lacks {', '.join(missing)}")
    return root


def build_cifar(name: str, cfg, data_dir: Path, device, seed: int) -> DataBundle:
    s = SPECS[name]
    root = ensure_cifar(name, data_dir)
    x_train, y_train = read_batches(root, s["train"], s["label_key"])
    x_test, y_test = read_batches(root, s["test"], s["label_key"])
    class_names = [n.decode() for n in _unpickle(root / s["meta"])[s["names_key"]]]
    mean = tuple(cfg.get("mean") or s["mean"])
    std = tuple(cfg.get("std") or s["std"])
    aug = dict(crop_padding=int(cfg.get("crop_padding", 4)), flip=bool(cfg.get("flip", True)))
    train = DeviceImageSplit(x_train, y_train, mean, std, device=device, **aug)
    test = DeviceImageSplit(x_test, y_test, mean, std, device=device)
    # the validation images depend on the data seed only, so every technique of a task sees the same ones
    train, val = split_off_validation(train, int(cfg.get("val_size", 0)), seed=int(cfg.get("split_seed", 0)))
    return DataBundle(
        name=name,
        task="classification",
        train=train,
        test=test,
        val=val,
        num_classes=s["num_classes"],
        input_shape=(3, 32, 32),
        class_names=class_names,
        meta={"source": s["url"], "license": "no explicit license (University of Toronto release)", "root": str(root)},
    )


@DATASETS.register("cifar10", "CIFAR-10: 50,000/10,000 32x32 RGB images, 10 classes", "Krizhevsky 2009")
def build_cifar10(cfg, data_dir, device, seed) -> DataBundle:
    return build_cifar("cifar10", cfg, Path(data_dir), device, seed)


@DATASETS.register("cifar100", "CIFAR-100: 50,000/10,000 32x32 RGB images, 100 fine classes", "Krizhevsky 2009")
def build_cifar100(cfg, data_dir, device, seed) -> DataBundle:
    return build_cifar("cifar100", cfg, Path(data_dir), device, seed)
