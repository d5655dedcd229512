"""ProfileTable files: round trip, refusal of corrupted tables, and the optimizer problem."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest

from profiling.serving import to_problem
from profiling.table import SCHEMA_VERSION, ProfileTable, TableError, load, save


def _write(tmp_path: Path, data: dict, name: str = "bad.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")  # json writes NaN as NaN
    return path


def _refused(tmp_path: Path, data: dict, *fragments: str) -> str:
    with pytest.raises(TableError) as info:
        load(_write(tmp_path, data))
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def _scalable_index(data: dict) -> int:
    return next(i for i, b in enumerate(data["blocks"]) if b["spec"]["scalable"])


def test_save_is_atomic_and_round_trips(table: ProfileTable, tmp_path: Path) -> None:
    path = save(table, tmp_path / "sub" / "table.json")
    assert [p.name for p in path.parent.iterdir()] == ["table.json"], "no temp files left behind"
    assert load(path) == table


def test_missing_block_is_refused(table: ProfileTable, tmp_path: Path) -> None:
    data = table.to_dict()
    last = len(data["blocks"]) - 1
    name = data["blocks"].pop()["name"]
    _refused(tmp_path, data, f"blocks[{last}]: missing", repr(name))


def test_block_order_mismatch_is_refused(table: ProfileTable, tmp_path: Path) -> None:
    data = table.to_dict()
    data["blocks"][0], data["blocks"][1] = data["blocks"][1], data["blocks"][0]
    _refused(tmp_path, data, "blocks[0].name", "block_order")


def test_wrong_schema_version_is_refused(table: ProfileTable, tmp_path: Path) -> None:
    data = table.to_dict()
    data["schema_version"] = 1
    _refused(tmp_path, data, "schema_version", "version 1", f"writes version {SCHEMA_VERSION}", "legodnn profile")
    del data["schema_version"]
    _refused(tmp_path, data, "schema_version: missing")


def test_nan_is_refused_with_the_field_path(table: ProfileTable, tmp_path: Path) -> None:
    data = table.to_dict()
    i = _scalable_index(data)
    data["blocks"][i]["choices"]["0.4"]["accuracy_drop"] = math.nan
    _refused(tmp_path, data, f"blocks[{i}].choices['0.4'].accuracy_drop", "NaN")


def test_missing_and_negative_values_are_refused(table: ProfileTable, tmp_path: Path) -> None:
    data = table.to_dict()
    i = _scalable_index(data)
    broken = copy.deepcopy(data)
    del broken["blocks"][i]["choices"]["0.4"]["flops"]
    _refused(tmp_path, broken, f"blocks[{i}].choices['0.4']: missing required field 'flops'")
    broken = copy.deepcopy(data)
    broken["blocks"][i]["choices"]["0.2"]["latency"]["median_ms"] = -1.0
    _refused(tmp_path, broken, f"blocks[{i}].choices['0.2'].latency.median_ms", ">= 0")
    broken = copy.deepcopy(data)
    del broken["blocks"][i]["choices"]["0.0"]
    _refused(tmp_path, broken, f"blocks[{i}].choices", "'0.0'")
    broken = copy.deepcopy(data)
    broken["blocks"][i]["choices"]["0.0"]["accuracy_drop"] = 0.01
    _refused(tmp_path, broken, f"blocks[{i}].choices['0.0'].accuracy_drop", "exactly 0")
    broken = copy.deepcopy(data)
    broken["blocks"][i]["choices"]["0.2"]["latency"]["fingerprint"] = "elsewhere"
    _refused(tmp_path, broken, f"blocks[{i}].choices['0.2'].latency.fingerprint", "elsewhere")


def test_garbage_files_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "x.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(TableError, match="not valid JSON"):
        load(bad)
    with pytest.raises(TableError, match="no such file"):
        load(tmp_path / "absent.json")


def test_nan_is_never_written(table: ProfileTable, tmp_path: Path) -> None:
    broken = copy.deepcopy(table)
    broken.teacher_accuracy = math.nan
    with pytest.raises(TableError, match="teacher_accuracy"):
        save(broken, tmp_path / "t.json")
    assert not (tmp_path / "t.json").exists()


def test_to_problem_is_accepted_by_the_optimizer(table: ProfileTable) -> None:
    from optimizer.problem import parse_problem

    other = copy.deepcopy(table)
    other.model_name = "second"
    current = {table.model_name: table.normalize_selection(["0.0"] * len(table.blocks))}
    raw = to_problem([table, other], {"latency_ms": 5.0, "memory_bytes": 1e7}, current=current,
                     weights={"second": 2.0})
    problem = parse_problem(raw)
    assert [m.name for m in problem.models] == [table.model_name, "second"]
    assert problem.models[1].weight == 2.0
    model = problem.models[0]
    assert model.base_accuracy == table.teacher_accuracy
    for block, profiled in zip(model.blocks, table.blocks):
        assert block.name == profiled.name
        for choice in block.choices:
            c = profiled.choices[choice.id]
            assert choice.accuracy_drop == c.accuracy_drop
            assert choice.latency_ms == table.choice_latency_ms(profiled.name, choice.id)
            assert choice.memory_bytes == c.peak_bytes
            assert choice.load_bytes == c.weight_bytes
    assert problem.budgets.switch_bytes is None
    assert problem.current == {table.model_name: tuple(["0.0"] * len(table.blocks))}


def test_to_problem_latency_override(table: ProfileTable) -> None:
    from optimizer.problem import parse_problem

    override = {(b.name, cid): 1.5 for b in table.blocks for cid in b.choices}
    problem = parse_problem(to_problem(table, {"latency_ms": 3.0}, latency_override=override))
    assert {c.latency_ms for b in problem.models[0].blocks for c in b.choices} == {1.5}
    del override[(table.blocks[0].name, "0.0")]
    with pytest.raises(ValueError, match="lacks"):
        to_problem(table, {}, latency_override=override)
    with pytest.raises(ValueError, match="unknown budget"):
        to_problem(table, {"latency": 1.0})
    with pytest.raises(ValueError, match="unique"):
        to_problem([table, table], {})
