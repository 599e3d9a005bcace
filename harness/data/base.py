"""The data interface the training loop sees: a ``DataBundle`` of ``Split`` objects that yield
``harness.hooks.Batch`` objects already on the device.

Small datasets are ``DeviceImageSplit``: uint8 images kept on the device, shuffled and augmented
there in whole batches, so no CPU DataLoader sits in the hot loop. The order of an epoch is a pure
function of (seed, epoch), which makes resuming from an epoch checkpoint exact.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from harness.hooks import Batch


class Split(Protocol):
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

    def __len__(self) -> int:
        return len(self.labels)

    def num_batches(self, batch_size: int, train: bool) -> int:
        n = len(self)
        return max(1, n // batch_size) if train else -(-n // batch_size)

    def subset(self, index: Tensor) -> DeviceImageSplit:
        out = object.__new__(DeviceImageSplit)
        out.__dict__.update(self.__dict__)
        out.images, out.labels = self.images[index], self.labels[index]
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

    def batches(self, batch_size: int, *, train: bool, epoch: int = 0, seed: int = 0) -> Iterator[Batch]:
        n = len(self)
        if train:
            # the whole epoch's randomness in one draw and one host-to-device copy: a copy per batch
            # would make the host wait for the GPU at every step
            g = epoch_generator(seed, epoch)
            order = torch.randperm(n, generator=g)
            p = self.crop_padding
            dy = torch.randint(0, 2 * p + 1, (n,), generator=g) if p else None
            dx = torch.randint(0, 2 * p + 1, (n,), generator=g) if p else None
            flip = torch.rand(n, generator=g) < 0.5 if self.flip else None
            order, dy, dx, flip = (t.to(self.device) if t is not None else None for t in (order, dy, dx, flip))
            for i in range(self.num_batches(batch_size, True)):
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
