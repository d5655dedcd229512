"""What a stage of the recipe is: a typed function, its typed job, its inputs and its fan-out.

A stage is declared once (`pipelines.recipe.STAGES`) as a `Stage`: the function that does the
work, how its typed job is built from the config (the job is the only config the function
sees, and exactly what its cache key hashes), the stages whose outputs it reads, and how it
fans out into units (one per model, per block, per chunk of compositions, per budget). Every
executor (Ray, in-process) runs units through the same protocol (`pipelines.units`), so the
stage functions know nothing about Ray, caching or MLflow.

A unit function has the form `fn(ctx: UnitContext) -> dict`: it reads its job
(`ctx.job`), its item (`ctx.item`, e.g. the block) and the upstream units' output folders
(`ctx.inputs`), writes its files under `ctx.out` (a temporary folder the cache commits
atomically) and returns a small JSON-able dict of facts for the summary and MLflow.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

J = TypeVar("J")

NOT_KEYED = {"key": False}
"""Field metadata: a job field that does not change the unit's output (a path to the same
content, a thread count), so it stays out of the cache key."""


class Placement(enum.Enum):
    """Where a unit runs: a task (a Ray task, or the calling process), a distributed training
    job (Ray Train; the calling process in-process), or always the driver (I/O to one store)."""

    TASK = "task"
    TRAIN = "train"
    DRIVER = "driver"


@dataclass(frozen=True)
class Item:
    """One unit of a stage: `name` is unique within the stage (a block name, "chunk003");
    `payload` is JSON-able data the unit needs beyond the job (it is part of the key)."""

    name: str
    payload: Any = None


@dataclass(frozen=True)
class UnitRef:
    """A finished upstream unit as a stage function sees it."""

    unit: str
    dir: Path
    meta: Mapping[str, Any]


@dataclass(frozen=True)
class Inputs:
    """The finished units of the stages a stage needs, by stage name, in unit order."""

    units: Mapping[str, Sequence[UnitRef]] = field(default_factory=dict)

    def one(self, stage: str) -> UnitRef:
        (only,) = self.units[stage]
        return only

    def all(self, stage: str) -> list[UnitRef]:
        return list(self.units.get(stage, ()))

    def by_unit(self, stage: str) -> dict[str, UnitRef]:
        return {u.unit: u for u in self.units.get(stage, ())}


Reporter = Callable[[str, dict[str, Any]], None]
"""`report(kind, values)`: live facts of a running unit (e.g. ("epoch", {"loss": 0.3}))."""


def _no_report(kind: str, values: dict[str, Any]) -> None:
    return None


@dataclass
class UnitContext(Generic[J]):
    """Everything a unit function gets: where to write, its job, its item and its inputs."""

    out: Path
    job: J
    item: Item
    inputs: Inputs
    report: Reporter = _no_report
    key: str = ""


@dataclass(frozen=True)
class Stage:
    """One stage of the recipe, declared once.

    Args:
        name: the stage's name (cache folder, progress line, summary).
        fn: the unit function.
        job: builds the stage's typed job from the config and the preflight facts.
        needs: stages whose finished units this one reads (they key its units too).
        items: the stage's units, from the config and its inputs (default: one unit).
        fanout: what one unit is, for readers: "model", "block", "chunk" or "budget".
        placement: where its units run (see `Placement`).
        enabled: whether the stage runs at all; when it does not, `passthrough` names the
            stage whose units downstream stages read in its place.
        ray_fn: the unit function under the Ray executor when it differs from `fn` (the joint
            stage as a Ray Train job); it must write the same outputs.
        keyed_by: the needed stages whose outputs key the units (default: all of `needs`); a
            stage read only to plan the units (whose plan is in the item) can stay out.
    """

    name: str
    fn: Callable[[UnitContext[Any]], dict[str, Any]]
    job: Callable[[Any, Any], Any]
    needs: tuple[str, ...] = ()
    items: Callable[[Any, Inputs], list[Item]] | None = None
    fanout: str = "model"
    placement: Placement = Placement.TASK
    enabled: Callable[[Any, Inputs], bool] | None = None
    passthrough: str | None = None
    ray_fn: Callable[[UnitContext[Any]], dict[str, Any]] | None = None
    keyed_by: tuple[str, ...] | None = None

    def units(self, cfg: Any, inputs: Inputs) -> list[Item]:
        return self.items(cfg, inputs) if self.items is not None else [Item(self.name)]

    def runs(self, cfg: Any, inputs: Inputs) -> bool:
        return self.enabled(cfg, inputs) if self.enabled is not None else True


def key_view(job: Any) -> Any:
    """The part of a job that keys the cache: every field but those marked `NOT_KEYED`."""
    if dataclasses.is_dataclass(job) and not isinstance(job, type):
        return {
            f.name: key_view(getattr(job, f.name))
            for f in dataclasses.fields(job)
            if f.metadata.get("key", True)
        }
    if isinstance(job, Mapping):
        return {str(k): key_view(v) for k, v in job.items()}
    if isinstance(job, (list, tuple)):
        return [key_view(v) for v in job]
    if isinstance(job, Path):
        return str(job)
    return job
