"""The stages that train descendants: block I/O, per-block distillation, the joint stage."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from pipelines.recipe.jobs import BlockIOJob, JointJob, RetrainJob
from pipelines.recipe.model import SCALABLE_DIR, block_file, load_scalable, read_blocks, variant_files
from pipelines.stage import UnitContext

# Test hook: the first retrain unit to see this marker path creates it and exits hard,
# like a worker killed mid-task; Ray's retry then has to produce identical outputs.
FAIL_ONCE_ENV = "LEGODNN_TEST_FAIL_ONCE"
REPORT_EVERY = 10  # joint steps between live loss reports


def _fail_once_hook() -> None:
    marker = os.environ.get(FAIL_ONCE_ENV)
    if not marker:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, f"pid {os.getpid()}\n".encode())
    os.close(fd)
    os._exit(1)  # like a SIGKILLed worker: no cleanup, no exception


def blockio(ctx: UnitContext[BlockIOJob]) -> dict[str, Any]:
    """One frozen-teacher pass: every block's (input, output) pairs, one file per block."""
    from legoblocks.retrain import collect_block_io
    from legoblocks.serialize import load_module
    from pipelines.data import load_splits

    detect_dir = ctx.inputs.one("detect").dir
    specs = read_blocks(detect_dir)["specs"]
    names = [s["name"] for s in specs]
    blocks = [load_module(block_file(detect_dir, n)) for n in names]
    job = ctx.job
    # Every cut point's activation of one image, in float32: the limit that fits in memory.
    per_image = 4 * (math.prod(specs[0]["in_shape"]) + sum(math.prod(s["out_shape"]) for s in specs))
    fit = max(1, job.memory_mb * 2**20 // per_image)
    limit = fit if job.limit is None else min(job.limit, fit)
    datas = collect_block_io(blocks, load_splits(job.data).train, limit=limit, batch_size=job.batch_size,
                             seed=job.seed, num_workers=job.data.workers)
    variance = {}
    for name, block_data in zip(names, datas):
        block_data.save(ctx.out / f"{name}.safetensors")
        variance[name] = float(block_data.outputs.var())
    return {"samples": len(datas[0]), "memory_limit": fit, "output_variance": variance}


def retrain(ctx: UnitContext[RetrainJob]) -> dict[str, Any]:
    """Distill all descendants of one block together on the teacher's block I/O."""
    from legoblocks.retrain import BlockData, retrain_descendants
    from legoblocks.serialize import load_module, save_module

    _fail_once_hook()
    block = ctx.item.name
    files = variant_files(ctx.inputs.by_unit("descend")[block].dir)
    descendants = {c: load_module(p) for c, p in files.items()}
    data = BlockData.load(ctx.inputs.one("blockio").dir / f"{block}.safetensors")
    epochs = ctx.job.retrain.epochs

    def on_epoch(epoch: int, losses: dict[str, float]) -> None:
        ctx.report("epoch", {"epoch": epoch, "of": epochs, "loss": sum(losses.values()) / len(losses), "losses": losses})

    reports = retrain_descendants(descendants, data, ctx.job.retrain, progress=False, on_epoch=on_epoch)
    for choice, module in descendants.items():
        save_module(module, ctx.out / f"{choice}.safetensors")
    return {
        "block": block,
        "reports": {c: {"loss_before": r.loss_before, "loss_after": r.loss_after, "seconds": r.seconds}
                    for c, r in reports.items()},
        "output_variance": float(data.outputs.var()),
    }


def _save_joint(assembled: Path, state: dict[str, Any], out: Path) -> None:
    """The assembled ScalableModel with the joint stage's trained weights, saved under out."""
    scalable = load_scalable(assembled)
    for key, weights in state["variants"].items():
        block, choice = key.rsplit("/", 1)
        scalable.variant(block, choice).load_state_dict(weights)
    scalable.save(out / SCALABLE_DIR)


def _joint_meta(state: dict[str, Any], resumed_from_step: int, node_ids: list[str]) -> dict[str, Any]:
    return {"steps": int(state["step"]), "losses": [float(v) for v in state["losses"].tolist()],
            "resumed_from_step": resumed_from_step, "train_seconds": float(state["seconds"]), "node_ids": node_ids}


def joint(ctx: UnitContext[JointJob]) -> dict[str, Any]:
    """The composition-aware joint stage, in this process (the in-process executor)."""
    from legoblocks.joint import JointTrainer
    from pipelines.data import load_splits

    assembled = ctx.inputs.one("assemble").dir
    model = load_scalable(assembled)
    trainer = JointTrainer(model, load_splits(ctx.job.data).train, ctx.job.joint, num_workers=ctx.job.data.workers)
    def report(info: Any) -> None:
        if info.step % REPORT_EVERY == 0 or info.step == ctx.job.joint.steps:
            ctx.report("step", {"step": info.step, "of": ctx.job.joint.steps, "loss": info.loss})

    while not trainer.done:
        trainer.run(num_steps=ctx.job.checkpoint_every, progress=False, on_step=report)
    _save_joint(assembled, trainer.get_state(), ctx.out)
    return _joint_meta(trainer.get_state(), 0, [])


def joint_on_ray_train(ctx: UnitContext[JointJob]) -> dict[str, Any]:
    """The joint stage as a Ray Train job (checkpointed; resumes a run of the same key)."""
    from legoblocks.joint import load_state_file
    from pipelines.executors.raytrain import fit_joint

    assembled = ctx.inputs.one("assemble").dir
    run = fit_joint(model_dir=assembled / SCALABLE_DIR, job=ctx.job, run_name=f"joint-{ctx.key}", report=ctx.report)
    state = load_state_file(run.state_path)
    _save_joint(assembled, state, ctx.out)
    return _joint_meta(state, run.resumed_from_step, run.node_ids)
