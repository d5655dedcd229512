"""The joint stage (legoblocks/joint.py) as a Ray Train `TorchTrainer` job (the Ray executor's
form of `pipelines.recipe.train.joint`).

The joint stage trains descendants inside composed models for a few hundred steps, longer
than any other unit, so it is the one stage worth checkpointing mid-way: every
`checkpoint_every` steps rank 0 reports a checkpoint (the `JointTrainer` state, a plain dict
of tensors read back with `weights_only=True`). A worker that dies is restarted by Ray Train
(`FailureConfig.max_failures`) and resumes from the latest checkpoint; a driver that dies
and is restarted runs a trainer with the same `RunConfig(name, storage_path)`, which Ray
Train V2 restores from the same checkpoints. Data parallel runs use `JointTrainer`'s own
flat all-reduce over gloo (the model changes shape every step, so no DDP wrapper).
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

STATE_FILE = "joint_state.pt"
# Test hook: "<step>:<marker file>" makes a worker exit once, right after reporting `step`.
FAIL_ENV = "LEGODNN_TEST_JOINT_FAIL_ONCE"


@dataclass
class JointRun:
    """What the joint job did: losses per step, where it resumed from, who ran it."""

    steps: int
    losses: list[float]
    seconds: float
    resumed_from_step: int
    node_ids: list[str] = field(default_factory=list)
    state_path: str = ""


def _maybe_fail(step: int) -> None:
    spec = os.environ.get(FAIL_ENV)
    if not spec:
        return
    at, _, marker = spec.partition(":")
    if step != int(at):
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    # Ray Train's controller registers a reported checkpoint when it next polls the workers
    # (every 2 s); die after that, as a worker killed some time after a checkpoint would.
    time.sleep(6)
    os._exit(1)


def train_loop(config: dict[str, Any]) -> None:
    """The per-worker loop: load the model, resume from the last checkpoint, train, report."""
    import ray.train
    import torch
    import torch.distributed as dist

    from legoblocks.compose import ScalableModel
    from legoblocks.joint import JointTrainer, load_state_file, save_state
    from pipelines.allocator import keep_freed_memory
    from pipelines.data import load_splits
    from pipelines.recipe.train import REPORT_EVERY

    job = config["job"]
    torch.set_num_threads(max(1, int(job.threads)))
    keep_freed_memory()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    model = ScalableModel.load(config["model_dir"])
    trainer = JointTrainer(model, load_splits(job.data).train, job.joint, rank=rank, world_size=world,
                           num_workers=job.data.workers)
    resumed_from = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            trainer.load_state(load_state_file(Path(folder) / STATE_FILE))
        resumed_from = trainer.step_count
    node_id = ray.get_runtime_context().get_node_id()
    queue = config.get("queue")
    def relay(info: Any) -> None:  # a denser live loss curve than one point per checkpoint
        if queue is not None and rank == 0 and info.step % REPORT_EVERY == 0:
            queue.put_nowait({"step": info.step, "of": job.joint.steps, "loss": info.loss})

    while not trainer.done:
        trainer.run(num_steps=job.checkpoint_every, progress=False, on_step=relay)
        metrics = {
            "step": trainer.step_count,
            "loss": trainer.losses[-1] if trainer.losses else float("nan"),
            "resumed_from_step": resumed_from,
            "node_id": node_id,
        }
        if world > 1:
            dist.barrier()
        if rank == 0:
            if queue is not None and trainer.step_count % REPORT_EVERY:
                queue.put_nowait({"step": trainer.step_count, "of": job.joint.steps, "loss": metrics["loss"]})
            with tempfile.TemporaryDirectory() as folder:
                save_state(trainer.get_state(), Path(folder) / STATE_FILE)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
        else:
            ray.train.report(metrics)
        _maybe_fail(trainer.step_count)


def _torch_config(num_workers: int):
    """Gloo for several workers; for one, no process group at all.

    A single worker needs no collective, and torch's TCPStore (the rendezvous every process
    group starts) listens on all interfaces: skipping it keeps a one-worker job (the laptop
    and test default) from opening any socket outside Ray's own loopback ones.
    """
    from ray.train.torch import TorchConfig
    from ray.train.torch.config import _TorchBackend

    class _Backend(_TorchBackend):
        def on_start(self, worker_group, backend_config):  # type: ignore[no-untyped-def]
            if len(worker_group) > 1:
                super().on_start(worker_group, backend_config)

        def on_shutdown(self, worker_group, backend_config):  # type: ignore[no-untyped-def]
            if len(worker_group) > 1:
                super().on_shutdown(worker_group, backend_config)

    class _Config(TorchConfig):
        @property
        def backend_cls(self):  # type: ignore[no-untyped-def]
            return _Backend

    return _Config(backend="gloo")


def fit_joint(
    *,
    model_dir: str | Path,
    job: Any,
    run_name: str,
    report: Callable[[str, dict[str, Any]], None] | None = None,
    max_failures: int = 2,
) -> JointRun:
    """Run the joint stage (a `pipelines.recipe.jobs.JointJob`) on the ScalableModel in
    `model_dir` under Ray Train; resumes a run of the same name from its checkpoints.

    Returns the final trainer state's path (in the latest checkpoint) and the loss curve;
    the caller applies the state to its own copy of the model and saves it. `report` hears
    ("step", {"step", "of", "loss"}) after every checkpoint interval.
    """
    import threading

    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Empty, Queue

    from legoblocks.joint import load_state_file

    queue = Queue(maxsize=10_000, actor_options={"num_cpus": 0}) if report is not None else None
    trainer = TorchTrainer(
        train_loop,
        torch_config=_torch_config(job.num_workers),
        train_loop_config={"model_dir": str(model_dir), "job": job, "queue": queue},
        scaling_config=ray.train.ScalingConfig(
            num_workers=job.num_workers, use_gpu=False, resources_per_worker={"CPU": max(1, job.threads)}
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=str(Path(job.storage).resolve()),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    stop = threading.Event()

    def relay() -> None:  # the driver's view of the workers' progress, while fit() blocks
        while not stop.is_set():
            try:
                values = queue.get(timeout=0.5)
            except Empty:
                continue
            except Exception:  # noqa: BLE001 - the queue actor is gone: the run is over
                return
            report("step", values)

    watcher = threading.Thread(target=relay, daemon=True) if queue is not None else None
    if watcher is not None:
        watcher.start()
    try:
        result = trainer.fit()
    finally:
        stop.set()
        if watcher is not None:
            watcher.join(timeout=2)
        if queue is not None:
            ray.kill(queue.actor)
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"joint stage {run_name}: Ray Train finished without a checkpoint")
    # Local storage: the latest checkpoint is a directory under storage_path, kept by
    # CheckpointConfig(num_to_keep=2) until the next run of this name.
    state_path = Path(result.checkpoint.path) / STATE_FILE
    state = load_state_file(state_path)
    metrics = result.metrics or {}
    return JointRun(
        steps=int(state["step"]),
        losses=[float(v) for v in state["losses"].tolist()],
        seconds=float(state["seconds"]),
        resumed_from_step=int(metrics.get("resumed_from_step", 0)),
        node_ids=[str(metrics["node_id"])] if "node_id" in metrics else [],
        state_path=str(state_path),
    )
