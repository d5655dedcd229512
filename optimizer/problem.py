"""The scaling problem: its JSON form, validated into frozen typed records.

The optimizer's input is produced by other programs (profiling, the device fetch script)
and edited by hand, so validation is strict and every error names the exact place
(`models[1].blocks[3].choices[0].latency_ms: expected a number >= 0.0`) and what is
expected. Field types and ranges are checked by `legoblocks.schema.convert` (msgspec);
what spans fields (unique names and ids, selections that must name existing choices) is
checked here with the same path style. After `parse_problem` the solver can trust every
number: finite, non-negative where a cost, ids unique, `current` and every composition
consistent with the blocks.

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
         ],
         "compositions": [{"selection": ["0.0"], "accuracy": 0.915}]}
      ],
      "budgets": {"latency_ms": null, "memory_bytes": null, "switch_bytes": null},
      "current": null,
      "switch_penalty_per_byte": 0.0
    }

`load_bytes` defaults to `memory_bytes`. `accuracy_drop` may be negative (a retrained
descendant can measure slightly better than the original on a finite validation set);
every cost, budget, deadline and the penalty must be >= 0. A model absent from `current`
is not running, so its blocks cost nothing to switch.

**Compositions** are whole-model selections whose accuracy was measured (the original
model, trained anchors, re-ranked picks). Under selection s a model is worth the measured
`accuracy` if s is one of its compositions (the highest, if s is listed twice), else
`base_accuracy - sum(accuracy_drop)`; latency, memory and switching costs are the sum of
the chosen choices either way.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping
from operator import attrgetter
from pathlib import Path
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from legoblocks.schema import Finite, convert

__all__ = [
    "Block",
    "Budgets",
    "Choice",
    "Composition",
    "Model",
    "Problem",
    "ProblemError",
    "parse_budgets",
    "parse_current",
    "parse_models",
    "parse_penalty",
    "parse_problem",
    "synthetic_budgets",
    "synthetic_problem",
]

_MAX = 1.7976931348623157e308
Cost = Annotated[float, Meta(ge=0.0, le=_MAX)]
"""A finite number >= 0 (NaN fails every comparison)."""
Positive = Annotated[float, Meta(gt=0.0, le=_MAX)]
Name = Annotated[str, Meta(min_length=1)]
_CHOICE_ID = attrgetter("id")  # a choice's id, read in C while checking that a block's ids are distinct


class ProblemError(ValueError):
    """An invalid scaling problem; `path` names the offending field (`models[0].name`)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


class Choice(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    """One descendant of a block: its predicted accuracy cost and its resource costs.

    `load_bytes` (what switching to it loads) is `memory_bytes` unless given. It is kept
    as given (`load`: JSON key "load_bytes", None when absent) and resolved on access, so
    that parsing a table of hundreds of choices runs no Python code per choice. Holding
    only strings and numbers, a choice is never part of a reference cycle: the garbage
    collector does not track it (`gc=False`).
    """

    id: Name
    accuracy_drop: Finite
    latency_ms: Cost
    memory_bytes: Cost
    load: Cost | None = msgspec.field(default=None, name="load_bytes")

    @property
    def load_bytes(self) -> float:
        """Bytes loaded when switching to this choice (`memory_bytes` unless given)."""
        return self.memory_bytes if self.load is None else self.load


class Block(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: Name
    choices: Annotated[tuple[Choice, ...], Meta(min_length=1)]

    def index_of(self, choice_id: str) -> int:
        for i, choice in enumerate(self.choices):
            if choice.id == choice_id:
                return i
        raise KeyError(choice_id)


class Composition(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A whole-model selection (one choice id per block) and its measured absolute accuracy."""

    selection: tuple[str, ...]
    accuracy: Cost


class Model(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: Name
    blocks: Annotated[tuple[Block, ...], Meta(min_length=1)]
    base_accuracy: Cost = 0.0
    weight: Positive = 1.0
    latency_deadline_ms: Cost | None = None
    compositions: tuple[Composition, ...] = ()

    def measured(self) -> dict[tuple[str, ...], float]:
        """Measured accuracy by selection (the highest where one is listed twice)."""
        out: dict[tuple[str, ...], float] = {}
        for comp in self.compositions:
            out[comp.selection] = max(comp.accuracy, out.get(comp.selection, -math.inf))
        return out


class Budgets(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Shared device budgets; None means unconstrained."""

    latency_ms: Cost | None = None
    memory_bytes: Cost | None = None
    switch_bytes: Cost | None = None


class Problem(msgspec.Struct, frozen=True):
    """A validated scaling problem. `current` maps a running model to its selection."""

    models: tuple[Model, ...]
    budgets: Budgets = Budgets()
    current: Mapping[str, tuple[str, ...]] | None = None
    switch_penalty_per_byte: float = 0.0

    def model(self, name: str) -> Model:
        for model in self.models:
            if model.name == name:
                return model
        raise KeyError(name)

    def replace(self, **changes: Any) -> Problem:
        """A copy with some fields changed (e.g. `budgets=`), not validated again."""
        return msgspec.structs.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form; `parse_problem(p.to_dict()) == p`."""
        return msgspec.to_builtins(self)


class _ProblemJSON(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The top-level object as written; `current` is checked against the models by hand."""

    models: Annotated[tuple[Model, ...], Meta(min_length=1)]
    budgets: Budgets | None = None
    current: Any = None
    switch_penalty_per_byte: Cost | None = None


_FIELDS = {
    "choices": Choice,
    "blocks": Block,
    "compositions": Composition,
    "models": Model,
    "budgets": Budgets,
    "problem": _ProblemJSON,
}


def _error(path: str, message: str) -> ProblemError:
    """A `ProblemError` from a schema mismatch, saying which keys an object allows and that
    costs must be finite."""
    where = path or "problem"
    if message.startswith("unknown field"):
        kind = where.rsplit(".", 1)[-1].split("[", 1)[0]
        if kind in _FIELDS:
            message += f" (allowed: {', '.join(sorted(_FIELDS[kind].__struct_encode_fields__))})"
    return ProblemError(where, message.replace("expected a number >= 0.0", "expected a finite number >= 0"))


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _first_repeat(names: list[str]) -> tuple[int, int] | None:
    """(index of the first repeated name, index of its first occurrence), or None."""
    if len(set(names)) == len(names):
        return None
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            return i, seen[name]
        seen[name] = i
    return None


def _check_selection(ids: Any, model: Model, path: str) -> tuple[str, ...]:
    """A list with one existing choice id per block of `model`, in block order."""
    if not isinstance(ids, (list, tuple)):
        raise ProblemError(path, f"must be a list of choice ids, got {_type_name(ids)}")
    if len(ids) != len(model.blocks):
        raise ProblemError(
            path,
            f"has {len(ids)} choice ids but model {model.name!r} has {len(model.blocks)} blocks; "
            "give one id per block, in block order",
        )
    for b, (block, choice_id) in enumerate(zip(model.blocks, ids)):
        if not isinstance(choice_id, str):
            raise ProblemError(f"{path}[{b}]", f"must be a string, got {_type_name(choice_id)}")
        if all(c.id != choice_id for c in block.choices):
            known = ", ".join(c.id for c in block.choices)
            raise ProblemError(
                f"{path}[{b}]", f"unknown choice id {choice_id!r} for block {block.name!r} (choices: {known})"
            )
    return tuple(ids)


def _check_models(models: tuple[Model, ...], path: str) -> None:
    """Names and ids unique where selections address items by them; compositions valid."""
    repeat = _first_repeat([m.name for m in models])
    if repeat:
        i, j = repeat
        raise ProblemError(f"{path}[{i}].name", f"duplicate model name {models[i].name!r} (also models[{j}])")
    for m, model in enumerate(models):
        where = f"{path}[{m}]"
        repeat = _first_repeat([b.name for b in model.blocks])
        if repeat:
            i, j = repeat
            raise ProblemError(
                f"{where}.blocks[{i}].name", f"duplicate block name {model.blocks[i].name!r} (also blocks[{j}])"
            )
        for b, block in enumerate(model.blocks):
            if len(set(map(_CHOICE_ID, block.choices))) == len(block.choices):
                continue
            repeat = _first_repeat([c.id for c in block.choices])
            if repeat:
                i, j = repeat
                raise ProblemError(
                    f"{where}.blocks[{b}].choices[{i}].id",
                    f"duplicate choice id {block.choices[i].id!r} (also choices[{j}])",
                )
        for c, comp in enumerate(model.compositions):
            _check_selection(comp.selection, model, f"{where}.compositions[{c}].selection")


def parse_models(raw: Any, path: str = "models") -> tuple[Model, ...]:
    """Validate a list of model objects (the part of a problem that does not change with budgets)."""
    models = convert(raw, Annotated[tuple[Model, ...], Meta(min_length=1)], error=_error, path=path)
    _check_models(models, path)
    return models


def parse_budgets(raw: Any, path: str = "budgets") -> Budgets:
    """Validate a budgets object; missing keys and nulls mean unconstrained."""
    return Budgets() if raw is None else convert(raw, Budgets, error=_error, path=path)


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
            raise ProblemError(f"{path}.{name}", f"unknown model {name!r} (models: {', '.join(by_name)})")
        current[name] = _check_selection(ids, by_name[name], f"{path}.{name}")
    return current


def parse_penalty(raw: Any, path: str = "switch_penalty_per_byte") -> float:
    """Validate the objective's cost per switched byte (>= 0; null means 0)."""
    return 0.0 if raw is None else convert(raw, Cost, error=_error, path=path)


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
    """Validate a problem given as a dict, a JSON string, or a Path to a JSON file.

    Raises:
        ProblemError: naming the field path and what is expected there.
    """
    raw = convert(_load_raw(source), _ProblemJSON, error=_error)
    _check_models(raw.models, "models")
    return Problem(
        models=raw.models,
        budgets=raw.budgets or Budgets(),
        current=parse_current(raw.current, raw.models),
        switch_penalty_per_byte=raw.switch_penalty_per_byte or 0.0,
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
    return {"models": models, "budgets": synthetic_budgets(models, tightness)}


def synthetic_budgets(models: list[dict[str, Any]], tightness: float) -> dict[str, float]:
    """The budgets `synthetic_problem` sets for its models (JSON form) at `tightness`: the
    latency budget that far from the smallest to the largest total, memory at 1.2x that
    fraction (capped at the largest total)."""
    every = [b for model in models for b in model["blocks"]]

    def budget(key: str, t: float) -> float:
        lo = sum(min(c[key] for c in b["choices"]) for b in every)
        hi = sum(max(c[key] for c in b["choices"]) for b in every)
        return lo + t * (hi - lo)

    return {"latency_ms": budget("latency_ms", tightness), "memory_bytes": budget("memory_bytes", min(1.0, 1.2 * tightness))}
