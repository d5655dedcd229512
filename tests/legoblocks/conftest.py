"""Shared legoblocks fixtures: a small real Fashion-MNIST subset and tiny residual models.

Everything here is small on purpose (hundreds of images, 8-channel blocks): the suite runs
on 2 shared CPU cores.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from legoblocks.data import load_fashion_mnist, split


@pytest.fixture(scope="session")
def fmnist_test_split(fmnist_dir: Path) -> TensorDataset:
    """The real 10k test split (loads in well under a second, unlike the 60k train split)."""
    return load_fashion_mnist(fmnist_dir, train=False)


@pytest.fixture(scope="session")
def fmnist_small(fmnist_test_split: TensorDataset) -> tuple[TensorDataset, TensorDataset]:
    """(train, held-out) = 768 and 256 disjoint real images, fixed seed."""
    train, held_out = split(fmnist_test_split, [768, 256], seed=0)
    return train, held_out


class ResidualBlock(nn.Module):
    """A CIFAR-style basic block whose inner width can differ from its I/O width."""

    def __init__(self, channels: int = 8, inner: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, inner, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(inner, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(x + self.bn2(self.conv2(y)))


def tiny_resnet(channels: int = 8, num_classes: int = 10) -> nn.Sequential:
    """stem -> residual block -> residual block -> head, as a chain of blocks."""
    stem = nn.Sequential(nn.Conv2d(1, channels, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU())
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))
    return nn.Sequential(stem, ResidualBlock(channels), ResidualBlock(channels), head)


def thin_copy(block: ResidualBlock, keep: int) -> ResidualBlock:
    """A hand-pruned descendant: keep the `keep` inner filters with the largest L1 norm."""
    channels = block.conv1.in_channels
    idx = block.conv1.weight.detach().abs().sum(dim=(1, 2, 3)).argsort(descending=True)[:keep].sort().values
    thin = ResidualBlock(channels, keep)
    with torch.no_grad():
        thin.conv1.weight.copy_(block.conv1.weight[idx])
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(thin.bn1, name).copy_(getattr(block.bn1, name)[idx])
        thin.conv2.weight.copy_(block.conv2.weight[:, idx])
        thin.bn2.load_state_dict(block.bn2.state_dict())
    return thin


def hand_descendants(block: ResidualBlock) -> dict[str, nn.Module]:
    """What legoblocks.descend would produce, built by hand: the original plus thinner copies."""
    inner = block.conv1.out_channels
    out: dict[str, nn.Module] = {"0.0": copy.deepcopy(block)}
    for sparsity in (0.5, 0.75):
        out[str(sparsity)] = thin_copy(block, max(1, round(inner * (1 - sparsity))))
    return out


@pytest.fixture(scope="session")
def trained_tiny_resnet(fmnist_small: tuple[TensorDataset, TensorDataset]) -> nn.Sequential:
    """A tiny teacher trained for 2 epochs on the small real subset (a few seconds)."""
    from legoblocks.train import train_teacher

    torch.manual_seed(0)
    model = tiny_resnet()
    train_teacher(model, fmnist_small[0], epochs=2, lr=0.05, batch_size=64, weight_decay=5e-4, seed=0, progress=False)
    return model.eval()


# Test modules cannot import conftest under --import-mode=importlib: hand the helpers out as fixtures.
@pytest.fixture(scope="session")
def make_tiny_resnet():
    return tiny_resnet


@pytest.fixture(scope="session")
def make_hand_descendants():
    return hand_descendants


@pytest.fixture(scope="session")
def residual_block_cls():
    return ResidualBlock


@pytest.fixture()
def single_thread():
    """One intra-op thread for the test, restored after.

    The test machine's 2 cores are shared by several suites: with torch's default two
    threads per process, spinning threads made this package's tests ~7x slower (95 s vs
    14 s measured under load average 10). Opt in with
    `pytestmark = pytest.mark.usefixtures("single_thread")`.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
