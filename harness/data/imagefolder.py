"""Image datasets too large to keep on the device: JPEG/PNG files decoded with PIL in DataLoader
workers. Train transform RandomResizedCrop + horizontal flip, eval transform Resize(size / crop_pct)
+ CenterCrop (the standard ImageNet recipes, crop_pct 0.875). Workers return uint8 tensors; the
conversion to float and the normalisation run on the device (a quarter of the host-to-device bytes).

Random augmentation of sample i in epoch e is seeded by (seed, e, i), so an epoch's batches are the
same for any number of workers and a resumed run sees the same augmentations.

Datasets: ``imagefolder`` (any ``train/<class>/*`` + ``val/<class>/*`` or ``test/<class>/*`` tree),
``imagenette``/``imagewoof`` (fast.ai, Howard 2019; the torchvision ``Imagenette`` layout),
``tinyimagenet`` (the official ``tiny-imagenet-200`` layout, Le & Yang 2015) and ``imagenet100``
(the 100-class ImageNet subset of CMC, Tian et al. 2020, selected from a local ImageNet tree).
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset
from torchvision.transforms import functional as TF

from harness.data import download
from harness.data.base import DataBundle, epoch_generator, split_off_validation
from harness.errors import ConfigError, DataCorruptError, DataMissingError
from harness.hooks import Batch

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class _Images(Dataset):
    """(path, label) samples; an item is ``(i, aug_seed)`` so the sampler decides the randomness."""

    def __init__(self, samples: list[tuple[str, int]], transform):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item):
        i, aug_seed = item
        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
        except (
            OSError,
            SyntaxError,
            ValueError,
            Image.DecompressionBombError,
        ) as e:  # PIL: UnidentifiedImageError, truncated
            raise DataCorruptError(
                f"{path} is not a readable image ({type(e).__name__}: {e}). Delete or replace it (re-download or "
                "re-extract the dataset; see datasets/README.md) and run again."
            ) from e
        x = self.transform(im) if aug_seed is None else self.transform(im, random.Random(aug_seed))
        return x, label, i


class TrainTransform:
    """RandomResizedCrop (Szegedy et al. 2015; torchvision's parameter sampling) + horizontal flip,
    drawing from a per-sample ``random.Random`` instead of torch's global generator: reseeding that
    per sample costs milliseconds, this costs nothing, and the result is independent of workers."""

    def __init__(self, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip: bool = True):
        self.size, self.scale, self.flip = size, tuple(scale), flip
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))

    def crop_box(self, w: int, h: int, rng: random.Random) -> tuple[int, int, int, int]:
        for _ in range(10):
            area = w * h * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*self.log_ratio))
            cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                return rng.randint(0, h - ch), rng.randint(0, w - cw), ch, cw
        # fallback, as torchvision: the whole image, clamped to the aspect-ratio range, centred
        r_min, r_max = (math.exp(v) for v in self.log_ratio)
        cw, ch = (w, round(w / r_min)) if w / h < r_min else (round(h * r_max), h) if w / h > r_max else (w, h)
        return (h - ch) // 2, (w - cw) // 2, ch, cw

    def __call__(self, im: Image.Image, rng: random.Random) -> torch.Tensor:
        top, left, ch, cw = self.crop_box(*im.size, rng)
        im = TF.resized_crop(im, top, left, ch, cw, [self.size, self.size], antialias=True)
        if self.flip and rng.random() < 0.5:
            im = TF.hflip(im)
        return TF.pil_to_tensor(im)


class _EpochSampler(Sampler):
    """Shuffled order and per-sample augmentation seeds of one epoch (train), or the plain order."""

    def __init__(self, n: int, train: bool):
        self.n, self.train, self.seed, self.epoch = n, train, 0, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        if not self.train:
            return ((i, None) for i in range(self.n))
        g = epoch_generator(self.seed, self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        base = int(torch.randint(0, 2**62, (1,), generator=g))
        return ((i, base + i) for i in order)


class FolderSplit:
    """Same interface as ``DeviceImageSplit``: ``__len__``, ``num_batches``, ``batches`` (yielding
    ``Batch`` on ``device``, ``index`` = positions in this split) and ``subset``."""

    def __init__(
        self,
        samples: list[tuple[str, int]],
        image_size: int,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        *,
        device: torch.device | str = "cpu",
        num_workers: int = 4,
        crop_pct: float = 0.875,
        rrc_scale=(0.08, 1.0),
        flip: bool = True,
    ):
        self.samples = list(samples)
        self.device = torch.device(device)
        self.image_size, self.num_workers = int(image_size), int(num_workers)
        self.crop_pct, self.rrc_scale, self.flip = float(crop_pct), tuple(rrc_scale), bool(flip)
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1) * 255
        self._loaders: dict[tuple[bool, int], DataLoader] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def subset(self, index) -> FolderSplit:
        out = object.__new__(FolderSplit)
        out.__dict__.update(self.__dict__)
        out.samples = [self.samples[i] for i in torch.as_tensor(index).tolist()]
        out._loaders = {}
        return out

    def transform(self, train: bool):
        s = self.image_size
        if train:
            return TrainTransform(s, self.rrc_scale, flip=self.flip)
        return T.Compose([T.Resize(int(s / self.crop_pct)), T.CenterCrop(s), T.PILToTensor()])

    def num_batches(self, batch_size: int, train: bool) -> int:
        n = len(self)
        return max(1, n // batch_size) if train else -(-n // batch_size)

    def _loader(self, batch_size: int, train: bool) -> DataLoader:
        key = (train, batch_size)
        if key not in self._loaders:
            w = self.num_workers
            self._loaders[key] = DataLoader(
                _Images(self.samples, self.transform(train)),
                batch_size=batch_size,
                sampler=_EpochSampler(len(self), train),
                num_workers=w,
                drop_last=train and len(self) >= batch_size,  # equal steps per epoch, as DeviceImageSplit
                pin_memory=self.device.type == "cuda",
                persistent_workers=train and w > 0,  # eval loaders are used rarely; don't keep their workers
                prefetch_factor=4 if w > 0 else None,
            )
        return self._loaders[key]

    def batches(self, batch_size: int, *, train: bool, epoch: int = 0, seed: int = 0) -> Iterator[Batch]:
        loader = self._loader(batch_size, train)
        loader.sampler.seed, loader.sampler.epoch = seed, epoch
        for x, y, idx in _reraise_corrupt(loader):
            x = x.to(self.device, non_blocking=True)
            x = (x.float() - self.mean) / self.std
            yield Batch(x=x, y=y.to(self.device, non_blocking=True), index=idx.to(self.device, non_blocking=True))


def _reraise_corrupt(loader: DataLoader) -> Iterator:
    """A damaged image found in a worker arrives wrapped in the worker's traceback; raise it again
    with just its message (which names the file)."""
    it = iter(loader)
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except DataCorruptError as e:
            lines = [ln for ln in str(e).splitlines() if ln.startswith(f"{DataCorruptError.__module__}.")]
            raise DataCorruptError(lines[-1].split(": ", 1)[1] if lines else str(e)) from None
        yield item


# -- helpers ------------------------------------------------------------------------------------------------


def scan(directory: Path, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    return make_dataset(str(directory), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)


def subdirs(directory: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))


def make_bundle(name, cfg, train_samples, test_samples, classes, class_names, device, meta) -> DataBundle:
    if not train_samples or not test_samples:
        which = "training" if not train_samples else "evaluation"
        raise DataMissingError(f"{name}: no {which} images ({', '.join(IMG_EXTENSIONS)}) found under {meta['root']}")
    size = int(cfg["image_size"])  # cfg: the dataset YAML's options, the one place of their values
    opts = dict(
        mean=tuple(cfg["mean"] or IMAGENET_MEAN),
        std=tuple(cfg["std"] or IMAGENET_STD),
        device=device,
        num_workers=int(cfg["num_workers"]),
        crop_pct=float(cfg["crop_pct"]),
        rrc_scale=tuple(cfg["rrc_scale"]),
        flip=bool(cfg["flip"]),
    )
    train = FolderSplit(train_samples, size, **opts)
    test = FolderSplit(test_samples, size, **opts)
    train, val = split_off_validation(train, int(cfg["val_size"]), seed=int(cfg["split_seed"]))
    return DataBundle(
        name=name,
        task="classification",
        train=train,
        test=test,
        val=val,
        num_classes=len(classes),
        input_shape=(3, size, size),
        class_names=class_names,
        meta={**meta, "train_images": len(train_samples), "test_images": len(test_samples)},
    )


def resolve_root(cfg, data_dir: Path, default: str | None) -> Path:
    root = cfg.get("root") or default
    if not root:
        raise ConfigError(
            "dataset.root is required: a directory with train/<class>/ and val/<class>/ (absolute, or relative to data_dir)"
        )
    root = Path(os.path.expanduser(str(root)))
    return root if root.is_absolute() else data_dir / root


def folder_classes(name: str, root: Path, train_dir: Path, test_dir: Path) -> tuple[list[str], dict[str, int]]:
    classes = subdirs(train_dir)
    if not classes:
        raise DataMissingError(f"{name}: no class folders in {train_dir}")
    extra = sorted(set(subdirs(test_dir)) - set(classes))
    if extra:
        raise DataMissingError(f"{name}: {test_dir} has classes that {train_dir} lacks: {', '.join(extra[:5])}")
    return classes, {c: i for i, c in enumerate(classes)}


# -- imagefolder ----------------------------------------------------------------------------------------------


def imagefolder(data_dir, device, seed, **cfg) -> DataBundle:
    """``conf/dataset/imagefolder.yaml``: any train/<class>/*, val/<class>/* (or test/) image tree at dataset.root."""
    root = resolve_root(cfg, Path(data_dir), None)
    train_dir = root / "train"
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise DataMissingError(
            f"imagefolder: expected {train_dir}/<class>/* and {root}/val/<class>/* (or test/<class>/*)"
        )
    classes, c2i = folder_classes("imagefolder", root, train_dir, test_dir)
    meta = {"source": str(root), "license": "user-supplied", "root": str(root), "test_split": test_dir.name}
    return make_bundle("imagefolder", cfg, scan(train_dir, c2i), scan(test_dir, c2i), classes, classes, device, meta)


# -- Imagenette / Imagewoof (https://github.com/fastai/imagenette, Apache-2.0) ---------------------------------

_S3 = "https://s3.amazonaws.com/fast-ai-imageclas"
# md5 of the Imagenette archives as listed by torchvision.datasets.Imagenette; the Imagewoof archives
# were re-released with different checksums, so they are not verified.
FASTAI = {
    "imagenette": {
        "full": ("imagenette2", "fe2fc210e6bb7c5664d602c3cd71e612"),
        "320": ("imagenette2-320", "3df6f0d01a2c9592104656642f5e78a3"),
        "160": ("imagenette2-160", "e793b78cc4c9e9a4ccc0c1155377a412"),
    },
    "imagewoof": {"full": ("imagewoof2", None), "320": ("imagewoof2-320", None), "160": ("imagewoof2-160", None)},
}
WNID_NAMES = {
    "n01440764": "tench",
    "n02102040": "English springer",
    "n02979186": "cassette player",
    "n03000684": "chain saw",
    "n03028079": "church",
    "n03394916": "French horn",
    "n03417042": "garbage truck",
    "n03425413": "gas pump",
    "n03445777": "golf ball",
    "n03888257": "parachute",
    "n02086240": "Shih-Tzu",
    "n02087394": "Rhodesian ridgeback",
    "n02088364": "beagle",
    "n02089973": "English foxhound",
    "n02093754": "Border terrier",
    "n02096294": "Australian terrier",
    "n02099601": "golden retriever",
    "n02105641": "Old English sheepdog",
    "n02111889": "Samoyed",
    "n02115641": "dingo",
}


def build_fastai(name: str, cfg, data_dir: Path, device) -> DataBundle:
    size = str(cfg["size"])
    if size not in FASTAI[name]:
        raise ConfigError(f"dataset.size={size!r} for {name}; valid choices: {', '.join(FASTAI[name])}")
    folder, md5 = FASTAI[name][size]
    root = Path(data_dir) / folder
    if not ((root / "train").is_dir() and (root / "val").is_dir()):
        expected = f"{root}/train/<wnid>/*.JPEG and {root}/val/<wnid>/*.JPEG"
        download.download_and_extract(
            f"{_S3}/{folder}.tgz", Path(data_dir), md5, what=f"{name} ({folder})", expected=expected
        )
    classes, c2i = folder_classes(name, root, root / "train", root / "val")
    meta = {"source": f"{_S3}/{folder}.tgz", "license": "Apache-2.0 (fast.ai); images from ImageNet", "root": str(root)}
    names = [WNID_NAMES.get(c, c) for c in classes]
    return make_bundle(name, cfg, scan(root / "train", c2i), scan(root / "val", c2i), classes, names, device, meta)


def imagenette(data_dir, device, seed, **cfg) -> DataBundle:
    """``conf/dataset/imagenette*.yaml``: Imagenette (Howard 2019, fast.ai), 10 easy ImageNet classes."""
    return build_fastai("imagenette", cfg, Path(data_dir), device)


def imagewoof(data_dir, device, seed, **cfg) -> DataBundle:
    """``conf/dataset/imagewoof*.yaml``: Imagewoof (Howard 2019, fast.ai), 10 ImageNet dog breeds."""
    return build_fastai("imagewoof", cfg, Path(data_dir), device)


# -- Tiny ImageNet (CS231n, Le & Yang 2015) ---------------------------------------------------------------------

TINY_URL, TINY_MD5 = "http://cs231n.stanford.edu/tiny-imagenet-200.zip", "90528d7ca1a48142e341f4ef8d21d0de"


def tinyimagenet(data_dir, device, seed, **cfg) -> DataBundle:
    """``conf/dataset/tinyimagenet.yaml``: Tiny ImageNet (Le & Yang 2015), 200 classes of 64x64 images."""
    data_dir = Path(data_dir)
    root = resolve_root(cfg, data_dir, "tiny-imagenet-200")
    needed = [root / "wnids.txt", root / "train", root / "val" / "val_annotations.txt", root / "val" / "images"]
    if not all(p.exists() for p in needed):
        expected = (
            f"{root}/ with wnids.txt, words.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG, val/val_annotations.txt"
        )
        download.download_and_extract(TINY_URL, root.parent, TINY_MD5, what="tinyimagenet", expected=expected)
    classes = sorted(w.strip() for w in (root / "wnids.txt").read_text().split() if w.strip())
    c2i = {c: i for i, c in enumerate(classes)}
    train = scan(root / "train", c2i)
    test = []
    for line in (root / "val" / "val_annotations.txt").read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 2 and parts[1] in c2i:
            test.append((str(root / "val" / "images" / parts[0]), c2i[parts[1]]))
        elif line.strip():
            raise DataMissingError(f"tinyimagenet: bad line in {root}/val/val_annotations.txt: {line!r}")
    words = {}
    if (root / "words.txt").is_file():
        for line in (root / "words.txt").read_text(encoding="utf-8").splitlines():
            wnid, _, text = line.partition("\t")
            words[wnid] = text.split(",")[0].strip()
    names = [words.get(c, c) for c in classes]
    meta = {"source": TINY_URL, "license": "ImageNet terms (non-commercial research)", "root": str(root)}
    return make_bundle("tinyimagenet", cfg, train, test, classes, names, device, meta)


# -- ImageNet-100 (the CMC subset, Tian et al. 2020) --------------------------------------------------------------

CLASS_LIST = Path(__file__).with_name("imagenet100_classes.txt")


def imagenet100_classes(path: Path = CLASS_LIST) -> list[str]:
    lines = [ln.split("#")[0].strip() for ln in path.read_text().splitlines()]
    return [w for w in lines if w]


def imagenet100(data_dir, device, seed, **cfg) -> DataBundle:
    """``conf/dataset/imagenet100.yaml``: the CMC 100-class subset of a local ImageNet tree (Tian et al. 2020)."""
    root = resolve_root(cfg, Path(data_dir), "imagenet")
    wnids = imagenet100_classes(Path(cfg["class_list"]) if cfg.get("class_list") else CLASS_LIST)
    how = (
        "ImageNet cannot be downloaded automatically (registration at https://image-net.org). Place ILSVRC2012 as an "
        f"ImageFolder tree {root}/train/<wnid>/*.JPEG and {root}/val/<wnid>/*.JPEG (val sorted into class folders, "
        "e.g. with the valprep.sh script of PyTorch's imagenet example), or set dataset.root"
    )
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataMissingError(f"imagenet100: {root / split} not found. {how}")
        missing = [w for w in wnids if not (root / split / w).is_dir()]
        if missing:
            raise DataMissingError(
                f"imagenet100: {len(missing)} of the {len(wnids)} classes are missing from {root / split} "
                f"(e.g. {', '.join(missing[:5])}). {how}"
            )
    classes = sorted(wnids)
    c2i = {c: i for i, c in enumerate(classes)}
    meta = {
        "source": "ImageNet ILSVRC2012 (local)",
        "license": "ImageNet terms (non-commercial research)",
        "root": str(root),
    }
    return make_bundle(
        "imagenet100", cfg, scan(root / "train", c2i), scan(root / "val", c2i), classes, classes, device, meta
    )
