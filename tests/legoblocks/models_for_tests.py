"""Models defined only for tests, outside the zoo: detection must work on what users bring.

Load them the way a user would, through a model reference:
`legoblocks.modelref.load_model(f"{THIS_FILE}:concat_net")` (tests cannot import each other
under pytest's importlib mode, and the reference path is what the CLI takes anyway).
"""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn_relu(cin: int, cout: int, kernel: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class ConcatBlock(nn.Module):
    """Two branches (1x1, and 3x3 -> 3x3) concatenated on channels and fused by a 1x1 conv.

    With `skip=True` the input is added back (Inception-ResNet style), without it the unit
    is a pure branch-and-concat: both are one atomic block because the input feeds both
    branches, so no single tensor is live inside the unit.
    """

    def __init__(self, channels: int, branch: int, skip: bool = True) -> None:
        super().__init__()
        self.skip = skip
        self.a = nn.Sequential(*_conv_bn_relu(channels, branch, 1))
        self.b = nn.Sequential(*_conv_bn_relu(channels, branch, 3), *_conv_bn_relu(branch, branch, 3))
        self.fuse = nn.Sequential(nn.Conv2d(2 * branch, channels, 1, bias=False), nn.BatchNorm2d(channels))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fuse(torch.cat([self.a(x), self.b(x)], dim=1))
        return self.relu(x + y if self.skip else y)


class ConcatNet(nn.Module):
    """stem -> ConcatBlock (skip) -> max-pool -> ConcatBlock (no skip) -> global pool -> fc."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn_relu(in_channels, width, 3))
        self.cat1 = ConcatBlock(width, width // 2, skip=True)
        self.pool = nn.MaxPool2d(2)
        self.cat2 = ConcatBlock(width, width // 2, skip=False)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.cat2(self.pool(self.cat1(self.stem(x)))))


def concat_net(in_channels: int = 1, num_classes: int = 10) -> ConcatNet:
    return ConcatNet(in_channels, num_classes)


class DataDependentNet(nn.Module):
    """Branches on a tensor's value: torch.fx cannot trace this."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.mean() > 0:  # data-dependent control flow
            y = torch.relu(y)
        return self.fc(y.mean(dim=(2, 3)))


def data_dependent_net(in_channels: int = 1, num_classes: int = 10) -> DataDependentNet:
    return DataDependentNet(in_channels, num_classes)


class FixedSizeNet(nn.Module):
    """A conv + a classifier sized for 28x28 inputs only (no global pooling)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.fc = nn.Linear(28 * 28, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.conv(x), 1))


def fixed_size_net() -> FixedSizeNet:
    return FixedSizeNet()


class NoisyNet(nn.Module):
    """Adds fresh noise in forward, so no chain of blocks can reproduce its output."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x) + torch.randn_like(x)
        return self.fc(y.mean(dim=(2, 3)))


def noisy_net(in_channels: int = 1, num_classes: int = 10) -> NoisyNet:
    return NoisyNet(in_channels, num_classes)
