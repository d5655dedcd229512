"""The LegoDNN recipe, declared once: the one map of what runs, on what, keyed by what.

    stage      fan-out       needs                               job (what keys it)
    teacher    model         -                                   model, data, teacher | checkpoint hash
    detect     model         teacher                             model, target_blocks
    descend    block         detect                              ladder, importance
    blockio    model         detect                              data, io batch, seed
    retrain    block*        descend, blockio                    retrain (legoblocks.retrain.RetrainConfig)
    assemble   model         detect, descend, retrain            model ref
    joint      model (Ray Train)  assemble                       joint (legoblocks.joint.JointConfig), data
    cost       block         joint                               latency settings
    accuracy   chunk         joint (+ assemble, cost to plan)    data, BatchNorm batches, seed; the chunk
    table      model         joint, assemble, cost, accuracy     profile plan, latency fit, re-ranking
    points     model         joint, table                        data, grid
    publish    model         joint, table                        store, key id, model id
    lineage    model (driver) every stage above                  tracking store (pipelines.lineage)

    * only blocks with descendants. `joint` passes `assemble` through when disabled.

`pipelines.run.run_pipeline` runs `STAGES` (plus lineage) on an executor; benchmarks call the
same list (`pipelines.run.run_recipe`) and add the baselines (`pipelines.baselines`).
"""

from __future__ import annotations

from typing import Any

from pipelines.recipe import jobs
from pipelines.recipe.measure import accuracy, accuracy_items, cost, table
from pipelines.recipe.model import assemble, descend, detect, teacher
from pipelines.recipe.serve import points, publish
from pipelines.recipe.train import blockio, joint, joint_on_ray_train, retrain
from pipelines.stage import Inputs, Item, Placement, Stage


def _blocks(cfg: Any, inputs: Inputs) -> list[Item]:
    return [Item(b) for b in inputs.one("detect").meta["blocks"]]


def _trainable(cfg: Any, inputs: Inputs) -> list[Item]:
    return [Item(u.unit) for u in inputs.all("descend") if len(u.meta["choices"]) > 1]


def _assembled_blocks(cfg: Any, inputs: Inputs) -> list[Item]:
    return [Item(b) for b in inputs.one("assemble").meta["blocks"]]


def _joint_runs(cfg: Any, inputs: Inputs) -> bool:
    return bool(cfg.joint.enabled) and any(len(c) > 1 for c in inputs.one("assemble").meta["choices"].values())


STAGES: tuple[Stage, ...] = (
    Stage("teacher", teacher, jobs.teacher_job),
    Stage("detect", detect, jobs.detect_job, needs=("teacher",)),
    Stage("descend", descend, jobs.descend_job, needs=("detect",), items=_blocks, fanout="block"),
    Stage("blockio", blockio, jobs.blockio_job, needs=("detect",)),
    Stage("retrain", retrain, jobs.retrain_job, needs=("descend", "blockio"), items=_trainable, fanout="block"),
    Stage("assemble", assemble, jobs.assemble_job, needs=("detect", "descend", "retrain")),
    Stage("joint", joint, jobs.joint_job, needs=("assemble",), placement=Placement.TRAIN, enabled=_joint_runs,
          passthrough="assemble", ray_fn=joint_on_ray_train),
    Stage("cost", cost, jobs.cost_job, needs=("joint", "assemble"), items=_assembled_blocks, fanout="block",
          keyed_by=("joint",)),
    Stage("accuracy", accuracy, jobs.accuracy_job, needs=("joint", "assemble", "cost"), fanout="chunk",
          items=lambda cfg, inputs: accuracy_items(jobs.plan_job(cfg), inputs), keyed_by=("joint",)),
    Stage("table", table, jobs.table_job, needs=("joint", "assemble", "cost", "accuracy")),
    Stage("points", points, jobs.points_job, needs=("joint", "table")),
    Stage("publish", publish, jobs.publish_job, needs=("joint", "table"),
          enabled=lambda cfg, inputs: bool(cfg.publish.enabled)),
)


def stage(name: str) -> Stage:
    """The stage of `STAGES` called `name`."""
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(f"no stage {name!r}; stages: {', '.join(s.name for s in STAGES)}")


__all__ = ["STAGES", "stage"]
