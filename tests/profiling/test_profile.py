"""profile_model end to end on a real (tiny) scalable ResNet and real Fashion-MNIST images."""

from __future__ import annotations

import math

from legoblocks.compose import ScalableModel
from profiling.profile import profile_model
from profiling.table import SCHEMA_VERSION, ProfileTable, load, save

from .conftest import PROFILE_KW


def _without_timing(table: ProfileTable) -> dict:
    """The table minus what legitimately varies between runs: latency, timestamps, seconds."""
    data = table.to_dict()
    data.pop("created")
    data["settings"].pop("seconds")
    data.pop("fingerprints")
    data.pop("latency_calibration")
    for block in data["blocks"]:
        for choice in block["choices"].values():
            choice.pop("latency")
    return data


def test_table_is_complete_and_loads(table: ProfileTable, scalable: ScalableModel, tmp_path) -> None:
    assert table.schema_version == SCHEMA_VERSION
    assert table.block_names == scalable.block_names
    assert table.input_shape == (1, 28, 28)
    assert 0.0 < table.teacher_accuracy <= 1.0
    for block in table.blocks:
        assert list(block.choices) == scalable.choices(block.name)
        assert block.spec["name"] == block.name
    path = save(table, tmp_path / "t.json")
    again = load(path)
    assert again.to_dict() == table.to_dict()


def test_original_has_zero_drop(table: ProfileTable) -> None:
    for block in table.blocks:
        assert block.choices["0.0"].accuracy_drop == 0.0
        assert block.choices["0.0"].accuracy_drop_raw == 0.0


def test_costs_fall_with_sparsity(table: ProfileTable) -> None:
    scalable_blocks = [b for b in table.blocks if b.spec["scalable"]]
    assert scalable_blocks, "the ResNet must have scalable blocks"
    for block in scalable_blocks:
        ordered = sorted(block.choices.values(), key=lambda c: c.sparsity)
        assert len(ordered) >= 3
        for metric in ("params", "weight_bytes", "flops", "peak_bytes"):
            values = [getattr(c, metric) for c in ordered]
            assert all(a > b for a, b in zip(values, values[1:])), (block.name, metric, values)
        # A block keeps its output shape, so its output activation does not change.
        assert len({c.activation_bytes for c in ordered}) == 1


def test_block_flops_add_up_to_the_model(table: ProfileTable, scalable: ScalableModel) -> None:
    from legoblocks.flops import count_flops

    whole = count_flops(scalable.compose(scalable.original_selection()), table.input_shape)
    assert table.total(scalable.original_selection(), "flops") == whole


def test_latency_columns_carry_a_fingerprint(table: ProfileTable) -> None:
    for block in table.blocks:
        for c in block.choices.values():
            assert c.latency.fingerprint in table.fingerprints
            assert c.latency.median_ms > 0
    fp = next(iter(table.fingerprints.values()))
    assert fp["threads"] == 1 and fp["torch_version"]


def test_additivity_and_calibration_reported(table: ProfileTable) -> None:
    add = table.additivity
    assert add is not None and add["n"] == 6 and len(add["points"]) == 6
    errors = [abs(p["predicted"] - p["measured"]) for p in add["points"]]
    assert math.isclose(add["mae"], sum(errors) / len(errors), abs_tol=1e-12)
    cal = table.calibration
    assert cal is not None and cal["k"] == 6 and cal["heldout_n"] == 6
    assert cal["heldout_mae_raw"] == add["mae"]
    # Calibrated drops are raw drops times the fitted per-block weights: still additive.
    for block in table.blocks:
        w = cal["block_weights"][block.name]
        for c in block.choices.values():
            # Raw drops below 0 (a swap measured better than the original) are clipped before calibrating.
            assert math.isclose(c.accuracy_drop, w * max(0.0, c.accuracy_drop_raw), rel_tol=1e-12, abs_tol=1e-15)
    # The held-out calibrated MAE is the MAE of teacher - summed calibrated drops.
    held = [p["selection"] for p in add["points"]]
    measured = [p["measured"] for p in add["points"]]
    mae = sum(abs(table.predicted_accuracy(s) - m) for s, m in zip(held, measured)) / len(held)
    assert math.isclose(cal["heldout_mae_calibrated"], mae, abs_tol=1e-12)


def test_phase_seconds_are_recorded(table: ProfileTable) -> None:
    seconds = table.settings["seconds"]
    assert set(seconds) == {"costs", "latency", "accuracy"}
    assert all(v >= 0 for v in seconds.values()) and seconds["accuracy"] > 0


def test_profiling_is_deterministic(table: ProfileTable, scalable: ScalableModel, fmnist_parts) -> None:
    again = profile_model(scalable, fmnist_parts["val"], **PROFILE_KW)
    assert _without_timing(again) == _without_timing(table)
