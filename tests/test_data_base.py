"""The device-resident split: epochs are pure functions of (seed, epoch); augmentation is a random
crop of the zero-padded image and a horizontal flip."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.data.base import DeviceImageSplit, split_off_validation


def make_split(**aug) -> DeviceImageSplit:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 8, 8), generator=g, dtype=torch.uint8)
    return DeviceImageSplit(images, torch.arange(64) % 10, (0.0, 0.0, 0.0), (1 / 255,) * 3, **aug)


def test_epoch_is_a_pure_function_of_seed_and_epoch():
    split = make_split(crop_padding=2, flip=True)
    a = [b.x for b in split.batches(16, train=True, epoch=3, seed=1)]
    b = [b.x for b in split.batches(16, train=True, epoch=3, seed=1)]
    c = [b.index for b in split.batches(16, train=True, epoch=4, seed=1)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(torch.cat(c), torch.cat([b.index for b in split.batches(16, train=True, epoch=3, seed=1)]))
    assert split.num_batches(16, True) == 4 and len(a) == 4


def test_augmented_images_are_padded_crops_possibly_flipped():
    split = make_split(crop_padding=2, flip=True)
    flipped = 0
    for batch in split.batches(16, train=True, epoch=0, seed=0):
        for x, i in zip(batch.x, batch.index):
            padded = F.pad(split.images[i].float(), (2, 2, 2, 2))
            windows = [padded[:, dy : dy + 8, dx : dx + 8] for dy in range(5) for dx in range(5)]
            plain = any(torch.equal(x, w) for w in windows)
            mirrored = any(torch.equal(x, w.flip(2)) for w in windows)
            assert plain or mirrored
            flipped += mirrored and not plain
    assert 0 < flipped < 64  # both flipped and unflipped images occur


def test_evaluation_is_in_order_and_unaugmented():
    split = make_split(crop_padding=2, flip=True)
    xs = torch.cat([b.x for b in split.batches(10, train=False)])
    assert torch.equal(xs, split.images.float())


def test_validation_split_is_disjoint_and_fixed():
    split = make_split()
    train, val = split_off_validation(split, 16, seed=0)
    train2, val2 = split_off_validation(split, 16, seed=0)
    assert len(train) == 48 and len(val) == 16 and torch.equal(val.images, val2.images)
    seen = {tuple(im.flatten().tolist()) for im in train.images}
    assert not any(tuple(im.flatten().tolist()) in seen for im in val.images)
