"""Descendants: pruned copies that keep the block's I/O shapes and really shrink."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from legoblocks.descend import DEFAULT_LADDER, choice_id, count_params, make_descendants, validate_ladder
from legoblocks.detect import count_flops, detect_blocks
from legoblocks.modelref import load_model
from legoblocks.zoo import build_zoo_model

MODELS = Path(__file__).with_name("models_for_tests.py")
SHAPE = (1, 28, 28)

CASES = {
    "resnet20": lambda: build_zoo_model("resnet20", width=8),
    "vgg11": lambda: build_zoo_model("vgg11", width=8),
    "mobilenetv2": lambda: build_zoo_model("mobilenetv2", width_mult=0.25),
    "concat_net": lambda: load_model(f"{MODELS}:concat_net"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_descendant_keeps_io_shapes_and_has_fewer_params(name: str) -> None:
    blocked = detect_blocks(CASES[name](), SHAPE)
    pruned_blocks = 0
    for spec, block in zip(blocked.specs, blocked.blocks):
        if not spec.scalable:
            continue
        descendants = make_descendants(block, spec.in_shape)
        assert set(descendants) <= {choice_id(s) for s in DEFAULT_LADDER} and "0.0" in descendants
        x = torch.randn(2, *spec.in_shape)
        with torch.no_grad():
            reference = block(x)
            assert torch.equal(descendants["0.0"](x), reference)
        previous = count_params(block)
        for cid in sorted(descendants, key=float)[1:]:
            d = descendants[cid]
            with torch.no_grad():
                assert tuple(d(x).shape) == tuple(reference.shape), f"{spec.name}@{cid} changed its output shape"
            params = count_params(d)
            assert params < count_params(block), f"{spec.name}@{cid} did not shrink"
            assert params <= previous  # a higher sparsity never keeps more
            previous = params
        pruned_blocks += len(descendants) > 1
    # All scalable blocks but MobileNetV2's first unit (a depthwise conv tied to its input) prune.
    assert pruned_blocks >= sum(s.scalable for s in blocked.specs) - (name == "mobilenetv2")


def test_channel_counts_round_down_so_flops_are_measured() -> None:
    model = build_zoo_model("resnet20", width=16)
    blocked = detect_blocks(model, SHAPE)
    block, spec = blocked.blocks[1], blocked.specs[1]
    descendants = make_descendants(block, spec.in_shape)
    inner = {cid: d.get_submodule("layer1.0.conv1").out_channels for cid, d in descendants.items()}
    assert inner == {"0.0": 16, "0.2": 12, "0.4": 9, "0.6": 6, "0.8": 3}
    flops = {cid: count_flops(d, spec.in_shape) for cid, d in descendants.items()}
    assert flops["0.0"] == spec.flops
    assert flops["0.0"] > flops["0.2"] > flops["0.4"] > flops["0.6"] > flops["0.8"]
    # 9 of 16 channels kept at 0.4 is not 60% of the conv FLOPs: the ladder value is not the cost.
    assert not math.isclose(flops["0.4"] / flops["0.0"], 0.6, rel_tol=0.02)


def test_original_block_is_untouched_and_bn_statistics_survive() -> None:
    blocked = detect_blocks(build_zoo_model("resnet20", width=8), SHAPE)
    block = blocked.blocks[2]
    state = {k: v.clone() for k, v in block.state_dict().items()}
    descendants = make_descendants(block, blocked.specs[2].in_shape, [0.0, 0.5])
    assert all(torch.equal(v, block.state_dict()[k]) for k, v in state.items())
    assert descendants["0.0"] is not block
    # The output BN is never pruned; its running statistics are copied, not re-estimated.
    bn2 = descendants["0.5"].get_submodule("layer1.1.bn2")
    assert torch.equal(bn2.running_mean, block.get_submodule("layer1.1.bn2").running_mean)
    assert not descendants["0.5"].training


def test_frozen_parameters_and_no_grad_context_still_prune() -> None:
    # Torch-Pruning silently prunes nothing through frozen params or under no_grad.
    blocked = detect_blocks(build_zoo_model("resnet20", width=8), SHAPE)
    block = blocked.blocks[1].requires_grad_(False)
    with torch.no_grad():
        descendants = make_descendants(block, blocked.specs[1].in_shape, [0.5])
    assert count_params(descendants["0.5"]) < count_params(block)
    assert not any(p.requires_grad for p in block.parameters())


def test_block_with_nothing_to_prune_keeps_only_its_original(caplog: pytest.LogCaptureFixture) -> None:
    single = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    with caplog.at_level(logging.WARNING, logger="legoblocks.descend"):
        descendants = make_descendants(single, (4, 8, 8))
    assert list(descendants) == ["0.0"]
    assert "nothing to prune" in caplog.text


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, float("nan"), "0.2", True])
def test_sparsity_outside_0_1_is_a_clear_error(bad: object) -> None:
    block = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    with pytest.raises(ValueError, match=r"sparsity must be .*\[0, 1\)"):
        make_descendants(block, (4, 8, 8), [0.0, bad])


def test_ladder_and_choice_ids() -> None:
    assert choice_id(0.2) == "0.2" and choice_id(0.0) == "0.0" and choice_id(0) == "0.0"
    assert choice_id(0.25) == "0.25" and choice_id(0.1 + 0.2) == "0.3"
    assert validate_ladder([0.4, 0.2]) == [0.0, 0.2, 0.4]
    with pytest.raises(ValueError, match="repeats sparsity 0.2"):
        validate_ladder([0.2, 0.2])
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        choice_id(1.0)
    with pytest.raises(ValueError, match="unknown importance 'taylor'"):
        make_descendants(nn.Conv2d(1, 1, 1), (1, 4, 4), importance="taylor")


def test_other_importances_prune_too() -> None:
    block = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    for importance in ("l1", "bn_scale", "random"):
        d = make_descendants(block, (4, 8, 8), [0.5], importance=importance)["0.5"]
        assert d[0].out_channels == 4 and d[3].in_channels == 4 and d[3].out_channels == 4
