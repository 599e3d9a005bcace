"""The data interface the training loop sees: a ``DataBundle`` of ``Split`` objects that yield
``harness.hooks.Batch`` objects already on the device.

Small datasets are ``DeviceImageSplit``: uint8 images kept on the device, shuffled and augmented
there in whole batches, so no CPU DataLoader sits in the hot loop. The order of an epoch is a pure
function of (seed, epoch) (and of the kept training indices when a sample-selection technique such
as ``regularization=pdd`` passes ``index``), which makes resuming from an epoch checkpoint exact.

Symmetric label noise (``dataset.label_noise``) is applied here, to the training split only, after
the validation split is carved: see :func:`symmetric_label_noise`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from harness.errors import ConfigError
from harness.hooks import Batch


class Split(Protocol):
    """A split of a dataset. ``batches(..., index=I)`` (device-resident image splits only) iterates the
    training positions ``I`` instead of the whole split: the sample-selection hook
    (``harness.hooks.Technique.select_samples``)."""

    def __len__(self) -> int: ...

    def num_batches(self, batch_size: int, train: bool) -> int: ...

    def batches(self, batch_size: int, *, train: bool, epoch: int = 0, seed: int = 0) -> Iterator[Batch]: ...


@dataclass
class DataBundle:
    name: str
    task: str  # "classification" or "lm"
    train: Split
    test: Split
    val: Split | None
    num_classes: int  # classes, or vocabulary size for language modelling
    input_shape: tuple[int, ...]  # (C, H, W) for images, (context,) for token windows
    class_names: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # source, license, tokenizer, sizes


def epoch_generator(seed: int, epoch: int, salt: int = 0) -> torch.Generator:
    """A CPU generator whose stream depends only on (seed, epoch, salt)."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + epoch * 7_919 + salt) % (2**63))
    return g


class DeviceImageSplit:
    """Images as a uint8 (N, C, H, W) tensor on the device, labels as int64.

    Training batches are shuffled (drop_last, so every epoch has the same number of steps) and
    augmented on the device: random crop after zero padding of ``crop_padding`` pixels and a
    horizontal flip with probability 0.5. Evaluation batches are in order and not augmented.
    Images are normalised with the per-channel ``mean``/``std`` (given in 0..1 units).
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        crop_padding: int = 0,
        flip: bool = False,
        device: torch.device | str = "cpu",
    ):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, torch.int64)
        c = images.shape[1]
        self.mean = torch.tensor(mean, device=self.device, dtype=torch.float32).view(1, c, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device, dtype=torch.float32).view(1, c, 1, 1) * 255
        self.crop_padding = crop_padding
        self.flip = flip
        self.flipped: Tensor | None = None  # (N,) bool: labels replaced by symmetric label noise
        self.label_noise: dict[str, Any] | None = None  # the noise's settings (fraction, seed, variant)

    def __len__(self) -> int:
        return len(self.labels)

    def num_batches(self, batch_size: int, train: bool, n: int | None = None) -> int:
        """Batches of one pass over the split (``n``: over ``n`` kept training samples instead). A
        training pass drops the last partial batch but never has zero batches unless ``n == 0``."""
        n = len(self) if n is None else int(n)
        if n == 0:
            return 0
        return max(1, n // batch_size) if train else -(-n // batch_size)

    def subset(self, index: Tensor) -> DeviceImageSplit:
        out = object.__new__(DeviceImageSplit)
        out.__dict__.update(self.__dict__)
        out.images, out.labels = self.images[index], self.labels[index]
        if self.flipped is not None:
            out.flipped = self.flipped[index]
        return out

    def with_label_noise(self, num_classes: int, fraction: float, seed: int) -> DeviceImageSplit:
        """This split with symmetric label noise (see :func:`symmetric_label_noise`); itself when
        ``fraction`` is 0. The clean split is not modified."""
        fraction = check_label_noise(fraction, seed)
        if fraction == 0.0:
            return self
        noisy, flipped = symmetric_label_noise(self.labels.cpu(), num_classes, fraction, int(seed))
        out = self.subset(torch.arange(len(self), device=self.device))
        out.labels, out.flipped = noisy.to(self.device), flipped.to(self.device)
        out.label_noise = {
            "fraction": fraction,
            "noise_seed": int(seed),
            "variant": "symmetric: round(fraction * N) training labels, each replaced by a class drawn "
            "uniformly from the other num_classes - 1",
        }
        return out

    def _normalise(self, x: Tensor) -> Tensor:
        return (x.float() - self.mean) / self.std

    def _augment(self, x: Tensor, dy: Tensor | None, dx: Tensor | None, flip: Tensor | None) -> Tensor:
        b, _, h, w = x.shape
        if dy is not None:
            p = self.crop_padding
            x = torch.nn.functional.pad(x, (p, p, p, p))
            rows = (dy[:, None] + torch.arange(h, device=self.device)).view(b, 1, h, 1)
            cols = (dx[:, None] + torch.arange(w, device=self.device)).view(b, 1, 1, w)
            x = x[
                torch.arange(b, device=self.device).view(b, 1, 1, 1),
                torch.arange(x.shape[1], device=self.device).view(1, -1, 1, 1),
                rows,
                cols,
            ]
        if flip is not None:
            x = torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)
        return x

    def batches(
        self, batch_size: int, *, train: bool, epoch: int = 0, seed: int = 0, index: Tensor | None = None
    ) -> Iterator[Batch]:
        """Training: a shuffled pass (over the training positions ``index`` when given, a device
        tensor kept by a sample-selection technique), augmented on the device; ``Batch.index`` holds
        each sample's position in this split. Evaluation: the split in order, not augmented."""
        n = len(self)
        if train:
            m = n if index is None else len(index)
            # the whole epoch's randomness in one draw and one host-to-device copy: a copy per batch
            # would make the host wait for the GPU at every step
            g = epoch_generator(seed, epoch)
            order = torch.randperm(m, generator=g)
            p = self.crop_padding
            dy = torch.randint(0, 2 * p + 1, (m,), generator=g) if p else None
            dx = torch.randint(0, 2 * p + 1, (m,), generator=g) if p else None
            flip = torch.rand(m, generator=g) < 0.5 if self.flip else None
            order, dy, dx, flip = (t.to(self.device) if t is not None else None for t in (order, dy, dx, flip))
            if index is not None:  # a permutation of the kept positions, on the device
                order = index.to(self.device, torch.int64)[order]
            for i in range(self.num_batches(batch_size, True, m)):
                sl = slice(i * batch_size, (i + 1) * batch_size)
                idx = order[sl]
                x = self._normalise(self.images[idx])
                x = self._augment(x, *(t[sl] if t is not None else None for t in (dy, dx, flip)))
                yield Batch(x=x, y=self.labels[idx], index=idx)
        else:
            for i in range(0, n, batch_size):
                idx = torch.arange(i, min(i + batch_size, n), device=self.device)
                yield Batch(
                    x=self._normalise(self.images[i : i + batch_size]), y=self.labels[i : i + batch_size], index=idx
                )


def split_off_validation(
    train: DeviceImageSplit, val_size: int, seed: int
) -> tuple[DeviceImageSplit, DeviceImageSplit | None]:
    """Carve a held-out validation split of ``val_size`` samples from the training split (never
    from test). The choice depends on the data seed only, so every technique of a task sees the
    same validation images."""
    if val_size <= 0:
        return train, None
    if val_size >= len(train):
        raise ValueError(f"dataset.val_size={val_size} must be smaller than the training split ({len(train)})")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(train), generator=g).to(train.device)
    return train.subset(perm[val_size:]), train.subset(perm[:val_size])


# ------------------------------------------------------------------------------------------ label noise
def check_label_noise(fraction: Any, seed: Any = 0) -> float:
    """``dataset.label_noise`` as a float in [0, 1) and ``dataset.noise_seed`` a non-negative integer;
    anything else is a ConfigError naming the value and the valid range."""
    if isinstance(fraction, bool):
        raise ConfigError(f"dataset.label_noise={fraction!r} must be a number in [0, 1)")
    try:
        value = float(fraction)
    except (TypeError, ValueError):
        raise ConfigError(f"dataset.label_noise={fraction!r} must be a number in [0, 1)") from None
    if not 0.0 <= value < 1.0:  # also refuses nan
        raise ConfigError(
            f"dataset.label_noise={fraction!r} must be in [0, 1): the fraction of training labels replaced "
            "by another class (0 = clean labels)"
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ConfigError(f"dataset.noise_seed={seed!r} must be an integer in [0, 2**63)")
    return value


def symmetric_label_noise(labels: Tensor, num_classes: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Symmetric (uniform) label noise as in Patrini et al. 2017 ("Making Deep Neural Networks Robust
    to Label Noise: a Loss Correction Approach") and Zhang & Sabuncu 2018 ("Generalized Cross Entropy
    Loss for Training Deep Neural Networks with Noisy Labels"), in its "flip to a different class"
    variant: exactly ``round(fraction * N)`` samples, chosen uniformly without replacement, get a
    label drawn uniformly from the ``num_classes - 1`` classes other than their own, so the realised
    fraction of wrong labels equals ``fraction`` up to 1/N (the transition matrix has ``1 - fraction``
    on its diagonal and ``fraction / (K - 1)`` elsewhere). The draw depends on ``seed`` (``dataset.noise_seed``)
    only, never on the run seed, so every seed of a study sees the same noisy labels.

    Returns (noisy labels, bool mask of the changed samples), on the CPU."""
    if num_classes < 2:
        raise ConfigError(f"dataset.label_noise needs at least 2 classes, the dataset has {num_classes}")
    labels = labels.to(torch.int64)
    n = len(labels)
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + 424_242) % (2**63))
    chosen = torch.randperm(n, generator=g)[: round(fraction * n)]
    offset = torch.randint(1, num_classes, (len(chosen),), generator=g)  # never 0: always another class
    noisy = labels.clone()
    noisy[chosen] = (labels[chosen] + offset) % num_classes
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[chosen] = True
    return noisy, flipped


def label_noise_info(split: Any) -> dict[str, Any] | None:
    """``dataset_info.label_noise`` of a run: the settings and the realised fraction of flipped labels
    of the training split the run trains on (after ``train_subset``); None without label noise."""
    split = getattr(split, "inner", split)  # a torchrun shard: this rank's part
    flipped = getattr(split, "flipped", None)
    if flipped is None or getattr(split, "label_noise", None) is None:
        return None
    count = int(flipped.sum().item())
    return {
        **split.label_noise,
        "flipped": count,
        "train_size": len(flipped),
        "realised_fraction": round(count / max(len(flipped), 1), 6),
        "splits": "train only (validation is carved before the noise; test is never noised)",
    }
