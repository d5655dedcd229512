"""The small shared helpers every package uses: choice ids, atomic files, FLOPs, JSON schemas."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from legoblocks.choices import ORIGINAL, choice_id, smallest_selection, sorted_choices, validate_ladder
from legoblocks.files import sha256_file, write_atomic, write_json_atomic
from legoblocks.flops import count_flops
from legoblocks.schema import Finite, NonNegative, SchemaError, convert


def test_choice_ids_are_exact_strings_and_the_original_is_zero() -> None:
    assert ORIGINAL == choice_id(0.0) == "0.0"
    assert choice_id(0.1 + 0.2) == "0.3"
    assert sorted_choices(["0.6", "0.0", "0.25"]) == ["0.0", "0.25", "0.6"]
    assert smallest_selection(["a", "b"], {"a": ["0.0", "0.4"], "b": ["0.0"]}) == ["0.4", "0.0"]
    assert validate_ladder([0.4, 0.2]) == [0.0, 0.2, 0.4]
    with pytest.raises(ValueError, match="repeats sparsity 0.2"):
        validate_ladder([0.2, 0.2000000001])
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        choice_id(1.0)


def test_write_atomic_replaces_whole_files_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "f.json"
    write_json_atomic(target, {"b": 1, "a": [1, 2]})
    first = target.read_text()
    assert first.index('"a"') < first.index('"b"')  # sorted keys: stable bytes for hashing
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert os.listdir(target.parent) == ["f.json"]
    assert sha256_file(target) == hashlib.sha256(b"new").hexdigest()


def test_count_flops_counts_multiply_adds_and_restores_modes() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    model.train()
    model[1].eval()
    flops = count_flops(model, (3, 8, 8))
    assert flops == 2 * (3 * 4 * 9 * 8 * 8) + 2 * (4 * 8 * 8 * 10)
    assert model.training and model[0].training and not model[1].training


@dataclasses.dataclass
class _Choice:
    id: str
    latency_ms: NonNegative
    drop: Finite


@dataclasses.dataclass
class _Block:
    name: str
    choices: list[_Choice]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"name": "b", "choices": [{"id": "0.0", "latency_ms": -1, "drop": 0}]}, r"^blocks\[2\]\.choices\[0\]\.latency_ms: expected a number >= 0\.0, got -1$"),
        ({"name": "b", "choices": [{"id": "0.0", "latency_ms": 1, "drop": float("nan")}]}, r"choices\[0\]\.drop: expected a finite number, got NaN$"),
        ({"name": 3, "choices": []}, r"^blocks\[2\]\.name: expected a string, got 3$"),
        ({"choices": []}, r"^blocks\[2\]: missing required field 'name'$"),
    ],
)
def test_schema_errors_name_the_field_path(raw: dict, message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        convert(raw, _Block, path="blocks[2]")
    block = convert({"name": "b", "choices": [{"id": "0.0", "latency_ms": 1, "drop": -0.5}]}, _Block)
    assert block.choices[0].latency_ms == 1.0 and isinstance(block.choices[0], _Choice)


def test_schema_error_type_is_the_callers() -> None:
    class MyError(ValueError):
        def __init__(self, path: str, message: str) -> None:
            super().__init__(f"{path} -> {message}")

    with pytest.raises(MyError, match="name -> expected a string"):
        convert({"name": 1, "choices": []}, _Block, error=MyError)
