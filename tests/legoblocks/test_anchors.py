"""Budget anchors: even compositions that fit their FLOPs budget, and the joint stage trains them."""

from __future__ import annotations

import logging

import pytest
import torch

from legoblocks.anchors import anchor_selections, choice_flops, even_selection
from legoblocks.compose import ScalableModel
from legoblocks.detect import detect_blocks
from legoblocks.joint import JointConfig, JointTrainer
from legoblocks.uniform import count_flops

SHAPE = (1, 28, 28)
# Four scalable blocks of unequal cost between a fixed stem and head.
FLOPS = {
    "stem": {"0.0": 50},
    "a": {"0.0": 100, "0.5": 50, "0.75": 25},
    "b": {"0.0": 100, "0.5": 50, "0.75": 25},
    "c": {"0.0": 200, "0.5": 100, "0.75": 50},
    "d": {"0.0": 200, "0.5": 100, "0.75": 50},
    "head": {"0.0": 10},
}
FULL = sum(v["0.0"] for v in FLOPS.values())
LEVEL = {"0.0": 0, "0.5": 1, "0.75": 2}


def _flops(sel: list[str]) -> int:
    return sum(FLOPS[b][c] for b, c in zip(FLOPS, sel))


@pytest.mark.parametrize("budget", [0.35, 0.4, 0.5, 0.6, 0.75, 0.9, 1.0])
def test_even_selection_fits_its_budget_and_stays_even(budget: float) -> None:
    sel = even_selection(FLOPS, budget)
    assert _flops(sel) <= budget * FULL
    levels = [LEVEL[c] for b, c in zip(FLOPS, sel) if b not in ("stem", "head")]
    assert max(levels) - min(levels) <= 1, f"{sel} is not even"
    # Greedy is maximal: no sparsest block could take one more step within the budget.
    sparsest = max(levels)
    for i, (b, c) in enumerate(zip(FLOPS, sel)):
        if b in ("stem", "head") or LEVEL[c] != sparsest or LEVEL[c] == 0:
            continue
        denser = dict(zip(LEVEL.values(), LEVEL))[LEVEL[c] - 1]
        assert _flops(sel[:i] + [denser] + sel[i + 1:]) > budget * FULL, f"{b} could still grow in {sel}"


def test_even_selection_grows_with_the_budget_and_ends_at_the_original() -> None:
    costs = [_flops(even_selection(FLOPS, b)) for b in (0.35, 0.45, 0.6, 0.75, 0.9)]
    assert costs == sorted(costs) and costs[0] < costs[-1]
    assert even_selection(FLOPS, 1.0) == ["0.0"] * len(FLOPS)


def test_a_budget_below_the_smallest_gives_the_smallest_with_a_warning(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="legoblocks.anchors"):
        sel = even_selection(FLOPS, 0.05)
    assert sel == ["0.0", "0.75", "0.75", "0.75", "0.75", "0.0"]
    assert "below the smallest composition" in caplog.text
    with pytest.raises(ValueError, match=r"FLOPs fraction in \(0, 1\]"):
        even_selection(FLOPS, 1.5)


@pytest.fixture(scope="module")
def scalable(make_tiny_resnet) -> ScalableModel:
    torch.manual_seed(0)
    return ScalableModel.from_blocked(detect_blocks(make_tiny_resnet().eval(), SHAPE), ladder=(0.0, 0.5, 0.75))


def test_anchors_of_a_real_model_fit_their_measured_budget(scalable: ScalableModel) -> None:
    flops = choice_flops(scalable)
    full = count_flops(scalable.compose(scalable.original_selection()), SHAPE)
    assert sum(v["0.0"] for v in flops.values()) == full  # per-block FLOPs add up exactly
    budgets = [0.5, 0.8]
    anchors = anchor_selections(scalable, budgets)
    assert len(anchors) == 2 and anchors[0] != anchors[1]
    for budget, sel in zip(budgets, anchors):
        assert count_flops(scalable.compose(sel), SHAPE) <= budget * full
        assert any(c != "0.0" for c in sel)


def test_the_joint_stage_trains_each_anchor_in_turn(scalable: ScalableModel, fmnist_small) -> None:
    train, _ = fmnist_small
    cfg = JointConfig(steps=4, batch_size=32, random_compositions=0, sandwich_smallest=False,
                      anchor_budgets=[0.5, 0.8])
    trainer = JointTrainer(scalable, train, cfg)
    anchors = anchor_selections(scalable, cfg.anchor_budgets)
    assert [trainer.selections_for(s) for s in range(4)] == [[anchors[0]], [anchors[1]]] * 2
    with pytest.raises(ValueError, match="anchor_budgets must be FLOPs fractions"):
        JointConfig(anchor_budgets=[0.5, 0.0]).validate()
    JointConfig(random_compositions=0, sandwich_smallest=False, anchor_budgets=[0.5]).validate()
