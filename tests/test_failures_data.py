"""Damaged dataset files are bad input with a message that names the file and the fix; a crafted
CIFAR batch never runs code (issue 14, items 1 and 4)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from harness.data import cifar, wikitext
from harness.data.imagefolder import FolderSplit
from harness.errors import DataCorruptError, DataMissingError
from tests.test_data_cifar import write_cifar10
from tests.test_data_text import write_tree

C10 = cifar.SPECS["cifar10"]


def read_cifar10(data_dir: Path):
    root = cifar.ensure_cifar("cifar10", data_dir)
    x, y = cifar.read_batches(root, C10["train"] + C10["test"], C10["label_key"])
    return x, y, cifar.read_class_names(root / C10["meta"], C10["names_key"])


def read_wikitext(data_dir: Path):
    files = wikitext.find_wikitext("wikitext2", "tokens", data_dir, download_ok=False)
    return wikitext.load_tokens(files, "word", log=lambda m: None)


def test_corrupt_is_a_kind_of_missing_data():
    # the CLI and the experiment treat both as bad input: exit 2, no record
    assert issubclass(DataCorruptError, DataMissingError)


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda b: b[: len(b) // 2], "truncated"),
        (lambda b: b[:40], "truncated"),
        (lambda b: b"", "the file is empty"),
        (lambda b: b"\x00garbage" * 50, "UnpicklingError"),
        (lambda b: pickle.dumps([1, 2, 3]), "holds a list, not a dict"),
        (lambda b: pickle.dumps({b"labels": [1]}), "no b'data' entry"),
    ],
)
def test_damaged_cifar_batch_names_the_file_and_the_fix(tmp_path, damage, reason):
    write_cifar10(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(damage(bad.read_bytes()))
    with pytest.raises(DataCorruptError) as e:
        read_cifar10(tmp_path)
    msg = str(e.value)
    assert str(bad) in msg and reason in msg
    assert f"Delete {bad.parent}" in msg and "datasets/README.md" in msg


class _Payload:
    """What an attacker would put into data_batch_1: unpickling calls os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_crafted_cifar_batch_is_refused_and_runs_nothing(tmp_path, protocol):
    write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(pickle.dumps({b"data": _Payload(marker), b"labels": [0]}, protocol=protocol))
    with pytest.raises(DataCorruptError, match=r"refused to load posix\.system"):
        read_cifar10(tmp_path)
    assert not marker.exists(), "the payload ran"


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_restricted_unpickler_reads_every_pickle_protocol(tmp_path, protocol):
    # the official files are protocol-2 pickles from Python 2; rebuilt copies use whatever protocol
    d = tmp_path / "cifar-10-batches-py"
    write_cifar10(tmp_path)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (7, 3072), dtype=np.uint8)
        (d / name).write_bytes(pickle.dumps({b"data": data, b"labels": list(range(7)), b"k": "s"}, protocol=protocol))
    x, y, names = read_cifar10(tmp_path)
    assert x.shape == (42, 3, 32, 32) and y.tolist() == list(range(7)) * 6 and names[0] == "airplane"


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda b: b[: len(b) - 7], "truncated"),
        (lambda b: b"", "empty"),
        (lambda b: b[:10] + b"\xff\xfe\xfa" + b[10:], "not UTF-8"),
    ],
)
def test_damaged_wikitext_names_the_file(tmp_path, damage, reason):
    write_tree(tmp_path / "data")
    bad = next((tmp_path / "data").rglob("wiki.valid.tokens"))
    bad.write_bytes(damage(bad.read_bytes()))
    with pytest.raises(DataCorruptError) as e:
        read_wikitext(tmp_path / "data")
    assert str(bad) in str(e.value) and reason in str(e.value) and "Delete" in str(e.value)


def test_damaged_token_cache_is_rebuilt(tmp_path, capsys):
    write_tree(tmp_path / "data")
    first, vocab_size, _, _ = read_wikitext(tmp_path / "data")
    caches = list((tmp_path / "data").rglob(".harness-cache/*.npy"))
    assert caches
    for npy in caches:
        npy.write_bytes(b"\x93NUMPY garbage")
    again, vocab_again, _, cached = read_wikitext(tmp_path / "data")
    assert not cached and vocab_again == vocab_size
    assert all((again[k] == first[k]).all() for k in first)
    assert "tokenizing again" in capsys.readouterr().err


@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_image_names_the_file(tmp_path, workers):
    from PIL import Image

    root = tmp_path / "tree"
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(root / split / c / f"{i}.png")
    bad = root / "train" / "b" / "1.png"
    bad.write_bytes(bad.read_bytes()[:20])
    samples = [(str(p), int(p.parent.name == "b")) for p in sorted((root / "train").rglob("*.png"))]
    split = FolderSplit(samples, 8, num_workers=workers)
    with pytest.raises(DataCorruptError) as e:
        for _ in split.batches(4, train=True):
            pass
    msg = str(e.value)
    assert str(bad) in msg and "not a readable image" in msg and "Traceback" not in msg
