"""The stages that shape the model: teacher, detect (blocks), descend (pruned descendants), assemble."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from legoblocks.choices import ORIGINAL, sorted_choices
from pipelines.recipe.jobs import AssembleJob, DescendJob, DetectJob, ModelSpec, TeacherJob
from pipelines.stage import UnitContext

TEACHER_FILE = "teacher.safetensors"
BLOCKS_JSON = "blocks.json"
SCALABLE_DIR = "scalable"


def build_model(spec: ModelSpec, checkpoint: str | Path | None = None) -> nn.Module:
    """The network a model spec names; `options` (e.g. width) go to the zoo builder."""
    from legoblocks.modelref import ModelRefError, load_checkpoint, load_model
    from legoblocks.zoo import ZOO, build_zoo_model

    common = {"in_channels": spec.in_channels, "num_classes": spec.num_classes, "input_size": spec.input_size}
    if not spec.options:
        return load_model(spec.ref, checkpoint, **common)
    if spec.ref not in ZOO:
        raise ModelRefError(
            f"model.options {spec.options} apply to zoo models only, but model.ref is {spec.ref!r}; "
            "give the options defaults in your factory instead"
        )
    model = build_zoo_model(spec.ref, **common, **spec.options)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model


def load_teacher(spec: ModelSpec, teacher_dir: Path) -> nn.Module:
    from legoblocks.train import load_state_dict_file

    return load_state_dict_file(build_model(spec), teacher_dir / TEACHER_FILE).eval()


def read_blocks(detect_dir: Path) -> dict[str, Any]:
    return json.loads((detect_dir / BLOCKS_JSON).read_text(encoding="utf-8"))


def block_file(detect_dir: Path, name: str) -> Path:
    return detect_dir / "blocks" / f"{name}.safetensors"


def variant_files(folder: Path) -> dict[str, Path]:
    """choice id -> descendant file in a descend/retrain unit folder, original first."""
    return {c: folder / f"{c}.safetensors" for c in sorted_choices(p.stem for p in folder.glob("*.safetensors"))}


def smallest_flops_fraction(detect_dir: Path, descend_dirs: Mapping[str, Path]) -> float:
    """The smallest composition's FLOPs over the original's, from the untrained descendants:
    pruning fixes the architecture, so the floor of a FLOPs grid is known before any training.

    Args:
        detect_dir: the detect unit's folder (the block specs).
        descend_dirs: block name -> its descend unit's folder.

    Returns:
        A fraction in (0, 1].
    """
    from legoblocks.flops import count_flops
    from legoblocks.serialize import load_module

    small = full = 0
    for spec in read_blocks(detect_dir)["specs"]:
        smallest = list(variant_files(descend_dirs[spec["name"]]).values())[-1]
        full += spec["flops"]
        small += count_flops(load_module(smallest), spec["in_shape"])
    return small / full


def load_scalable(folder: Path):
    """The ScalableModel a stage wrote under `folder/scalable`."""
    from legoblocks.compose import ScalableModel

    return ScalableModel.load(folder / SCALABLE_DIR)


def teacher(ctx: UnitContext[TeacherJob]) -> dict[str, Any]:
    """Load the given checkpoint or train a teacher; record its validation/test accuracy."""
    from legoblocks.train import evaluate, save_state_dict, train_teacher
    from pipelines.data import load_splits

    job = ctx.job
    splits = load_splits(job.data)
    seed = job.teacher.seed if job.teacher is not None else 0
    torch.manual_seed(seed)  # the model's initial weights
    net = build_model(job.model, job.checkpoint)
    meta: dict[str, Any] = {"trained": job.teacher is not None}
    if job.teacher is not None:
        t = job.teacher
        report = train_teacher(net, splits.train, epochs=t.epochs, lr=t.lr, batch_size=t.batch_size,
                               weight_decay=t.weight_decay, seed=t.seed, progress=False, num_workers=job.data.workers,
                               on_epoch=lambda epoch, loss: ctx.report("epoch", {"epoch": epoch, "of": t.epochs,
                                                                                  "loss": loss}))
        meta.update(train_seconds=report.seconds, train_loss=report.final_loss)
    net.eval()
    meta["val_accuracy"] = evaluate(net, splits.val, num_workers=job.data.workers)
    meta["test_accuracy"] = evaluate(net, splits.test, num_workers=job.data.workers)
    save_state_dict(net, ctx.out / TEACHER_FILE)
    return meta


def detect(ctx: UnitContext[DetectJob]) -> dict[str, Any]:
    """Cut the teacher into blocks; each block becomes one safe file."""
    from legoblocks.detect import detect_blocks, verify_chain
    from legoblocks.serialize import save_module

    net = load_teacher(ctx.job.model, ctx.inputs.one("teacher").dir)
    blocked = detect_blocks(net, ctx.job.model.input_shape, target_blocks=ctx.job.target_blocks)
    verify_chain(net, blocked)
    (ctx.out / "blocks").mkdir()
    for spec, block in zip(blocked.specs, blocked.blocks):
        save_module(block, block_file(ctx.out, spec.name))
    info = {"input_shape": list(blocked.input_shape), "specs": [spec.to_dict() for spec in blocked.specs]}
    (ctx.out / BLOCKS_JSON).write_text(json.dumps(info, indent=1), encoding="utf-8")
    return {"blocks": [s.name for s in blocked.specs], "scalable": [s.name for s in blocked.specs if s.scalable]}


def descend(ctx: UnitContext[DescendJob]) -> dict[str, Any]:
    """Prune one block at every sparsity of the ladder (I/O shapes unchanged)."""
    from legoblocks.descend import make_descendants
    from legoblocks.serialize import load_module, save_module

    detect_dir = ctx.inputs.one("detect").dir
    block = ctx.item.name
    spec = next(s for s in read_blocks(detect_dir)["specs"] if s["name"] == block)
    module = load_module(block_file(detect_dir, block))
    if spec["scalable"]:
        descendants = make_descendants(module, tuple(spec["in_shape"]), ctx.job.ladder, importance=ctx.job.importance)
    else:
        descendants = {ORIGINAL: module}
    params = {}
    for choice, desc in descendants.items():
        save_module(desc, ctx.out / f"{choice}.safetensors")
        params[choice] = sum(p.numel() for p in desc.parameters())
    return {"block": block, "choices": sorted_choices(descendants), "params": params}


def assemble(ctx: UnitContext[AssembleJob]) -> dict[str, Any]:
    """Gather every block's variants (retrained where they were) into one ScalableModel."""
    from legoblocks.compose import ScalableModel
    from legoblocks.detect import BlockSpec
    from legoblocks.serialize import load_module

    info = read_blocks(ctx.inputs.one("detect").dir)
    specs = [BlockSpec.from_dict(s) for s in info["specs"]]
    folders = {u.unit: u.dir for u in ctx.inputs.all("descend")}
    folders.update({u.unit: u.dir for u in ctx.inputs.all("retrain")})
    variants = {s.name: {c: load_module(p) for c, p in variant_files(folders[s.name]).items()} for s in specs}
    scalable = ScalableModel(specs, variants, tuple(info["input_shape"]), model_ref=ctx.job.model_ref)
    scalable.save(ctx.out / SCALABLE_DIR)
    return {"num_options": scalable.num_options(), "blocks": list(scalable.block_names),
            "choices": {b: scalable.choices(b) for b in scalable.block_names}}
