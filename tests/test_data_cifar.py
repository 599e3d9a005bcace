"""CIFAR-10/100 loaders on batch files written here in the official pickle format, the offline and
download paths (network replaced by a fake ``fetch``), and the real CIFAR-10 rebuilt from
../shared/data when it is present."""

import hashlib
import pickle
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from harness.data import build_dataset, download
from harness.data import cifar as cifar_mod
from harness.errors import DataMissingError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
C10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _dump(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_cifar10(root: Path, per_batch: int = 20, n_test: int = 30, seed: int = 0) -> dict:
    """The official layout: dicts with bytes keys, data uint8 (N, 3072) channel-major, labels a list."""
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = n_test if name == "test_batch" else per_batch
        data, labels = rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n).tolist()
        _dump(d / name, {b"batch_label": name.encode(), b"labels": labels, b"data": data, b"filenames": [b"x.png"] * n})
        out[name] = (data, labels)
    _dump(
        d / "batches.meta",
        {b"num_cases_per_batch": per_batch, b"label_names": [n.encode() for n in C10_NAMES], b"num_vis": 3072},
    )
    return out


def write_cifar100(root: Path, n_train: int = 40, n_test: int = 20) -> dict:
    rng = np.random.default_rng(1)
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    out = {}
    for name, n in (("train", n_train), ("test", n_test)):
        data, fine = rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 100, n).tolist()
        coarse = [f // 5 for f in fine]
        _dump(d / name, {b"filenames": [b"x.png"] * n, b"fine_labels": fine, b"coarse_labels": coarse, b"data": data})
        out[name] = (data, fine)
    fine_names = [f"fine{i:02d}".encode() for i in range(100)]
    _dump(d / "meta", {b"fine_label_names": fine_names, b"coarse_label_names": [f"c{i}".encode() for i in range(20)]})
    return out


def cfg(name, **kw):
    return OmegaConf.create({"name": name, "val_size": 0, "crop_padding": 4, "flip": True, **kw})


def test_cifar10_reads_official_batches(tmp_path):
    written = write_cifar10(tmp_path)
    b = build_dataset(cfg("cifar10"), tmp_path, torch.device("cpu"), seed=0)
    assert (b.task, b.num_classes, b.input_shape, b.class_names) == ("classification", 10, (3, 32, 32), C10_NAMES)
    assert b.train.images.shape == (100, 3, 32, 32) and b.train.images.dtype == torch.uint8
    assert b.test.images.shape == (30, 3, 32, 32) and b.val is None
    # rows are R(1024) G(1024) B(1024) planes: image 0 of batch 1 must come back pixel for pixel
    data, labels = written["data_batch_1"]
    assert torch.equal(b.train.images[0], torch.from_numpy(data[0].reshape(3, 32, 32)))
    assert b.train.labels.tolist() == sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert b.test.labels.tolist() == written["test_batch"][1]
    # evaluation batches are normalised, in order and unaugmented
    x = next(b.test.batches(8, train=False)).x
    mean, std = torch.tensor(cifar_mod.SPECS["cifar10"]["mean"]), torch.tensor(cifar_mod.SPECS["cifar10"]["std"])
    ref = (
        torch.from_numpy(written["test_batch"][0][:8].reshape(8, 3, 32, 32)).float() / 255 - mean.view(1, 3, 1, 1)
    ) / std.view(1, 3, 1, 1)
    assert torch.allclose(x, ref, atol=1e-5)
    tb = next(b.train.batches(16, train=True, epoch=0, seed=0))
    assert tb.x.shape == (16, 3, 32, 32) and tb.x.dtype == torch.float32 and tb.y.dtype == torch.int64


def test_cifar10_validation_split_comes_from_train(tmp_path):
    write_cifar10(tmp_path)
    b = build_dataset(cfg("cifar10", val_size=25), tmp_path, torch.device("cpu"), seed=3)
    assert (len(b.train), len(b.val), len(b.test)) == (75, 25, 30)
    b2 = build_dataset(cfg("cifar10", val_size=25), tmp_path, torch.device("cpu"), seed=9)
    assert torch.equal(b.val.images, b2.val.images)  # the held-out images do not depend on the run seed


def test_cifar100_fine_labels_and_names(tmp_path):
    written = write_cifar100(tmp_path)
    b = build_dataset(cfg("cifar100"), tmp_path, torch.device("cpu"), seed=0)
    assert b.num_classes == 100 and b.class_names[:2] == ["fine00", "fine01"] and len(b.class_names) == 100
    assert b.train.images.shape == (40, 3, 32, 32) and b.test.images.shape == (20, 3, 32, 32)
    assert b.train.labels.tolist() == written["train"][1]  # fine, not coarse, labels
    assert b.test.labels.tolist() == written["test"][1]


def _offline(monkeypatch):
    calls = []

    def fetch(url, dest):
        calls.append(url)
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(download, "fetch", fetch)
    return calls


@pytest.mark.parametrize("name,folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")])
def test_missing_offline_says_where_to_put_files(tmp_path, monkeypatch, name, folder):
    calls = _offline(monkeypatch)
    with pytest.raises(DataMissingError) as e:
        build_dataset(cfg(name), tmp_path, torch.device("cpu"), 0)
    msg = str(e.value)
    url = cifar_mod.SPECS[name]["url"]
    assert str(tmp_path / folder) in msg and url in msg and cifar_mod.SPECS[name]["md5"] in msg
    assert ("data_batch_1" in msg) if name == "cifar10" else ("train" in msg and "meta" in msg)
    assert calls == [url]
    assert not list(tmp_path.rglob("*.tar.gz*"))  # no partial archive left behind


def _fake_release(tmp_path) -> tuple[Path, str]:
    src = tmp_path / "src"
    write_cifar10(src, per_batch=4, n_test=6)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as t:
        t.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return archive, hashlib.md5(archive.read_bytes()).hexdigest()


def test_download_verifies_md5_then_extracts(tmp_path, monkeypatch):
    archive, md5 = _fake_release(tmp_path)
    monkeypatch.setattr(download, "fetch", lambda url, dest: dest.write_bytes(archive.read_bytes()))
    data_dir = tmp_path / "data"
    # the real md5 does not match the fake archive: refused, and the bad archive is deleted
    with pytest.raises(DataMissingError, match="md5 mismatch"):
        build_dataset(cfg("cifar10"), data_dir, torch.device("cpu"), 0)
    assert not (data_dir / "cifar-10-python.tar.gz").exists() and not (data_dir / "cifar-10-batches-py").exists()
    monkeypatch.setitem(cifar_mod.SPECS["cifar10"], "md5", md5)
    b = build_dataset(cfg("cifar10"), data_dir, torch.device("cpu"), 0)
    assert len(b.train) == 20 and len(b.test) == 6
    assert not (data_dir / "cifar-10-python.tar.gz").exists()  # archive removed after unpacking


def test_real_cifar10_shapes_and_labels(real_cifar10, monkeypatch):
    _offline(monkeypatch)  # must be read from disk, never downloaded
    b = build_dataset(cfg("cifar10", val_size=5000), real_cifar10, torch.device("cpu"), seed=0)
    assert (len(b.train), len(b.val), len(b.test)) == (45_000, 5_000, 10_000)
    assert b.class_names == C10_NAMES
    all_train = torch.cat([b.train.labels, b.val.labels])
    assert torch.bincount(all_train, minlength=10).tolist() == [5000] * 10
    assert torch.bincount(b.test.labels, minlength=10).tolist() == [1000] * 10
    rows = dict(
        ln.split() for ln in (SHARED / "cifar10-jpeg-labels.txt").read_text().splitlines() if ln and ln[0] != "#"
    )
    assert b.test.labels.tolist() == [int(c) for c in rows["test"]]
    # real photographs: pixel mean close to the published per-channel mean
    m = b.test.images.float().mean(dim=(0, 2, 3)) / 255
    assert torch.allclose(m, torch.tensor(cifar_mod.SPECS["cifar10"]["mean"]), atol=0.01)
