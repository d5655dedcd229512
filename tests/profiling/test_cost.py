"""Cost measurement: FLOPs from torch's counter, bytes, and the peak-memory graph walk."""

from __future__ import annotations

import torch
from torch import fx, nn

from profiling.cost import (
    Cost,
    count_flops,
    graph_peak_activation_bytes,
    hook_peak_activation_bytes,
    measure_cost,
)


class Residual(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + x)


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.sum() > 1e9:
            return y * 2
        return y


def test_flops_are_two_per_multiply_add() -> None:
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=False)
    macs = 3 * 5 * 9 * 10 * 10
    assert count_flops(conv, (3, 10, 10)) == 2 * macs
    linear = nn.Linear(7, 4)
    assert count_flops(linear, (7,)) == 2 * 7 * 4


def test_measure_cost_of_residual_block() -> None:
    block = Residual(8)
    cost = measure_cost(block, (8, 6, 6))
    act = 8 * 6 * 6 * 4
    weights = (2 * 8 * 8 * 9 + 2 * 2 * 8) * 4 + 2 * 2 * 8 * 4 + 2 * 8  # convs, BN affine, BN stats, counters
    assert cost == Cost(
        params=2 * 8 * 8 * 9 + 2 * 2 * 8,
        weight_bytes=weights,
        flops=2 * 2 * 8 * 8 * 9 * 36,
        activation_bytes=act,
        # input x (kept for the skip) + two intermediates alive while the next op runs
        peak_bytes=weights + 3 * act,
    )
    assert block.training, "measure_cost must restore the module's mode"


def test_peak_walk_frees_values_after_last_use() -> None:
    chain = nn.Sequential(nn.Conv2d(1, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1))
    gm = fx.symbolic_trace(chain)
    x = torch.zeros(1, 1, 5, 5)
    # At most an input and an output are alive at once: 4ch in + 4ch out.
    assert graph_peak_activation_bytes(gm, x) == 2 * 4 * 25 * 4


def test_inplace_and_views_allocate_nothing() -> None:
    chain = nn.Sequential(nn.Conv2d(1, 4, 1), nn.ReLU(inplace=True), nn.Flatten())
    gm = fx.symbolic_trace(chain)
    x = torch.zeros(1, 1, 5, 5)
    assert graph_peak_activation_bytes(gm, x) == 1 * 25 * 4 + 4 * 25 * 4


def test_untraceable_module_falls_back_to_hooks() -> None:
    m = Untraceable()
    cost = measure_cost(m, (2, 5, 5))
    expected = hook_peak_activation_bytes(m, torch.zeros(1, 2, 5, 5))
    assert expected == (2 + 4) * 25 * 4
    assert cost.peak_bytes == cost.weight_bytes + expected


def test_bad_shape_is_refused() -> None:
    import pytest

    with pytest.raises(ValueError, match="in_shape"):
        measure_cost(nn.Conv2d(1, 1, 1), (1, 0, 5))
