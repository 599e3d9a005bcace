"""ResNets (He et al. 2016, Deep Residual Learning for Image Recognition) and the quickstart CNN.

Below 64 px the CIFAR variant is used (3x3 stride-1 stem, no max-pool), as in the common CIFAR
recipes; at 64 px and above torchvision's ImageNet ResNet. Blocks are torchvision's, so every
normalization layer is a named ``nn.BatchNorm2d`` module (``bn1``, ``bn2``, ``downsample.1``)
that the normalization techniques can find and swap.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet as tv

from harness.errors import ConfigError

_LAYOUTS = {
    "resnet18": (tv.BasicBlock, [2, 2, 2, 2]),
    "resnet34": (tv.BasicBlock, [3, 4, 6, 3]),
    "resnet50": (tv.Bottleneck, [3, 4, 6, 3]),
}


def make_resnet(name: str, num_classes: int, in_channels: int, image_size: int, stem: str = "auto") -> tv.ResNet:
    block, layers = _LAYOUTS[name]
    model = tv.ResNet(block, layers, num_classes=num_classes)
    small = image_size < 64 if stem == "auto" else stem == "cifar"
    if small:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


STEMS = ("auto", "cifar", "imagenet")


def resnet(data, *, arch: str, stem: str) -> tv.ResNet:
    """``conf/model/resnet*.yaml``: ResNet ``arch`` for the dataset's images and classes."""
    if arch not in _LAYOUTS:
        raise ConfigError(f"model.arch={arch!r}; valid choices: {', '.join(_LAYOUTS)}")
    if stem not in STEMS:
        raise ConfigError(f"model.stem={stem!r}; valid choices: {', '.join(STEMS)}")
    if data.task != "classification" or len(data.input_shape) != 3:
        raise ConfigError(f"{arch} needs images (C, H, W); dataset {data.name!r} gives {data.task} data")
    c, h, _ = data.input_shape
    return make_resnet(arch, data.num_classes, c, h, stem)


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU stages and a linear head: the quickstart model (seconds per epoch on CPU)."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32):
        super().__init__()
        w = width

        def stage(cin, cout, pool):
            layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            return nn.Sequential(*layers, nn.MaxPool2d(2) if pool else nn.Identity())

        self.features = nn.Sequential(stage(in_channels, w, False), stage(w, 2 * w, True), stage(2 * w, 4 * w, True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def small_cnn(data, *, width: int) -> SmallCNN:
    """``conf/model/small_cnn.yaml``: the quickstart CNN for the dataset's channels and classes."""
    if int(width) < 1:
        raise ConfigError(f"model.width={width} must be a positive integer")
    return SmallCNN(data.input_shape[0], data.num_classes, int(width))
