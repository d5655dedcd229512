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

    .venv/bin/python bench/accuracy.py                 # full run (an hour or more on 2 cores)
    .venv/bin/python bench/accuracy.py --quick --workdir /tmp/q --out /tmp/q/a.json --md /tmp/q/a.md
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

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
    """Everything that defines a run; written into the JSON so a result names its recipe."""

    models: list[str] = field(default_factory=lambda: ["resnet20"])
    budgets: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    seed: int = 0
    data_dir: str = "/usr/share/datasets/fashion-mnist"
    model_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)  # per model name
    train_size: int | None = None  # None: all 60k minus validation
    val_size: int = 1000
    test_size: int | None = None  # None: the full 10k test set
    teacher_epochs: int = 8
    teacher_lr: float = 0.1
    ladder: list[float] = field(default_factory=lambda: [0.0, 0.2, 0.4, 0.6, 0.8])
    retrain_epochs: int = 1
    retrain_limit: int | None = 15000
    retrain_lr: float = 1e-3
    joint_steps: int = 200
    joint_batch: int = 128
    joint_lr: float = 2e-3
    profile_envs: int = 1
    additivity_n: int = 20
    calibration_k: int = 16
    top_k: int = 5
    bn_batches: int = 8
    uniform_epochs: float = 1.0
    uniform_lr: float = 0.01
    prune_iterations: int = 12
    threads: int | None = None


def quick_settings(base: Settings) -> Settings:
    """A tiny end-to-end setting for the smoke test: every stage runs, nothing is accurate."""
    return Settings(
        models=base.models[:1], budgets=base.budgets, seed=base.seed, data_dir=base.data_dir,
        model_kwargs={m: {WIDTH_KEY.get(m, "width"): QUICK_WIDTH[_width_family(m)]} for m in base.models[:1]},
        train_size=768, val_size=128, test_size=256,
        teacher_epochs=1, ladder=[0.0, 0.8], retrain_limit=256, joint_steps=2, joint_batch=32,
        additivity_n=2, calibration_k=2, top_k=2, bn_batches=1, uniform_epochs=0.05,
        prune_iterations=4, threads=base.threads if base.threads is not None else 1,
    )


# ----------------------------------------------------------------------------- helpers


def _machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return (f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {platform.system()} {platform.release()}")


class Timer:
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


def teacher_for(name: str, s: Settings, train, workdir: Path, progress: bool):
    """Train the teacher once per (model, recipe) and cache its state dict in the workdir."""
    import torch

    from legoblocks.train import train_teacher

    kwargs = s.model_kwargs.get(name, {})
    tag = "-".join(f"{k}{v}" for k, v in sorted(kwargs.items())) or "default"
    path = workdir / f"teacher-{name}-{tag}-n{len(train)}-e{s.teacher_epochs}-s{s.seed}.pt"
    torch.manual_seed(s.seed)
    model = _build(name, kwargs)
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        log.info("teacher %s loaded from %s", name, path)
        return model.eval(), None
    with Timer() as t:
        train_teacher(model, train, epochs=s.teacher_epochs, lr=s.teacher_lr, batch_size=128,
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


def choose(table, budget_flops: float, top_k: int) -> list[list[str]]:
    """The optimizer's `top_k` best selections under a FLOPs budget, best first.

    FLOPs are given to the optimizer as its latency column (in MFLOPs), so the selection is
    exact for the budget the benchmark measures.
    """
    from optimizer.problem import parse_problem
    from optimizer.solver import solve
    from profiling.table import to_problem

    flops = {(b.name, cid): c.flops / 1e6 for b in table.blocks for cid, c in b.choices.items()}
    problem = to_problem(table, {"latency_ms": budget_flops / 1e6}, latency_override=flops)
    solution = solve(parse_problem(problem), top_k=top_k)
    if not solution.feasible:
        raise ValueError(
            f"no composition of {table.model_name} fits {budget_flops / 1e6:.2f} MFLOPs "
            f"(smallest: {solution.min_latency_ms:.2f}); raise the budget or add sparser descendants"
        )
    return [solution.selection[table.model_name]] + [a.selection[table.model_name] for a in solution.alternatives]


def _row(model: str, method: str, budget: float, flops_frac: float, acc: float, wall: float, **extra) -> dict:
    return {"model": model, "method": method, "budget": budget, "flops_frac": round(flops_frac, 4),
            "test_acc": round(100.0 * acc, 2), "train_wall_s": round(wall, 1), **extra}


# ----------------------------------------------------------------------------- one model


def bench_model(name: str, s: Settings, data: dict, workdir: Path, progress: bool) -> tuple[list[dict], dict]:
    import torch

    from legoblocks.bn import calibration_batches, recalibrate_bn
    from legoblocks.compose import ScalableModel
    from legoblocks.detect import detect_blocks
    from legoblocks.joint import JointConfig, train_joint
    from legoblocks.retrain import RetrainConfig, collect_block_io, retrain_descendants
    from legoblocks.train import evaluate
    from legoblocks.uniform import count_flops, finetune, prune_to_flops
    from profiling.accuracy import SelectionEvaluator
    from profiling.profile import LatencySettings, profile_model

    train, val, test = data["train"], data["val"], data["test"]
    rows: list[dict] = []
    info: dict[str, Any] = {}
    teacher, teacher_s = teacher_for(name, s, train, workdir, progress)
    teacher_flops = count_flops(teacher, SHAPE)
    info.update(teacher_test_acc=round(100 * evaluate(teacher, test), 2), teacher_flops=teacher_flops,
                teacher_train_s=None if teacher_s is None else round(teacher_s, 1))
    log.info("%s teacher: %.2f%% test, %.2f MFLOPs", name, info["teacher_test_acc"], teacher_flops / 1e6)
    bn_batches = calibration_batches(train, num_batches=s.bn_batches, batch_size=128, seed=s.seed)

    # --- LegoDNN: one training run for every budget -------------------------------------
    torch.manual_seed(s.seed)
    with Timer() as t_block:
        blocked = detect_blocks(teacher, SHAPE)
        scalable = ScalableModel.from_blocked(blocked, ladder=s.ladder, model_ref=name)
        io = collect_block_io(blocked.blocks, train, limit=s.retrain_limit, batch_size=256, seed=s.seed)
        cfg = RetrainConfig(epochs=s.retrain_epochs, lr=s.retrain_lr, batch_size=64, seed=s.seed)
        for spec, block_io in zip(scalable.specs, io):
            if len(scalable.choices(spec.name)) > 1:
                retrain_descendants(scalable.variants[spec.name], block_io, cfg, progress=progress)
        del io
    blockwise = copy.deepcopy(scalable)
    with Timer() as t_joint:
        joint = train_joint(scalable, train, JointConfig(steps=s.joint_steps, batch_size=s.joint_batch,
                                                         lr=s.joint_lr, seed=s.seed), progress=progress)
    info["blocks"] = len(scalable.block_names)
    info["compositions"] = scalable.num_options()
    log.info("%s: per-block stage %.1f s, joint stage %.1f s", name, t_block.seconds, t_joint.seconds)
    timings = {"blockwise_s": round(t_block.seconds, 1), "joint_s": round(t_joint.seconds, 1),
               "joint_final_loss": round(sum(joint.losses[-10:]) / max(1, len(joint.losses[-10:])), 4)}

    lat = LatencySettings(warmup=1, repeats=3)  # budgets are FLOPs: latency is not used here
    variants = [
        # method, model, calibration compositions, re-rank the optimizer's top k on validation
        ("legodnn", scalable, s.calibration_k, True, t_block.seconds + t_joint.seconds),
        ("legodnn-blockwise", blockwise, 0, False, t_block.seconds),
    ]
    profiles = {}
    for method, model, k, rerank, trained_s in variants:
        with Timer() as t_prof:
            table = profile_model(model, val, envs=s.profile_envs, latency=lat, additivity_n=s.additivity_n,
                                  calibration_k=k, seed=s.seed, model_name=name, progress=progress)
        profiles[method] = {"profile_s": round(t_prof.seconds, 1), "additivity": _brief(table.additivity),
                            "calibration": _brief(table.calibration)}
        evaluator = SelectionEvaluator(model, val)
        picked: dict[float, tuple[list[str], list[float]]] = {}
        with Timer() as t_rerank:
            for budget in s.budgets:
                # The blockwise recipe takes the optimizer's best as is; its validation accuracy
                # is still measured, to report how wrong the raw prediction was.
                candidates = choose(table, budget * teacher_flops, s.top_k if rerank else 1)
                measured = evaluator.accuracy_many(candidates)
                best = max(range(len(candidates)), key=lambda i: (measured[i], -i))
                picked[budget] = (candidates[best], [measured[best], table.predicted_accuracy(candidates[best])])
        profiles[method]["rerank_s"] = round(t_rerank.seconds, 1)
        log.info("%s %s: profile %.1f s, selection %.1f s", name, method, t_prof.seconds, t_rerank.seconds)
        wall = trained_s + t_prof.seconds + t_rerank.seconds
        for budget, (sel, (val_acc, predicted)) in picked.items():
            composed = model.compose(sel)
            frac = count_flops(composed, SHAPE) / teacher_flops
            extra = {"selection": sel, "predicted_val_acc": round(100 * predicted, 2),
                     "val_acc": round(100 * val_acc, 2)}
            rows.append(_row(name, method, budget, frac, evaluate(composed, test), wall, **extra))
            with Timer() as t_bn:
                recalibrated = recalibrate_bn(composed, bn_batches)
            rows.append(_row(name, f"{method}+bn", budget, frac, evaluate(recalibrated, test),
                             wall + t_bn.seconds * len(s.budgets), selection=sel, bn_s=round(t_bn.seconds, 2)))
    info["timings"] = timings
    info["profiles"] = profiles

    # --- uniform pruning: one prune + fine-tune per budget -------------------------------
    uniform_s: dict[float, float] = {}
    uniform_rows = []
    for budget in s.budgets:
        with Timer() as t_prune:
            choice = prune_to_flops(teacher, budget, SHAPE, iterations=s.prune_iterations)
        report = finetune(choice.model, teacher, train, epochs=s.uniform_epochs, lr=s.uniform_lr,
                          seed=s.seed, progress=progress)
        uniform_s[budget] = report.seconds
        uniform_rows.append((budget, choice, evaluate(choice.model, test), t_prune.seconds + report.seconds))
        log.info("%s uniform @ %.2f: ratio %.3f, %.1f s", name, budget, choice.ratio, uniform_rows[-1][3])
    total_uniform = sum(r[3] for r in uniform_rows)
    for budget, choice, acc, _ in uniform_rows:
        rows.append(_row(name, "uniform", budget, choice.flops_frac, acc, total_uniform, ratio=round(choice.ratio, 4)))

    # --- scratch: a narrower model trained for the time uniform fine-tuned ---------------
    scratch_rows = []
    for budget in s.budgets:
        torch.manual_seed(s.seed)
        model, width = scratch_model(name, s, budget * teacher_flops)
        report = finetune(model, teacher, train, wall_time_s=uniform_s[budget], lr=0.05, seed=s.seed,
                          progress=progress)
        scratch_rows.append((budget, width, count_flops(model, SHAPE) / teacher_flops, evaluate(model, test),
                             report.seconds))
    total_scratch = sum(r[4] for r in scratch_rows)
    for budget, width, frac, acc, _ in scratch_rows:
        rows.append(_row(name, "scratch", budget, frac, acc, total_scratch, width=width))
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
  then the composition-aware joint stage (`legoblocks.joint`: a random and the smallest
  composition per step, T^2 KL to the teacher's logits + per-block feature MSE), then the
  profile with calibrated drops (`profiling.profile_model`, K FLOPs-spread compositions);
  per budget the optimizer (`optimizer.solve`, FLOPs as its latency column) returns its
  top k selections, which are measured on validation data and the best is kept. One
  training run serves every budget: `train_wall_s` = per-block + joint + profile + selection.
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


def markdown(result: dict) -> str:
    rows = result["rows"]
    out = ["# Accuracy under FLOPs budgets (issue 11)", "",
           f"Produced by `{result['command']}` on {result['machine']} "
           f"in {result.get('wall_s', '?')} s. Re-render this page from the JSON with "
           "`bench/accuracy.py --render docs/results/accuracy.json`.", "",
           "Test accuracy (%) on the Fashion-MNIST test set, measured FLOPs fraction of the teacher in "
           "parentheses; `train_wall_s` is the retraining time a method needs to serve all budgets "
           "(teacher training excluded). Raw numbers: `docs/results/accuracy.json`. Every method "
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
        out.append(f"LegoDNN time: per-block {t.get('blockwise_s')} s, joint {t.get('joint_s')} s; "
                   + "; ".join(f"{m}: profile {p['profile_s']} s, re-rank {p['rerank_s']} s"
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


def to_json(result: dict) -> str:
    """Indented JSON with one line per row, so a diff of two runs reads row by row."""
    rows = ",\n".join("    " + json.dumps(r) for r in result["rows"])
    rest = {k: v for k, v in result.items() if k != "rows"}
    text = json.dumps({**rest, "rows": "@ROWS@"}, indent=2)
    return text.replace('"@ROWS@"', "[\n" + rows + "\n  ]") + "\n"


def build_parser() -> argparse.ArgumentParser:
    d = Settings()
    p = argparse.ArgumentParser(
        prog="bench/accuracy.py",
        description="LegoDNN composed models vs uniform pruning vs scratch under FLOPs budgets "
        "(Fashion-MNIST, one teacher and seed for all methods). Writes JSON and Markdown.",
    )
    p.add_argument("--models", nargs="+", default=d.models, help="zoo model names (default: resnet20)")
    p.add_argument("--budgets", nargs="+", type=float, default=d.budgets, help="FLOPs fractions of the teacher")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--data-dir", default=d.data_dir, help="folder with the Fashion-MNIST IDX .gz files")
    p.add_argument("--workdir", type=Path, default=REPO / ".legodnn" / "bench-accuracy",
                   help="cache for trained teachers (reused across runs)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "accuracy.json")
    p.add_argument("--md", type=Path, default=REPO / "docs" / "benchmarks" / "accuracy.md")
    p.add_argument("--train-size", type=int, default=None, help="training images (default: all but validation)")
    p.add_argument("--val-size", type=int, default=d.val_size, help="validation images held out of training")
    p.add_argument("--teacher-epochs", type=int, default=d.teacher_epochs)
    p.add_argument("--retrain-epochs", type=int, default=d.retrain_epochs)
    p.add_argument("--retrain-limit", type=int, default=d.retrain_limit, help="block I/O pairs per block")
    p.add_argument("--joint-steps", type=int, default=d.joint_steps)
    p.add_argument("--joint-batch", type=int, default=d.joint_batch)
    p.add_argument("--joint-lr", type=float, default=d.joint_lr)
    p.add_argument("--calibration-k", type=int, default=d.calibration_k)
    p.add_argument("--top-k", type=int, default=d.top_k, help="selections re-ranked on validation data")
    p.add_argument("--bn-batches", type=int, default=d.bn_batches, help="batches of 128 for BN re-estimation")
    p.add_argument("--uniform-epochs", type=float, default=d.uniform_epochs)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="tiny smoke setting (seconds, meaningless numbers)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--render", type=Path, default=None, metavar="JSON",
                   help="only rewrite the Markdown (--md) from an existing results JSON")
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    s = Settings(
        models=list(args.models), budgets=list(args.budgets), seed=args.seed, data_dir=str(args.data_dir),
        train_size=args.train_size, val_size=args.val_size, teacher_epochs=args.teacher_epochs, retrain_epochs=args.retrain_epochs,
        retrain_limit=args.retrain_limit, joint_steps=args.joint_steps, joint_batch=args.joint_batch,
        joint_lr=args.joint_lr, calibration_k=args.calibration_k, top_k=args.top_k,
        bn_batches=args.bn_batches, uniform_epochs=args.uniform_epochs, threads=args.threads,
    )
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
        args.md.write_text(markdown(json.loads(args.render.read_text())))
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
        "settings": asdict(s),
        "wall_s": round(time.time() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(to_json(result))
    args.md.parent.mkdir(parents=True, exist_ok=True)
    args.md.write_text(markdown(result))
    for line in verdicts(rows):
        print(line)
    print(f"wrote {args.out} and {args.md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
