"""Accuracy units, the selection cache, BatchNorm re-estimation and the additivity check."""

from __future__ import annotations

import pytest
import torch

from legoblocks.bn import calibration_batches, recalibrate_bn
from legoblocks.compose import ScalableModel
from legoblocks.train import evaluate
from profiling.accuracy import (
    AccuracyUnit,
    SelectionEvaluator,
    accuracy_drops,
    additivity_check,
    evaluate_unit,
    plan_units,
    random_compositions,
    resolve_environments,
    results_from_accuracies,
    unit_selections,
)
from profiling.calibrate import spread_compositions
from profiling.cost import count_flops


@pytest.fixture(scope="module")
def evaluator(scalable: ScalableModel, fmnist_parts) -> SelectionEvaluator:
    return SelectionEvaluator(scalable, fmnist_parts["val"])


def test_environments(scalable: ScalableModel) -> None:
    envs = {e.name: e for e in resolve_environments(scalable)}
    assert list(envs) == ["original", "middle", "largest"]
    for i, block in enumerate(scalable.block_names):
        scalable_block = len(scalable.choices(block)) > 1
        assert envs["original"].selection[i] == "0.0"
        assert envs["middle"].selection[i] == ("0.4" if scalable_block else "0.0")
        assert envs["largest"].selection[i] == ("0.8" if scalable_block else "0.0")
    assert [e.name for e in resolve_environments(scalable, 2)] == ["original", "middle"]
    explicit = {b: scalable.choices(b)[-1] for b in scalable.block_names}
    (custom,) = resolve_environments(scalable, [explicit])
    assert list(custom.selection) == scalable.normalize_selection(explicit)
    with pytest.raises(ValueError, match="unknown environment 'smallest'"):
        resolve_environments(scalable, ["smallest"])


def test_plan_covers_every_descendant_and_environment(scalable: ScalableModel) -> None:
    units = plan_units(scalable)
    expected = sum(len(scalable.choices(b)) - 1 for b in scalable.block_names) * 3
    assert len(units) == expected == len(set(units))
    for unit in units:
        assert unit.choice != "0.0"
        i = scalable.block_names.index(unit.block)
        assert unit.reference_selection()[i] == "0.0"
        assert unit.selection()[i] == unit.choice
        others = [j for j in range(len(scalable.block_names)) if j != i]
        assert all(unit.selection()[j] == unit.env.selection[j] for j in others)


def test_nothing_is_evaluated_twice(scalable: ScalableModel, fmnist_parts) -> None:
    units = plan_units(scalable, ["original", "largest"])
    evaluator = SelectionEvaluator(scalable, fmnist_parts["val"])
    results = [evaluate_unit(scalable, u, evaluator) for u in units]
    needed = unit_selections(units)
    assert evaluator.evaluations == len(needed) == len(set(needed))
    assert len(needed) < 2 * len(units), "references are shared between units"
    again = [evaluate_unit(scalable, u, evaluator) for u in units]
    assert again == results and evaluator.evaluations == len(needed)


def test_fanned_out_selections_give_the_same_drops(scalable: ScalableModel, fmnist_parts,
                                                   evaluator: SelectionEvaluator) -> None:
    units = plan_units(scalable, ["original", "middle"])
    in_process = accuracy_drops(scalable, [evaluate_unit(scalable, u, evaluator) for u in units])
    # As a Ray fan-out would do it: each worker measures some selections with its own evaluator.
    selections = unit_selections(units)
    measured = {}
    for part in (selections[::2], selections[1::2]):
        worker = SelectionEvaluator(scalable, fmnist_parts["val"])
        measured.update({s: worker.accuracy(s) for s in part})
    fanned = accuracy_drops(scalable, results_from_accuracies(units, measured))
    assert fanned == in_process
    for block in scalable.block_names:
        assert in_process[block]["0.0"] == 0.0
    with pytest.raises(ValueError, match="no unit results"):
        accuracy_drops(scalable, [])


def test_unit_for_unknown_choice_is_refused(scalable: ScalableModel, evaluator: SelectionEvaluator) -> None:
    env = resolve_environments(scalable, ["original"])[0]
    block = scalable.block_names[1]
    with pytest.raises(ValueError, match="no choice|names choice"):
        evaluate_unit(scalable, AccuracyUnit(block, "0.55", env), evaluator)


def test_batchnorm_reestimation_hook(scalable: ScalableModel, fmnist_parts) -> None:
    with pytest.raises(ValueError, match="bn_data"):
        SelectionEvaluator(scalable, fmnist_parts["val"], bn_recalibration_batches=2)
    on = SelectionEvaluator(scalable, fmnist_parts["val"], bn_data=fmnist_parts["bn"],
                            bn_recalibration_batches=2, bn_batch_size=64, seed=3)
    off = SelectionEvaluator(scalable, fmnist_parts["val"])
    selections = [tuple(scalable.smallest_selection()), *random_compositions(scalable, 4, seed=2)]
    # Re-estimated along the prefix tree, exactly as recalibrate_bn does on each whole model.
    batches = calibration_batches(fmnist_parts["bn"], num_batches=2, batch_size=64, seed=3)
    expected = [evaluate(recalibrate_bn(scalable.compose(list(s)), batches), fmnist_parts["val"])
                for s in selections]
    assert on.accuracy_many(selections) == expected
    assert expected != off.accuracy_many(selections), "re-estimation changed nothing: the test is void"
    # The stored variants keep their own statistics.
    block = scalable.block_names[1]
    before = {k: v.clone() for k, v in scalable.variant(block, "0.8").state_dict().items()}
    on.accuracy_many(random_compositions(scalable, 3, seed=8))
    after = scalable.variant(block, "0.8").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_random_compositions_are_distinct_and_seeded(scalable: ScalableModel) -> None:
    comps = random_compositions(scalable, 10, seed=4)
    assert len(comps) == len(set(comps)) == 10
    assert tuple(scalable.original_selection()) not in comps
    assert random_compositions(scalable, 10, seed=4) == comps
    assert random_compositions(scalable, 10, seed=5) != comps


def test_additivity_check_measures_prediction_error(scalable: ScalableModel,
                                                    evaluator: SelectionEvaluator) -> None:
    units = plan_units(scalable, ["original"])
    drops = accuracy_drops(scalable, [evaluate_unit(scalable, u, evaluator) for u in units])
    report = additivity_check(scalable, drops, evaluator, n=4, seed=1)
    teacher = evaluator.accuracy(scalable.original_selection())
    assert report.n == 4
    for p in report.points:
        assert p.measured == evaluator.accuracy(list(p.selection))
        assert p.predicted == pytest.approx(teacher - sum(drops[b][c] for b, c in zip(scalable.block_names, p.selection)))
    assert report.mae == pytest.approx(sum(abs(p.error) for p in report.points) / 4)
    assert report.max_error == pytest.approx(max(abs(p.error) for p in report.points))
    # A single swap in the original environment is predicted exactly by construction.
    block = next(b for b in scalable.block_names if len(scalable.choices(b)) > 1)
    single = tuple("0.4" if b == block else "0.0" for b in scalable.block_names)
    exact = additivity_check(scalable, drops, evaluator, compositions=[single])
    assert exact.mae == pytest.approx(0.0, abs=1e-12)


def test_calibration_compositions_spread_over_flops(scalable: ScalableModel) -> None:
    flops = {b: {c: count_flops(scalable.variant(b, c), scalable.spec(b).in_shape) for c in scalable.choices(b)}
             for b in scalable.block_names}
    comps = spread_compositions(scalable, flops, 8, seed=0)
    assert len(comps) == len(set(comps)) == 8
    total = [sum(flops[b][c] for b, c in zip(scalable.block_names, s)) for s in comps]
    smallest = sum(flops[b][scalable.choices(b)[-1]] for b in scalable.block_names)
    largest = sum(flops[b]["0.0"] for b in scalable.block_names)
    span = largest - smallest
    assert total == sorted(total)
    assert total[0] - smallest < 0.15 * span and largest - total[-1] < 0.15 * span
    assert spread_compositions(scalable, flops, 8, seed=0, exclude=comps[:2])[:2] != comps[:2]


def test_prefix_sharing_matches_plain_evaluation(scalable: ScalableModel, fmnist_parts) -> None:
    selections = [tuple(scalable.original_selection()), *random_compositions(scalable, 5, seed=9)]
    selections.append(tuple(scalable.smallest_selection()))
    batched = SelectionEvaluator(scalable, fmnist_parts["val"], batch_size=128)
    accs = batched.accuracy_many(selections)
    assert batched.evaluations == len(set(selections))
    for sel, acc in zip(selections, accs):
        assert acc == evaluate(scalable.compose(list(sel)), fmnist_parts["val"], batch_size=128)


def test_held_out_images_are_measured_apart_in_the_same_pass(scalable: ScalableModel, fmnist_parts) -> None:
    """A seeded random `held_out` of the images choose nothing: `accuracy_many` counts only the
    others and `held_out_many` only them, in one pass over batches that mix both."""
    from torch.utils.data import Subset

    val = fmnist_parts["val"]
    held = len(val) // 2 - 37
    selections = [tuple(scalable.original_selection()), *random_compositions(scalable, 4, seed=3)]
    split = SelectionEvaluator(scalable, val, batch_size=64, held_out=held, seed=5)
    mask = split.held_out_mask
    assert mask.sum() == held and split.choosing == len(val) - held
    assert 0 < mask[: len(val) // 2].sum() < held, "the held-out images are a random draw, not the last ones"
    assert (SelectionEvaluator(scalable, val, held_out=held, seed=5).held_out_mask == mask).all()
    tell, choose = mask.nonzero()[0].tolist(), (~mask).nonzero()[0].tolist()
    choosing = split.accuracy_many(selections)
    assert split.held_out_cache.keys() == set(selections), "one pass measured both parts"
    telling = split.held_out_many(selections)
    assert split.evaluations == len(selections)
    for sel, a, t in zip(selections, choosing, telling):
        assert a == evaluate(scalable.compose(list(sel)), Subset(val, choose), batch_size=64)
        assert t == evaluate(scalable.compose(list(sel)), Subset(val, tell), batch_size=64)
    assert choosing != telling, "the two parts gave identical accuracies: the test cannot tell them apart"
    # Accuracies known from elsewhere on the choosing part only are measured again for the held-out part.
    other = SelectionEvaluator(scalable, val, batch_size=64, held_out=held, seed=5)
    other.update(dict(zip(selections, choosing)))
    assert other.held_out_many(selections[:2]) == telling[:2] and other.evaluations == 2
    with pytest.raises(ValueError, match="held_out must be in"):
        SelectionEvaluator(scalable, val, held_out=len(val))
    with pytest.raises(ValueError, match="holds no images out"):
        SelectionEvaluator(scalable, val).held_out_many(selections)
