"""Where a composition's low-budget accuracy goes: the fixed block interfaces, or the training?

A LegoDNN block keeps its input and output channels so that any descendant fits its
neighbours; only the channels inside a block are pruned. At a low FLOPs budget a composition
must therefore cut most of every block's inner channels, while uniform pruning thins every
layer, the channels between blocks included, by less. For each budget this takes the even
composition (`legoblocks.anchors`, the recipe's anchor) and measures four arms on the test set:

    legodnn              the composition as the recipe's joint stage trains it (shared blocks)
    composition          the retrained descendants fine-tuned end to end with the uniform
                         baseline's loop, loss, optimizer and wall time (`legoblocks.uniform.
                         finetune` with `pipelines.baselines.BaselineJob`'s settings)
    composition-blocks   the same with only the pruned blocks trainable, as in the joint stage
    uniform              the uniform baseline itself (`pipelines.baselines.uniform`)

If the composition trails uniform after the same training, the gap is the space of
compositions; if it matches uniform but `legodnn` does not, it is how LegoDNN trains.

The recipe's stages run from `bench/evaluate.py`'s cache (same settings, same --workdir), so
its teacher and descendants are the ones the accuracy figure used.

    .venv/bin/python bench/structure.py --model mobilenetv2 --seconds 436 --threads 2 \\
        --workdir /work/bench-cache/eval3 --out docs/results/structure-mobilenetv2.json
    .venv/bin/python bench/structure.py ... --budgets 0.3956 0.4711 --arms legodnn uniform
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: the packages live in the repo root
    sys.path.insert(0, str(REPO))


def _evaluate() -> ModuleType:
    """bench/evaluate.py, whose recipe settings and cache this script shares. Loaded by path under a
    private name: putting bench/ on sys.path would let bench/optimizer.py shadow the optimizer package."""
    spec = importlib.util.spec_from_file_location("bench_evaluate", Path(__file__).with_name("evaluate.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


ARMS = ("legodnn", "composition", "composition-blocks", "uniform")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/structure.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mobilenetv2", help="zoo model, as in bench/evaluate.py --models")
    p.add_argument("--budgets", type=float, nargs="+", default=None,
                   help="FLOPs fractions of the teacher (default: the lowest of bench/evaluate.py's budgets)")
    p.add_argument("--seconds", type=float, required=True,
                   help="fine-tuning wall time of each arm, e.g. the uniform baseline's share in the accuracy figure")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="recipe override, as in bench/evaluate.py")
    p.add_argument("--budgets-n", type=int, default=10, help="bench/evaluate.py's budget count (fixes the budgets)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (and Ray CPUs)")
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist", help="Fashion-MNIST IDX folder")
    p.add_argument("--workdir", type=Path, default=REPO / ".legodnn" / "bench-evaluate", help="the recipe's cache")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS),
                   help="legodnn: the composition as the recipe's joint stage trains it; composition: the same "
                   "selection of retrained descendants fine-tuned end to end like uniform; composition-blocks: "
                   "the same with only its pruned blocks trainable (the stem, head and original blocks frozen, "
                   "as in the joint stage); uniform: the uniform baseline")
    p.add_argument("--out", type=Path, help="write the results as JSON here; the budgets and arms not run this "
                   "time are kept from it when the model and seconds match")
    p.add_argument("--quick", action="store_true", help="bench/evaluate.py's tiny smoke setting (meaningless numbers)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    from legoblocks.anchors import anchor_selections, choice_flops
    from legoblocks.choices import ORIGINAL
    from legoblocks.compose import ScalableModel
    from legoblocks.train import evaluate
    from legoblocks.uniform import finetune
    from pipelines.baselines import baseline_job, baseline_stages
    from pipelines.data import load_splits
    from pipelines.recipe.jobs import model_spec
    from pipelines.recipe.model import SCALABLE_DIR, load_teacher
    from profiling.latency import fingerprint

    args = build_parser().parse_args(argv)
    if args.quick:
        args.budgets_n = 3
    if args.seconds <= 0 or args.threads < 1 or args.budgets_n < 2:
        raise SystemExit("bench/structure.py: need --seconds > 0, --threads >= 1 and --budgets-n >= 2")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    bench = _evaluate()
    run_stages = bench.run_stages
    cfg, budgets = bench.recipe_config(args.model, args)
    chosen = [budgets[0]] if args.budgets is None else args.budgets
    if not all(0 < b < 1 for b in chosen):
        raise SystemExit(f"bench/structure.py: --budgets must be FLOPs fractions in (0, 1), got {chosen}")

    run = run_stages(cfg, stages=6)  # teacher, detect, descend, blockio, retrain, assemble
    splits = load_splits(run.checked.facts.data)
    teacher = load_teacher(model_spec(cfg), run.dir("teacher"))
    scalable = ScalableModel.load(run.dir("assemble") / SCALABLE_DIR)
    flops = choice_flops(scalable)
    names = list(flops)
    job = baseline_job(cfg, run.checked.facts)

    def test(model) -> float:
        return round(100 * evaluate(model, splits.test), 2)

    def frac(selection: list[str]) -> float:
        return round(sum(flops[b][c] for b, c in zip(names, selection)) / sum(flops[b][ORIGINAL] for b in names), 4)

    def composition(selection: list[str], pruned_only: bool) -> dict:
        """The even composition of the retrained descendants (copies), fine-tuned as uniform is."""
        composed = scalable.compose(selection)
        trainable = [composed[i] for i, c in enumerate(selection) if c != ORIGINAL] if pruned_only else None
        before = test(composed)
        report = finetune(composed, teacher, splits.train, wall_time_s=args.seconds, lr=job.lr,
                          batch_size=job.batch_size, seed=job.seed, num_workers=cfg.data.workers or 0,
                          trainable=trainable)
        return {"flops_frac": frac(selection), "test_before": before, "test": test(composed),
                "steps": report.steps, "seconds": round(report.seconds, 1)}

    @functools.cache
    def joint() -> tuple[ScalableModel, float]:
        """The recipe through its joint stage (run or cached once for every budget) and its seconds."""
        done = run_stages(cfg, stages=7)
        return ScalableModel.load(done.scalable_dir), round(sum(r.seconds for r in done.records["joint"]), 1)

    def legodnn(selection: list[str]) -> dict:
        """The same composition as the recipe trains it (its joint stage), untouched."""
        trained, seconds = joint()
        return {"flops_frac": frac(selection), "test": test(trained.compose(selection)), "joint_s": seconds}

    def uniform(budget: float) -> dict:
        done = run_stages(cfg, stages=1, extra=baseline_stages([budget], {budget: args.seconds}, methods=["uniform"]))
        (meta,) = [r.meta for r in done.records["uniform"]]
        out = {"flops_frac": round(meta["flops_frac"], 4), "ratio": meta["ratio"],
               "test": round(100 * meta["test_accuracy"], 2), "seconds": round(meta["seconds"], 1)}
        if "steps" in meta:  # models cached before the baselines recorded their steps have none
            out["steps"] = meta["steps"]
        return out

    runners = {"legodnn": lambda b, sel: legodnn(sel), "composition": lambda b, sel: composition(sel, False),
               "composition-blocks": lambda b, sel: composition(sel, True), "uniform": lambda b, sel: uniform(b)}
    old = json.loads(args.out.read_text()) if args.out is not None and args.out.is_file() else {}
    same = (old.get("model"), old.get("seconds")) == (args.model, args.seconds)
    rows = {row["budget"]: row for row in (old.get("rows", []) if same else [])}
    for budget in chosen:
        (selection,) = anchor_selections(scalable, [budget], flops)
        arms = {**rows.get(budget, {}).get("arms", {}), **{arm: runners[arm](budget, selection) for arm in args.arms}}
        rows[budget] = {"budget": budget, "selection": selection, "arms": {a: arms[a] for a in ARMS if a in arms}}
    result = {
        "model": args.model, "seconds": args.seconds, "teacher_test": test(teacher),
        "rows": [rows[b] for b in sorted(rows)],
        "commands": [*(old.get("commands", []) if same else []), "bench/structure.py " + shlex.join(
            sys.argv[1:] if argv is None else argv)],
        "machine": f"{fingerprint()['cpu_model']}, {os.cpu_count()} CPUs",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print(json.dumps(result, indent=2))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
