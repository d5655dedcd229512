"""recalibrate_bn: a re-estimated copy whose BatchNorm buffers, and nothing else, differ."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from legoblocks.bn import calibration_batches, iter_batches, recalibrate_bn


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _bn_buffer_names(model: nn.Module) -> set[str]:
    names = set()
    for prefix, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            names |= {f"{prefix}.{b}" for b, _ in module.named_buffers()}
    return names


def test_only_bn_buffers_of_the_copy_change() -> None:
    model = _net().train()  # the caller's mode must survive too
    before = _snapshot(model)
    batches = [torch.randn(16, 1, 8, 8) * 3 + 2 for _ in range(4)]

    copy = recalibrate_bn(model, batches)

    assert copy is not model
    assert not copy.training and model.training
    after_original = model.state_dict()
    assert all(torch.equal(before[k], after_original[k]) for k in before), "original touched"
    bn_names = _bn_buffer_names(model)
    changed = {k for k, v in copy.state_dict().items() if not torch.equal(v, before[k])}
    assert changed, "recalibration changed nothing"
    assert changed <= bn_names, f"non-BatchNorm state changed: {changed - bn_names}"
    assert {k for k in changed if k.endswith("running_mean")}, "running means not re-estimated"
    assert [m.momentum for m in copy.modules() if isinstance(m, nn.BatchNorm2d)] == [0.1, 0.1]


def test_statistics_are_the_cumulative_average_over_batches() -> None:
    model = _net()
    batches = [torch.randn(32, 1, 8, 8) + i for i in range(3)]
    copy = recalibrate_bn(model, batches)
    # The first BatchNorm sees conv1's output: its running mean is the mean of per-batch means.
    conv = copy[0]
    with torch.no_grad():
        expected = torch.stack([conv(b).mean(dim=(0, 2, 3)) for b in batches]).mean(0)
    assert torch.allclose(copy[1].running_mean, expected, atol=1e-5)
    assert int(copy[1].num_batches_tracked) == 3


def test_accepts_loader_style_tuples_and_rejects_nothing() -> None:
    model = _net()
    ds = torch.utils.data.TensorDataset(torch.randn(50, 1, 8, 8), torch.zeros(50, dtype=torch.long))
    batches = calibration_batches(ds, num_batches=3, batch_size=16, seed=1)
    assert [len(b) for b in batches] == [16, 16, 16]
    loader = torch.utils.data.DataLoader(ds, batch_size=25)
    a = recalibrate_bn(model, loader)  # (x, y) tuples
    b = recalibrate_bn(model, iter_batches(ds.tensors[0], 25))
    assert torch.equal(a[1].running_var, b[1].running_var)
    with pytest.raises(ValueError, match="no batches"):
        recalibrate_bn(model, [])
    with pytest.raises(TypeError, match="batch must be"):
        recalibrate_bn(model, ["nope"])
