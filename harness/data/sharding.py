"""Sharding a run's training split across torchrun ranks (see ``harness.infra.distributed``):
device-resident splits by index, image folders with a ``DistributedSampler``, token streams by
drawing different random windows per rank."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch

from harness.data.base import DeviceImageSplit, epoch_generator
from harness.data.imagefolder import FolderSplit
from harness.data.tokens import TokenSplit
from harness.errors import ConfigError
from harness.infra.distributed import is_initialized, rank, world_size


class Shard:
    """One rank's view of a training split. ``batch_size`` arguments are global batch sizes;
    the inner split is asked for ``batch_size / world`` samples per step, and every rank yields
    the same number of steps per epoch (DDP would hang otherwise)."""

    def __init__(self, inner, world: int, rank: int, seed_offset: int = 0, steps_of=None):
        self.inner, self.world, self.rank = inner, world, rank
        self.seed_offset = seed_offset  # decorrelates per-rank random draws where shards share data
        self.steps_of = steps_of  # global batch -> steps per epoch, when not the inner split's own count

    def __len__(self) -> int:
        return len(self.inner)

    def _local(self, batch_size: int) -> int:
        if batch_size % self.world:
            raise ConfigError(
                f"trainer.batch_size={batch_size} is the global batch and must be divisible by the world size {self.world}"
            )
        return batch_size // self.world

    def num_batches(self, batch_size: int, train: bool) -> int:
        if self.steps_of is not None:
            return self.steps_of(batch_size, train)
        return self.inner.num_batches(self._local(batch_size), train)

    def batches(self, batch_size: int, *, train: bool, epoch: int = 0, seed: int = 0) -> Iterator:
        it = self.inner.batches(self._local(batch_size), train=train, epoch=epoch, seed=seed + self.seed_offset)
        return itertools.islice(it, self.num_batches(batch_size, train))

    def subset(self, index):
        raise ConfigError("a sharded training split cannot be subset again; split off validation data before sharding")


def shard_split(split, world: int, rank: int):
    """Shard a training split for DDP (see the module docstring)."""
    if isinstance(split, DeviceImageSplit):
        n = len(split) - len(split) % world  # equal shards: every rank takes the same number of steps
        index = torch.arange(rank, n, world, device=split.labels.device)
        # different augmentation draws per rank; the shards themselves are disjoint
        return Shard(split.subset(index), world, rank, seed_offset=rank * 7_919_001)
    if isinstance(split, FolderSplit):
        return Shard(_sharded_folder(split, world, rank), world, rank)
    if isinstance(split, TokenSplit):
        # random windows of one shared stream: different draws per rank, the single-process step count
        return Shard(
            split, world, rank, seed_offset=rank * 7_919_001, steps_of=lambda b, train: split.num_batches(b, train)
        )
    raise ConfigError(f"distributed training does not know how to shard a {type(split).__name__} training split")


def _sharded_folder(split, world: int, rank: int):
    """A FolderSplit whose training loaders use a DistributedSampler (a fresh global shuffle every
    epoch, then each rank takes every ``world``-th sample)."""
    from torch.utils.data import DataLoader, DistributedSampler

    class EpochDistributedSampler(DistributedSampler):
        """DistributedSampler whose items are ``(index, augmentation seed)``, as FolderSplit expects."""

        def __iter__(self):
            order = list(super().__iter__())
            base = int(torch.randint(0, 2**62, (1,), generator=epoch_generator(self.seed, self.epoch, salt=1)))
            return ((i, base + i) for i in order)

    class ShardedFolderSplit(FolderSplit):
        def num_batches(self, batch_size: int, train: bool) -> int:
            if train:
                return max(1, (len(self) // world) // batch_size)
            return super().num_batches(batch_size, train)

        def _loader(self, batch_size: int, train: bool) -> DataLoader:
            loader = super()._loader(batch_size, train)
            if train and not isinstance(loader.sampler, DistributedSampler):
                sampler = EpochDistributedSampler(
                    range(len(self)), num_replicas=world, rank=rank, shuffle=True, drop_last=True
                )
                loader = DataLoader(
                    loader.dataset,
                    batch_size=batch_size,
                    sampler=sampler,
                    num_workers=loader.num_workers,
                    drop_last=True,
                    pin_memory=loader.pin_memory,
                    persistent_workers=loader.persistent_workers,
                    prefetch_factor=loader.prefetch_factor,
                )
                self._loaders[(train, batch_size)] = loader
            return loader

    out = object.__new__(ShardedFolderSplit)
    out.__dict__.update(split.__dict__)
    out._loaders = {}
    return out


def shard_data(data):
    """The DataBundle with its training split sharded for this rank (unchanged in one process)."""
    if not is_initialized() or world_size() == 1:
        return data
    import dataclasses

    return dataclasses.replace(data, train=shard_split(data.train, world_size(), rank()))
