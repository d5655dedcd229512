"""The simple alternatives LegoDNN must beat, as stages of the same recipe.

    uniform   per budget   the whole teacher pruned at one ratio to the budget's FLOPs
                           (`legoblocks.uniform`), fine-tuned end to end (0.5 CE + 0.5 KD)
    scratch   per budget   the model at the widest width that fits the budget, trained from
                           scratch with the same loss

Each gets a wall-time share per budget (`time_shares` of `legodnn_seconds`: LegoDNN's training
stages' time, or its whole pipeline's with profiling, split evenly over the budgets it
serves), so "at least as accurate for no more training time" is measured, not assumed. They read the recipe's teacher and are cached like every unit: a benchmark that
re-renders a figure does not retrain them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from torch import nn

from pipelines.recipe.jobs import DataRef, ModelSpec, data_ref, model_spec
from pipelines.recipe.model import build_model, load_teacher
from pipelines.stage import Item, Stage, UnitContext

MODEL_FILE = "model.safetensors"
# The zoo's width argument per family (every other zoo model takes an int `width`).
WIDTH_KEY = {"mobilenetv2": "width_mult"}
DEFAULT_WIDTH = {"mobilenetv2": 1.0}


@dataclass(frozen=True)
class BaselineJob:
    """One baseline family: the model, data, fine-tuning settings; the budgets are the items."""

    model: ModelSpec
    data: DataRef
    lr: float = 0.01
    prune_iterations: int = 12
    seed: int = 0
    batch_size: int = 128


# The recipe's stages whose wall time counts as LegoDNN's, per basis: its training after the
# teacher, or its whole pipeline after the teacher (training and profiling).
LEGODNN_TIME = {
    "training": ("blockio", "retrain", "joint"),
    "pipeline": ("blockio", "retrain", "joint", "cost", "accuracy", "table"),
}


def legodnn_seconds(records: Mapping[str, Sequence[Any]], basis: str = "pipeline") -> float:
    """LegoDNN's wall time on `basis` (a key of `LEGODNN_TIME`) from a recipe run's records
    (stage -> unit records with `seconds`; a cached unit keeps the time it took when it ran).

    A unit resumed from its checkpoint (the joint stage) records only its last run's
    `seconds`; its training time across every run (`meta["train_seconds"]`) counts where larger,
    so an interrupted run never hands the baselines less time than an uninterrupted one."""
    if basis not in LEGODNN_TIME:
        raise ValueError(f"unknown time basis {basis!r}: choose from {', '.join(LEGODNN_TIME)}")
    return sum(max(r.seconds, float(r.meta.get("train_seconds", 0.0)))
               for stage in LEGODNN_TIME[basis] for r in records.get(stage, []))


def time_shares(budgets: Sequence[float], seconds: float) -> dict[float, float]:
    """Each budget's wall-time share of `seconds`, split evenly over the budgets below 1.0 (the
    full budget needs no pruning, but gets the same share)."""
    share = seconds / max(1, sum(b < 1.0 for b in budgets))
    return dict.fromkeys(budgets, share)


def budget_items(budgets: list[float], seconds: dict[float, float]) -> list[Item]:
    """One unit per FLOPs budget, with its wall-time share (part of the key: more time, a new model)."""
    return [Item(f"b{b:.4f}", {"budget": float(b), "seconds": round(float(seconds[b]), 1)}) for b in budgets]


def _save(ctx: UnitContext[BaselineJob], model: nn.Module, meta: dict[str, Any]) -> dict[str, Any]:
    from legoblocks.serialize import save_module
    from legoblocks.train import evaluate
    from pipelines.data import load_splits

    save_module(model, ctx.out / MODEL_FILE)
    test = load_splits(ctx.job.data).test
    return {**meta, "budget": ctx.item.payload["budget"],
            "test_accuracy": evaluate(model, test, num_workers=ctx.job.data.workers)}


def uniform(ctx: UnitContext[BaselineJob]) -> dict[str, Any]:
    """The teacher pruned uniformly to the budget's FLOPs fraction, fine-tuned for its share."""
    import time

    from legoblocks.uniform import finetune, prune_to_flops
    from pipelines.data import load_splits

    job, budget, seconds = ctx.job, ctx.item.payload["budget"], ctx.item.payload["seconds"]
    teacher = load_teacher(job.model, ctx.inputs.one("teacher").dir)
    started = time.perf_counter()
    choice = prune_to_flops(teacher, budget, job.model.input_shape, iterations=job.prune_iterations)
    prune_s = time.perf_counter() - started
    report = finetune(choice.model, teacher, load_splits(job.data).train, wall_time_s=max(0.5, seconds - prune_s),
                      lr=job.lr, batch_size=job.batch_size, seed=job.seed, progress=False,
                      num_workers=job.data.workers,
                      on_step=lambda step, loss: ctx.report("step", {"step": step, "loss": loss}) if step % 50 == 0 else None)
    return _save(ctx, choice.model, {"flops_frac": choice.flops_frac, "ratio": choice.ratio,
                                     "seconds": prune_s + report.seconds, "steps": report.steps})


def scratch_model(spec: ModelSpec, target_flops: float) -> tuple[nn.Module, float]:
    """The widest version of a zoo model whose measured FLOPs fit `target_flops`, and its width."""
    from legoblocks.flops import count_flops

    key = WIDTH_KEY.get(spec.ref, "width")
    full = spec.options.get(key, DEFAULT_WIDTH.get(spec.ref, 16))

    def build(width: float) -> nn.Module:
        return build_model(ModelSpec(spec.ref, spec.in_channels, spec.num_classes, spec.input_size,
                                     {**spec.options, key: width}))

    if isinstance(full, int):
        for width in range(full, 0, -1):
            model = build(width)
            if count_flops(model, spec.input_shape) <= target_flops:
                return model, width
        raise ValueError(f"scratch: even width 1 of {spec.ref} exceeds {target_flops:.0f} FLOPs")
    lo, hi, best = 0.0, float(full), None  # a float multiplier: bisection (lo fits, hi does not)
    if count_flops(build(hi), spec.input_shape) <= target_flops:
        return build(hi), hi
    for _ in range(12):
        mid = 0.5 * (lo + hi)
        model = build(mid)
        if count_flops(model, spec.input_shape) <= target_flops:
            lo, best = mid, (model, mid)
        else:
            hi = mid
    if best is None:
        raise ValueError(f"scratch: no width multiplier of {spec.ref} fits {target_flops:.0f} FLOPs")
    return best


def scratch(ctx: UnitContext[BaselineJob]) -> dict[str, Any]:
    """The widest model that fits the budget, trained from scratch (0.5 CE + 0.5 KD) for its share.

    Some families cannot shrink below a floor (MobileNetV2 rounds channels to multiples of 8):
    such a budget yields no model (`meta["skipped"]` says why)."""
    import torch

    from legoblocks.flops import count_flops
    from legoblocks.uniform import finetune
    from pipelines.data import load_splits

    job, budget, seconds = ctx.job, ctx.item.payload["budget"], ctx.item.payload["seconds"]
    teacher = load_teacher(job.model, ctx.inputs.one("teacher").dir)
    teacher_flops = count_flops(teacher, job.model.input_shape)
    torch.manual_seed(job.seed)
    try:
        model, width = scratch_model(job.model, budget * teacher_flops)
    except ValueError as exc:
        return {"budget": budget, "skipped": str(exc)}
    report = finetune(model, teacher, load_splits(job.data).train, wall_time_s=seconds, lr=0.05,
                      batch_size=job.batch_size, seed=job.seed, progress=False, num_workers=job.data.workers)
    return _save(ctx, model, {"flops_frac": count_flops(model, job.model.input_shape) / teacher_flops,
                              "width": width, "seconds": report.seconds, "steps": report.steps})


def baseline_job(cfg: Any, facts: Any, **settings: Any) -> BaselineJob:
    return BaselineJob(model_spec(cfg), data_ref(cfg, facts), seed=cfg.teacher.seed, **settings)


BASELINES = ("uniform", "scratch")


def baseline_stages(budgets: list[float], seconds: dict[float, float], methods: Sequence[str] = BASELINES,
                    **settings: Any) -> list[Stage]:
    """The baseline stages (`methods`, of `BASELINES`) for `budgets`, each with its wall-time
    share in seconds."""
    unknown = set(methods) - set(BASELINES)
    if unknown:
        raise ValueError(f"unknown baseline(s) {sorted(unknown)}: choose from {', '.join(BASELINES)}")
    items = budget_items(budgets, seconds)
    fns = {"uniform": uniform, "scratch": scratch}
    return [
        Stage(name, fns[name], lambda cfg, facts: baseline_job(cfg, facts, **settings), needs=("teacher",),
              items=lambda cfg, inputs: items, fanout="budget")
        for name in methods
    ]


__all__ = ["BASELINES", "LEGODNN_TIME", "MODEL_FILE", "BaselineJob", "baseline_stages", "legodnn_seconds", "scratch",
           "scratch_model", "time_shares", "uniform"]
