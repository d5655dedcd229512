"""Benchmark the profiler on ResNet-20 / Fashion-MNIST with the default ladder (run by hand).

Trains (or loads) a teacher, detects blocks, makes descendants at 0.0/0.2/0.4/0.6/0.8,
retrains them by feature distillation (optionally the joint stage too), profiles them and
reports what the optimizer depends on:

- additivity: MAE / max error of teacher accuracy minus summed drops over N random
  compositions, raw and calibrated (held out from the calibration fit);
- the error on the compositions the optimizer picks at 25/50/75% of the teacher's FLOPs;
- latency stability: the coefficient of variation of each descendant's latency median
  over repeated measuring rounds, and whole-chain latency against the sum of its blocks.

Writes the numbers, the command and the machine to docs/benchmarks/profiling.md (--out).
Trained models are cached in --workdir, so a rerun with the same settings only profiles.
`--quick` is the smoke test's tiny setting (seconds; the numbers mean nothing).

    .venv/bin/python bench/profiling.py --help
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from legoblocks.compose import ScalableModel  # noqa: E402
from legoblocks.data import DEFAULT_DATA_DIR, load_fashion_mnist, split  # noqa: E402
from legoblocks.descend import DEFAULT_LADDER  # noqa: E402
from legoblocks.detect import detect_blocks  # noqa: E402
from legoblocks.retrain import RetrainConfig, collect_block_io, retrain_descendants  # noqa: E402
from legoblocks.train import train_teacher  # noqa: E402
from legoblocks.zoo import build_zoo_model  # noqa: E402
from optimizer.problem import parse_problem  # noqa: E402
from optimizer.solver import solve  # noqa: E402
from profiling.accuracy import SelectionEvaluator, plan_units, unit_selections  # noqa: E402
from profiling.latency import measure_chain_latency  # noqa: E402
from profiling.profile import LatencySettings, measure_latencies, profile_model  # noqa: E402
from profiling.table import ProfileTable, save, to_problem  # noqa: E402

INPUT_SHAPE = (1, 28, 28)
# --quick: a width-4 ResNet-20 on a few hundred images, one environment, a handful of
# compositions and latency runs, so every step runs in seconds (the smoke test's setting).
QUICK = {
    "width": 4, "train_size": 1024, "val_size": 128, "teacher_epochs": 3, "retrain_limit": 128,
    "retrain_epochs": 1, "joint_steps": 0, "envs": "original", "additivity_n": 3, "calibration_k": 3,
    "bn_compare": 0, "latency_repeats": 3, "latency_rounds": 2,
}
NOTES_MARKER = "<!-- hand-written notes: bench/profiling.py keeps everything below this line -->"

METHOD = """## What the numbers mean (profiling/)

- **FLOPs** come from `torch.utils.flop_counter.FlopCounterMode` at batch 1 and are FLOPs, 2 per
  multiply-add (1 MAC = 2 FLOPs). The counter counts convolutions and matrix products; BatchNorm,
  ReLU, pooling and additions are not counted (they are a few percent here). Per-block FLOPs add up
  exactly to the whole model's.
- **Peak memory** of a block at batch 1 = its weight bytes (parameters and buffers) + the largest
  total of activations alive at the same time. The block's `torch.fx` graph is run once with
  `ShapeProp` to get every value's size, then walked in execution order: a value is allocated when
  its node runs and freed after its last user; views and in-place ops allocate nothing. Kernel
  workspace is invisible to the graph, so this is a lower bound on what an allocator needs.
  Modules fx cannot trace fall back to a forward-hook estimate (largest input + output of a leaf).
- **Accuracy drop** of (block, choice): mean over the background environments of
  acc(environment with the block original) - acc(environment with the block at that choice); the
  original choice has drop exactly 0. **Additivity**: predicted accuracy = teacher accuracy minus
  the summed drops, compared with the measured accuracy of random compositions.
- **Calibration**: on k compositions spread evenly over the FLOPs range, fit teacher - measured
  ~= sum of w_b * drop_b; w_b is one least-squares scale, or per-block ridge weights if they are
  at least 10% better in leave-one-out cross-validation; if neither beats the raw drops there,
  the raw drops are kept (method "identity"). Calibrated drops = raw drops * w_b, so
  the optimizer's model stays additive (and exact). Scored on the additivity compositions, which
  the fit never sees.
- **Latency**: `torch.set_num_threads(1)` during the measurement (restored after), batch 1,
  5 warm-up runs, then the median of the timed runs; each column carries a host fingerprint.
  Whole chain against the sum of its blocks: on a loaded shared machine a multi-millisecond
  whole-model run is preempted more often than a sub-millisecond block run, which inflates the
  whole-model figure; on an idle device the ratio is what the optimizer's additive latency
  model should be checked against (the device side measures its own table).
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="Fashion-MNIST IDX folder")
    p.add_argument("--workdir", type=Path, default=ROOT / ".legodnn" / "bench-profiling",
                   help="cache for the teacher and the retrained descendants")
    p.add_argument("--model", default="resnet20", help="zoo model")
    p.add_argument("--width", type=int, default=None, help="zoo width option (default: the model's own)")
    p.add_argument("--train-size", type=int, default=3000, help="training images (teacher and retraining)")
    p.add_argument("--val-size", type=int, default=500,
                   help="validation images for the profile (disjoint from the training images)")
    p.add_argument("--teacher-epochs", type=int, default=2)
    p.add_argument("--retrain-limit", type=int, default=1000, help="images per block for distillation")
    p.add_argument("--retrain-epochs", type=int, default=1)
    p.add_argument("--retrain-lr", type=float, default=1e-3, help="Adam learning rate of the distillation")
    p.add_argument("--joint-steps", type=int, default=0, help="joint-stage steps after distillation (0 = off)")
    p.add_argument("--envs", default="original,middle,largest")
    p.add_argument("--additivity-n", type=int, default=20)
    p.add_argument("--calibration-k", type=int, default=16)
    p.add_argument("--bn-batches", type=int, default=0, help="BatchNorm re-estimation batches (0 = off)")
    p.add_argument("--bn-batch-size", type=int, default=128, help="images per re-estimation batch")
    p.add_argument("--bn-compare", type=int, default=0,
                   help="also profile with BatchNorm re-estimation on this many batches and compare (0 = off)")
    p.add_argument("--latency-repeats", type=int, default=30)
    p.add_argument("--latency-rounds", type=int, default=3, help="times the whole latency table is measured")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "profiling.md")
    p.add_argument("--table", type=Path, default=None, help="also write the ProfileTable here")
    p.add_argument("--quick", action="store_true",
                   help=f"tiny smoke setting (seconds, meaningless numbers): overrides {', '.join(f'--{k}' for k in QUICK)}")
    args = p.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    return args


def _key(args: argparse.Namespace, *fields: str) -> str:
    # An unset option (None) is left out, so adding one keeps the keys of existing caches.
    data = {f: str(getattr(args, f)) for f in fields if getattr(args, f) is not None}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:10]


def build_teacher(args: argparse.Namespace, train_ds) -> tuple[torch.nn.Module, dict]:
    """Train the teacher, or load it from the workdir (state dict, weights_only)."""
    key = _key(args, "model", "width", "train_size", "teacher_epochs", "seed")
    path = args.workdir / f"teacher-{key}.pt"
    torch.manual_seed(args.seed)
    teacher = build_zoo_model(args.model, **({} if args.width is None else {"width": args.width}))
    if path.exists():
        print(f"loading teacher from {path}")
        teacher.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return teacher.eval(), {}
    t = time.perf_counter()
    train_teacher(teacher, train_ds, epochs=args.teacher_epochs, lr=0.05, batch_size=128,
                  weight_decay=5e-4, seed=args.seed, checkpoint=path, progress=True)
    return teacher.eval(), {"teacher_s": time.perf_counter() - t}


def build_scalable(args: argparse.Namespace, train_ds) -> tuple[ScalableModel, dict]:
    """Teacher -> blocks -> descendants -> distillation (-> joint), cached in the workdir."""
    key = _key(args, "model", "width", "train_size", "teacher_epochs", "retrain_limit", "retrain_epochs",
               "retrain_lr", "joint_steps", "seed")
    cached = args.workdir / f"scalable-{key}"
    timings_file = args.workdir / f"scalable-{key}-timings.json"
    if (cached / "scalable.json").exists():
        print(f"loading retrained descendants from {cached}")
        built = json.loads(timings_file.read_text()) if timings_file.exists() else {}
        # Training times of the run that built the cache, so the report still shows them.
        return ScalableModel.load(cached), {f"{k} (cached)": v for k, v in built.items()}
    teacher, timings = build_teacher(args, train_ds)
    blocked = detect_blocks(teacher, INPUT_SHAPE)
    t = time.perf_counter()
    scalable = ScalableModel.from_blocked(blocked, DEFAULT_LADDER, progress=True, model_ref=args.model)
    timings["descend_s"] = time.perf_counter() - t
    t = time.perf_counter()
    data = collect_block_io(blocked.blocks, train_ds, limit=args.retrain_limit, batch_size=256,
                            seed=args.seed, progress=True)
    cfg = RetrainConfig(epochs=args.retrain_epochs, lr=args.retrain_lr, seed=args.seed)
    for spec, io in zip(scalable.specs, data):
        if spec.scalable:
            retrain_descendants(scalable.variants[spec.name], io, cfg, progress=True)
    timings["retrain_s"] = time.perf_counter() - t
    if args.joint_steps > 0:
        from legoblocks.joint import JointConfig, train_joint

        t = time.perf_counter()
        train_joint(scalable, train_ds, JointConfig(steps=args.joint_steps, seed=args.seed), progress=True)
        timings["joint_s"] = time.perf_counter() - t
    scalable.save(cached)
    timings_file.write_text(json.dumps(timings), encoding="utf-8")
    return scalable, timings


def latency_stability(scalable: ScalableModel, table: ProfileTable, args: argparse.Namespace) -> dict:
    """CV of each (block, choice) latency median over rounds, and chain vs sum of blocks."""
    settings = LatencySettings(repeats=args.latency_repeats)
    medians = {(b.name, c): [ch.latency.median_ms] for b in table.blocks for c, ch in b.choices.items()}
    for _ in range(args.latency_rounds - 1):
        stats, _ = measure_latencies(scalable, settings)
        for b, per in stats.items():
            for c, s in per.items():
                medians[(b, c)].append(s.median_ms)
    cvs = np.array([np.std(v) / np.mean(v) for v in medians.values()])
    within = np.array([ch.latency.cv for b in table.blocks for ch in b.choices.values()])
    spread = np.array([(ch.latency.p90_ms - ch.latency.p10_ms) / ch.latency.median_ms
                       for b in table.blocks for ch in b.choices.values()])
    chains = {}
    for label, sel in (("original", scalable.original_selection()), ("smallest", scalable.smallest_selection())):
        composed = scalable.compose(sel)
        report = measure_chain_latency(list(composed), INPUT_SHAPE, repeats=args.latency_repeats)
        chains[label] = {"whole_ms": report.whole.median_ms, "sum_ms": report.sum_of_blocks_ms,
                         "ratio": report.ratio}
    return {"rounds": args.latency_rounds, "cv_of_medians_median": float(np.median(cvs)),
            "cv_of_medians_mean": float(cvs.mean()), "cv_of_medians_max": float(cvs.max()),
            "within_run_cv_median": float(np.median(within)),
            "within_run_spread_median": float(np.median(spread)), "chains": chains}


def optimizer_picks(scalable: ScalableModel, table: ProfileTable, evaluator: SelectionEvaluator) -> list[dict]:
    """The optimizer's choice at 25/50/75% of the teacher's FLOPs (FLOPs as the latency column)."""
    names = table.block_names
    teacher_flops = table.total(["0.0"] * len(names), "flops")
    override = {(b.name, c): float(ch.flops) for b in table.blocks for c, ch in b.choices.items()}
    rows = []
    for frac in (0.25, 0.5, 0.75):
        problem = parse_problem(to_problem(table, {"latency_ms": frac * teacher_flops}, latency_override=override))
        solution = solve(problem)
        if not solution.feasible:
            rows.append({"budget": frac, "feasible": False})
            continue
        sel = solution.selection[table.model_name]
        rows.append({
            "budget": frac, "feasible": True, "selection": sel,
            "flops_frac": table.total(sel, "flops") / teacher_flops,
            "predicted_raw": table.predicted_accuracy(sel, raw=True),
            "predicted_calibrated": table.predicted_accuracy(sel),
            "measured": evaluator.accuracy(sel),
        })
    return rows


def prefix_savings(scalable: ScalableModel, table: ProfileTable) -> dict:
    """FLOPs the prefix-sharing evaluator spends on the unit selections vs composing each one."""
    names = scalable.block_names
    flops = {(b.name, c): ch.flops for b in table.blocks for c, ch in b.choices.items()}
    selections = unit_selections(plan_units(scalable, table.settings["envs"]))
    naive = sum(flops[(b, c)] for sel in selections for b, c in zip(names, sel))
    prefixes = {sel[: i + 1] for sel in selections for i in range(len(names))}
    shared = sum(flops[(names[len(p) - 1], p[-1])] for p in prefixes)
    return {"selections": len(selections), "naive_flops": naive, "shared_flops": shared,
            "saving": 1.0 - shared / naive}


def pts(x: float) -> str:
    return f"{100 * x:.2f}"


def bn_label(batches: int, batch_size: int = 128) -> str:
    return f"BN re-estimated ({batches} x {batch_size} images)" if batches else "BN as trained"


def _additivity_rows(run: dict) -> list[str]:
    table, label = run["table"], bn_label(run["bn_batches"], run["bn_batch_size"])
    add, cal = table.additivity or {}, table.calibration or {}
    rows = [f"| {label} | raw drops | {add.get('n')} random | {pts(add.get('mae', 0))} | "
            f"{pts(add.get('max_error', 0))} | {pts(add.get('bias', 0))} |"]
    if cal:
        held = cal["heldout_calibrated"]
        rows.append(
            f"| {label} | calibrated: {cal['method']} (fitted scale {cal['scale']:.3f}, k={cal['k']} "
            f"FLOPs-spread) | {held['n']} random, held out | {pts(held['mae'])} | {pts(held['max_error'])} | "
            f"{pts(held.get('bias', 0))} |"
        )
    return rows


def _pick_rows(run: dict) -> list[str]:
    rows = []
    for r in run["picks"]:
        if not r["feasible"]:
            rows.append(f"| {bn_label(run['bn_batches'], run['bn_batch_size'])} | {r['budget']:.0%} | infeasible | | | |")
            continue
        rows.append(
            f"| {bn_label(run['bn_batches'], run['bn_batch_size'])} | {r['budget']:.0%} | {r['flops_frac']:.1%} | {pts(r['measured'])} | "
            f"{pts(r['predicted_raw'])} ({pts(r['predicted_raw'] - r['measured'])}) | "
            f"{pts(r['predicted_calibrated'])} ({pts(r['predicted_calibrated'] - r['measured'])}) |"
        )
    return rows


def write_markdown(path: Path, args: argparse.Namespace, argv: list[str], runs: list[dict], timings: dict,
                   latency: dict, savings: dict, load: tuple[float, float]) -> None:
    table = runs[0]["table"]
    host = next(iter(table.fingerprints.values()))
    command = "python bench/profiling.py " + " ".join(shlex.quote(a) for a in argv)
    lines = [
        "# Profiling benchmark",
        "",
        "Written by `bench/profiling.py` (run by hand). All accuracies are on the validation images",
        "(disjoint from the training images); errors are in accuracy points (percentage points).",
        "",
        f"- command: `{command.strip()}`",
        f"- machine: {host.get('cpu_model')}, {host.get('logical_cores')} logical cores "
        f"({platform.machine()}), torch {host.get('torch_version')}; shared with other jobs: load average "
        f"{load[0]:.1f} at the start, {load[1]:.1f} at the end; latency at {host.get('threads')} thread(s), batch 1",
        f"- date: {table.created}",
        f"- setting: {args.model}{'' if args.width is None else f' (width {args.width})'} on Fashion-MNIST, ladder {list(DEFAULT_LADDER)}, teacher trained "
        f"{args.teacher_epochs} epochs on {args.train_size} images, distillation {args.retrain_epochs} "
        f"epoch(s) (Adam lr {args.retrain_lr:g}) on {args.retrain_limit} images per block, joint stage steps "
        f"{args.joint_steps}, validation {args.val_size} images, environments {table.settings['envs']}",
        f"- teacher validation accuracy: {pts(table.teacher_accuracy)}%; "
        f"{sum(len(b.choices) for b in table.blocks)} descendants in {len(table.blocks)} blocks; "
        f"{table.settings['evaluations']} composed models evaluated per profile",
        "- wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()),
        "",
        "## Additivity of the accuracy drops",
        "",
        "| BatchNorm | prediction | compositions | MAE (pts) | max error (pts) | bias (pts) |",
        "|---|---|---|---|---|---|",
    ]
    for run in runs:
        lines += _additivity_rows(run)
    lines += ["", "Leave-one-out MAE on the k fit compositions (pts): " + "; ".join(
        f"{bn_label(r['bn_batches'], r['bn_batch_size'])}: raw {pts(r['table'].calibration['cv_mae_raw'] or 0)}, single scale "
        f"{pts(r['table'].calibration['cv_mae_scale'] or 0)}, per-block ridge "
        f"{pts(r['table'].calibration['cv_mae_ridge']) if r['table'].calibration['cv_mae_ridge'] is not None else '-'}"
        for r in runs if r["table"].calibration
    ) + ". A scale is applied only if it beats the raw drops there, ridge only if 10% better still."]
    lines += [
        "",
        "## Compositions the optimizer picks (FLOPs budget)",
        "",
        "| BatchNorm | budget | FLOPs used | measured | predicted raw (error) | predicted calibrated (error) |",
        "|---|---|---|---|---|---|",
    ]
    for run in runs:
        lines += _pick_rows(run)
    lines += [
        "",
        "## Latency",
        "",
        f"Each descendant's latency median (over {args.latency_repeats} timed runs after 5 warm-up runs) was "
        f"measured in {latency['rounds']} separate rounds. Coefficient of variation of the medians across "
        f"rounds: median {latency['cv_of_medians_median']:.3f}, mean {latency['cv_of_medians_mean']:.3f}, "
        f"max {latency['cv_of_medians_max']:.3f}. Within one round the repeats scatter more: median "
        f"per-descendant CV (std / mean) {latency['within_run_cv_median']:.3f}, driven by the few runs the "
        f"shared machine preempts; the robust spread (p90 - p10) / median is "
        f"{latency['within_run_spread_median']:.3f}. This is why the table keeps medians.",
        "",
        "| chain | whole model (ms) | sum of blocks (ms) | whole / sum |",
        "|---|---|---|---|",
    ]
    for label, c in latency["chains"].items():
        lines.append(f"| {label} | {c['whole_ms']:.3f} | {c['sum_ms']:.3f} | {c['ratio']:.3f} |")
    lines += [
        "",
        "## Evaluation cost",
        "",
        f"The {savings['selections']} selections the accuracy units need share prefixes; evaluating them "
        f"as a prefix tree costs {savings['shared_flops'] / 1e9:.1f} GFLOPs per image instead of "
        f"{savings['naive_flops'] / 1e9:.1f} ({savings['saving']:.0%} less).",
        "",
        METHOD,
    ]
    # Hand-written notes below the marker survive a rerun.
    kept = ""
    if path.exists() and NOTES_MARKER in path.read_text(encoding="utf-8"):
        kept = path.read_text(encoding="utf-8").split(NOTES_MARKER, 1)[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n" + NOTES_MARKER + kept, encoding="utf-8")


def accuracy_run(scalable: ScalableModel, val_ds, train_ds, bn_batches: int, args: argparse.Namespace) -> dict:
    """Profile (BatchNorm as trained, or re-estimated on `bn_batches`) and measure the optimizer's picks."""
    bn_data = train_ds if bn_batches else None
    envs = [e.strip() for e in args.envs.split(",") if e.strip()]
    t = time.perf_counter()
    table = profile_model(
        scalable, val_ds, envs=envs, latency=LatencySettings(repeats=args.latency_repeats),
        additivity_n=args.additivity_n, calibration_k=args.calibration_k, seed=args.seed,
        bn_recalibration_batches=bn_batches, bn_data=bn_data, bn_batch_size=args.bn_batch_size, progress=True,
    )
    evaluator = SelectionEvaluator(scalable, val_ds, bn_data=bn_data, bn_recalibration_batches=bn_batches,
                                   bn_batch_size=args.bn_batch_size, seed=args.seed)
    picks = optimizer_picks(scalable, table, evaluator)
    return {"bn_batches": bn_batches, "bn_batch_size": args.bn_batch_size, "table": table, "picks": picks, "seconds": time.perf_counter() - t}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    load_start = os.getloadavg()[0]
    full = load_fashion_mnist(args.data_dir, train=True)
    train_ds, val_ds = split(full, [args.train_size, args.val_size], seed=args.seed)
    del full
    start = time.perf_counter()
    scalable, timings = build_scalable(args, train_ds)
    runs = [accuracy_run(scalable, val_ds, train_ds, args.bn_batches, args)]
    timings["profile_s"] = runs[0]["seconds"]
    if args.bn_compare:
        runs.append(accuracy_run(scalable, val_ds, train_ds, args.bn_compare, args))
        timings["profile_bn_s"] = runs[1]["seconds"]
    if args.table:
        save(runs[0]["table"], args.table)
    t = time.perf_counter()
    latency = latency_stability(scalable, runs[0]["table"], args)
    timings["latency_rounds_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - start
    savings = prefix_savings(scalable, runs[0]["table"])
    write_markdown(args.out, args, argv, runs, timings, latency, savings, (load_start, os.getloadavg()[0]))

    print(f"teacher accuracy {pts(runs[0]['table'].teacher_accuracy)}%")
    for run in runs:
        for row in _additivity_rows(run) + _pick_rows(run):
            print(row)
    print(f"latency medians CV across {latency['rounds']} rounds: median {latency['cv_of_medians_median']:.3f}, "
          f"max {latency['cv_of_medians_max']:.3f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
