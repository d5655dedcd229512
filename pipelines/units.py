"""The one unit protocol: key, cache lookup, execution, record, progress, for every stage.

`run_stages` walks a stage list in order. For each stage it resolves the inputs (the records
of the stages it needs), asks the stage for its units, derives each unit's cache key from the
stage's typed job (`pipelines.stage.key_view`), the unit's item, the upstream output hashes
and the code version, and hands only the units the cache does not hold to the executor. Every
executor runs a unit through `execute_unit`, so lookup, the temporary output folder, the
thread count, the commit and the record are the same whether a unit runs in this process, in
a Ray task or under Ray Train; observers (the progress view, MLflow) hear about every unit,
cached or executed, in one place.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pipelines.cache import Cache, UnitCounter, UnitRecord, unit_key
from pipelines.stage import Inputs, Item, Placement, Reporter, Stage, UnitContext, UnitRef, key_view


class PipelineError(RuntimeError):
    """A unit failed (after any retries); the message names stage, unit and cause."""


@dataclass(frozen=True)
class UnitTask:
    """One unit to execute: everything `execute_unit` needs, all of it picklable."""

    stage: str
    item: Item
    key: str
    job: Any
    inputs: Inputs
    threads: int


class Observer(Protocol):
    """Hears about every stage and unit (the progress view, live MLflow logging)."""

    def stage_started(self, stage: str, total: int, cached: int) -> None: ...

    def unit_finished(self, stage: str, record: UnitRecord, executed: bool) -> None: ...

    def unit_report(self, stage: str, unit: str, kind: str, values: dict[str, Any]) -> None: ...

    def stage_finished(self, stage: str, executed: int, skipped: int, seconds: float) -> None: ...


class Executor(Protocol):
    """Runs units of one stage; calls `done(index, record)` as each one finishes."""

    def run(self, stage: Stage, tasks: Sequence[UnitTask], cache: Cache,
            done: Callable[[int, UnitRecord], None], report: Callable[[str, str, dict[str, Any]], None]) -> None: ...

    def nodes(self) -> list[dict[str, Any]]: ...

    def close(self) -> None: ...


def execute_unit(cache_root: str | Path, fn: Callable[[UnitContext[Any]], dict[str, Any]], task: UnitTask, *,
                 report: Reporter | None = None, where: tuple[str | None, str | None] = (None, None)) -> UnitRecord:
    """Run one unit: fill a temporary folder, commit it, return the record.

    The torch thread count is set to the unit's (and restored), so a unit computes the same
    bits in a Ray worker and in this process, and the process keeps freed memory
    (`pipelines.allocator`: no page faults per op on large activations). A retried attempt
    whose predecessor committed after all returns that record.

    Args:
        cache_root: the work directory's cache.
        fn: the unit function (`Stage.fn`, or `Stage.ray_fn` under Ray).
        task: the unit.
        report: where the unit's live facts go.
        where: (node id, task id) for the record.
    """
    import torch

    from pipelines.allocator import keep_freed_memory

    cache = Cache(cache_root)
    existing = cache.lookup(task.stage, task.key)
    if existing is not None:
        return existing
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, task.threads))
    keep_freed_memory()
    started = time.perf_counter()
    tmp = cache.begin(task.stage, task.key)
    try:
        ctx = UnitContext(out=tmp, job=task.job, item=task.item, inputs=task.inputs,
                          report=report or (lambda kind, values: None), key=task.key)
        meta = fn(ctx) or {}
        record = UnitRecord(stage=task.stage, unit=task.item.name, key=task.key, outputs={}, meta=meta,
                            node_id=where[0], task_id=where[1], seconds=time.perf_counter() - started,
                            keyed={"job": key_view(task.job), "item": task.item.payload})
        return cache.commit(tmp, record)
    except BaseException:
        cache.abort(tmp)
        raise
    finally:
        torch.set_num_threads(threads)


def ref_of(cache: Cache, record: UnitRecord) -> UnitRef:
    return UnitRef(unit=record.unit, dir=cache.unit_dir(record.stage, record.key), meta=record.meta)


@dataclass
class StageRun:
    """What `run_stages` produced: every stage's records (in unit order) and the counts."""

    records: dict[str, list[UnitRecord]] = field(default_factory=dict)
    counter: UnitCounter = field(default_factory=UnitCounter)
    skipped_stages: list[str] = field(default_factory=list)

    def inputs(self, cache: Cache, stages: Sequence[str]) -> Inputs:
        return Inputs({s: [ref_of(cache, r) for r in self.records[s]] for s in stages if s in self.records})


class UnitRunner:
    """Runs a stage list through an executor, unit by unit, with caching and observers.

    Args:
        cache: the work directory's cache.
        code: the code version every key includes.
        executor: where units run (`pipelines.executors`).
        observers: told about every stage and unit.
        threads: torch threads of every unit.
    """

    def __init__(self, cache: Cache, code: str, executor: Executor, *, observers: Sequence[Observer] = (),
                 threads: int = 1) -> None:
        self.cache = cache
        self.code = code
        self.executor = executor
        self.observers = list(observers)
        self.threads = threads

    def key(self, stage: Stage, item: Item, job: Any, upstream: Sequence[UnitRecord]) -> str:
        config = {"job": key_view(job), "item": item.payload}
        # Sorted by (stage, unit): a key never depends on the order records were listed in.
        digests = [r.digest() for r in sorted(upstream, key=lambda r: (r.stage, r.unit))]
        return unit_key(stage.name, item.name, config, digests, self.code)

    def run(self, stages: Sequence[Stage], cfg: Any, facts: Any, result: StageRun | None = None) -> StageRun:
        """Run (or find cached) every unit of `stages`, in order; returns all records.

        A stage that is not enabled is skipped; its `passthrough` stage's records stand in
        for it. `result` continues an earlier run (its records are inputs here).
        """
        result = result or StageRun()
        for stage in stages:
            keyed_by = stage.keyed_by if stage.keyed_by is not None else stage.needs
            upstream_records = [r for s in keyed_by for r in result.records.get(s, [])]
            missing = [s for s in stage.needs if s not in result.records]
            if missing:
                raise ValueError(f"stage {stage.name!r} needs {missing}, which did not run before it")
            inputs = result.inputs(self.cache, stage.needs)
            if not stage.runs(cfg, inputs):
                result.skipped_stages.append(stage.name)
                result.records[stage.name] = (result.records[stage.passthrough]
                                              if stage.passthrough is not None else [])
                continue
            result.records[stage.name] = self.run_stage(stage, stage.job(cfg, facts), inputs, upstream_records,
                                                        stage.units(cfg, inputs), result.counter)
        return result

    def run_stage(self, stage: Stage, job: Any, inputs: Inputs, upstream: Sequence[UnitRecord],
                  items: Sequence[Item], counter: UnitCounter) -> list[UnitRecord]:
        names = [i.name for i in items]
        if len(set(names)) != len(names):
            raise ValueError(f"stage {stage.name}: unit names must be unique, got {names}")
        keys = [self.key(stage, item, job, upstream) for item in items]
        records: list[UnitRecord | None] = [self.cache.lookup(stage.name, k) for k in keys]
        todo = [i for i, r in enumerate(records) if r is None]
        started = time.perf_counter()
        for obs in self.observers:
            obs.stage_started(stage.name, len(items), len(items) - len(todo))
        for i, record in enumerate(records):
            if record is not None:
                for obs in self.observers:
                    obs.unit_finished(stage.name, record, False)
        tasks = [UnitTask(stage.name, items[i], keys[i], job, inputs, self.threads) for i in todo]

        def done(index: int, record: UnitRecord) -> None:
            records[todo[index]] = record
            for obs in self.observers:
                obs.unit_finished(stage.name, record, True)

        def report(unit: str, kind: str, values: dict[str, Any]) -> None:
            for obs in self.observers:
                obs.unit_report(stage.name, unit, kind, values)

        if tasks:
            if stage.placement is Placement.DRIVER:
                for index, task in enumerate(tasks):
                    done(index, _driver_unit(self.cache, stage, task, report))
            else:
                self.executor.run(stage, tasks, self.cache, done, report)
        for i in range(len(items)):
            counter.add(stage.name, executed=i in todo)
        for obs in self.observers:
            obs.stage_finished(stage.name, len(todo), len(items) - len(todo), time.perf_counter() - started)
        return [r for r in records if r is not None]


def _driver_unit(cache: Cache, stage: Stage, task: UnitTask,
                 report: Callable[[str, str, dict[str, Any]], None]) -> UnitRecord:
    try:
        return execute_unit(cache.root, stage.fn, task, report=lambda kind, values: report(task.item.name, kind, values))
    except Exception as exc:
        raise PipelineError(f"stage {stage.name!r}, unit {task.item.name!r} failed: {type(exc).__name__}: {exc}") from exc
