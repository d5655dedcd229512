"""Run units of work as Ray tasks, skipping the ones the cache already holds.

The driver computes each unit's content address, looks it up, and submits only the missing
ones as Ray tasks with declared `num_cpus` and `max_retries`. Tasks receive small arguments
(paths into the work directory and config sections); tensors travel as files there, never
re-pickled into every task. A task writes its outputs through `Cache.begin/commit`, so an
attempt killed half-way leaves nothing that looks done and Ray's retry starts clean.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from pipelines.cache import Cache, UnitCounter, UnitRecord, unit_key
from pipelines.progress import PipelineProgress

StageFn = Callable[..., dict[str, Any]]


class PipelineError(RuntimeError):
    """A unit failed (after Ray's retries); the message names stage, unit and cause."""


class RayUnreachableError(ConnectionError):
    """The configured Ray cluster cannot be reached; says which address and what to do."""


@dataclass
class Unit:
    """One unit of work: `fn(out_dir, **kwargs) -> meta` run in a Ray task.

    `config` and `upstream` are what the cache key hashes; `kwargs` is what the task gets
    (it may name upstream directories, which are themselves content-addressed).
    """

    name: str
    fn: StageFn
    kwargs: dict[str, Any]
    config: Any
    upstream: Sequence[UnitRecord] = ()
    num_cpus: float | None = None


@dataclass
class StageResult:
    stage: str
    records: list[UnitRecord]
    executed: list[str] = field(default_factory=list)


def _local_ray_env() -> None:
    """Settings for a Ray this process starts itself: no token auth, and loopback only.

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes Ray use 127.0.0.1 as the node address, so a
    local run opens no port outside loopback. Only for a local Ray: a driver joining a
    cluster must advertise its real address, and takes the cluster's settings as they are.
    Values already in the environment win.
    """
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def check_ray_address(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast (TCP connect) instead of letting ray.init retry for a minute."""
    if address in ("auto", "local"):
        return
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    host, port = parsed.hostname, parsed.port
    if not host or not port:
        raise RayUnreachableError(
            f"Ray address {address!r} is not host:port (or ray://host:port); "
            "set RAY_ADDRESS / --ray-address to a running cluster's GCS address, or unset it to run locally"
        )
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        raise RayUnreachableError(
            f"Ray cluster at {address} is unreachable ({exc}); start it (`ray start --head` or "
            "`ray up ray_cluster.yaml`), fix RAY_ADDRESS / --ray-address, or unset both to run on a local Ray"
        ) from exc


def connect_ray(address: str | None, *, local_num_cpus: int | None = None) -> bool:
    """Connect to `address` (or RAY_ADDRESS) or start a local Ray on 127.0.0.1.

    Returns True when this call started Ray (the caller then shuts it down). Under
    `ray job submit` RAY_ADDRESS is set for us and the same code joins the cluster.
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        check_ray_address(address)
        try:
            ray.init(address=address, logging_level="WARNING", log_to_driver=True)
        except (ConnectionError, RuntimeError) as exc:
            raise RayUnreachableError(f"could not join the Ray cluster at {address}: {exc}") from exc
        return True
    _local_ray_env()
    # Task failures reach the driver as exceptions; forwarding worker logs would only add
    # Ray Train's periodic "PlacementGroupCleaner ... State API" noise to the live view.
    # They stay in /tmp/ray/session_latest/logs.
    ray.init(
        num_cpus=local_num_cpus,
        include_dashboard=False,
        logging_level="WARNING",
        log_to_driver=False,
    )
    return True


def _execute(cache_root: str, stage: str, unit: str, key: str, fn: StageFn,
             kwargs: dict[str, Any], num_cpus: float) -> dict[str, Any]:
    """The body of every Ray task: fill a temp dir, commit it, return the record."""
    import ray
    import torch

    cache = Cache(cache_root)
    existing = cache.lookup(stage, key)
    if existing is not None:  # a retried attempt whose predecessor committed after all
        return existing.to_dict()
    # Worker processes are reused across tasks: pin the thread count each task declared.
    torch.set_num_threads(max(1, int(num_cpus)))
    ctx = ray.get_runtime_context()
    start = time.perf_counter()
    tmp = cache.begin(stage, key)
    try:
        meta = fn(tmp, **kwargs) or {}
        record = UnitRecord(
            stage=stage, unit=unit, key=key, outputs={}, meta=meta,
            node_id=ctx.get_node_id(), task_id=ctx.get_task_id(),
            seconds=time.perf_counter() - start,
        )
        return cache.commit(tmp, record).to_dict()
    except BaseException:
        cache.abort(tmp)
        raise


class RayRunner:
    """Submits units as Ray tasks; counts executed vs cached units per stage."""

    def __init__(
        self,
        cache: Cache,
        code: str,
        *,
        ray_address: str | None = None,
        local_num_cpus: int | None = None,
        num_cpus: float = 1.0,
        max_retries: int = 3,
        scheduling: str = "DEFAULT",
        progress: PipelineProgress | None = None,
        counter: UnitCounter | None = None,
    ) -> None:
        self.cache = cache
        self.code = code
        self.num_cpus = num_cpus
        self.max_retries = max_retries
        self.scheduling = scheduling
        self.progress = progress or PipelineProgress(live=False)
        self.counter = counter or UnitCounter()
        self.ray_address = ray_address
        self.local_num_cpus = local_num_cpus
        self.started_ray = False
        self._remote: Any = None

    def ensure_ray(self) -> None:
        """Connect on first need: a run whose units are all cached never starts Ray."""
        if connect_ray(self.ray_address, local_num_cpus=self.local_num_cpus):
            self.started_ray = True

    def nodes(self) -> list[dict[str, Any]]:
        """The cluster's live nodes (id and resources), or [] when Ray was never needed."""
        import ray

        if not ray.is_initialized():
            return []
        return [
            {"node_id": n["NodeID"], "address": n.get("NodeManagerAddress"), "resources": n.get("Resources", {})}
            for n in ray.nodes() if n.get("Alive")
        ]

    def shutdown(self) -> None:
        """Stop the Ray this runner started (a joined cluster is left running)."""
        import ray

        if self.started_ray:
            ray.shutdown()
            self.started_ray = False

    def key(self, stage: str, unit: Unit) -> str:
        return unit_key(stage, unit.name, unit.config, [r.digest() for r in unit.upstream], self.code)

    def run_stage(self, stage: str, units: Sequence[Unit]) -> StageResult:
        """Run the missing units of one stage in parallel; return all records in unit order."""
        import ray

        names = [u.name for u in units]
        if len(set(names)) != len(names):
            raise ValueError(f"stage {stage}: unit names must be unique, got {names}")
        keys = [self.key(stage, u) for u in units]
        records: list[UnitRecord | None] = [self.cache.lookup(stage, k) for k in keys]
        todo = [i for i, r in enumerate(records) if r is None]
        self.progress.start_stage(stage, total=len(units), cached=len(units) - len(todo))
        if todo:
            self.ensure_ray()
            if self._remote is None:
                self._remote = ray.remote(_execute)
        pending: dict[Any, int] = {}
        for i in todo:
            unit = units[i]
            cpus = unit.num_cpus if unit.num_cpus is not None else self.num_cpus
            ref = self._remote.options(
                num_cpus=cpus,
                max_retries=self.max_retries,
                scheduling_strategy=self.scheduling,
                name=f"{stage}:{unit.name}",
            ).remote(str(self.cache.root), stage, unit.name, keys[i], unit.fn, unit.kwargs, cpus)
            pending[ref] = i
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    i = pending.pop(ref)
                    try:
                        records[i] = UnitRecord.from_dict(ray.get(ref))
                    except Exception as exc:  # noqa: BLE001 - re-raised with the unit named
                        raise PipelineError(
                            f"stage {stage!r}, unit {units[i].name!r} failed: {_root_cause(exc)}"
                        ) from exc
                    self.progress.advance(stage)
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
        for i in range(len(units)):
            self.counter.add(stage, executed=i in todo)
        self.progress.end_stage(stage, executed=len(todo), skipped=len(units) - len(todo))
        return StageResult(stage, [r for r in records if r is not None], [units[i].name for i in todo])


def _root_cause(exc: BaseException) -> str:
    """The user's exception, not Ray's wrapper: RayTaskError carries it as `.cause`."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}"
    return f"{type(exc).__name__}: {exc}"
