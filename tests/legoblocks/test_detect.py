"""Block detection: expected blocks per architecture, exact chains, measured costs, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from legoblocks.detect import (
    BlockSpec,
    ChainMismatchError,
    InputShapeError,
    UntraceableModelError,
    count_flops,
    detect_blocks,
    verify_chain,
)
from legoblocks.modelref import load_model
from legoblocks.zoo import build_zoo_model

MODELS = Path(__file__).with_name("models_for_tests.py")
SHAPE = (1, 28, 28)


def _check_chain_and_costs(model: nn.Module, blocked, shape=SHAPE) -> None:
    assert verify_chain(model, blocked) < 1e-5
    assert sum(s.flops for s in blocked.specs) == count_flops(model, shape)
    assert sum(s.params for s in blocked.specs) == sum(p.numel() for p in model.parameters())
    # Consecutive blocks fit together, and each spec states its block's real shapes.
    assert blocked.specs[0].in_shape == shape
    for prev, nxt in zip(blocked.specs, blocked.specs[1:]):
        assert prev.out_shape == nxt.in_shape
    for spec, block in zip(blocked.specs, blocked.blocks):
        with torch.no_grad():
            assert tuple(block(torch.zeros(1, *spec.in_shape)).shape[1:]) == spec.out_shape


def test_resnet20_is_stem_nine_residual_blocks_and_head() -> None:
    model = build_zoo_model("resnet20", width=8)
    blocked = detect_blocks(model, SHAPE)
    expected = ["stem"] + [f"layer{i}.{j}" for i in (1, 2, 3) for j in range(3)] + ["head"]
    assert blocked.names == expected
    assert [s.scalable for s in blocked.specs] == [False] + [True] * 9 + [False]
    assert blocked.specs[4].out_shape == (16, 14, 14)  # layer2.0 down-samples
    assert blocked.specs[-1].out_shape == (10,)
    _check_chain_and_costs(model, blocked)


def test_resnet_with_option_a_shortcuts_on_cifar_shapes() -> None:
    model = build_zoo_model("resnet20", in_channels=3, input_size=32, width=8, shortcut="A")
    blocked = detect_blocks(model, (3, 32, 32))
    assert len(blocked.specs) == 11
    _check_chain_and_costs(model, blocked, (3, 32, 32))


def test_vgg11_is_grouped_at_pooling_boundaries_into_4_to_6_blocks() -> None:
    model = build_zoo_model("vgg11", width=16)
    blocked = detect_blocks(model, SHAPE)
    assert 4 <= len(blocked.specs) <= 6
    assert blocked.names[0] == "stem" and blocked.names[-1] == "head"
    # Every scalable VGG block holds at least two convs (inner channels to prune).
    for spec, block in zip(blocked.specs, blocked.blocks):
        convs = sum(isinstance(m, nn.Conv2d) for m in block.modules())
        assert convs >= 2 or not spec.scalable
    _check_chain_and_costs(model, blocked)


def test_vgg16_on_cifar_shapes() -> None:
    model = build_zoo_model("vgg16", in_channels=3, input_size=32, width=8)
    blocked = detect_blocks(model, (3, 32, 32))
    assert 4 <= len(blocked.specs) <= 6
    _check_chain_and_costs(model, blocked, (3, 32, 32))


def test_mobilenetv2_is_one_block_per_inverted_residual() -> None:
    model = build_zoo_model("mobilenetv2", width_mult=0.25)
    blocked = detect_blocks(model, SHAPE)
    names = blocked.names
    # The first inverted residual (a depthwise conv tied to its input: nothing to prune alone)
    # joins the next; every other one is a block, skip or not; the lone last 1x1 conv, whose
    # channels only the classifier reads, joins the head.
    assert names == ["stem", "features.0-1"] + [f"features.{i}" for i in range(2, 17)] + ["head"]
    head = blocked.blocks[-1]
    assert sum(isinstance(m, nn.Conv2d) for m in head.modules()) == 1
    _check_chain_and_costs(model, blocked)


def test_user_model_with_a_concat_branch_inside_a_block() -> None:
    model = load_model(f"{MODELS}:concat_net")
    blocked = detect_blocks(model, SHAPE)
    assert blocked.names == ["stem", "cat1", "cat2", "head"]
    # The branch-and-concat unit is one block: both branches and the fuse conv are inside.
    cat1 = blocked.blocks[1]
    assert any(n.target is torch.cat for n in cat1.graph.nodes)
    assert blocked.specs[2].out_shape == (16, 14, 14)  # the max-pool joined the next unit
    _check_chain_and_costs(model, blocked)


def test_target_blocks_merges_adjacent_units_flop_balanced() -> None:
    model = build_zoo_model("resnet20", width=8)
    natural = detect_blocks(model, SHAPE)
    merged = detect_blocks(model, SHAPE, target_blocks=6)
    assert len(merged.specs) == 6
    assert merged.names[0] == "stem" and merged.names[-1] == "head"
    assert sum(s.flops for s in merged.specs) == sum(s.flops for s in natural.specs)
    scalable = [s.flops for s in merged.specs if s.scalable]
    # Merging the cheapest pair first keeps the blocks within 2x of each other.
    assert max(scalable) <= 2 * min(scalable)
    _check_chain_and_costs(model, merged)
    with pytest.raises(ValueError, match="exceeds the 11 atomic blocks"):
        detect_blocks(model, SHAPE, target_blocks=12)
    with pytest.raises(ValueError, match="choose at least 3"):
        detect_blocks(model, SHAPE, target_blocks=2)


def test_blocks_are_independent_copies_of_the_model() -> None:
    model = build_zoo_model("resnet20", width=4)
    blocked = detect_blocks(model, SHAPE)
    before = model.layer1[0].conv1.weight.clone()
    with torch.no_grad():
        for p in blocked.blocks[1].parameters():
            p.zero_()
    assert torch.equal(model.layer1[0].conv1.weight, before)
    assert model.training  # detection traced a copy; the model's mode is untouched
    assert not any(m.training for block in blocked.blocks for m in block.modules())
    with pytest.raises(ChainMismatchError, match="differs from the model"):
        verify_chain(model, blocked)


def test_blockspec_round_trips_through_a_dict() -> None:
    spec = BlockSpec("layer1.0", (8, 28, 28), (8, 28, 28), 1184, 1806336, True)
    assert BlockSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="lacks field"):
        BlockSpec.from_dict({"name": "x"})


def test_untraceable_model_error_names_the_line_and_the_fx_limitation() -> None:
    model = load_model(f"{MODELS}:data_dependent_net")
    with pytest.raises(UntraceableModelError) as info:
        detect_blocks(model, SHAPE)
    msg = str(info.value)
    assert "models_for_tests.py" in msg and "if y.mean() > 0" in msg
    assert "control flow" in msg and "torch.fx" in msg


def test_wrong_input_shape_names_expected_and_given() -> None:
    model = build_zoo_model("resnet20", width=4)
    with pytest.raises(InputShapeError, match=r"expects 1 input channel\(s\) but input_shape has C=3"):
        detect_blocks(model, (3, 28, 28))
    with pytest.raises(InputShapeError, match="expects an input of 3 dims"):
        detect_blocks(model, (1, 28))
    with pytest.raises(InputShapeError, match="positive integers"):
        detect_blocks(model, (1, 0, 28))
    fixed = load_model(f"{MODELS}:fixed_size_net")
    with pytest.raises(InputShapeError, match="expects 784 input features.*spatial size"):
        detect_blocks(fixed, (1, 32, 32))


def test_models_without_convolutions_or_with_several_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="no convolution"):
        detect_blocks(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), SHAPE)

    class TwoInputs(nn.Module):
        def forward(self, x, y):
            return x + y

    with pytest.raises(ValueError, match="exactly one tensor input"):
        detect_blocks(TwoInputs(), SHAPE)
