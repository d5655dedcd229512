"""Measured re-ranking keeps a trained anchor unless the validation data says otherwise."""

from __future__ import annotations

import math

import pytest

from profiling.rerank import pick_measured, standard_error


def test_standard_error_of_an_accuracy() -> None:
    assert standard_error(0.94, 1000) == pytest.approx(math.sqrt(0.94 * 0.06 / 1000))
    assert standard_error(1.0, 10) == 0.0
    with pytest.raises(ValueError, match="n must be >= 1"):
        standard_error(0.5, 0)


def test_best_measured_without_a_preferred_candidate() -> None:
    assert pick_measured([0.90, 0.93, 0.92], n=1000) == 1
    assert pick_measured([0.93, 0.93], n=1000) == 0  # ties: the optimizer's better rank


def test_an_anchor_within_the_noise_is_kept() -> None:
    se = standard_error(0.948, 1000)  # about 0.7 points
    measured = [0.948, 0.946, 0.948 - 0.5 * se]
    assert pick_measured(measured, [2], n=1000) == 2
    # Beaten by more than the margin: the data wins.
    assert pick_measured([0.948, 0.930], [1], n=1000) == 0
    # A larger validation set shrinks the margin: the same gap then decides.
    assert pick_measured(measured, [2], n=100_000) == 0
    assert pick_measured(measured, [2], n=1000, margin_se=0) == 0
    # Of several anchors the best measured one.
    assert pick_measured([0.95, 0.947, 0.948], [1, 2], n=1000) == 2


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="at least one"):
        pick_measured([], n=10)
    with pytest.raises(ValueError, match="outside the 2 candidates"):
        pick_measured([0.5, 0.6], [2], n=10)
    with pytest.raises(ValueError, match="margin_se must be >= 0"):
        pick_measured([0.5], n=10, margin_se=-1)


def test_verify_top_k_keeps_the_original_where_the_whole_model_fits(table, scalable, fmnist_parts) -> None:
    """A pruned descendant profiled slightly better than its original (noise) must not
    displace the whole model at a full budget unless it measures clearly better."""
    from pipelines.recipe.serve import verify_top_k
    from profiling.accuracy import SelectionEvaluator

    data = table.to_dict()
    block = next(b for b in data["blocks"] if len(b["choices"]) > 1)
    pruned = next(c for c in block["choices"] if c != "0.0")
    block["choices"][pruned]["accuracy_drop"] = -0.01  # "better than the original"
    for b in data["blocks"]:  # latency from FLOPs: timings of tiny blocks are noise, not the point here
        for c in b["choices"].values():
            c["latency"]["median_ms"] = 1e-6 * c["flops"] + 0.01
    noisy = type(table).from_dict(data)
    original = ["0.0"] * len(noisy.blocks)
    evaluator = SelectionEvaluator(scalable, fmnist_parts["val"])

    (kept,) = verify_top_k(noisy, evaluator, [1.0], k=3, margin_se=1e9)
    assert kept["anchor"] and kept["selection"] == original
    assert noisy.predicted_accuracy(kept["candidates"][0]["selection"]) > noisy.predicted_accuracy(original)
    (best,) = verify_top_k(noisy, evaluator, [1.0], k=3, margin_se=0.0)
    assert best["measured_accuracy"] == max(c["measured_accuracy"] for c in best["candidates"])
