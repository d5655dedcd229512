"""LegoDNN against the simple alternatives, one command per figure; a thin driver of the recipe.

    accuracy    test accuracy under 10 FLOPs budgets: the compositions LegoDNN serves vs uniform
                pruning + fine-tuning vs the model at reduced width from scratch, the baselines
                given LegoDNN's wall time split evenly over the budgets (--baseline-time: its
                whole pipeline after the teacher, profiling included, or its training stages);
                each difference with its paired standard error (the same test images), and
                the best composition the joint stage trained, chosen by the test set (a bound
                on any choice: is a miss the choice or the training?)
    latency     the same under 10 latency budgets; every served model timed end to end (a pick
                over budget is re-solved as a device does, `optimizer.solve_measured`)
    options     distinct composed models, LegoDNN's time for all of them, and the time uniform
                pruning needs to reach LegoDNN's accuracy at 50% FLOPs
    switching   bytes read and time for budget changes: block switching vs whole-model reloads
    additivity  predicted vs measured accuracy of random compositions the profile never saw
    all         every figure above, in that order

Training, profiling, re-ranking and the baselines are the library's: `pipelines.run.run_recipe`
runs the recipe in this process (`pipelines.recipe.STAGES` + `pipelines.baselines`), cached
in --workdir, so a figure re-renders without retraining. Results merge into --out, --md is
regenerated (notes below its marker kept), PNGs go to --figures-dir and one MLflow run per
invocation (experiment "legodnn-evaluation") holds them.

    .venv/bin/python bench/evaluate.py all --threads 1
    .venv/bin/python bench/evaluate.py all --quick --workdir /tmp/e --out /tmp/e/e.json --md /tmp/e/e.md \\
        --figures-dir /tmp/e/fig --tracking-uri sqlite:////tmp/e/mlflow.db
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import logging
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: the packages live in the repo root
    sys.path.insert(0, str(REPO))

FIGURES = ("accuracy", "latency", "options", "switching", "additivity")
EXPERIMENT = "legodnn-evaluation"
NOTES_MARKER = "<!-- hand-written notes below this line are kept when the page is regenerated -->"
# The recipe the figures measure, per model, over the embedded defaults (pipelines/config.py).
FULL = {
    # The profile measures on 20,000 validation images (10,000 choose, 10,000 tell), a check split
    # of 10,000 is used for nothing but checking what is told; the official 10,000 test images test.
    "data": {"train_size": 30000, "val_size": 20000, "check_size": 10000, "test_size": 10000},
    "teacher": {"epochs": 8, "lr": 0.1, "batch_size": 128},
    "retrain": {"epochs": 1, "lr": 1e-3, "val_limit": 500, "io_limit": 14000},
    # 2,000 steps: the floor composition every step, and an anchor at every budget between the floor
    # and 1.0 (`Model`) in turn, about 220 steps each over nine budgets.
    "joint": {"steps": 2000, "lr": 1e-3, "batch_size": 128, "random_compositions": 0},
    "profile": {"envs": 1, "additivity_n": 20, "calibration_k": 16, "verify_top_k": 10, "verify_metric": "flops",
                "latency_batch_size": 1, "latency_warmup": 5, "latency_repeats": 30, "latency_calibration_k": 12},
}
MODELS = {"resnet20": {"model": {"ref": "resnet20", "options": {"width": 16}}},
          # MobileNetV2 distils each block for 10 epochs, not 1: its composed anchors start much nearer the
          # teacher and end higher after the same joint stage (served.md, "Longer per-block retraining").
          "mobilenetv2": {"model": {"ref": "mobilenetv2", "options": {"width_mult": 0.5}}, "teacher": {"epochs": 4},
                          "retrain": {"epochs": 10}}}
QUICK = {
    "data": {"train_size": 768, "val_size": 128, "check_size": 128, "test_size": 256},
    "teacher": {"epochs": 1}, "descend": {"ladder": [0.0, 0.8]}, "retrain": {"epochs": 1, "io_limit": 256, "val_limit": None},
    "joint": {"steps": 2, "batch_size": 32},
    "profile": {"additivity_n": 2, "calibration_k": 2, "verify_top_k": 2, "latency_repeats": 30, "latency_warmup": 2,
                "latency_calibration_k": 3},
}
QUICK_WIDTH = {"resnet20": {"width": 8}, "mobilenetv2": {"width_mult": 0.25}}


class Model:
    """One model's recipe run, its baselines and what the figures share."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        from legoblocks.compose import ScalableModel
        from pipelines.baselines import legodnn_seconds
        from profiling.table import load

        self.name, self.args = name, args
        self.cfg, self.budgets = recipe_config(name, args)
        self.run = run_stages(self.cfg)
        self.scalable, self.table = ScalableModel.load(self.run.scalable_dir), load(self.run.table_path)
        self.teacher_flops = self.table.total(["0.0"] * len(self.table.blocks), "flops")
        self.lego_s = legodnn_seconds(self.run.records, "pipeline")
        self.train_s = legodnn_seconds(self.run.records, "training")

    def baselines(self) -> dict[str, list[dict[str, Any]]]:
        """The --baselines at every budget, each with LegoDNN's time (--baseline-time: its whole
        pipeline or its training stages) over the budgets below 1.0."""
        from pipelines.baselines import MODEL_FILE, baseline_stages, legodnn_seconds, time_shares

        seconds = legodnn_seconds(self.run.records, self.args.baseline_time)
        shares = time_shares(self.budgets, seconds) if not self.args.quick else dict.fromkeys(self.budgets, 1.0)
        share = shares[self.budgets[0]]
        run = run_stages(self.cfg, extra=baseline_stages(self.budgets, shares, methods=self.args.baselines))
        out = {method: [{**r.meta, "file": str(run.dir(method, r.unit) / MODEL_FILE)}
                        for r in run.records[method] if "skipped" not in r.meta] for method in self.args.baselines}
        return out | {"share_s": share}  # type: ignore[operator]

    def served(self, budget: float) -> list[str]:
        """What LegoDNN serves at a FLOPs budget (a fraction of the teacher's): the library's choice."""
        from pipelines.recipe.serve import flops_override, solve_top

        _, (selection, *_) = solve_top(self.table, {"latency_ms": budget * self.teacher_flops / 1e6},
                                       latency_override=flops_override(self.table))
        return selection

    def hits(self, module: Any, split: str = "test") -> Any:
        """Per-image correctness of `module` on a split, in the split's order (a paired comparison's input)."""
        from legoblocks.train import correct

        return correct(module, getattr(self.splits, split))

    def flops_frac(self, sel: Sequence[str]) -> float:
        return round(self.table.total(list(sel), "flops") / self.teacher_flops, 4)

    def measured(self, sel: Sequence[str], split: str = "test") -> dict[str, float]:
        return {f"{split}_acc": percent(self.hits(self.scalable.compose(list(sel)), split)), "flops_frac": self.flops_frac(sel)}

    @functools.cached_property
    def splits(self):
        from pipelines.data import load_splits

        return load_splits(self.run.checked.facts.data)

    def latency_ms(self, module) -> float:
        from profiling.latency import measure_latency

        return measure_latency(module, self.cfg.model.input_shape, batch_size=1, warmup=5, repeats=30,
                               threads=1).median_ms


def run_stages(cfg: Any, stages: int | None = None, extra: Sequence[Any] = ()):
    """The recipe's first `stages` stages (all but publish by default) and `extra`, cached in the config's workdir."""
    from pipelines.progress import PipelineProgress
    from pipelines.recipe import STAGES
    from pipelines.run import run_recipe

    stage_list = [s for s in STAGES[:stages] if s.name != "publish"] + list(extra)
    return run_recipe(cfg, stages=stage_list, observers=[PipelineProgress(live=False)])


def recipe_config(name: str, args: argparse.Namespace) -> tuple[Any, list[float]]:
    """The recipe config a figure measures for zoo model `name` (`FULL`, or `QUICK` with --quick,
    then --set), and its --budgets-n FLOPs budgets: the lowest is the joint stage's floor, those
    between it and 1.0 its anchors. Finding the lowest runs the recipe's first four stages
    (teacher, detect, descend, blockio), cached in --workdir."""
    from pipelines.commands.run import overrides_from_args
    from pipelines.config import load_config, merge_config
    from pipelines.recipe.model import smallest_flops_fraction

    over = merge_config(merge_config(FULL, MODELS.get(name, {"model": {"ref": name}})), QUICK if args.quick else {})
    if args.quick:
        over["model"]["options"] = QUICK_WIDTH.get(name, {})
    over = merge_config(over, {"workdir": str(args.workdir / name), "data": {"dir": args.data_dir, "seed": args.seed},
                               "publish": {"enabled": False}, "ray": {"num_cpus": args.threads}})
    sets = overrides_from_args(argparse.Namespace(set=args.set or []))
    over = merge_config(over, sets)
    prefix = run_stages(load_config(None, over), stages=4)
    descend = {r.unit: prefix.dir("descend", r.unit) for r in prefix.records["descend"]}
    budgets = budget_grid(smallest_flops_fraction(prefix.dir("detect"), descend), args.budgets_n)
    over = merge_config(over, {"joint": {"sandwich_floor": budgets[0], "anchor_budgets": budgets[1:-1]},
                               "profile": {"verify_budgets": budgets}})
    return load_config(None, merge_config(over, sets)), budgets  # --set still wins


def budget_grid(smallest: float, n: int) -> list[float]:
    """n FLOPs budgets from just above the smallest composition to 1.0."""
    start = min(1.0, math.ceil((smallest + 0.002) * 100) / 100)
    return [round(start + (1.0 - start) * i / (n - 1), 4) for i in range(n)] if n > 1 else [1.0]


# ----------------------------------------------------------------------------- figures


def percent(hits) -> float:
    """Accuracy in percent, two decimals, of a per-image correctness vector."""
    return round(100 * int(hits.sum()) / len(hits), 2)


def fig_accuracy(m: Model) -> dict[str, Any]:
    """LegoDNN vs uniform vs scratch at every FLOPs budget, all measured on the test set, each
    baseline row with LegoDNN's difference and its paired standard error (same test images);
    what LegoDNN tells about each served composition against the check split (`served` rows).

    `best_trained` separates choice from training: at each budget, the composition the joint
    stage trained (an anchor, or the original) that fits and reads best *on the test set*. No
    rule could serve it (it chooses by the test set); it bounds what any choice among the
    trained compositions serves, and each baseline row's `best_trained_minus` is its margin."""
    import numpy as np

    from legoblocks.serialize import load_module
    from optimizer.evaluation import budget_limit
    from profiling.serving import MEASURED_KIND, paired_difference, told

    # a composition served at several budgets, or both served and trained, is composed and measured once
    composed = functools.cache(lambda sel: m.scalable.compose(list(sel)))
    test_hits = functools.cache(lambda sel: m.hits(composed(sel)))
    rows, served, lego_hits = [], [], {}
    for budget in m.budgets:
        sel = m.served(budget)
        t, flops = told(m.table, sel), m.flops_frac(sel)
        lego_hits[budget], check_acc = test_hits(tuple(sel)), percent(m.hits(composed(tuple(sel)), "check"))
        rows.append({"method": "legodnn", "budget": budget, "test_acc": percent(lego_hits[budget]),
                     "flops_frac": flops, "told": round(100 * t.accuracy, 2), "check_acc": check_acc, "selection": sel})
        served.append({"model": m.name, "budget": budget, "flops_frac": flops,
                       "predicted": round(100 * t.accuracy, 3), "predicted_se": round(100 * t.se, 3),
                       "measured_check": check_acc, "check_n": len(m.splits.check),
                       "measured_test": rows[-1]["test_acc"], "source": t.source})
    trained = {sel: test_hits(sel) for sel, c in m.table.measured_by_selection().items() if c.kind != MEASURED_KIND}
    best = {}  # budget -> the trained selection that fits and reads best on the test set
    for budget in m.budgets:
        limit = budget_limit(budget * m.teacher_flops)
        if fits := [s for s in trained if m.table.total(list(s), "flops") <= limit]:
            best[budget] = max(fits, key=lambda s: int(trained[s].sum()))
    best_rows = [{"budget": b, "flops_frac": m.flops_frac(s), "test_acc": percent(trained[s]), "selection": list(s)}
                 for b, s in best.items()]

    def best_minus(budget: float, theirs: Any) -> float | None:
        return round(100 * paired_difference(trained[best[budget]], theirs).difference, 2) if budget in best else None

    base = m.baselines()
    gaps = {}
    for method in m.args.baselines:
        theirs = {r["budget"]: m.hits(load_module(r["file"])) for r in base[method]}
        paired = {b: paired_difference(lego_hits[b], hits) for b, hits in theirs.items()}
        rows += [{"method": method, "budget": r["budget"], "flops_frac": round(r["flops_frac"], 4),
                  "test_acc": round(100 * r["test_accuracy"], 2), "train_s": round(r["seconds"], 1),
                  "legodnn_minus": round(100 * paired[r["budget"]].difference, 2),
                  "paired_se": round(100 * paired[r["budget"]].se, 2),
                  "best_trained_minus": best_minus(r["budget"], theirs[r["budget"]])} for r in base[method]]
        if paired:
            diffs = [100 * d.difference for d in paired.values()]
            pooled = paired_difference(np.stack([lego_hits[b] for b in theirs]), np.stack(list(theirs.values())))
            gaps[method] = {"max": round(max(diffs), 2), "mean": round(100 * pooled.difference, 2),
                            "mean_se": round(100 * pooled.se, 2), "min": round(min(diffs), 2),
                            "min_se": round(100 * min(paired.values(), key=lambda d: d.difference).se, 2),
                            "below_2se": [b for b, d in paired.items() if d.difference < -2 * d.se],
                            "best_trained_min": min((r["best_trained_minus"] for r in rows if r["method"] == method
                                                     and r["best_trained_minus"] is not None), default=None)}
    return {"budgets": m.budgets, "rows": rows, "served": served, "best_trained": best_rows, "gaps": gaps,
            "lego_time_s": round(m.lego_s, 1), "lego_training_s": round(m.train_s, 1), "baseline_time": m.args.baseline_time,
            "baseline_share_s": round(base["share_s"], 1), "joint_floor": m.cfg.joint.sandwich_floor,
            "teacher_test_acc": percent(test_hits(("0.0",) * len(m.table.blocks)))}


def fig_latency(m: Model) -> dict[str, Any]:
    """LegoDNN's picks under latency budgets (the recipe's re-ranking on the latency range),
    timed end to end; the accuracy figure's baselines at their measured latencies."""
    import dataclasses

    from legoblocks.serialize import load_module
    from legoblocks.train import evaluate
    from optimizer import parse_problem, solve_measured
    from pipelines.recipe import stage
    from pipelines.run import run_recipe
    from profiling.serving import to_problem
    from profiling.table import load

    fractions = [round(i / (m.args.budgets_n - 1), 4) for i in range(m.args.budgets_n)]
    cfg = dataclasses.replace(m.cfg, profile=dataclasses.replace(m.cfg.profile, verify_metric="latency",
                                                                 verify_budgets=fractions))
    table = load(run_recipe(cfg, stages=[stage("table")], continue_from=m.run, checked=m.run.checked).table_path)
    rows, modules = [], []
    for v in table.verified:
        budget = v["budget"]["latency_ms"]
        selection, first = v["selection"], m.latency_ms(m.scalable.compose(v["selection"]))
        rounds = 0
        if first > budget:  # what a device does: time it, re-solve under a tightened budget
            guard = solve_measured(parse_problem(to_problem(table, {"latency_ms": budget})),
                                   lambda sel: m.latency_ms(m.scalable.compose(sel[table.model_name])))
            selection, rounds = list(guard.solution.selection[table.model_name]), len(guard.rounds)
        rows.append({"method": "legodnn", "budget_ms": round(budget, 4), "first_pick_ms": round(first, 4),
                     "predicted_ms": round(table.predicted_latency(selection), 4), "guard_rounds": rounds,
                     **m.measured(selection), "selection": selection})
        modules.append(m.scalable.compose(selection))
    base = m.baselines()
    for method in m.args.baselines:
        for r in base[method]:
            model = load_module(Path(r["file"]))
            rows.append({"method": method, "budget": r["budget"], "test_acc": round(100 * evaluate(model, m.splits.test), 2)})
            modules.append(model)
    teacher = m.scalable.compose(["0.0"] * len(table.blocks))
    # Every model in each of 3 round-robin passes, the fastest kept: interference only adds time.
    passes = [[m.latency_ms(x) for x in [*modules, teacher]] for _ in range(3)]
    for i, row in enumerate(rows):
        row["latency_ms"] = round(min(p[i] for p in passes), 4)
    return {"budgets_ms": [round(v["budget"]["latency_ms"], 4) for v in table.verified], "rows": rows,
            "teacher_latency_ms": round(min(p[-1] for p in passes), 4)}


def fig_options(m: Model) -> dict[str, Any]:
    """Options count, LegoDNN's time for all of them, and uniform's time to match it at 50%."""
    from legoblocks.train import evaluate
    from legoblocks.uniform import finetune, prune_to_flops
    from pipelines.recipe.jobs import model_spec
    from pipelines.recipe.model import load_teacher

    target = m.measured(m.served(0.5))
    teacher = load_teacher(model_spec(m.cfg), m.run.dir("teacher"))
    cap = (2.0 if m.args.quick else 3.0) * m.lego_s
    start = time.perf_counter()
    choice = prune_to_flops(teacher, 0.5, m.cfg.model.input_shape)
    curve, spent = [], {"eval": 0.0}

    class Reached(Exception): ...

    def on_step(step: int, loss: float) -> None:
        elapsed = time.perf_counter() - start - spent["eval"]
        if step % (5 if m.args.quick else 50) and elapsed < cap:
            return
        t0 = time.perf_counter()
        acc = round(100 * evaluate(choice.model, m.splits.test), 2)
        spent["eval"] += time.perf_counter() - t0
        curve.append((round(elapsed, 2), acc))
        if acc >= target["test_acc"] or elapsed >= cap:
            raise Reached

    try:
        finetune(choice.model, teacher, m.splits.train, wall_time_s=cap, lr=0.01, progress=False, on_step=on_step)
    except Reached:
        pass
    reached = next((t for t, a in curve if a >= target["test_acc"]), None)
    return {"num_options": m.scalable.num_options(), "blocks": len(m.table.blocks), "lego_train_s": round(m.lego_s, 1),
            "lego_acc_at_50": target["test_acc"], "uniform_time_to_reach_s": reached, "cap_s": round(cap, 1),
            "ratio": round(m.lego_s / reached, 3) if reached else None, "curve": curve}


def fig_switching(m: Model) -> dict[str, Any]:
    """Block switching vs whole-model reloads over a seeded sequence of FLOPs budgets, each
    re-solved alone or switch-aware (points of predicted accuracy per MiB loaded), both reading
    the same per-block files."""
    import numpy as np
    import torch
    from torch import nn

    from legoblocks.compose import BlockSwitcher
    from legoblocks.serialize import load_module, save_module
    from pipelines.recipe.serve import flops_override
    from optimizer import parse_problem, solve
    from profiling.serving import to_problem

    names, root = m.table.block_names, m.args.workdir / m.name / "switch"
    for b in names:
        for c in m.scalable.choices(b):
            if not (root / b / f"{c}.safetensors").is_file():
                save_module(m.scalable.variant(b, c), root / b / f"{c}.safetensors")
    fracs = [float(f) for f in np.random.default_rng(m.args.seed).uniform(m.budgets[0], 1.0, m.args.switch_steps + 1)]
    read = {"bytes": 0}

    def source(block: str, choice: str) -> nn.Module:
        path = root / block / f"{choice}.safetensors"
        read["bytes"] += path.stat().st_size
        return load_module(path)

    def choose(frac: float, current: Any, penalty: float) -> list[str]:
        problem = to_problem(m.table, {"latency_ms": frac * m.teacher_flops / 1e6}, latency_override=flops_override(m.table),
                             current=None if current is None else {m.table.model_name: current},
                             switch_penalty_per_byte=penalty / 100 / 2**20)
        return list(solve(parse_problem(problem)).selection[m.table.model_name])

    x = torch.randn(2, *m.cfg.model.input_shape, generator=torch.Generator().manual_seed(0))
    runs = []
    for penalty in (0.0, 0.25, 1.0):
        sels = [choose(fracs[0], None, 0.0)]
        for f in fracs[1:]:
            sels.append(choose(f, sels[-1] if penalty else None, penalty))
        switcher, steps = BlockSwitcher(source, names, sels[0]), []
        for sel in sels[1:]:
            read["bytes"] = 0
            report = switcher.switch(sel)
            block_bytes, read["bytes"] = read["bytes"], 0
            t0 = time.perf_counter()
            full = nn.Sequential(*(source(b, c) for b, c in zip(names, sel))).eval()
            full_s = time.perf_counter() - t0
            with torch.no_grad():
                assert torch.allclose(switcher.model(x), full(x), atol=1e-5), "switched model differs from reloaded"
            steps.append({"block_bytes": block_bytes, "block_s": report.seconds, "full_bytes": read["bytes"],
                          "full_s": full_s})
        tot = {k: sum(s[k] for s in steps) for k in steps[0]}
        runs.append({"penalty_points_per_mib": penalty, "steps": steps, **{f"total_{k}": v for k, v in tot.items()},
                     "bytes_ratio": round(tot["block_bytes"] / tot["full_bytes"], 4),
                     "time_ratio": round(tot["block_s"] / tot["full_s"], 4)})
    return {**runs[0], "n_changes": len(runs[0]["steps"]), "penalties": runs}


def fig_additivity(m: Model) -> dict[str, Any]:
    """Predicted (raw, calibrated) vs measured validation accuracy (held-out images where the
    profile held some out) of compositions spread over the FLOPs range, drawn with a seed the
    calibration did not use."""
    from pipelines.recipe.measure import evaluator_for
    from profiling.calibrate import spread_compositions

    flops = {b.name: {c: p.flops for c, p in b.choices.items()} for b in m.table.blocks}
    sels = spread_compositions(m.scalable, flops, 6 if m.args.quick else 20, seed=m.args.seed + 7919)
    ev = evaluator_for(m.scalable, m.run.checked.facts.data, 0, m.cfg.profile.seed, m.cfg.profile.held_out_fraction)
    measured = ev.held_out_many(sels) if ev.held_out else ev.accuracy_many(sels)
    points = [{"measured": round(100 * a, 2), "raw": round(100 * m.table.predicted_accuracy(s, raw=True), 2),
               "calibrated": round(100 * m.table.predicted_accuracy(s), 2)} for s, a in zip(sels, measured)]
    out: dict[str, Any] = {"n": len(points), "points": points}
    for kind in ("raw", "calibrated"):
        errors = [abs(p[kind] - p["measured"]) for p in points]
        out[f"mae_{kind}"], out[f"max_{kind}"] = round(sum(errors) / len(errors), 3), round(max(errors), 3)
    return out


RUNNERS: dict[str, Callable[[Model], dict[str, Any]]] = dict(zip(FIGURES, (
    fig_accuracy, fig_latency, fig_options, fig_switching, fig_additivity)))


# ----------------------------------------------------------------------------- plots, verdicts, page


def plot(figure: str, model: str, r: dict[str, Any], directory: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    if figure in ("accuracy", "latency"):
        x = "flops_frac" if figure == "accuracy" else "latency_ms"
        for method, marker in zip(("legodnn", "uniform", "scratch"), "os^"):
            pts = sorted((row[x], row["test_acc"]) for row in r["rows"] if row["method"] == method and x in row)
            if pts:
                ax.plot(*zip(*pts), marker=marker, label=method)
        for key, style in (("told", "--"), ("check_acc", ":")):  # what LegoDNN told, and the check split
            if pts := sorted((row[x], row[key]) for row in r["rows"] if key in row and x in row):
                ax.plot(*zip(*pts), ls=style, color="C0", label=f"legodnn {key.replace('_acc', ' split')}")
        if pts := sorted((row["flops_frac"], row["test_acc"]) for row in r.get("best_trained", [])):
            ax.plot(*zip(*pts), ls="-.", color="C0", alpha=0.5, label="legodnn best trained (chosen by test)")
        ax.set_xlabel("FLOPs fraction of the teacher" if figure == "accuracy" else "measured latency (ms, batch 1)")
        ax.set_ylabel("accuracy (%)")
    elif figure == "options":
        if r["curve"]:
            ax.plot(*zip(*r["curve"]), marker=".", label="uniform @ 50% FLOPs, fine-tuning")
        ax.axhline(r["lego_acc_at_50"], ls="--", color="C1", label="LegoDNN @ 50%")
        ax.axvline(r["lego_train_s"], ls=":", color="C1", label="LegoDNN time (all options)")
        ax.set_xlabel("training wall time (s)")
        ax.set_ylabel("test accuracy (%)")
    elif figure == "switching":
        for run in r["penalties"]:
            label = f"blocks, {run['penalty_points_per_mib']:g} pts/MiB" if run["penalty_points_per_mib"] else "blocks"
            ax.plot(list(itertools.accumulate(s["block_bytes"] for s in run["steps"])), marker=".", label=label)
        ax.plot(list(itertools.accumulate(s["full_bytes"] for s in r["steps"])), marker="s", label="whole model")
        ax.set_xlabel("budget change")
        ax.set_ylabel("cumulative bytes read")
    else:
        for kind, marker in (("raw", "x"), ("calibrated", "o")):
            ax.scatter([p["measured"] for p in r["points"]], [p[kind] for p in r["points"]], marker=marker, label=kind)
        lims = [min(p["measured"] for p in r["points"]), max(p["measured"] for p in r["points"])]
        ax.plot(lims, lims, ls="--", color="gray", label="y = x")
        ax.set_xlabel("measured validation accuracy (%)")
        ax.set_ylabel("predicted (%)")
    ax.set_title(f"{model}: {figure}")
    ax.grid(alpha=0.3)
    ax.legend()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"eval-{figure}-{model}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def verdicts(figures: dict[str, dict[str, Any]]) -> list[str]:
    """One line per (figure, model) against the targets, from the JSON alone."""
    out = []
    for model, r in figures.get("accuracy", {}).items():
        u = r["gaps"].get("uniform")
        basis = f"uniform given {r.get('baseline_share_s', 0):.0f} s per budget, LegoDNN's {r.get('baseline_time', 'pipeline')} time"
        out.append(f"accuracy, {model}: legodnn - uniform mean {u['mean']:+.2f} +- {u.get('mean_se', float('nan')):.2f}, "
                   f"worst {u['min']:+.2f} +- {u.get('min_se', float('nan')):.2f} points (paired SE, same test images; {basis}; "
                   f"target >= 0 at every budget: {'met' if u['min'] >= 0 else 'missed'}; below by more than "
                   f"2 paired SEs at {len(u.get('below_2se', []))} budgets"
                   + (f"; the best trained composition chosen by the test set: worst {u['best_trained_min']:+.2f}"
                      if u.get("best_trained_min") is not None else "") + ")"
                   if u else f"accuracy, {model}: no baseline run")
        served = r.get("served", [])
        if served:
            mae = sum(abs(x["predicted"] - x["measured_check"]) for x in served) / len(served)
            tests = [x["measured_test"] for x in sorted(served, key=lambda x: x["budget"])]
            drops = [a - b for a, b in zip(tests, tests[1:]) if a - b > 0.2]
            full = next((x for x in r["rows"] if x["method"] == "legodnn" and x["budget"] == 1.0), None)
            out.append(f"served, {model}: mean |told - check| {mae:.2f} points on {served[0]['check_n']} check images "
                       f"(target <= 0.3: {'met' if mae <= 0.3 else 'missed'}); test accuracy non-decreasing in the "
                       f"budget within 0.2: {'met' if not drops else f'missed ({len(drops)} falls, largest {max(drops):.2f})'}"
                       + (f"; 100% serves the original: {'met' if full and set(full['selection']) == {'0.0'} else 'missed'}"
                          if full else ""))
    for model, r in figures.get("latency", {}).items():
        lego = [x for x in r["rows"] if x["method"] == "legodnn"]
        over = sum(x["latency_ms"] > x["budget_ms"] for x in lego)
        out.append(f"latency, {model}: {over} of {len(lego)} served models over their budget when timed")
    for model, r in figures.get("options", {}).items():
        out.append(f"options, {model}: {r['num_options']:,} models in {r['lego_train_s']:.0f} s; uniform to LegoDNN's "
                   f"50% accuracy: {r['uniform_time_to_reach_s']} s of a {r['cap_s']:.0f} s cap (ratio {r['ratio']})")
    for model, r in figures.get("switching", {}).items():
        best = min(run["bytes_ratio"] for run in r["penalties"])
        out.append(f"switching, {model}: {100 * r['bytes_ratio']:.1f}% of the bytes solved alone, {100 * best:.1f}% "
                   f"switch-aware (target <= 30%: {'met' if best <= 0.3 else 'missed'})")
    for model, r in figures.get("additivity", {}).items():
        out.append(f"additivity, {model}: MAE raw {r['mae_raw']:.2f} / calibrated {r['mae_calibrated']:.2f} points")
    return out


def markdown(result: dict[str, Any], md: Path) -> str:
    out = ["# Evaluation against the baselines", "", "Generated by `bench/evaluate.py` from its results JSON; "
           "every figure names its command, date and machine.", "", "## Verdicts", ""]
    out += [f"- {v}" for v in verdicts(result["figures"])] + [""]
    for figure in FIGURES:
        for model, r in result["figures"].get(figure, {}).items():
            png = os.path.relpath(REPO / r["png"], md.parent) if not Path(r["png"]).is_absolute() else r["png"]
            out += [f"## {figure}: {model}", "", f"`{r['command']}` - {r['date']}, {r['wall_s']} s, {r['machine']}.", "",
                    f"![{figure} {model}]({png})", ""]
            rows = r.get("served") or r.get("rows") or [{k: v for k, v in run.items() if k != "steps"}
                                                         for run in r.get("penalties", [])]
            rows = rows or r.get("points", [])
            if rows:
                keys = [k for k in rows[0] if k != "selection"]
                out += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
                out += ["| " + " | ".join(str(row.get(k, "")) for k in keys) + " |" for row in rows] + [""]
    return "\n".join(out)


def write_page(path: Path, result: dict[str, Any]) -> None:
    notes = path.read_text().split(NOTES_MARKER, 1)[1] if path.is_file() and NOTES_MARKER in path.read_text() else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown(result, path) + "\n" + NOTES_MARKER + (notes or "\n\n## Notes\n\n"))


def log_mlflow(uri: str, result: dict[str, Any], pngs: list[Path], json_path: Path) -> None:
    from infra.tracking import Tracker, default_artifact_root, flatten

    root = default_artifact_root(Path(uri[len("sqlite:///"):]).parent) if uri.startswith("sqlite:///") else None
    tracker = Tracker(uri, EXPERIMENT, artifact_root=root)
    run_id = tracker.start_run("evaluate", kind="evaluation")
    tracker.log_params(run_id, flatten({"command": result["command"]}))
    for figure, per_model in result["figures"].items():
        for model, r in per_model.items():
            tracker.log_metrics(run_id, {f"{model}.{figure}.{k}": v for k, v in r.items() if isinstance(v, (int, float))})
    for png in pngs:
        tracker.log_artifact(run_id, png, "figures")
    tracker.log_artifact(run_id, json_path)
    tracker.finish(run_id)


def build_parser() -> argparse.ArgumentParser:
    from pipelines.baselines import LEGODNN_TIME

    p = argparse.ArgumentParser(prog="bench/evaluate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("figure", choices=[*FIGURES, "all"], help="which figure to (re)compute")
    p.add_argument("--models", nargs="+", default=["resnet20", "mobilenetv2"], help="zoo models")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a recipe config key for every model, e.g. --set joint.steps=600 (JSON value)")
    p.add_argument("--budgets-n", type=int, default=10, help="budgets of the accuracy and latency figures")
    p.add_argument("--switch-steps", type=int, default=20, help="budget changes of the switching figure")
    p.add_argument("--baselines", nargs="*", default=["uniform", "scratch"], choices=["uniform", "scratch"],
                   help="which baselines to train (pipelines.baselines); none: LegoDNN's rows only")
    p.add_argument("--baseline-time", choices=sorted(LEGODNN_TIME), default="pipeline",
                   help="each baseline budget's share of LegoDNN's time: its whole pipeline after the teacher "
                   "(block retraining, joint stage and profiling; default) or its training stages only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (and Ray CPUs) per unit")
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist", help="Fashion-MNIST IDX folder")
    p.add_argument("--workdir", type=Path, default=REPO / ".legodnn" / "bench-evaluate", help="the recipe's cache")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "evaluation.json")
    p.add_argument("--served-out", type=Path, help="told vs check vs test of the accuracy figure's served "
                   "compositions, per model and budget; the models run replace their rows, others stay "
                   "(default: served.json beside --out)")
    p.add_argument("--md", type=Path, default=REPO / "docs" / "benchmarks" / "evaluation.md")
    p.add_argument("--figures-dir", type=Path, default=REPO / "docs" / "figures")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: MLFLOW_TRACKING_URI, else sqlite "
                   "in .legodnn)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.add_argument("--quick", action="store_true", help="tiny smoke setting (meaningless numbers)")
    return p


def merge_served(path: Path, rows: dict[str, list[dict[str, Any]]], run: dict[str, str]) -> dict[str, Any]:
    """The served file at `path` with this run's rows: the models run now replace their rows
    and their `runs` entry (command, machine, date); other models' rows stay, so one file
    holds every model however many invocations produced it."""
    old = json.loads(path.read_text()) if path.is_file() else {}
    kept = [row for row in old.get("rows", []) if row["model"] not in rows]
    runs = {name: entry for name, entry in old.get("runs", {}).items() if name not in rows}
    return {"runs": {**runs, **{name: run for name in rows}}, "rows": kept + [row for r in rows.values() for row in r]}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.quick:
        args.budgets_n, args.switch_steps = 3, 5
    if args.budgets_n < 2 or args.switch_steps < 1:
        raise SystemExit("bench/evaluate.py: need --budgets-n >= 2 and --switch-steps >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    figures = list(FIGURES) if args.figure == "all" else [args.figure]
    uri = None
    if not args.no_mlflow:
        from infra.tracking import check_tracking, resolve_tracking_uri

        uri = resolve_tracking_uri(REPO / ".legodnn", args.tracking_uri)
        check_tracking(uri)  # fail before hours of work, not after
    from profiling.latency import fingerprint

    machine = f"{fingerprint()['cpu_model']}, {os.cpu_count()} CPUs, {platform.system()}"
    command = "bench/evaluate.py " + shlex.join(argv)
    new: dict[str, Any] = {"figures": {}}
    pngs = []
    for name in args.models:
        m = Model(name, args)
        for figure in figures:
            started = time.perf_counter()
            r = RUNNERS[figure](m)
            png = plot(figure, name, r, args.figures_dir)
            pngs.append(png)
            shown = str(png.resolve().relative_to(REPO)) if png.resolve().is_relative_to(REPO) else str(png.resolve())
            r.update(command=command, wall_s=round(time.perf_counter() - started, 1), machine=machine, png=shown,
                     date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), config=m.cfg.to_dict())
            new["figures"].setdefault(figure, {})[name] = r
    old = json.loads(args.out.read_text()) if args.out.is_file() else {}
    merged = old.get("figures", {})
    for figure, per_model in new["figures"].items():
        merged.setdefault(figure, {}).update(per_model)
    result = {"command": command, "machine": machine, "figures": merged}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if "accuracy" in new["figures"]:
        served_out = args.served_out or args.out.with_name("served.json")
        served = merge_served(served_out, {name: r.get("served", []) for name, r in new["figures"]["accuracy"].items()},
                              {"command": command, "machine": machine, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")})
        served_out.write_text(json.dumps(served, indent=1) + "\n")
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    write_page(args.md, result)
    print("\n".join(verdicts(new["figures"])))
    print(f"wrote {args.out}, {args.md} and {len(pngs)} PNGs in {args.figures_dir}")
    if uri is not None:
        log_mlflow(uri, result, pngs, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
