"""Run units as Ray tasks (and the joint stage as a Ray Train job).

Tasks receive small arguments (the unit's job, item and the paths of its inputs in the work
directory); tensors travel as files there, never re-pickled into every task. A task writes its
outputs through the cache's temporary folder and commit, so an attempt killed half-way leaves
nothing that looks done and Ray's retry starts clean. Live facts a task reports (a loss per
epoch) come back through a `ray.util.queue.Queue` the driver drains while it waits.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlparse

from pipelines.cache import Cache, UnitRecord
from pipelines.stage import Placement, Stage
from pipelines.units import PipelineError, UnitTask, execute_unit


class RayUnreachableError(ConnectionError):
    """The configured Ray cluster cannot be reached; says which address and what to do."""


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
    ray.init(num_cpus=local_num_cpus, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    return True


def _ray_unit(cache_root: str, fn: Callable[..., dict[str, Any]], task: UnitTask, queue: Any) -> dict[str, Any]:
    """The body of every Ray task."""
    import ray

    ctx = ray.get_runtime_context()

    def report(kind: str, values: dict[str, Any]) -> None:
        if queue is not None:
            try:
                queue.put_nowait((task.item.name, kind, values))
            except Exception:  # noqa: BLE001 - live facts are best effort; the unit's result is not
                pass

    record = execute_unit(cache_root, fn, task, report=report, where=(ctx.get_node_id(), ctx.get_task_id()))
    return record.to_dict()


def _root_cause(exc: BaseException) -> str:
    """The user's exception, not Ray's wrapper: RayTaskError carries it as `.cause`."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}"
    return f"{type(exc).__name__}: {exc}"


class RayExecutor:
    """Submits units as Ray tasks with declared CPUs, retries and scheduling strategy.

    Ray starts (or is joined) on the first unit that must execute: a run whose units are all
    cached never starts Ray.

    Args:
        address: the cluster to join (None: RAY_ADDRESS, else a local Ray on 127.0.0.1).
        local_num_cpus: CPUs of a local Ray (None: all cores).
        num_cpus: CPUs every task declares (and its torch threads).
        max_retries: retries of a task whose worker died.
        scheduling: "DEFAULT" or "SPREAD".
    """

    def __init__(self, *, address: str | None = None, local_num_cpus: int | None = None, num_cpus: float = 1.0,
                 max_retries: int = 3, scheduling: str = "DEFAULT") -> None:
        self.address = address
        self.local_num_cpus = local_num_cpus
        self.num_cpus = num_cpus
        self.max_retries = max_retries
        self.scheduling = scheduling
        self.started_ray = False
        self._remote: Any = None
        self._queue: Any = None

    def ensure_ray(self) -> None:
        if connect_ray(self.address, local_num_cpus=self.local_num_cpus):
            self.started_ray = True

    def run(self, stage: Stage, tasks: Sequence[UnitTask], cache: Cache,
            done: Callable[[int, UnitRecord], None], report: Callable[[str, str, dict[str, Any]], None]) -> None:
        self.ensure_ray()
        if stage.placement is Placement.TRAIN and stage.ray_fn is not None:
            for index, task in enumerate(tasks):  # Ray Train schedules its own workers
                try:
                    record = execute_unit(cache.root, stage.ray_fn, task,
                                          report=lambda kind, values, u=task.item.name: report(u, kind, values),
                                          where=(None, "ray-train"))
                except Exception as exc:  # noqa: BLE001 - Ray Train wraps worker errors; name the stage
                    raise PipelineError(
                        f"stage {stage.name!r} (Ray Train) failed: {type(exc).__name__}: {exc}") from exc
                done(index, record)
            return
        self._run_tasks(stage, tasks, cache, done, report)

    def _run_tasks(self, stage: Stage, tasks: Sequence[UnitTask], cache: Cache,
                   done: Callable[[int, UnitRecord], None], report: Callable[[str, str, dict[str, Any]], None]) -> None:
        import ray
        from ray.util.queue import Empty, Queue

        if self._remote is None:
            self._remote = ray.remote(_ray_unit)
        if self._queue is None:
            self._queue = Queue(maxsize=10_000, actor_options={"num_cpus": 0})
        pending: dict[Any, int] = {}
        for index, task in enumerate(tasks):
            ref = self._remote.options(
                num_cpus=self.num_cpus, max_retries=self.max_retries, scheduling_strategy=self.scheduling,
                name=f"{stage.name}:{task.item.name}",
            ).remote(str(cache.root), stage.fn, task, self._queue)
            pending[ref] = index

        def drain() -> None:
            while True:
                try:
                    unit, kind, values = self._queue.get_nowait()
                except Empty:
                    return
                report(unit, kind, values)

        try:
            while pending:
                finished, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
                drain()
                for ref in finished:
                    index = pending.pop(ref)
                    try:
                        record = UnitRecord.from_dict(ray.get(ref))
                    except Exception as exc:  # noqa: BLE001 - re-raised with the unit named
                        raise PipelineError(
                            f"stage {stage.name!r}, unit {tasks[index].item.name!r} failed: {_root_cause(exc)}"
                        ) from exc
                    done(index, record)
            drain()
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)

    def nodes(self) -> list[dict[str, Any]]:
        """The cluster's live nodes (id and resources), or [] when Ray was never needed."""
        import ray

        if not ray.is_initialized():
            return []
        return [
            {"node_id": n["NodeID"], "address": n.get("NodeManagerAddress"), "resources": n.get("Resources", {})}
            for n in ray.nodes() if n.get("Alive")
        ]

    def close(self) -> None:
        """Stop the Ray this executor started (a joined cluster is left running)."""
        import ray

        if self._queue is not None and ray.is_initialized():
            try:
                ray.kill(self._queue.actor)
            except Exception:  # noqa: BLE001 - shutting down anyway
                pass
            self._queue = None
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False
