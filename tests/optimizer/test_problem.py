"""Validation of the problem JSON: every error names its path and the fix."""

from __future__ import annotations

import copy
import json
import math

import pytest

from optimizer import Problem, ProblemError, parse_problem

BASE = {
    "models": [
        {
            "name": "resnet20",
            "weight": 1.0,
            "base_accuracy": 0.915,
            "latency_deadline_ms": None,
            "blocks": [
                {
                    "name": "layer1.0",
                    "choices": [
                        {"id": "0.0", "accuracy_drop": 0.0, "latency_ms": 0.41, "memory_bytes": 74000, "load_bytes": 37000},
                        {"id": "0.2", "accuracy_drop": 0.002, "latency_ms": 0.33, "memory_bytes": 52000},
                    ],
                },
                {"name": "head", "choices": [{"id": "0.0", "accuracy_drop": 0.0, "latency_ms": 0.1, "memory_bytes": 4000}]},
            ],
        },
        {
            "name": "vgg11",
            "blocks": [{"name": "features.0", "choices": [{"id": "0.0", "accuracy_drop": 0, "latency_ms": 1, "memory_bytes": 10}]}],
        },
    ],
    "budgets": {"latency_ms": 6.0, "memory_bytes": 900000, "switch_bytes": None},
    "current": {"resnet20": ["0.0", "0.0"]},
    "switch_penalty_per_byte": 0.0,
}


def _mutated(path: list, value) -> dict:
    raw = copy.deepcopy(BASE)
    target = raw
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return raw


_DELETE = object()
CHOICE = ["models", 0, "blocks", 0, "choices", 0]


def test_parses_the_issue_example_with_defaults():
    problem = parse_problem(BASE)
    assert isinstance(problem, Problem)
    first = problem.models[0].blocks[0].choices
    assert first[0].load_bytes == 37000
    assert first[1].load_bytes == 52000  # defaults to memory_bytes
    vgg = problem.models[1]
    assert vgg.weight == 1.0 and vgg.base_accuracy == 0.0 and vgg.latency_deadline_ms is None
    assert problem.current == {"resnet20": ("0.0", "0.0")}
    assert problem.budgets.switch_bytes is None


def test_accepts_json_text_and_paths(tmp_path):
    text = json.dumps(BASE)
    path = tmp_path / "problem.json"
    path.write_text(text)
    assert parse_problem(text) == parse_problem(path) == parse_problem(BASE)


def test_round_trips_through_to_dict():
    problem = parse_problem(BASE)
    assert parse_problem(problem.to_dict()) == problem
    assert parse_problem(json.loads(json.dumps(problem.to_dict()))) == problem


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (CHOICE + ["latency_ms"], -1, "models[0].blocks[0].choices[0].latency_ms: expected a finite number >= 0"),
        (CHOICE + ["memory_bytes"], "big", "models[0].blocks[0].choices[0].memory_bytes: expected a number, got a string"),
        (CHOICE + ["load_bytes"], -5, "models[0].blocks[0].choices[0].load_bytes: expected a finite number >= 0"),
        (CHOICE + ["accuracy_drop"], math.nan, "models[0].blocks[0].choices[0].accuracy_drop: expected a finite number"),
        (CHOICE + ["latency_ms"], math.inf, "models[0].blocks[0].choices[0].latency_ms: expected a finite number"),
        (CHOICE + ["latency_ms"], True, "models[0].blocks[0].choices[0].latency_ms: expected a number, got true or false"),
        (CHOICE + ["id"], 3, "models[0].blocks[0].choices[0].id: expected a string, got an integer"),
        (CHOICE + ["id"], "", "models[0].blocks[0].choices[0].id: expected a string of length >= 1"),
        (CHOICE + ["latency_ms"], _DELETE, "models[0].blocks[0].choices[0]: missing required field 'latency_ms'"),
        (CHOICE + ["flops"], 1, "models[0].blocks[0].choices[0]: unknown field 'flops' (allowed: accuracy_drop, id, latency_ms, load_bytes, memory_bytes)"),
        (["models", 0, "blocks", 0, "choices", 1, "id"], "0.0", "models[0].blocks[0].choices[1].id: duplicate choice id '0.0' (also choices[0])"),
        (["models", 0, "blocks", 0, "choices"], [], "models[0].blocks[0].choices: expected a list of length >= 1"),
        (["models", 0, "blocks", 1, "name"], "layer1.0", "models[0].blocks[1].name: duplicate block name 'layer1.0' (also blocks[0])"),
        (["models", 0, "blocks"], [], "models[0].blocks: expected a list of length >= 1"),
        (["models", 0, "blocks"], {"a": 1}, "models[0].blocks: expected a list, got a mapping"),
        (["models", 0, "weight"], 0, "models[0].weight: expected a number > 0.0"),
        (["models", 0, "weight"], -2, "models[0].weight: expected a number > 0.0"),
        (["models", 0, "base_accuracy"], -0.1, "models[0].base_accuracy: expected a finite number >= 0"),
        (["models", 0, "latency_deadline_ms"], -3, "models[0].latency_deadline_ms: expected a finite number >= 0"),
        (["models", 0, "name"], None, "models[0].name: expected a string, got null"),
        (["models", 1, "name"], "resnet20", "models[1].name: duplicate model name 'resnet20' (also models[0])"),
        (["models", 1, "blocks", 0], "x", "models[1].blocks[0]: expected a mapping, got a string"),
        (["models"], [], "models: expected a list of length >= 1"),
        (["models"], _DELETE, "problem: missing required field 'models'"),
        (["budget"], {}, "problem: unknown field 'budget' (allowed: budgets, current, models, switch_penalty_per_byte)"),
        (["budgets", "latency_ms"], -6, "budgets.latency_ms: expected a finite number >= 0"),
        (["budgets", "memory"], 5, "budgets: unknown field 'memory' (allowed: latency_ms, memory_bytes, switch_bytes)"),
        (["budgets", "switch_bytes"], math.nan, "budgets.switch_bytes: expected a finite number >= 0"),
        (["switch_penalty_per_byte"], -1e-9, "switch_penalty_per_byte: expected a finite number >= 0"),
        (["current", "alexnet"], ["0.0"], "current.alexnet: unknown model 'alexnet' (models: resnet20, vgg11)"),
        (["current", "resnet20"], ["0.0"], "current.resnet20: has 1 choice ids but model 'resnet20' has 2 blocks; give one id per block, in block order"),
        (["current", "resnet20"], ["0.0", "0.5"], "current.resnet20[1]: unknown choice id '0.5' for block 'head' (choices: 0.0)"),
        (["current", "resnet20"], ["0.0", 0], "current.resnet20[1]: must be a string, got int"),
        (["current", "resnet20"], "0.0", "current.resnet20: must be a list of choice ids, got str"),
        (["current"], ["0.0"], "current: must be a JSON object (model name -> list of choice ids), got list"),
    ],
)
def test_errors_name_the_path(path, value, message):
    with pytest.raises(ProblemError) as info:
        parse_problem(_mutated(path, value))
    text = str(info.value)  # the offending value itself is named where it is a short scalar
    assert text == message or (text.startswith(message.rsplit(", got ", 1)[0]) and ", got " in text), text
    assert info.value.path == message.split(":")[0]


def test_negative_accuracy_drop_is_allowed():
    # A retrained descendant can measure better than the original on a finite validation set.
    problem = parse_problem(_mutated(CHOICE + ["accuracy_drop"], -0.001))
    assert problem.models[0].blocks[0].choices[0].accuracy_drop == -0.001


def test_not_an_object_and_bad_json(tmp_path):
    with pytest.raises(ProblemError, match=r"^problem: expected a mapping, got a list"):
        parse_problem([])  # type: ignore[arg-type]
    with pytest.raises(ProblemError, match="not valid JSON.*pathlib.Path"):
        parse_problem("problem.json")
    with pytest.raises(ProblemError, match="cannot read problem file"):
        parse_problem(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ProblemError, match="bad.json is not valid JSON"):
        parse_problem(bad)


def test_problem_error_is_a_value_error():
    assert issubclass(ProblemError, ValueError)
