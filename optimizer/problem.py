"""The scaling problem: its JSON form, validated into frozen dataclasses.

The optimizer's input is produced by other programs (profiling, the device fetch script)
and edited by hand, so validation is strict and every error names the exact place
(`models[1].blocks[3].choices[0].latency_ms: must be >= 0, got -1`) and what to do.
After `parse_problem` the solver can trust every number: finite, non-negative where a cost,
ids unique, `current` consistent with the blocks.

JSON form (optional keys show their defaults)::

    {
      "models": [
        {"name": "resnet20", "weight": 1.0, "base_accuracy": 0.0,
         "latency_deadline_ms": null,
         "blocks": [
           {"name": "layer1.0", "choices": [
             {"id": "0.0", "accuracy_drop": 0.0, "latency_ms": 0.41,
              "memory_bytes": 74000, "load_bytes": 74000}
           ]}
         ]}
      ],
      "budgets": {"latency_ms": null, "memory_bytes": null, "switch_bytes": null},
      "current": null,
      "switch_penalty_per_byte": 0.0
    }

`load_bytes` defaults to `memory_bytes`. `accuracy_drop` may be negative (a retrained
descendant can measure slightly better than the original on a finite validation set);
every cost, budget, deadline and the penalty must be >= 0. A model absent from `current`
is not running, so its blocks cost nothing to switch.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

__all__ = [
    "Budgets",
    "Block",
    "Choice",
    "Model",
    "Problem",
    "ProblemError",
    "parse_budgets",
    "parse_current",
    "parse_models",
    "parse_penalty",
    "parse_problem",
    "synthetic_problem",
]


class ProblemError(ValueError):
    """An invalid scaling problem; `path` names the offending field (`models[0].name`)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


@dataclass(frozen=True)
class Choice:
    """One descendant of a block: its predicted accuracy cost and its resource costs."""

    id: str
    accuracy_drop: float
    latency_ms: float
    memory_bytes: float
    load_bytes: float


@dataclass(frozen=True)
class Block:
    name: str
    choices: tuple[Choice, ...]

    def index_of(self, choice_id: str) -> int:
        for i, choice in enumerate(self.choices):
            if choice.id == choice_id:
                return i
        raise KeyError(choice_id)


@dataclass(frozen=True)
class Model:
    name: str
    blocks: tuple[Block, ...]
    base_accuracy: float = 0.0
    weight: float = 1.0
    latency_deadline_ms: float | None = None


@dataclass(frozen=True)
class Budgets:
    """Shared device budgets; None means unconstrained."""

    latency_ms: float | None = None
    memory_bytes: float | None = None
    switch_bytes: float | None = None


@dataclass(frozen=True)
class Problem:
    """A validated scaling problem. `current` maps a running model to its selection."""

    models: tuple[Model, ...]
    budgets: Budgets = field(default_factory=Budgets)
    current: Mapping[str, tuple[str, ...]] | None = None
    switch_penalty_per_byte: float = 0.0

    def model(self, name: str) -> Model:
        for model in self.models:
            if model.name == name:
                return model
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form; `parse_problem(p.to_dict()) == p`."""
        return {
            "models": [
                {
                    "name": m.name,
                    "weight": m.weight,
                    "base_accuracy": m.base_accuracy,
                    "latency_deadline_ms": m.latency_deadline_ms,
                    "blocks": [
                        {
                            "name": b.name,
                            "choices": [
                                {
                                    "id": c.id,
                                    "accuracy_drop": c.accuracy_drop,
                                    "latency_ms": c.latency_ms,
                                    "memory_bytes": c.memory_bytes,
                                    "load_bytes": c.load_bytes,
                                }
                                for c in b.choices
                            ],
                        }
                        for b in m.blocks
                    ],
                }
                for m in self.models
            ],
            "budgets": {
                "latency_ms": self.budgets.latency_ms,
                "memory_bytes": self.budgets.memory_bytes,
                "switch_bytes": self.budgets.switch_bytes,
            },
            "current": None if self.current is None else {k: list(v) for k, v in self.current.items()},
            "switch_penalty_per_byte": self.switch_penalty_per_byte,
        }


# ----------------------------------------------------------------------------------------
# Validation helpers. Each takes the JSON path of the value it checks, so that a message
# always says where the problem is.


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _object(value: Any, path: str, required: set[str], optional: set[str]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ProblemError(path, f"must be a JSON object, got {_type_name(value)}")
    for key in value:
        if key not in required and key not in optional:
            allowed = ", ".join(sorted(required | optional))
            raise ProblemError(path, f"unknown key {key!r} (allowed: {allowed})")
    for key in sorted(required):
        if key not in value:
            raise ProblemError(path, f"missing required key {key!r}")
    return value


def _number(value: Any, path: str, *, minimum: float | None = 0.0, strictly: bool = False) -> float:
    # bool is an int in Python but never a sensible cost; reject it explicitly.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProblemError(path, f"must be a number, got {_type_name(value)}")
    number = float(value)
    if not math.isfinite(number):
        raise ProblemError(path, f"must be a finite number, got {value}")
    if minimum is not None:
        if strictly and number <= minimum:
            raise ProblemError(path, f"must be > {minimum:g}, got {value}")
        if not strictly and number < minimum:
            raise ProblemError(path, f"must be >= {minimum:g}, got {value}")
    return number


def _optional_number(value: Any, path: str) -> float | None:
    return None if value is None else _number(value, path)


def _name(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise ProblemError(path, f"must be a string, got {_type_name(value)}")
    if not value:
        raise ProblemError(path, "must not be empty")
    return value


def _list(value: Any, path: str) -> list[Any]:
    if not isinstance(value, list):
        raise ProblemError(path, f"must be a list, got {_type_name(value)}")
    if not value:
        raise ProblemError(path, "must not be empty")
    return value


_Item = TypeVar("_Item", Choice, Block, Model)


def _unique(
    raw: Any, path: str, parse: Callable[[Any, str], _Item], key: str, what: str
) -> tuple[_Item, ...]:
    """Parse a non-empty list with `parse`, rejecting a repeated `key` (a choice id, a
    block or model name): selections and `current` address items by it, so a repeat
    would make them ambiguous. The error names both places, e.g.
    `models[0].blocks[3].name: duplicate block name 'head' (also blocks[1])`.
    """
    items: list[_Item] = []
    seen: dict[str, int] = {}
    short = path.rsplit(".", 1)[-1]
    for i, raw_item in enumerate(_list(raw, path)):
        item = parse(raw_item, f"{path}[{i}]")
        name = getattr(item, key)
        if name in seen:
            raise ProblemError(f"{path}[{i}].{key}", f"duplicate {what} {name!r} (also {short}[{seen[name]}])")
        seen[name] = i
        items.append(item)
    return tuple(items)


def _parse_choice(raw: Any, path: str) -> Choice:
    obj = _object(raw, path, {"id", "accuracy_drop", "latency_ms", "memory_bytes"}, {"load_bytes"})
    memory = _number(obj["memory_bytes"], f"{path}.memory_bytes")
    load = obj.get("load_bytes")
    return Choice(
        id=_name(obj["id"], f"{path}.id"),
        accuracy_drop=_number(obj["accuracy_drop"], f"{path}.accuracy_drop", minimum=None),
        latency_ms=_number(obj["latency_ms"], f"{path}.latency_ms"),
        memory_bytes=memory,
        load_bytes=memory if load is None else _number(load, f"{path}.load_bytes"),
    )


def _parse_block(raw: Any, path: str) -> Block:
    obj = _object(raw, path, {"name", "choices"}, set())
    name = _name(obj["name"], f"{path}.name")
    choices = _unique(obj["choices"], f"{path}.choices", _parse_choice, "id", "choice id")
    return Block(name=name, choices=choices)


def _parse_model(raw: Any, path: str) -> Model:
    obj = _object(
        raw, path, {"name", "blocks"}, {"weight", "base_accuracy", "latency_deadline_ms"}
    )
    name = _name(obj["name"], f"{path}.name")
    blocks = _unique(obj["blocks"], f"{path}.blocks", _parse_block, "name", "block name")
    return Model(
        name=name,
        blocks=blocks,
        base_accuracy=_number(obj.get("base_accuracy", 0.0), f"{path}.base_accuracy"),
        weight=_number(obj.get("weight", 1.0), f"{path}.weight", strictly=True),
        latency_deadline_ms=_optional_number(
            obj.get("latency_deadline_ms"), f"{path}.latency_deadline_ms"
        ),
    )


def parse_models(raw: Any, path: str = "models") -> tuple[Model, ...]:
    """Validate a list of model objects (the part of a problem that does not change with budgets)."""
    return _unique(raw, path, _parse_model, "name", "model name")


def parse_budgets(raw: Any, path: str = "budgets") -> Budgets:
    """Validate a budgets object; missing keys and nulls mean unconstrained."""
    if raw is None:
        return Budgets()
    obj = _object(raw, path, set(), {"latency_ms", "memory_bytes", "switch_bytes"})
    return Budgets(
        latency_ms=_optional_number(obj.get("latency_ms"), f"{path}.latency_ms"),
        memory_bytes=_optional_number(obj.get("memory_bytes"), f"{path}.memory_bytes"),
        switch_bytes=_optional_number(obj.get("switch_bytes"), f"{path}.switch_bytes"),
    )


def parse_current(
    raw: Any, models: tuple[Model, ...], path: str = "current"
) -> dict[str, tuple[str, ...]] | None:
    """Validate the running selections against the models' blocks and choice ids."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ProblemError(path, f"must be a JSON object (model name -> list of choice ids), got {_type_name(raw)}")
    by_name = {m.name: m for m in models}
    current: dict[str, tuple[str, ...]] = {}
    for name, ids in raw.items():
        if name not in by_name:
            known = ", ".join(by_name)
            raise ProblemError(f"{path}.{name}", f"unknown model {name!r} (models: {known})")
        model = by_name[name]
        if not isinstance(ids, list):
            raise ProblemError(f"{path}.{name}", f"must be a list of choice ids, got {_type_name(ids)}")
        if len(ids) != len(model.blocks):
            raise ProblemError(
                f"{path}.{name}",
                f"has {len(ids)} choice ids but model {name!r} has {len(model.blocks)} blocks; "
                "give one id per block, in block order",
            )
        for b, (block, choice_id) in enumerate(zip(model.blocks, ids)):
            if not isinstance(choice_id, str):
                raise ProblemError(f"{path}.{name}[{b}]", f"must be a string, got {_type_name(choice_id)}")
            if all(c.id != choice_id for c in block.choices):
                known = ", ".join(c.id for c in block.choices)
                raise ProblemError(
                    f"{path}.{name}[{b}]",
                    f"unknown choice id {choice_id!r} for block {block.name!r} (choices: {known})",
                )
        current[name] = tuple(ids)
    return current


def parse_penalty(raw: Any, path: str = "switch_penalty_per_byte") -> float:
    """Validate the objective's cost per switched byte (>= 0; null means 0)."""
    return 0.0 if raw is None else _number(raw, path)


def _load_raw(source: Mapping[str, Any] | str | Path) -> Any:
    if isinstance(source, Path):
        try:
            text = source.read_text(encoding="utf-8")
        except OSError as exc:
            raise ProblemError("problem", f"cannot read problem file {source}: {exc.strerror or exc}") from exc
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ProblemError("problem", f"{source} is not valid JSON: {exc}") from exc
    if isinstance(source, str):
        try:
            return json.loads(source)
        except json.JSONDecodeError as exc:
            raise ProblemError(
                "problem", f"not valid JSON: {exc} (to read a file, pass a pathlib.Path)"
            ) from exc
    return source


def parse_problem(source: Mapping[str, Any] | str | Path) -> Problem:
    """Validate a problem given as a dict, a JSON string, or a Path to a JSON file."""
    obj = _object(
        _load_raw(source),
        "problem",
        {"models"},
        {"budgets", "current", "switch_penalty_per_byte"},
    )
    models = parse_models(obj["models"])
    return Problem(
        models=models,
        budgets=parse_budgets(obj.get("budgets")),
        current=parse_current(obj.get("current"), models),
        switch_penalty_per_byte=parse_penalty(obj.get("switch_penalty_per_byte")),
    )


# ----------------------------------------------------------------------------------------
# Synthetic instances, for the solver's benchmark and tests: one generator, so the tables
# the benchmark times are the tables the tests check against the MILP reference.


def synthetic_problem(
    rng: random.Random, n_models: int, n_blocks: int, n_choices: int, tightness: float
) -> dict[str, Any]:
    """A problem in JSON form shaped like real profile tables, drawn from `rng`.

    Per block the choices follow a sparsity ladder 0 .. 0.8: the accuracy drop grows with
    sparsity (convexly, plus measurement noise, rounded to 1e-4 as a 10k-image validation
    set would) while latency and memory fall. `tightness` in [0, 1] places the latency
    budget that far from the smallest to the largest achievable total (0 = tightest); the
    memory budget sits at 1.2x that fraction, capped at the largest total. Models are named
    `m0, m1, ...`, blocks `b0, b1, ...`; `n_choices` must be >= 2.
    """
    ladder = [round(0.8 * i / (n_choices - 1), 3) for i in range(n_choices)]
    models = []
    for m in range(n_models):
        blocks = []
        for b in range(n_blocks):
            lat0, mem0 = rng.uniform(0.2, 2.0), rng.uniform(2e4, 6e5)
            scale, power, floor = rng.uniform(0.005, 0.08), rng.uniform(1.5, 3.0), rng.uniform(0.1, 0.3)
            choices = []
            for s in ladder:
                drop = 0.0 if s == 0 else max(0.0, scale * s**power + rng.gauss(0.0, 5e-4))
                choices.append(
                    {
                        "id": str(s),
                        "accuracy_drop": round(drop, 4),
                        "latency_ms": lat0 * (floor + (1 - floor) * (1 - s) ** 1.5) * rng.uniform(0.95, 1.05),
                        "memory_bytes": int(mem0 * (1 - 0.9 * s)),
                    }
                )
            blocks.append({"name": f"b{b}", "choices": choices})
        models.append({"name": f"m{m}", "base_accuracy": 0.9, "blocks": blocks})
    every = [b for model in models for b in model["blocks"]]

    def budget(key: str, t: float) -> float:
        lo = sum(min(c[key] for c in b["choices"]) for b in every)
        hi = sum(max(c[key] for c in b["choices"]) for b in every)
        return lo + t * (hi - lo)

    return {
        "models": models,
        "budgets": {
            "latency_ms": budget("latency_ms", tightness),
            "memory_bytes": budget("memory_bytes", min(1.0, 1.2 * tightness)),
        },
    }
