"""The runtime scaler on two real composed models (legoblocks.compose): a sequence of
budget changes loads only the changed blocks, and each switched model computes exactly
what a freshly composed model with the same selection computes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from legoblocks.compose import BlockSwitcher, ScalableModel, module_nbytes
from legoblocks.detect import BlockSpec
from optimizer import RuntimeScaler, ScaleReport, evaluate, solve

CHANNELS = 4
LADDER = ("0.0", "0.25", "0.5", "0.75")


def _block(inner: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(CHANNELS, inner, 3, padding=1), nn.ReLU(), nn.Conv2d(inner, CHANNELS, 3, padding=1)
    ).eval()


def _scalable(seed: int, n_blocks: int) -> ScalableModel:
    """A chain of residual-free conv blocks; a descendant keeps (1 - s) of 8 inner channels."""
    specs, variants = [], {}
    for b in range(n_blocks):
        name = f"block{b}"
        specs.append(BlockSpec(name, (CHANNELS, 6, 6), (CHANNELS, 6, 6), 0, 0, True))
        variants[name] = {c: _block(max(1, round(8 * (1 - float(c)))), seed * 100 + b * 10 + i) for i, c in enumerate(LADDER)}
    return ScalableModel(specs, variants, (CHANNELS, 6, 6))


def _problem_model(name: str, sm: ScalableModel, latency_scale: float) -> dict:
    """Table-like costs: drop grows and latency/memory fall with sparsity."""
    blocks = []
    for b, block in enumerate(sm.block_names):
        choices = []
        for c in sm.choices(block):
            s = float(c)
            size = module_nbytes(sm.variant(block, c))
            choices.append(
                {
                    "id": c,
                    "accuracy_drop": round(0.01 * (b + 1) * s**2, 6),
                    "latency_ms": latency_scale * (1.0 + 0.1 * b) * (0.2 + 0.8 * (1 - s)),
                    "memory_bytes": size,
                    "load_bytes": size,
                }
            )
        blocks.append({"name": block, "choices": choices})
    return {"name": name, "base_accuracy": 0.9, "blocks": blocks}


@pytest.fixture
def setup():
    models = {"alpha": _scalable(1, 4), "beta": _scalable(2, 3)}
    calls: list[tuple[str, str, str]] = []

    def source_for(model_name: str, sm: ScalableModel):
        def source(block: str, choice: str) -> nn.Module:
            calls.append((model_name, block, choice))
            return copy.deepcopy(sm.variant(block, choice))

        return source

    switchers = {
        name: BlockSwitcher(source_for(name, sm), sm.block_names, sm.original_selection()) for name, sm in models.items()
    }
    problem_models = [_problem_model("alpha", models["alpha"], 1.0), _problem_model("beta", models["beta"], 2.0)]
    calls.clear()
    return models, switchers, problem_models, calls


def _check_outputs(models, switchers):
    x = torch.randn(2, CHANNELS, 6, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for name, sm in models.items():
            fresh = sm.compose(switchers[name].selection)
            assert torch.equal(switchers[name].model(x), fresh(x)), name


def test_budget_changes_switch_only_changed_blocks(setup):
    models, switchers, problem_models, calls = setup
    scaler = RuntimeScaler(problem_models, switchers)
    full = sum(c["latency_ms"] for m in problem_models for c in (b["choices"][0] for b in m["blocks"]))
    budgets = [
        {"latency_ms": full},  # everything original fits: nothing to do
        {"latency_ms": 0.7 * full},
        {"latency_ms": 0.45 * full, "memory_bytes": None},
        {"latency_ms": 0.85 * full},
        {"latency_ms": 0.7 * full, "switch_bytes": 6_000},
        {"latency_ms": 0.5 * full},
    ]
    switched = 0
    for step, b in enumerate(budgets):
        before = scaler.selection
        calls.clear()
        report = scaler.update(b)
        assert isinstance(report, ScaleReport)
        assert report.solution.feasible
        after = scaler.selection
        assert after == report.solution.selection
        # The switcher loaded exactly the blocks whose choice changed, nothing else.
        expected = {
            name: [(blk, old, new) for blk, old, new in zip(models[name].block_names, before[name], after[name]) if old != new]
            for name in after
        }
        expected = {k: v for k, v in expected.items() if v}
        assert report.changes == expected
        assert sorted(calls) == sorted((name, blk, new) for name, v in expected.items() for blk, _, new in v)
        assert report.bytes_loaded == sum(
            module_nbytes(models[name].variant(blk, new)) for name, v in expected.items() for blk, _, new in v
        )
        assert report.switched == bool(expected)
        if step == 0:
            assert not report.switched and report.kept == "optimal"
        # Same answer as solving the problem from scratch, and within the budgets.
        assert report.solution.objective == pytest.approx(solve(scaler_problem(problem_models, before, b)).objective, abs=1e-12)
        if b.get("switch_bytes") is not None:
            assert report.solution.switch_bytes <= b["switch_bytes"]
        else:  # no switching cost: read from the frontiers the scaler built
            assert report.solution.method == "frontier"
        assert report.solution.latency_ms <= b["latency_ms"] * (1 + 1e-9)
        _check_outputs(models, switchers)
        switched += report.switched
    assert switched >= 3


def scaler_problem(problem_models, current, budgets):
    from optimizer import parse_problem

    return parse_problem({"models": problem_models, "budgets": budgets, "current": current})


def test_hysteresis_keeps_a_feasible_selection_for_small_gains(setup):
    models, switchers, problem_models, calls = setup
    full = sum(c["latency_ms"] for m in problem_models for c in (b["choices"][0] for b in m["blocks"]))
    scaler = RuntimeScaler(problem_models, switchers, hysteresis=0.05)
    tight = scaler.update({"latency_ms": 0.45 * full})
    assert tight.switched  # a forced switch: the original selection does not fit
    calls.clear()
    relaxed = scaler.update({"latency_ms": 0.5 * full})
    best = solve(scaler.problem({"latency_ms": 0.5 * full}))
    assert best.selection != tight.solution.selection  # there is a (slightly) better selection ...
    assert relaxed.kept == "hysteresis" and not relaxed.switched and calls == []  # ... but not worth a switch
    assert relaxed.solution.selection == tight.solution.selection
    assert relaxed.solution.objective == pytest.approx(
        evaluate(scaler.problem({"latency_ms": 0.5 * full}), tight.solution.selection).objective
    )
    _check_outputs(models, switchers)


def test_infeasible_budgets_keep_the_running_models(setup):
    models, switchers, problem_models, calls = setup
    scaler = RuntimeScaler(problem_models, switchers)
    report = scaler.update({"latency_ms": 0.01})
    assert not report.solution.feasible and report.kept == "infeasible"
    assert not report.switched and calls == []
    assert "smallest achievable" in report.solution.reason
    assert scaler.selection == {name: sm.original_selection() for name, sm in models.items()}


def test_rejects_mismatched_switchers(setup):
    models, switchers, problem_models, _ = setup
    with pytest.raises(ValueError, match="cover exactly the models"):
        RuntimeScaler(problem_models, {"alpha": switchers["alpha"]})
    swapped = {"alpha": switchers["beta"], "beta": switchers["alpha"]}
    with pytest.raises(ValueError, match="runs blocks"):
        RuntimeScaler(problem_models, swapped)
    with pytest.raises(ValueError, match="hysteresis"):
        RuntimeScaler(problem_models, switchers, hysteresis=-1)
    with pytest.raises(ValueError, match="budgets: unknown field 'latency'"):
        RuntimeScaler(problem_models, switchers).update({"latency": 3})
