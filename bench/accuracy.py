"""Accuracy under FLOPs budgets: composed LegoDNN models against the baselines (issue 11).

One command trains one teacher per model (cached), then, from that same teacher and seed,
builds every method side by side and measures each on the 10k Fashion-MNIST test set:

  legodnn              per-block distillation + joint stage + calibrated profile, the
                       optimizer's top-k re-ranked on validation data (the full recipe)
  legodnn+bn           the same selections, BatchNorm re-estimated after composing
  legodnn-blockwise    per-block distillation only, raw profile, optimizer's best (the paper)
  legodnn-blockwise+bn the same selections, BatchNorm re-estimated
  uniform              whole teacher pruned at one ratio per budget, fine-tuned (0.5 CE + 0.5 KD)
  scratch              the model at reduced width, trained from scratch (same loss) for the
                       time uniform spent fine-tuning at that budget

Budgets are fractions of the teacher's FLOPs, always measured (torch.utils.flop_counter);
`train_wall_s` is what a method spends to serve all budgets, teacher training excluded.
Writes `docs/results/accuracy.json` and `docs/benchmarks/accuracy.md`.

The phases are functions `bench/evaluate.py` imports (`teacher_for`, `train_legodnn`,
`profile_and_select`, `uniform_baseline`, `scratch_baseline`). Teachers and LegoDNN runs are
cached in the workdir (a LegoRun under a hash of everything that defines its weights, as
pickle-free safetensors state dicts), so both scripts evaluate the same trained descendants
and a cached run reports its original training wall times.

    .venv/bin/python bench/accuracy.py                 # full run (an hour or more on 2 cores)
    .venv/bin/python bench/accuracy.py --quick --workdir /tmp/q --out /tmp/q/a.json --md /tmp/q/a.md
    .venv/bin/python bench/accuracy.py --models resnet20 mobilenetv2 --threads 1 \
        --model-kwargs mobilenetv2='{"width_mult": 0.5}' --model-teacher-epochs mobilenetv2=4 \
        --joint freeze_bn=true        # any legoblocks.joint.JointConfig field
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import logging
import os
import platform
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: the packages live in the repo root
    sys.path.insert(0, str(REPO))

SHAPE = (1, 28, 28)
WIDTH_KEY = {"mobilenetv2": "width_mult"}  # every other zoo model takes an int `width`
DEFAULT_WIDTH = {"resnet": 16, "vgg": 64, "mobilenetv2": 1.0}
QUICK_WIDTH = {"resnet": 8, "vgg": 8, "mobilenetv2": 0.25}

log = logging.getLogger("bench.accuracy")


@dataclass
class Settings:
    """Everything that defines a run; written into the JSON so a result names its recipe.

    `joint` holds overrides of `legoblocks.joint.JointConfig` fields only: the joint stage's
    defaults live in JointConfig, so a change there reaches this benchmark without an edit
    here (the effective config is what the JSON records).
    """

    models: list[str] = field(default_factory=lambda: ["resnet20"])
    budgets: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    seed: int = 0
    data_dir: str = "/usr/share/datasets/fashion-mnist"
    model_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)  # per model name
    train_size: int | None = None  # None: all 60k minus validation
    val_size: int = 1000
    test_size: int | None = None  # None: the full 10k test set
    teacher_epochs: int = 8
    model_teacher_epochs: dict[str, int] = field(default_factory=dict)  # per-model override
    teacher_lr: float = 0.1
    ladder: list[float] = field(default_factory=lambda: [0.0, 0.2, 0.4, 0.6, 0.8])
    retrain_epochs: int = 1
    # Pairs collected per block: 500 of them (retrain_val_limit) measure the loss before and
    # after, the other 13,500 train (the training share of the earlier 15,000 with 10% held out).
    retrain_limit: int | None = 14000
    retrain_val_limit: int | None = 500
    # The joint stage trains on the per-block stage's samples and reads the teacher's targets
    # from its teacher pass (no teacher forward per step) instead of sampling the whole set.
    joint_on_block_io: bool = False
    retrain_lr: float = 1e-3
    joint: dict[str, Any] = field(default_factory=dict)  # JointConfig overrides
    profile_envs: int = 1
    additivity_n: int = 20
    calibration_k: int = 16
    top_k: int = 20  # the recipe docs/benchmarks/accuracy.md measured
    # A trained anchor is kept unless a candidate beats it on validation by more than this
    # many standard errors (profiling.rerank); 0 keeps the best measured candidate.
    rerank_margin_se: float = 1.0
    bn_batches: int = 8
    uniform_epochs: float = 1.0
    uniform_lr: float = 0.01
    prune_iterations: int = 12
    threads: int | None = None
    methods: list[str] = field(default_factory=lambda: list(METHODS))


METHODS = ("legodnn", "legodnn-blockwise", "uniform", "scratch")  # each with its +bn row where it has one


def quick_settings(base: Settings) -> Settings:
    """A tiny end-to-end setting for the smoke tests: every stage runs, nothing is accurate.

    Models are width-reduced (the caller's per-model kwargs are replaced), the joint stage
    runs 2 steps of 32 images unless the caller overrides those fields with --joint.
    """
    return Settings(
        models=base.models, budgets=base.budgets, seed=base.seed, data_dir=base.data_dir,
        model_kwargs={m: {WIDTH_KEY.get(m, "width"): QUICK_WIDTH[_width_family(m)]} for m in base.models},
        train_size=768, val_size=128, test_size=256,
        teacher_epochs=1, ladder=[0.0, 0.8], retrain_limit=256, joint_on_block_io=base.joint_on_block_io,
        rerank_margin_se=base.rerank_margin_se,
        joint={"steps": 2, "batch_size": 32, **base.joint},
        additivity_n=2, calibration_k=2, top_k=2, bn_batches=1, uniform_epochs=0.05,
        prune_iterations=4, threads=base.threads if base.threads is not None else 1, methods=base.methods,
    )


def anchored_joint(budgets: Sequence[float]) -> dict[str, Any]:
    """The benchmark's joint-stage recipe (docs/benchmarks/accuracy.md, session 5): each step
    trains the even composition of the smallest budget (the sandwich floor, in place of the
    smallest composition) and one anchor of the other budgets in turn, no random
    composition. With one budget it is the anchor and the smallest composition stays the
    floor. `--joint` overrides any of these (session 4's recipe: `--joint sandwich_floor=null`)."""
    ordered = sorted(budgets)
    if len(ordered) == 1:
        return {"random_compositions": 0, "anchor_budgets": ordered}
    return {"random_compositions": 0, "anchor_budgets": ordered[1:], "sandwich_floor": ordered[0]}


def joint_config(s: Settings):
    """The effective JointConfig: JointConfig's own defaults, the run's seed, the benchmark's
    anchored recipe for its budgets (`anchored_joint`), then `s.joint`.

    Unknown keys and invalid values fail here, before any training, naming the valid fields.
    """
    from legoblocks.joint import JointConfig

    fields = {f.name for f in dataclasses.fields(JointConfig)}
    unknown = sorted(set(s.joint) - fields)
    if unknown:
        raise SystemExit(f"bench: --joint: unknown JointConfig field(s) {unknown}; "
                         f"valid fields: {', '.join(sorted(fields))}")
    cfg = JointConfig(**{"seed": s.seed, **anchored_joint(s.budgets), **s.joint})
    try:
        cfg.validate()
    except ValueError as exc:
        raise SystemExit(f"bench: --joint: {exc}") from exc
    return cfg


def trained_anchors(s: Settings) -> list[float]:
    """The budgets whose even composition the joint stage trains (anchors and the floor)."""
    return joint_config(s).trained_budgets()


def settings_record(s: Settings) -> dict[str, Any]:
    """Settings as written into a result: the JointConfig actually used, not just overrides."""
    return {**asdict(s), "joint_effective": asdict(joint_config(s))}


# ----------------------------------------------------------------------------- helpers


def _machine() -> str:
    import torch

    from profiling.latency import fingerprint

    return (f"{fingerprint()['cpu_model']}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {platform.system()} {platform.release()}")


class Timer:
    """Wall time of a `with` block, in `.seconds`."""

    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


def _width_family(name: str) -> str:
    return "mobilenetv2" if name.startswith("mobilenet") else "vgg" if name.startswith("vgg") else "resnet"


def _build(name: str, kwargs: dict[str, Any]):
    from legoblocks.zoo import build_zoo_model

    return build_zoo_model(name, **kwargs)


def teacher_epochs(name: str, s: Settings) -> int:
    return int(s.model_teacher_epochs.get(name, s.teacher_epochs))


def teacher_path(name: str, s: Settings, train_n: int, workdir: Path) -> Path:
    """The teacher cache file; its name is a contract with existing caches: do not change it."""
    kwargs = s.model_kwargs.get(name, {})
    tag = "-".join(f"{k}{v}" for k, v in sorted(kwargs.items())) or "default"
    return workdir / f"teacher-{name}-{tag}-n{train_n}-e{teacher_epochs(name, s)}-s{s.seed}.pt"


def teacher_for(name: str, s: Settings, train, workdir: Path, progress: bool):
    """Train the teacher once per (model, recipe) and cache its state dict in the workdir.

    Returns (model in eval mode, training seconds or None when loaded from the cache).
    """
    import torch

    from legoblocks.train import train_teacher

    path = teacher_path(name, s, len(train), workdir)
    torch.manual_seed(s.seed)
    model = _build(name, s.model_kwargs.get(name, {}))
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        log.info("teacher %s loaded from %s", name, path)
        return model.eval(), None
    with Timer() as t:
        train_teacher(model, train, epochs=teacher_epochs(name, s), lr=s.teacher_lr, batch_size=128,
                      weight_decay=5e-4, seed=s.seed, checkpoint=path, progress=progress)
    return model.eval(), t.seconds


def scratch_model(name: str, s: Settings, target_flops: float):
    """The widest version of the model whose measured FLOPs fit `target_flops`."""
    from legoblocks.uniform import count_flops

    family = _width_family(name)
    key = WIDTH_KEY.get(name, "width")
    kwargs = s.model_kwargs.get(name, {})
    full = kwargs.get(key, DEFAULT_WIDTH[family])

    def build(width):
        return _build(name, {**kwargs, key: width})

    if isinstance(full, int):
        for width in range(full, 0, -1):
            model = build(width)
            if count_flops(model, SHAPE) <= target_flops:
                return model, width
        raise ValueError(f"scratch: even width 1 of {name} exceeds {target_flops:.0f} FLOPs")
    lo, hi = 0.0, float(full)  # float multiplier: bisection (lo fits, hi does not)
    if count_flops(build(hi), SHAPE) <= target_flops:
        return build(hi), hi
    best = None
    for _ in range(12):
        mid = 0.5 * (lo + hi)
        model = build(mid)
        if count_flops(model, SHAPE) <= target_flops:
            lo, best = mid, (model, mid)
        else:
            hi = mid
    if best is None:
        raise ValueError(f"scratch: no width multiplier of {name} fits {target_flops:.0f} FLOPs")
    return best


def choose(table, budget: float, top_k: int, metric: str = "flops", *, current: Sequence[str] | None = None,
           switch_penalty_per_byte: float = 0.0) -> list[list[str]]:
    """The optimizer's `top_k` best selections under a budget, best first.

    metric "flops": `budget` is in FLOPs; FLOPs are given to the optimizer as its latency
    column (in MFLOPs), so the selection is exact for the budget the benchmark measures.
    metric "latency": `budget` is in ms against the table's own measured latency column.
    `current` and `switch_penalty_per_byte` (accuracy fraction per byte loaded) make the
    choice switch-aware, as the device's RuntimeScaler can: keeping a loaded block is free.
    """
    from optimizer.problem import parse_problem
    from optimizer.solver import solve
    from profiling.table import to_problem

    if metric == "flops":
        override = {(b.name, cid): c.flops / 1e6 for b in table.blocks for cid, c in b.choices.items()}
        limit, unit = budget / 1e6, "MFLOPs"
    elif metric == "latency":
        override, limit, unit = None, budget, "ms"
    else:
        raise ValueError(f"choose: metric must be 'flops' or 'latency', got {metric!r}")
    problem = to_problem(table, {"latency_ms": limit}, latency_override=override,
                         current=None if current is None else {table.model_name: list(current)},
                         switch_penalty_per_byte=switch_penalty_per_byte)
    solution = solve(parse_problem(problem), top_k=top_k)
    if not solution.feasible:
        raise ValueError(
            f"no composition of {table.model_name} fits {limit:.3f} {unit} "
            f"(smallest: {solution.min_latency_ms:.3f}); raise the budget or add sparser descendants"
        )
    return [solution.selection[table.model_name]] + [a.selection[table.model_name] for a in solution.alternatives]


def _row(model: str, method: str, budget: float, flops_frac: float, acc: float, wall: float, **extra) -> dict:
    return {"model": model, "method": method, "budget": budget, "flops_frac": round(flops_frac, 4),
            "test_acc": round(100.0 * acc, 2), "train_wall_s": round(wall, 1), **extra}


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- LegoDNN training

LEGO_CACHE_FORMAT = 1


@dataclass
class LegoRun:
    """One LegoDNN training run: descendants after the joint stage, and after per-block only.

    `timings` are the ORIGINAL training wall times (also when `cached`): blockwise_s,
    joint_s, joint_final_loss.
    """

    scalable: Any  # legoblocks.compose.ScalableModel, after the joint stage
    blockwise: Any  # the same descendants after per-block distillation only
    timings: dict[str, float]
    key: str
    cached: bool = False


def lego_key(name: str, s: Settings, train_n: int, workdir: Path) -> dict[str, Any]:
    """Everything that defines a LegoRun's weights (its cache key is a hash of this)."""
    return {
        "format": LEGO_CACHE_FORMAT, "model": name, "model_kwargs": s.model_kwargs.get(name, {}),
        "teacher": teacher_path(name, s, train_n, workdir).name, "train_size": train_n, "seed": s.seed,
        "ladder": list(s.ladder), "retrain": {"epochs": s.retrain_epochs, "limit": s.retrain_limit,
                                              "val_limit": s.retrain_val_limit,
                                              "lr": s.retrain_lr, "batch_size": 64},
        "joint": asdict(joint_config(s)),
        **({"joint_on_block_io": True} if s.joint_on_block_io else {}),
    }


def _save_variants(model, directory: Path) -> None:
    """Every descendant's state dict as one safetensors file (no pickle)."""
    from safetensors.torch import save_file

    for block, choices in model.variants.items():
        for cid, module in choices.items():
            path = directory / block / f"{cid}.safetensors"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, str(path))


def _load_variants(model, directory: Path) -> None:
    from safetensors.torch import load_file

    for block, choices in model.variants.items():
        for cid, module in choices.items():
            module.load_state_dict(load_file(str(directory / block / f"{cid}.safetensors")), strict=True)


def _descendants(blocked, s: Settings, name: str):
    """The untrained ScalableModel of a detected teacher (deterministic: same teacher, same
    structure, which is what lets a cache hold state dicts only)."""
    from legoblocks.compose import ScalableModel

    return ScalableModel.from_blocked(blocked, ladder=s.ladder, model_ref=name)


def _load_lego(name: str, s: Settings, teacher, root: Path, key: str) -> LegoRun:
    from legoblocks.detect import detect_blocks

    meta = json.loads((root / "lego.json").read_text())
    scalable = _descendants(detect_blocks(teacher, SHAPE), s, name)
    blockwise = copy.deepcopy(scalable)
    _load_variants(scalable, root / "scalable")
    _load_variants(blockwise, root / "blockwise")
    log.info("%s: LegoDNN descendants loaded from cache %s (trained originally in %.1f s per-block + "
             "%.1f s joint)", name, root, meta["timings"]["blockwise_s"], meta["timings"]["joint_s"])
    return LegoRun(scalable, blockwise, meta["timings"], key, cached=True)


def train_legodnn(name: str, s: Settings, data: dict, teacher, workdir: Path, progress: bool) -> LegoRun:
    """Per-block distillation + joint stage, cached in `workdir/lego-<hash>/` by everything
    that defines the weights, so several benchmarks share one training run."""
    import torch

    from legoblocks.detect import detect_blocks
    from legoblocks.joint import train_joint
    from legoblocks.retrain import RetrainConfig, collect_block_io, retrain_descendants

    train = data["train"]
    io = None
    spec = lego_key(name, s, len(train), workdir)
    key = _digest(spec)
    root = workdir / f"lego-{name}-{key}"
    if (root / "lego.json").is_file():
        return _load_lego(name, s, teacher, root, key)
    torch.manual_seed(s.seed)
    # The per-block stage does not depend on the joint stage's settings: runs that differ
    # only there share it (cached on its own, with its original wall time).
    block_spec_key = {k: v for k, v in spec.items() if k not in ("joint", "joint_on_block_io")}
    block_root = workdir / f"blockwise-{name}-{_digest(block_spec_key)}"
    if (block_root / "blockwise.json").is_file():
        scalable = _descendants(detect_blocks(teacher, SHAPE), s, name)
        _load_variants(scalable, block_root / "variants")
        blockwise_s = json.loads((block_root / "blockwise.json").read_text())["blockwise_s"]
        log.info("%s: per-block descendants loaded from cache %s (trained originally in %.1f s)",
                 name, block_root, blockwise_s)
    else:
        with Timer() as t_block:
            blocked = detect_blocks(teacher, SHAPE)
            scalable = _descendants(blocked, s, name)
            io = collect_block_io(blocked.blocks, train, limit=s.retrain_limit, batch_size=256, seed=s.seed)
            cfg = RetrainConfig(epochs=s.retrain_epochs, lr=s.retrain_lr, batch_size=64,
                                val_limit=s.retrain_val_limit, seed=s.seed)
            for block_spec, block_io in zip(scalable.specs, io):
                if len(scalable.choices(block_spec.name)) > 1:
                    retrain_descendants(scalable.variants[block_spec.name], block_io, cfg, progress=progress)
        blockwise_s = round(t_block.seconds, 1)
        tmp = cache_tmp(block_root)
        _save_variants(scalable, tmp / "variants")
        (tmp / "blockwise.json").write_text(json.dumps({"key": block_spec_key, "blockwise_s": blockwise_s}) + "\n")
        publish_cache(tmp, block_root)
    blockwise = copy.deepcopy(scalable)
    with Timer() as t_joint:
        joint_ds, outputs = train, None
        if s.joint_on_block_io:
            joint_ds, outputs, io = _block_io_for_joint(scalable, train, s, io)
        joint = train_joint(scalable, joint_ds, joint_config(s), progress=progress, teacher_outputs=outputs)
    del io, joint_ds, outputs
    tail = joint.losses[-10:]
    timings = {"blockwise_s": blockwise_s, "joint_s": round(t_joint.seconds, 1),
               "joint_final_loss": round(sum(tail) / max(1, len(tail)), 4)}
    log.info("%s: per-block stage %.1f s, joint stage %.1f s", name, blockwise_s, t_joint.seconds)
    tmp = cache_tmp(root)
    _save_variants(scalable, tmp / "scalable")
    _save_variants(blockwise, tmp / "blockwise")
    (tmp / "lego.json").write_text(json.dumps({"key": spec, "timings": timings}, indent=2) + "\n")
    publish_cache(tmp, root)
    return LegoRun(scalable, blockwise, timings, key)


def _block_io_for_joint(scalable, train, s: Settings, io):
    """(dataset, teacher outputs, block I/O) for a joint stage on the per-block stage's samples.

    The joint stage then reads the teacher's targets from the per-block stage's one teacher
    pass instead of running the teacher every step. When the per-block stage came from the
    cache its pass is redone here, inside the joint stage's timer.
    """
    from torch.utils.data import TensorDataset

    from legoblocks.retrain import block_io_indices, collect_block_io

    if io is None:
        teacher_blocks = [scalable.variants[b]["0.0"] for b in scalable.block_names]
        io = collect_block_io(teacher_blocks, train, limit=s.retrain_limit, batch_size=256, seed=s.seed)
    index = block_io_indices(len(train), s.retrain_limit, s.seed)
    return TensorDataset(io[0].inputs, train.tensors[1][index]), [d.outputs for d in io], io


def cache_tmp(root: Path) -> Path:
    """A private temporary sibling of a cache entry (unique per process)."""
    tmp = root.with_name(f".{root.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish_cache(tmp: Path, root: Path) -> None:
    """Rename a finished entry into place, so it appears only when complete; when another
    process published the same entry first, theirs is kept (same key, same content)."""
    try:
        tmp.rename(root)
    except OSError:
        if not root.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- profile and select


@dataclass
class Pick:
    """The selection kept for one budget, with its measured and predicted validation accuracy."""

    budget: float
    selection: list[str]
    val_acc: float
    predicted: float
    candidates: int
    anchor: bool = False  # the budget's trained even composition was kept


@dataclass
class Selected:
    table: Any  # profiling.table.ProfileTable
    picks: list[Pick]
    profile_s: float
    rerank_s: float


def select(table, model, val, budgets: Sequence[float], *, metric: str, top_k: int,
           rerank: bool, trained_anchors: Sequence[float] = (),
           margin_se: float = 1.0) -> tuple[list[Pick], float]:
    """Per budget, the optimizer's top-k re-ranked on validation data.

    metric "flops": budgets are fractions of the teacher's FLOPs (the table's per-block FLOPs
    add up exactly to the whole model's); metric "latency": budgets in ms against the table's
    latency column. With `rerank` on FLOPs budgets the budget's even composition
    (`legoblocks.anchors`, the one an anchored joint stage trains) is a candidate too; where
    the joint stage trained it (the budget is in `trained_anchors`), or it is the original
    model (a budget of 1.0), it is kept unless another candidate measures better by more
    than `margin_se` standard errors
    (`profiling.rerank.pick_measured`). Without `rerank` the optimizer's best is kept as is
    (its validation accuracy is still measured, to report how wrong the prediction was).
    Returns the picks (`Pick.budget` as given) and the seconds.
    """
    from profiling.accuracy import SelectionEvaluator
    from profiling.rerank import pick_measured
    from profiling.table import even_selections

    evaluator = SelectionEvaluator(model, val)
    scale = table.total(["0.0"] * len(table.blocks), "flops") if metric == "flops" else 1.0
    trained = set(trained_anchors)
    original = ["0.0"] * len(table.blocks)
    picks = []
    with Timer() as t:
        for budget in budgets:
            candidates = choose(table, budget * scale, top_k if rerank else 1, metric)
            preferred = []
            if rerank and metric == "flops":
                (anchor,) = even_selections(table, [budget])
                if anchor not in candidates and table.total(anchor, "flops") <= budget * scale:
                    candidates.append(anchor)
                # the original (the budget admits the whole model) needs no training to be right
                if (budget in trained or anchor == original) and anchor in candidates:
                    preferred.append(candidates.index(anchor))
            measured = evaluator.accuracy_many(candidates)
            best = pick_measured(measured, preferred, n=len(val), margin_se=margin_se)
            picks.append(Pick(budget, list(candidates[best]), measured[best],
                              table.predicted_accuracy(candidates[best]), len(candidates),
                              anchor=best in preferred))
    return picks, t.seconds


def profile(name: str, s: Settings, model, val, *, calibration_k: int, latency=None,
            additivity_n: int | None = None, progress: bool = False):
    """The ProfileTable of `model` on validation data, and the seconds serving needs of it.

    The held-out additivity check (`heldout_seconds(table)`) is left out of those seconds:
    it scores the profile for the report and nothing downstream reads it (the calibration
    picks its fit by cross-validation on its own compositions), as test-set scoring is left
    out of every method's time. Without `latency` (FLOPs budgets) latency is measured
    briefly and the composed-latency fit is skipped: nothing here reads either.
    """
    from profiling.latency_fit import DEFAULT_LATENCY_K
    from profiling.profile import LatencySettings, profile_model

    lat = latency or LatencySettings(warmup=1, repeats=3)
    with Timer() as t:
        table = profile_model(model, val, envs=s.profile_envs, latency=lat,
                              additivity_n=s.additivity_n if additivity_n is None else additivity_n,
                              calibration_k=calibration_k, latency_calibration_k=DEFAULT_LATENCY_K if latency else 0,
                              seed=s.seed, model_name=name, progress=progress)
    return table, t.seconds - heldout_seconds(table)


def heldout_seconds(table) -> float:
    """Seconds the profile spent on its held-out additivity check (report only)."""
    return float(table.settings.get("seconds", {}).get("additivity", 0.0))


def profile_and_select(name: str, s: Settings, model, val, budgets: Sequence[float], *, metric: str = "flops",
                       calibration_k: int, rerank: bool, latency=None, progress: bool = False) -> Selected:
    """Profile `model`, then pick a selection per budget: FLOPs fractions or ms (see `select`)."""
    table, profile_s = profile(name, s, model, val, calibration_k=calibration_k, latency=latency, progress=progress)
    picks, rerank_s = select(table, model, val, budgets, metric=metric, top_k=s.top_k, rerank=rerank,
                             trained_anchors=trained_anchors(s), margin_se=s.rerank_margin_se)
    log.info("%s: profile %.1f s, selection %.1f s", name, profile_s, rerank_s)
    return Selected(table, picks, profile_s, rerank_s)


# ----------------------------------------------------------------------------- baselines


@dataclass
class Baseline:
    """One baseline model for one budget: the trained model, its measured FLOPs and accuracy."""

    budget: float
    model: Any
    flops_frac: float
    test_acc: float  # fraction in [0, 1]
    seconds: float  # pruning + training wall time
    extra: dict[str, Any] = field(default_factory=dict)


def _per_budget(value: float | Mapping[float, float] | None, budget: float) -> float | None:
    return value.get(budget) if isinstance(value, Mapping) else value


def uniform_baseline(name: str, s: Settings, data: dict, teacher, budgets: Sequence[float], *,
                     seconds_per_budget: float | Mapping[float, float] | None = None,
                     epochs: float | None = None, progress: bool = False) -> list[Baseline]:
    """The teacher pruned uniformly to each FLOPs fraction and fine-tuned end to end.

    Give `epochs` (a fixed amount of work) or `seconds_per_budget` (pruning + fine-tuning
    wall time per budget, e.g. an equal share of LegoDNN's time). Budget 1.0 is the teacher
    itself fine-tuned for its share.
    """
    from legoblocks.train import evaluate
    from legoblocks.uniform import finetune, prune_to_flops

    if (epochs is None) == (seconds_per_budget is None):
        raise ValueError("uniform_baseline: give exactly one of epochs or seconds_per_budget")
    out = []
    for budget in budgets:
        with Timer() as t_prune:
            choice = prune_to_flops(teacher, budget, SHAPE, iterations=s.prune_iterations)
        share = _per_budget(seconds_per_budget, budget)
        budget_kw = {"epochs": epochs} if epochs is not None else {"wall_time_s": max(0.5, share - t_prune.seconds)}
        report = finetune(choice.model, teacher, data["train"], lr=s.uniform_lr, seed=s.seed,
                          progress=progress, **budget_kw)
        seconds = t_prune.seconds + report.seconds
        out.append(Baseline(budget, choice.model, choice.flops_frac, evaluate(choice.model, data["test"]),
                            seconds, {"ratio": round(choice.ratio, 4), "prune_s": round(t_prune.seconds, 1),
                                     "finetune_s": report.seconds}))
        log.info("%s uniform @ %.3f: ratio %.3f, %.1f s", name, budget, choice.ratio, seconds)
    return out


def scratch_baseline(name: str, s: Settings, data: dict, teacher, budgets: Sequence[float], *,
                     seconds_per_budget: float | Mapping[float, float], skip_unfit: bool = False,
                     progress: bool = False) -> list[Baseline]:
    """The model at the widest width that fits each budget, trained from scratch (0.5 CE +
    0.5 KD to the teacher) for the given wall time per budget.

    Some families cannot shrink below a floor (MobileNetV2 rounds channels to multiples of
    8): with `skip_unfit` such a budget is left out (logged), otherwise it raises.
    """
    import torch

    from legoblocks.train import evaluate
    from legoblocks.uniform import count_flops, finetune

    teacher_flops = count_flops(teacher, SHAPE)
    out = []
    for budget in budgets:
        torch.manual_seed(s.seed)
        try:
            model, width = scratch_model(name, s, budget * teacher_flops)
        except ValueError as exc:
            if not skip_unfit:
                raise
            log.warning("%s scratch @ %.3f skipped: %s", name, budget, exc)
            continue
        report = finetune(model, teacher, data["train"], wall_time_s=_per_budget(seconds_per_budget, budget),
                          lr=0.05, seed=s.seed, progress=progress)
        out.append(Baseline(budget, model, count_flops(model, SHAPE) / teacher_flops,
                            evaluate(model, data["test"]), report.seconds, {"width": width}))
        log.info("%s scratch @ %.3f: width %s, %.1f s", name, budget, width, report.seconds)
    return out


# ----------------------------------------------------------------------------- one model


def bench_model(name: str, s: Settings, data: dict, workdir: Path, progress: bool) -> tuple[list[dict], dict]:
    """Every method of issue 11 for one model, from one teacher and seed."""
    from legoblocks.bn import calibration_batches, recalibrate_bn
    from legoblocks.train import evaluate
    from legoblocks.uniform import count_flops

    train, val, test = data["train"], data["val"], data["test"]
    rows: list[dict] = []
    teacher, teacher_s = teacher_for(name, s, train, workdir, progress)
    teacher_flops = count_flops(teacher, SHAPE)
    info: dict[str, Any] = {"teacher_test_acc": round(100 * evaluate(teacher, test), 2), "teacher_flops": teacher_flops,
                            "teacher_train_s": None if teacher_s is None else round(teacher_s, 1)}
    log.info("%s teacher: %.2f%% test, %.2f MFLOPs", name, info["teacher_test_acc"], teacher_flops / 1e6)
    bn_batches = calibration_batches(train, num_batches=s.bn_batches, batch_size=128, seed=s.seed)

    variants = []
    if {"legodnn", "legodnn-blockwise"} & set(s.methods):  # baselines alone train no LegoDNN
        lego = train_legodnn(name, s, data, teacher, workdir, progress)
        info.update(blocks=len(lego.scalable.block_names), compositions=lego.scalable.num_options(),
                    timings=lego.timings, lego_cache=lego.key, lego_cached=lego.cached)
        variants = [  # method, model, calibration compositions, re-rank top k, training seconds
            ("legodnn", lego.scalable, s.calibration_k, True, lego.timings["blockwise_s"] + lego.timings["joint_s"]),
            ("legodnn-blockwise", lego.blockwise, 0, False, lego.timings["blockwise_s"]),
        ]
    info["profiles"] = {}
    for method, model, k, rerank, trained_s in [v for v in variants if v[0] in s.methods]:
        sel = profile_and_select(name, s, model, val, s.budgets,
                                 calibration_k=k, rerank=rerank, progress=progress)
        info["profiles"][method] = {"profile_s": round(sel.profile_s, 1), "rerank_s": round(sel.rerank_s, 1),
                                    "heldout_check_s": round(heldout_seconds(sel.table), 1),
                                    "additivity": _brief(sel.table.additivity),
                                    "calibration": _brief(sel.table.calibration)}
        wall = trained_s + sel.profile_s + sel.rerank_s
        for pick in sel.picks:
            budget = pick.budget
            composed = model.compose(pick.selection)
            frac = count_flops(composed, SHAPE) / teacher_flops
            rows.append(_row(name, method, budget, frac, evaluate(composed, test), wall, selection=pick.selection,
                             predicted_val_acc=round(100 * pick.predicted, 2), val_acc=round(100 * pick.val_acc, 2),
                             anchor=pick.anchor))
            with Timer() as t_bn:
                recalibrated = recalibrate_bn(composed, bn_batches)
            rows.append(_row(name, f"{method}+bn", budget, frac, evaluate(recalibrated, test),
                             wall + t_bn.seconds * len(s.budgets), selection=pick.selection,
                             bn_s=round(t_bn.seconds, 2)))

    if "uniform" not in s.methods:
        return rows, info
    uniform = uniform_baseline(name, s, data, teacher, s.budgets, epochs=s.uniform_epochs, progress=progress)
    total_uniform = sum(u.seconds for u in uniform)
    for u in uniform:
        rows.append(_row(name, "uniform", u.budget, u.flops_frac, u.test_acc, total_uniform, ratio=u.extra["ratio"]))
    if "scratch" not in s.methods:
        return rows, info
    # scratch trains for the time uniform spent fine-tuning at that budget
    scratch = scratch_baseline(name, s, data, teacher, s.budgets, progress=progress,
                               seconds_per_budget={u.budget: u.extra["finetune_s"] for u in uniform})
    total_scratch = sum(r.seconds for r in scratch)
    for r in scratch:
        rows.append(_row(name, "scratch", r.budget, r.flops_frac, r.test_acc, total_scratch, width=r.extra["width"]))
    return rows, info


def _brief(report: dict | None) -> dict | None:
    """The headline figures of an additivity or calibration dict (points are left out)."""
    if not report:
        return None
    keep = ("mae", "max_error", "n", "method", "scale", "k", "heldout_n", "heldout_mae_raw",
            "heldout_max_raw", "heldout_mae_calibrated", "heldout_max_calibrated")
    return {k: report[k] for k in keep if k in report}


# ----------------------------------------------------------------------------- report

METHODS_DOC = """\
- `legodnn`: per-block feature distillation of every descendant (one teacher pass, MSE),
  then the composition-aware joint stage (`legoblocks.joint`: per step the even composition
  (`legoblocks.anchors`) of the smallest budget, as the sandwich floor, and the even
  composition of one other budget in turn; 0.5 T^2 KL to the teacher's logits + 0.5 CE +
  per-block feature MSE), then the profile with calibrated drops (`profiling.profile_model`, K
  FLOPs-spread compositions); per budget the optimizer (`optimizer.solve`, FLOPs as its
  latency column) returns its top k selections, which are measured on validation data with
  the budget's even composition and the best is kept. One training run serves every budget
  (all compositions stay available): `train_wall_s` = per-block + joint + profile + selection.
  The profile's held-out additivity check (20 random compositions that score the
  calibration for this report; nothing downstream reads them) is timed but not counted,
  as no method's test-set scoring is.
- `legodnn+bn`: the same selections, BatchNorm statistics re-estimated on a few training
  batches after composing (`legoblocks.bn.recalibrate_bn`).
- `legodnn-blockwise`: the paper's recipe: per-block distillation only, raw (uncalibrated)
  profile, the optimizer's best selection as is. `train_wall_s` = per-block + profile.
- `uniform`: every layer of the teacher pruned at one ratio (Torch-Pruning, magnitude),
  the ratio bisected on measured FLOPs to fit each budget, then fine-tuned end to end with
  0.5 CE + 0.5 KD (T = 4), SGD with a cosine schedule; one prune + fine-tune per budget.
- `scratch`: the model at the largest width that fits the budget, trained from random
  initialisation with the same loss for the time uniform spent fine-tuning at that budget.\
"""


def verdicts(rows: list[dict]) -> list[str]:
    """Plain-language checks of the issue's acceptance targets, from the rows alone."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        by = {(r["method"], r["budget"]): r for r in rows if r["model"] == model}
        budgets = sorted({r["budget"] for r in rows if r["model"] == model})
        for budget in budgets:
            lego, uni = by.get(("legodnn", budget)), by.get(("uniform", budget))
            if lego and uni:
                diff = lego["test_acc"] - uni["test_acc"]
                verdict = "meets" if diff >= 0 else "MISSES"
                lines.append(f"{model} @ {budget:.2f}: legodnn {lego['test_acc']:.2f}% vs uniform "
                             f"{uni['test_acc']:.2f}% ({diff:+.2f} points) - {verdict} legodnn >= uniform")
        lego = next((r for r in rows if r["model"] == model and r["method"] == "legodnn"), None)
        uni = next((r for r in rows if r["model"] == model and r["method"] == "uniform"), None)
        if lego and uni and uni["train_wall_s"] > 0:
            ratio = lego["train_wall_s"] / uni["train_wall_s"]
            lines.append(f"{model}: legodnn train_wall_s / uniform = {lego['train_wall_s']:.1f} / "
                         f"{uni['train_wall_s']:.1f} = {ratio:.2f} (target <= 1.0)")
        smallest = min(budgets) if budgets else None
        plain, bn = by.get(("legodnn", smallest)), by.get(("legodnn+bn", smallest))
        if plain and bn:
            gain = bn["test_acc"] - plain["test_acc"]
            lines.append(f"{model}: BatchNorm re-estimation after the joint stage at {smallest:.2f}: "
                         f"{gain:+.2f} points ({'>=' if gain >= 0.3 else '<'} 0.3, the bar for shipping it)")
    return lines


def _shown(path: Path) -> str:
    """`path` as the page should name it: relative to the repository when inside it."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def markdown(result: dict, source: str = "docs/results/accuracy.json") -> str:
    rows = result["rows"]
    out = ["# Accuracy under FLOPs budgets (issue 11)", "",
           f"Produced by `{result['command']}` on {result['machine']} "
           f"in {result.get('wall_s', '?')} s. Re-render this page from the JSON with "
           f"`bench/accuracy.py --render {source}`.", "",
           "Test accuracy (%) on the Fashion-MNIST test set, measured FLOPs fraction of the teacher in "
           "parentheses; `train_wall_s` is the retraining time a method needs to serve all budgets "
           f"(teacher training excluded). Raw numbers: `{source}`. Every method "
           "starts from the same teacher and seed; wall times are measured in the same process, "
           "so they compare with each other, not with other machines.", "",
           "## Methods", "", METHODS_DOC, ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        info = result["models"][model]
        out += [f"## {model}", "",
                f"Teacher: {info['teacher_test_acc']:.2f}% test, {info['teacher_flops'] / 1e6:.2f} MFLOPs; "
                f"{info.get('blocks', '?')} blocks, {info.get('compositions', '?')} compositions.", ""]
        budgets = sorted({r["budget"] for r in rows if r["model"] == model})
        out.append("| method | " + " | ".join(f"budget {b:.2f}" for b in budgets) + " | train_wall_s |")
        out.append("|---|" + "---|" * len(budgets) + "---|")
        for method in dict.fromkeys(r["method"] for r in rows if r["model"] == model):
            cells, wall = [], ""
            for b in budgets:
                r = next((r for r in rows if r["model"] == model and r["method"] == method and r["budget"] == b), None)
                cells.append(f"{r['test_acc']:.2f} ({r['flops_frac']:.3f})" if r else "-")
                wall = f"{r['train_wall_s']:.1f}" if r else wall
            out.append(f"| {method} | " + " | ".join(cells) + f" | {wall} |")
        out.append("")
        t = info.get("timings", {})
        cached = " (descendants loaded from the LegoRun cache; original training times)" if info.get("lego_cached") else ""
        if t:
            out.append(f"LegoDNN time{cached}: per-block {t.get('blockwise_s')} s, joint {t.get('joint_s')} s; "
                       + "; ".join(f"{m}: profile {p['profile_s']} s, re-rank {p['rerank_s']} s"
                                   + (f" (held-out additivity check, not counted: {p['heldout_check_s']} s)"
                                      if p.get("heldout_check_s") else "")
                                   for m, p in info.get("profiles", {}).items()) + ".")
        cal = (info.get("profiles", {}).get("legodnn") or {}).get("calibration")
        if cal:
            out.append(f"Calibration ({cal.get('method')}, k={cal.get('k')}): held-out MAE "
                       f"{100 * cal['heldout_mae_raw']:.2f} -> {100 * cal['heldout_mae_calibrated']:.2f} points, "
                       f"max {100 * cal['heldout_max_raw']:.2f} -> {100 * cal['heldout_max_calibrated']:.2f} "
                       f"on {cal.get('heldout_n')} compositions.")
        for method in ("legodnn", "legodnn-blockwise"):
            chosen = [r for r in rows if r["model"] == model and r["method"] == method and "val_acc" in r]
            if chosen:
                out.append(f"{method}: predicted minus measured validation accuracy of the selection "
                           "picked, per budget: "
                           + ", ".join(f"{r['budget']:.2f}: {r['predicted_val_acc'] - r['val_acc']:+.2f}"
                                       for r in chosen) + " points.")
        out.append("")
    out += ["## Verdicts", ""] + [f"- {v}" for v in verdicts(rows)] + [""]
    out += ["## Settings", "", "```json", json.dumps(result["settings"], indent=2), "```", ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------- CLI


NOTES_MARKER = "<!-- hand-written notes below this line are kept when the page is regenerated -->"


def write_markdown(path: Path, result: dict, source: Path | None = None) -> None:
    """Write the generated page, keeping any hand-written notes after NOTES_MARKER."""
    notes = ""
    if path.is_file():
        old = path.read_text()
        if NOTES_MARKER in old:
            notes = old.split(NOTES_MARKER, 1)[1]
    page = markdown(result) if source is None else markdown(result, _shown(source))
    path.write_text(page + "\n" + NOTES_MARKER + notes)


def to_json(result: dict) -> str:
    """Indented JSON with one line per row, so a diff of two runs reads row by row."""
    rows = ",\n".join("    " + json.dumps(r) for r in result["rows"])
    rest = {k: v for k, v in result.items() if k != "rows"}
    text = json.dumps({**rest, "rows": "@ROWS@"}, indent=2)
    return text.replace('"@ROWS@"', "[\n" + rows + "\n  ]") + "\n"


def parse_assignments(values: Sequence[str] | None, flag: str, convert=None) -> dict[str, Any]:
    """`KEY=VALUE` strings -> dict; VALUE is JSON when it parses (numbers, true, {...}), else a
    string. `convert(key, value)` may check or transform each value (and raise SystemExit)."""
    out: dict[str, Any] = {}
    for item in values or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"bench: {flag} expects KEY=VALUE, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        key = key.strip()
        out[key] = convert(key, value) if convert else value
    return out


def _model_kwargs_value(key: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SystemExit(f"bench: --model-kwargs {key}=...: expected a JSON object such as "
                         f"'{{\"width_mult\": 0.5}}', got {value!r}")
    return value


def _epochs_value(key: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SystemExit(f"bench: --model-teacher-epochs {key}=...: expected a positive integer, got {value!r}")
    return value


def _optional_count(text: str) -> int | None:
    """argparse type: a positive integer, or 'none'."""
    if text.strip().lower() == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'none', got {text!r}")
    return value


def add_common_arguments(p: argparse.ArgumentParser, d: Settings) -> None:
    """The arguments that define teachers and the LegoDNN training run (shared with
    bench/evaluate.py, so both scripts find the same caches)."""
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--data-dir", default=d.data_dir, help="folder with the Fashion-MNIST IDX .gz files")
    p.add_argument("--workdir", type=Path, default=REPO / ".legodnn" / "bench-accuracy",
                   help="cache for trained teachers and LegoDNN runs (reused across runs and scripts)")
    p.add_argument("--model-kwargs", action="append", metavar="NAME=JSON",
                   help="zoo kwargs of one model, e.g. mobilenetv2='{\"width_mult\": 0.5}' (repeatable)")
    p.add_argument("--train-size", type=int, default=None, help="training images (default: all but validation)")
    p.add_argument("--val-size", type=int, default=d.val_size, help="validation images held out of training")
    p.add_argument("--teacher-epochs", type=int, default=d.teacher_epochs, help="teacher epochs of every model")
    p.add_argument("--model-teacher-epochs", action="append", metavar="NAME=N",
                   help="teacher epochs of one model, overriding --teacher-epochs (repeatable)")
    p.add_argument("--retrain-epochs", type=int, default=d.retrain_epochs)
    p.add_argument("--retrain-limit", type=int, default=d.retrain_limit,
                   help="block I/O pairs collected per block (the teacher pass), held-out ones included")
    p.add_argument("--retrain-val-limit", type=_optional_count, default=d.retrain_val_limit,
                   help="at most this many of them measure the per-block loss before/after, the rest "
                        "train ('none': 10%% of them, no cap)")
    p.add_argument("--joint-on-block-io", action="store_true",
                   help="train the joint stage on the per-block stage's samples, with the teacher's targets "
                        "from its one teacher pass (no teacher forward per step)")
    p.add_argument("--joint", action="append", metavar="KEY=VALUE",
                   help="override a legoblocks.joint.JointConfig field (VALUE parsed as JSON, else a "
                   "string), e.g. --joint steps=600 --joint freeze_bn=true (repeatable); unset fields "
                   "keep JointConfig's defaults, seed defaults to --seed")
    p.add_argument("--joint-steps", type=int, default=None, help="alias of --joint steps=N")
    p.add_argument("--joint-batch", type=int, default=None, help="alias of --joint batch_size=N")
    p.add_argument("--joint-lr", type=float, default=None, help="alias of --joint lr=X")
    p.add_argument("--calibration-k", type=int, default=d.calibration_k)
    p.add_argument("--top-k", type=int, default=d.top_k, help="selections re-ranked on validation data")
    p.add_argument("--rerank-margin-se", type=float, default=d.rerank_margin_se,
                   help="keep a trained anchor unless a candidate beats it on validation by more than this "
                        "many standard errors (0: keep the best measured candidate)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    d = Settings()
    p = argparse.ArgumentParser(
        prog="bench/accuracy.py",
        description="LegoDNN composed models vs uniform pruning vs scratch under FLOPs budgets "
        "(Fashion-MNIST, one teacher and seed for all methods). Writes JSON and Markdown.",
    )
    p.add_argument("--models", nargs="+", default=d.models, help="zoo model names (default: resnet20)")
    p.add_argument("--budgets", nargs="+", type=float, default=d.budgets, help="FLOPs fractions of the teacher")
    add_common_arguments(p, d)
    p.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "accuracy.json")
    p.add_argument("--md", type=Path, default=REPO / "docs" / "benchmarks" / "accuracy.md")
    p.add_argument("--bn-batches", type=int, default=d.bn_batches, help="batches of 128 for BN re-estimation")
    p.add_argument("--uniform-epochs", type=float, default=d.uniform_epochs)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(d.methods),
                   help="methods to run (default: all); scratch trains for uniform's time, so it needs uniform")
    p.add_argument("--quick", action="store_true", help="tiny smoke setting (seconds, meaningless numbers)")
    p.add_argument("--render", type=Path, default=None, metavar="JSON",
                   help="only rewrite the Markdown (--md) from an existing results JSON")
    return p


def common_settings(args: argparse.Namespace, **extra: Any) -> Settings:
    """Settings from the shared arguments (see add_common_arguments); checks --joint early."""
    joint = parse_assignments(args.joint, "--joint")
    for alias, key in (("joint_steps", "steps"), ("joint_batch", "batch_size"), ("joint_lr", "lr")):
        if getattr(args, alias) is not None:
            joint[key] = getattr(args, alias)
    s = Settings(
        seed=args.seed, data_dir=str(args.data_dir), train_size=args.train_size, val_size=args.val_size,
        model_kwargs=parse_assignments(args.model_kwargs, "--model-kwargs", _model_kwargs_value),
        teacher_epochs=args.teacher_epochs,
        model_teacher_epochs=parse_assignments(args.model_teacher_epochs, "--model-teacher-epochs", _epochs_value),
        retrain_epochs=args.retrain_epochs, retrain_limit=args.retrain_limit,
        retrain_val_limit=args.retrain_val_limit, joint_on_block_io=args.joint_on_block_io, joint=joint,
        calibration_k=args.calibration_k, top_k=args.top_k, rerank_margin_se=args.rerank_margin_se,
        threads=args.threads, **extra,
    )
    joint_config(s)  # unknown or invalid joint fields fail before any data is loaded
    return s


def settings_from(args: argparse.Namespace) -> Settings:
    s = common_settings(args, models=list(args.models), budgets=list(args.budgets),
                        bn_batches=args.bn_batches, uniform_epochs=args.uniform_epochs,
                        methods=list(dict.fromkeys(args.methods)))
    if "scratch" in s.methods and "uniform" not in s.methods:
        raise SystemExit("bench/accuracy.py: --methods scratch needs uniform too (scratch trains for the "
                         "time uniform spent fine-tuning); add uniform or drop scratch")
    bad = [b for b in s.budgets if not 0 < b < 1]
    if bad:
        raise SystemExit(f"bench/accuracy.py: budgets must be fractions in (0, 1), got {bad}")
    return quick_settings(s) if args.quick else s


def load_data(s: Settings) -> dict:
    from legoblocks.data import load_fashion_mnist, split

    full = load_fashion_mnist(s.data_dir, train=True)
    train_n = len(full) - s.val_size if s.train_size is None else s.train_size
    train, val = split(full, [train_n, s.val_size], seed=s.seed)
    test = load_fashion_mnist(s.data_dir, train=False)
    if s.test_size is not None:
        test = split(test, [s.test_size], seed=s.seed)[0]
    return {"train": train, "val": val, "test": test}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.render is not None:
        if not args.render.is_file():
            raise SystemExit(f"bench/accuracy.py: --render: {args.render} does not exist; run the benchmark first")
        args.md.parent.mkdir(parents=True, exist_ok=True)
        write_markdown(args.md, json.loads(args.render.read_text()), args.render)
        print(f"wrote {args.md}")
        return 0
    s = settings_from(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    threads = torch.get_num_threads()
    if s.threads is not None:
        torch.set_num_threads(s.threads)  # a benchmark owns its process; restored for in-process callers
    machine = _machine()
    try:
        args.workdir.mkdir(parents=True, exist_ok=True)
        data = load_data(s)
        started = time.time()
        rows, models = [], {}
        for name in s.models:
            model_rows, info = bench_model(name, s, data, args.workdir, progress=not args.no_progress)
            rows += model_rows
            models[name] = info
    finally:
        torch.set_num_threads(threads)
    result = {
        "machine": machine,
        "command": "bench/accuracy.py " + shlex.join(argv),
        "seed": s.seed,
        "rows": rows,
        "models": models,
        "settings": settings_record(s),
        "wall_s": round(time.time() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(to_json(result))
    args.md.parent.mkdir(parents=True, exist_ok=True)
    write_markdown(args.md, result, args.out)
    for line in verdicts(rows):
        print(line)
    print(f"wrote {args.out} and {args.md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
