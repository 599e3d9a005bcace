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
from harness.errors import DataCorruptError, DataMissingError

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


# The only globals the official batch files (Python 2 pickles of dicts of numpy arrays, lists, ints
# and bytes) and re-pickled copies of them (protocols 2 to 5, numpy 1.x or 2.x) refer to. Anything
# else (os.system, builtins.eval, ...) would run code while unpickling, so it is refused.
_NUMPY_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): "multiarray._reconstruct",
    ("numpy._core.multiarray", "_reconstruct"): "multiarray._reconstruct",
    ("numpy.core.multiarray", "scalar"): "multiarray.scalar",
    ("numpy._core.multiarray", "scalar"): "multiarray.scalar",
    ("numpy.core.numeric", "_frombuffer"): "numeric._frombuffer",
    ("numpy._core.numeric", "_frombuffer"): "numeric._frombuffer",
    ("_codecs", "encode"): "codecs.encode",  # bytes pickled by Python 3 with protocol 2
}


def _numpy_internal(name: str):
    import codecs
    import importlib

    if name == "codecs.encode":
        return codecs.encode
    module, attr = name.split(".")
    for prefix in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{prefix}.{module}"), attr)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"numpy has no {name}")


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles only what the CIFAR format uses: dicts, lists, ints, bytes, str and numpy arrays."""

    def find_class(self, module: str, name: str):
        target = _NUMPY_GLOBALS.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(
                f"refused to load {module}.{name}: a CIFAR batch holds only numpy arrays, lists, bytes and ints"
            )
        return _numpy_internal(target) if isinstance(target, str) else target


def _corrupt(path: Path, reason: str) -> DataCorruptError:
    folder = path.parent
    return DataCorruptError(
        f"{path} is not a readable CIFAR batch file ({reason}). Delete {folder} and run again to download and "
        f"md5-check a fresh copy (offline: unpack the official archive into {folder.parent}; see datasets/README.md)."
    )


def _unpickle(path: Path) -> dict:
    """One batch file, unpickled without executing code (``_BatchUnpickler``). Anything that is not
    a dict in the official format raises ``DataCorruptError`` naming the file and how to replace it."""
    try:
        if path.stat().st_size == 0:
            raise _corrupt(path, "the file is empty")
        with open(path, "rb") as f:
            d = _BatchUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise _corrupt(path, f"UnpicklingError: {e}") from e
    except EOFError as e:
        raise _corrupt(path, "the file ends too early: truncated") from e
    except (ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError) as e:
        raise _corrupt(path, f"{type(e).__name__}: {e}") from e
    if not isinstance(d, dict):
        raise _corrupt(path, f"it holds a {type(d).__name__}, not a dict")
    return d


def read_batches(root: Path, files: list[str], label_key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate official batch files into uint8 (N, 3, 32, 32) images and int64 labels."""
    images, labels = [], []
    for name in files:
        path = root / name
        d = _unpickle(path)
        try:
            data = np.asarray(d[b"data"], dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise ValueError(f"data has shape {data.shape}, expected (N, 3072)")
            y = np.asarray(d[label_key], dtype=np.int64).reshape(-1)
            if len(y) != len(data):
                raise ValueError(f"{len(data)} images but {len(y)} labels")
        except KeyError as e:
            raise _corrupt(path, f"no {e.args[0]!r} entry") from e
        except (ValueError, TypeError) as e:
            raise _corrupt(path, str(e)) from e
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(y)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def read_class_names(path: Path, names_key: bytes) -> list[str]:
    d = _unpickle(path)
    try:
        return [n.decode() if isinstance(n, bytes) else str(n) for n in d[names_key]]
    except (KeyError, TypeError, UnicodeDecodeError) as e:
        raise _corrupt(path, f"no readable {names_key!r} entry") from e


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


def build_cifar(
    name: str,
    data_dir: Path,
    device,
    *,
    val_size: int,
    split_seed: int,
    crop_padding: int,
    flip: bool,
    mean: list[float] | None,
    std: list[float] | None,
    label_noise: float = 0.0,
    noise_seed: int = 0,
) -> DataBundle:
    s = SPECS[name]
    root = ensure_cifar(name, data_dir)
    x_train, y_train = read_batches(root, s["train"], s["label_key"])
    x_test, y_test = read_batches(root, s["test"], s["label_key"])
    class_names = read_class_names(root / s["meta"], s["names_key"])
    mean = tuple(mean or s["mean"])
    std = tuple(std or s["std"])
    aug = dict(crop_padding=int(crop_padding), flip=bool(flip))
    train = DeviceImageSplit(x_train, y_train, mean, std, device=device, **aug)
    test = DeviceImageSplit(x_test, y_test, mean, std, device=device)
    # the validation images depend on the data seed only, so every technique of a task sees the same ones
    train, val = split_off_validation(train, int(val_size), seed=int(split_seed))
    # symmetric label noise on the training labels only, after validation is carved (val and test stay clean)
    train = train.with_label_noise(s["num_classes"], label_noise, noise_seed)
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


def cifar10(data_dir, device, seed, **options) -> DataBundle:
    """``conf/dataset/cifar10.yaml``: CIFAR-10 (Krizhevsky 2009), 50,000/10,000 32x32 images, 10 classes."""
    return build_cifar("cifar10", Path(data_dir), device, **options)


def cifar100(data_dir, device, seed, **options) -> DataBundle:
    """``conf/dataset/cifar100.yaml``: CIFAR-100 (Krizhevsky 2009), 100 fine classes."""
    return build_cifar("cifar100", Path(data_dir), device, **options)
