"""Image-folder datasets (imagefolder, imagenette/imagewoof, tinyimagenet, imagenet100) on tiny trees
of PNG/JPEG files written here in each dataset's real layout."""

import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from harness.data import build_dataset, download
from harness.data.imagefolder import imagenet100_classes
from harness.errors import ConfigError, DataMissingError

CPU = torch.device("cpu")


def img(path: Path, colour, size=(20, 24)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), colour, dtype=np.uint8)).save(path)


def cfg(name, **kw):
    return OmegaConf.create({"name": name, "image_size": 16, "num_workers": 0, "val_size": 0, **kw})


@pytest.fixture
def offline(monkeypatch):
    def fetch(url, dest):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(download, "fetch", fetch)


def folder_tree(root: Path, classes=("cat", "dog", "eel"), n_train=4, n_eval=2, eval_dir="val") -> None:
    # each class has its own solid colour, so a decoded pixel reveals the label
    for k, c in enumerate(classes):
        for i in range(n_train):
            img(root / "train" / c / f"{i}.png", 40 + 80 * k)
        for i in range(n_eval):
            img(root / eval_dir / c / f"{i}.jpg", 40 + 80 * k)


def label_from_pixels(batch, mean=0.485, std=0.229):
    """Recover the class from the (solid) image colour: value = 40 + 80 k."""
    v = batch.x[:, 0].mean(dim=(1, 2)) * std * 255 + mean * 255
    return ((v - 40) / 80).round().long()


def test_imagefolder_reads_tree_and_yields_batches(tmp_path):
    root = tmp_path / "tree"
    folder_tree(root)
    b = build_dataset(cfg("imagefolder", root=str(root)), tmp_path, CPU, seed=0)
    assert (b.task, b.num_classes, b.class_names, b.input_shape) == (
        "classification",
        3,
        ["cat", "dog", "eel"],
        (3, 16, 16),
    )
    assert len(b.train) == 12 and len(b.test) == 6 and b.val is None
    batches = list(b.train.batches(5, train=True, epoch=0, seed=0))
    assert len(batches) == b.train.num_batches(5, True) == 2  # drop_last: equal steps per epoch
    for bt in batches:
        assert bt.x.shape == (5, 3, 16, 16) and bt.x.dtype == torch.float32 and bt.y.dtype == torch.int64
        assert torch.equal(label_from_pixels(bt), bt.y)  # labels travel with their images
        assert torch.equal(bt.y, torch.tensor([b.train.samples[i][1] for i in bt.index.tolist()]))
    ev = list(b.test.batches(4, train=False))
    assert [len(e.y) for e in ev] == [4, 2] and torch.cat([e.index for e in ev]).tolist() == list(range(6))
    assert torch.equal(torch.cat([e.y for e in ev]), torch.tensor([0, 0, 1, 1, 2, 2]))
    assert torch.equal(torch.cat([label_from_pixels(e) for e in ev]), torch.cat([e.y for e in ev]))


def test_epoch_order_depends_on_seed_and_epoch_not_on_workers(tmp_path):
    root = tmp_path / "tree"
    folder_tree(root, n_train=6)
    b = build_dataset(cfg("imagefolder", root=str(root), rrc_scale=[0.3, 1.0]), tmp_path, CPU, seed=0)
    # random pixels so that crops differ
    rng = np.random.default_rng(0)
    for path, _ in b.train.samples:
        Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(path)
    first = list(b.train.batches(6, train=True, epoch=2, seed=5))
    again = list(b.train.batches(6, train=True, epoch=2, seed=5))
    other = list(b.train.batches(6, train=True, epoch=3, seed=5))
    assert all(torch.equal(a.x, c.x) and torch.equal(a.index, c.index) for a, c in zip(first, again))
    assert not all(torch.equal(a.index, c.index) for a, c in zip(first, other))
    b1 = build_dataset(cfg("imagefolder", root=str(root), rrc_scale=[0.3, 1.0], num_workers=1), tmp_path, CPU, seed=0)
    with_worker = list(b1.train.batches(6, train=True, epoch=2, seed=5))
    assert all(torch.equal(a.x, c.x) for a, c in zip(first, with_worker))  # augmentation seeded per sample


def test_imagefolder_test_dir_relative_root_and_validation(tmp_path):
    folder_tree(tmp_path / "mydata", eval_dir="test")
    b = build_dataset(cfg("imagefolder", root="mydata", val_size=3), tmp_path, CPU, seed=0)
    assert b.meta["test_split"] == "test" and (len(b.train), len(b.val), len(b.test)) == (9, 3, 6)
    assert not {s[0] for s in b.val.samples} & {s[0] for s in b.train.samples}
    vb = next(b.val.batches(3, train=False))
    assert torch.equal(label_from_pixels(vb), vb.y)  # validation images are evaluated unaugmented


def test_imagefolder_errors(tmp_path):
    with pytest.raises(ConfigError, match="dataset.root is required"):
        build_dataset(cfg("imagefolder", root=None), tmp_path, CPU, seed=0)
    with pytest.raises(DataMissingError, match="nowhere/train"):
        build_dataset(cfg("imagefolder", root="nowhere"), tmp_path, CPU, seed=0)
    folder_tree(tmp_path / "bad")
    img(tmp_path / "bad" / "val" / "zebra" / "0.png", 7)
    with pytest.raises(DataMissingError, match="zebra"):
        build_dataset(cfg("imagefolder", root="bad"), tmp_path, CPU, seed=0)


def test_imagenette_layout_and_names(tmp_path, offline):
    root = tmp_path / "imagenette2-160"
    for k, wnid in enumerate(["n01440764", "n03888257"]):
        for i in range(3):
            img(root / "train" / wnid / f"{wnid}_{i}.JPEG", 40 + 80 * k)
        img(root / "val" / wnid / f"ILSVRC2012_val_{k}.JPEG", 40 + 80 * k)
    b = build_dataset(cfg("imagenette", size="160"), tmp_path, CPU, seed=0)
    assert b.class_names == ["tench", "parachute"] and len(b.train) == 6 and len(b.test) == 2
    e = next(b.test.batches(8, train=False))
    assert torch.equal(label_from_pixels(e), e.y)


def test_imagewoof_missing_offline_names_folder_and_url(tmp_path, offline):
    with pytest.raises(DataMissingError) as e:
        build_dataset(cfg("imagewoof", size="160"), tmp_path, CPU, seed=0)
    msg = str(e.value)
    assert str(tmp_path / "imagewoof2-160" / "train") in msg and "fast-ai-imageclas/imagewoof2-160.tgz" in msg
    with pytest.raises(ConfigError, match="valid choices: full, 320, 160"):
        build_dataset(cfg("imagewoof", size="64"), tmp_path, CPU, seed=0)


def test_tinyimagenet_official_layout(tmp_path, offline):
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n02124075", "n01443537"]  # wnids.txt is not sorted; labels follow the sorted order
    (root).mkdir()
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "words.txt").write_text(
        "n01443537\tgoldfish, Carassius auratus\nn02124075\tEgyptian cat\nn00001740\tentity\n"
    )
    colours = {"n01443537": 40, "n02124075": 120}
    for w in wnids:
        for i in range(2):
            img(root / "train" / w / "images" / f"{w}_{i}.JPEG", colours[w], size=(64, 64))
        (root / "train" / w / f"{w}_boxes.txt").write_text(f"{w}_0.JPEG\t0\t0\t10\t10\n")
    ann = []
    for i, w in enumerate(["n02124075", "n01443537", "n02124075"]):
        img(root / "val" / "images" / f"val_{i}.JPEG", colours[w], size=(64, 64))
        ann.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(ann) + "\n")
    b = build_dataset(cfg("tinyimagenet", image_size=64, crop_pct=1.0), tmp_path, CPU, seed=0)
    assert b.class_names == ["goldfish", "Egyptian cat"] and b.num_classes == 2
    assert len(b.train) == 4 and len(b.test) == 3  # the boxes files are not images
    e = next(b.test.batches(8, train=False))
    assert e.y.tolist() == [1, 0, 1] and e.x.shape == (3, 3, 64, 64)
    assert torch.equal(label_from_pixels(e), e.y)


def test_tinyimagenet_missing_offline(tmp_path, offline):
    with pytest.raises(DataMissingError, match="val_annotations.txt") as e:
        build_dataset(cfg("tinyimagenet"), tmp_path, CPU, seed=0)
    assert "tiny-imagenet-200.zip" in str(e.value)


def test_imagenet100_selects_the_listed_classes(tmp_path):
    wnids = imagenet100_classes()
    assert len(wnids) == len(set(wnids)) == 100
    root = tmp_path / "imagenet"
    for w in wnids + ["n99999999"]:  # one class outside the subset must be ignored
        img(root / "train" / w / f"{w}_1.JPEG", 10, size=(8, 8))
        img(root / "val" / w / f"ILSVRC2012_val_{w}.JPEG", 10, size=(8, 8))
    b = build_dataset(cfg("imagenet100"), tmp_path, CPU, seed=0)
    assert b.num_classes == 100 and b.class_names == sorted(wnids)
    assert len(b.train) == 100 and len(b.test) == 100
    assert all("n99999999" not in p for p, _ in b.train.samples + b.test.samples)
    assert all(Path(p).parent.name == b.class_names[y] for p, y in b.test.samples)
    # a tree lacking classes of the list says which ones and how to set it up
    (root / "val" / wnids[3] / f"ILSVRC2012_val_{wnids[3]}.JPEG").unlink()
    (root / "val" / wnids[3]).rmdir()
    with pytest.raises(DataMissingError, match=f"1 of the 100 classes are missing .*{wnids[3]}"):
        build_dataset(cfg("imagenet100", root=str(root)), tmp_path, CPU, seed=0)


def test_random_resized_crop_boxes_respect_scale_and_ratio():
    import random

    from harness.data.imagefolder import TrainTransform

    t = TrainTransform(16, scale=(0.25, 1.0))
    rng = random.Random(0)
    boxes = [t.crop_box(40, 30, rng) for _ in range(2000)]
    for top, left, h, w in boxes:
        assert 0 <= top and top + h <= 30 and 0 <= left and left + w <= 40
        assert 0.2 <= h * w / 1200 <= 1.0 and 3 / 4 - 0.1 <= w / h <= 4 / 3 + 0.1  # rounding slack
    areas = [h * w / 1200 for _, _, h, w in boxes]
    assert min(areas) < 0.3 and max(areas) > 0.9  # the whole range is used
    out = t(Image.new("RGB", (40, 30)), random.Random(1))
    assert out.shape == (3, 16, 16) and out.dtype == torch.uint8
