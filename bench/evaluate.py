"""Evaluation against the baselines the paper beat (issue 7): one command per figure.

    accuracy    test accuracy under 10 FLOPs budgets: LegoDNN (optimizer's top-k re-ranked on
                validation, accuracy MEASURED on the test set) vs uniform pruning + fine-tune
                vs the model at reduced width from scratch, both baselines given LegoDNN's
                training wall time split evenly over the budgets
    latency     the same under 10 latency budgets (the profile's latency column, measured here
                at batch 1 on 1 thread); every chosen model's end-to-end latency is measured;
                the accuracy figure's baselines are added at their measured latencies
    options     distinct composed models, LegoDNN's training time for all of them, and the time
                uniform pruning needs to reach LegoDNN's accuracy at 50% FLOPs
    switching   bytes read and time for 20 budget changes: block-level switching
                (legoblocks.compose.BlockSwitcher) vs reloading the whole model, from per-block
                files written with legoblocks.serialize
    additivity  predicted (raw and calibrated) vs measured accuracy of 20 random compositions
    all         every figure above, in that order

Teachers and trained LegoDNN descendants come from bench/accuracy.py's caches in --workdir
(the same `teacher-*.pt`, `blockwise-*` and `lego-*` entries). The joint stage's sandwich floor
is the smallest budget this script evaluates (the smallest composition's FLOPs, rounded up),
not the accuracy bench's 25%, so its LegoRun differs from bench/accuracy.py's in the joint
stage only; `--joint sandwich_floor=X` overrides it. The profile (with latency) and the
baselines are cached there too, so a figure re-renders without retraining; delete a
`baselines-*` or `profile-*` entry to redo it. Baselines are keyed by teacher and budgets, not
by the joint stage: a set trained with at least a LegoDNN run's time share is reused for it.

Every run merges its figures into --out (docs/results/evaluation.json), regenerates --md
(docs/benchmarks/evaluation.md, keeping hand-written notes below the marker), writes PNGs to
--figures-dir and logs them with the headline numbers to an MLflow run (experiment
"legodnn-evaluation").

    .venv/bin/python bench/evaluate.py all --threads 1
    .venv/bin/python bench/evaluate.py switching --models resnet20 --threads 1
    .venv/bin/python bench/evaluate.py all --quick --workdir /tmp/e --out /tmp/e/e.json \\
        --md /tmp/e/e.md --figures-dir /tmp/e/fig --tracking-uri sqlite:////tmp/e/mlflow.db
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import logging
import math
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: the packages live in the repo root
    sys.path.insert(0, str(REPO))

FIGURES = ("accuracy", "latency", "options", "switching", "additivity")
DEFAULT_MODELS = ["resnet20", "mobilenetv2"]
DEFAULT_MODEL_KWARGS = {"mobilenetv2": {"width_mult": 0.5}}
DEFAULT_MODEL_TEACHER_EPOCHS = {"mobilenetv2": 4}
EXPERIMENT = "legodnn-evaluation"
SCHEMA = 1

log = logging.getLogger("bench.evaluate")


def _load_accuracy_module():
    """bench/accuracy.py as a module (bench/ is not a package); one instance per process."""
    name = "bench_accuracy"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("accuracy.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


acc = _load_accuracy_module()
SHAPE = acc.SHAPE
Timer = acc.Timer


@dataclass
class EvalSettings:
    """What the figures measure, on top of bench/accuracy.py's Settings (teachers, training)."""

    n_budgets: int = 10
    latency_warmup: int = 5
    latency_repeats: int = 30  # per block in the profile and per whole model (median)
    # The latency figure's reported timings: every model timed in this many round-robin passes,
    # keeping each one's fastest median. Interference only adds time, and on a shared VM it
    # comes in bursts (session 7: the teacher's architecture timed 2.10 and 3.35 ms minutes apart).
    latency_passes: int = 3
    options_cap_factor: float = 3.0  # uniform may take this multiple of LegoDNN's time
    options_cap_s: float | None = None  # an absolute cap instead (quick)
    options_eval_every: int = 50  # fine-tune steps between test evaluations
    switch_steps: int = 20
    # Switch-aware re-solves (the device's RuntimeScaler option): accuracy points charged per
    # MiB a change loads. 0 = every budget solved on its own.
    switch_penalties: tuple[float, ...] = (0.0, 0.25, 1.0)
    additivity_n: int = 20
    baseline_cap_s: float | None = None  # caps each baseline's per-budget time (quick only)
    quick: bool = False


def quick_eval_settings() -> EvalSettings:
    """Tiny settings: every figure runs end to end in seconds; the numbers mean nothing."""
    return EvalSettings(n_budgets=3, latency_warmup=2, latency_repeats=30, options_cap_s=2.0,
                        options_eval_every=5, switch_steps=5, additivity_n=6, baseline_cap_s=1.0, quick=True)


# ----------------------------------------------------------------------------- per-model context


class ModelContext:
    """Everything the figures of one model share, built lazily and cached on disk."""

    def __init__(self, name: str, s, e: EvalSettings, data: dict, workdir: Path, progress: bool) -> None:
        self.name, self.s, self.e, self.data, self.workdir, self.progress = name, s, e, data, workdir, progress
        self._teacher = self._lego = self._table = self._smallest = None
        self.profile_s = 0.0
        self._selections: dict[tuple[str, float], Any] = {}

    @property
    def teacher(self):
        if self._teacher is None:
            from legoblocks.train import evaluate
            from legoblocks.uniform import count_flops

            self._teacher, _ = acc.teacher_for(self.name, self.s, self.data["train"], self.workdir, self.progress)
            self.teacher_flops = count_flops(self._teacher, SHAPE)
            self.teacher_acc = evaluate(self._teacher, self.data["test"])
        return self._teacher

    @property
    def lego(self):
        if self._lego is None:
            self.teacher  # noqa: B018 - loads the teacher and its FLOPs first
            if "sandwich_floor" not in self.s.joint:
                # Train the floor at the smallest budget this evaluation serves, not at the
                # accuracy bench's smallest (25%): below its floor a composition is a mix the
                # joint stage never trained together (session 6: -6.78 points at 21%).
                self.s = dataclasses.replace(self.s, joint={**self.s.joint, "sandwich_floor": self.flops_budgets()[0]})
            self._lego = acc.train_legodnn(self.name, self.s, self.data, self.teacher, self.workdir, self.progress)
        return self._lego

    def block_key(self) -> dict[str, Any]:
        """What defines the per-block stage (teacher, data, ladder, retraining), not the joint stage."""
        spec = acc.lego_key(self.name, self.s, len(self.data["train"]), self.workdir)
        return {k: v for k, v in spec.items() if k not in ("joint", "joint_on_block_io")}

    @property
    def scalable(self):
        return self.lego.scalable

    @property
    def table(self):
        """The calibrated profile with a latency column measured here (batch 1, 1 thread), cached
        next to the LegoRun; `profile_s` is the ORIGINAL profiling time on a cache hit."""
        if self._table is None:
            from profiling.profile import LatencySettings
            from profiling.table import load, save

            lat = LatencySettings(batch_size=1, warmup=self.e.latency_warmup, repeats=self.e.latency_repeats, threads=1)
            spec = {"envs": self.s.profile_envs, "additivity_n": self.s.additivity_n, "k": self.s.calibration_k,
                    "latency": asdict(lat), "val_size": len(self.data["val"]), "seed": self.s.seed}
            root = self.workdir / f"lego-{self.name}-{self.lego.key}"
            path, meta = root / f"profile-{acc._digest(spec)}.json", root / f"profile-{acc._digest(spec)}.meta.json"
            if path.is_file() and meta.is_file():
                from profiling.calibrate import refit_table

                cached, self.profile_s = load(path), json.loads(meta.read_text())["profile_s"]
                # Refit the accuracy calibration with today's fit from the cached measurements:
                # a better fit must not need a re-profile (which would also re-time it).
                self._table = refit_table(cached)
                log.info("%s: profile loaded from cache %s (profiled originally in %.1f s); calibration %s -> %s",
                         self.name, path, self.profile_s, (cached.calibration or {}).get("method"),
                         (self._table.calibration or {}).get("method"))
            else:
                self._table, self.profile_s = acc.profile(self.name, self.s, self.scalable, self.data["val"],
                                                          calibration_k=self.s.calibration_k, latency=lat,
                                                          progress=self.progress)
                save(self._table, path)
                meta.write_text(json.dumps({"profile_s": self.profile_s, "settings": spec}) + "\n")
        return self._table

    def latency_table(self):
        """The profile with a composition-latency correction (`profiling.latency_fit`) fitted
        on this host, so latency budgets are met by the composed model and not only by the sum
        of its blocks timed alone. A profile made before the correction existed gets one
        measured here and cached beside it; the fit is profiling, not training time."""
        from profiling.latency import fingerprint
        from profiling.latency_fit import LatencyCalibration, measure_latency_calibration

        table = self.table
        if table.latency_calibration:
            return table
        host = fingerprint(threads=1)["id"]
        if host not in table.fingerprints:
            log.warning("%s: the profile's latencies come from %s, this host is %s; the correction "
                        "fitted here mixes hosts", self.name, sorted(table.fingerprints), host)
        path = self.workdir / f"lego-{self.name}-{self.lego.key}" / f"latency-fit-{host}.json"
        if path.is_file():
            fit = LatencyCalibration.from_dict(json.loads(path.read_text()))
        else:
            medians = {b.name: {c: ch.latency.median_ms for c, ch in b.choices.items()} for b in table.blocks}
            fit = measure_latency_calibration(
                self.scalable, medians, fingerprint=next(iter(table.fingerprints)), seed=self.s.seed,
                warmup=self.e.latency_warmup, repeats=self.e.latency_repeats, threads=1, progress=self.progress)
            path.write_text(json.dumps(fit.to_dict(), indent=1) + "\n")
        log.info("%s: latency correction %s: scale %.3f, offset %.3f ms (LOO MAE %.3f ms, raw sum %.3f ms)",
                 self.name, fit.method, fit.scale, fit.offset_ms, fit.loo_mae_calibrated_ms, fit.loo_mae_raw_ms)
        return dataclasses.replace(table, latency_calibration=fit.to_dict())

    def lego_train_s(self) -> float:
        """Per-block + joint + profiling (drops, additivity, calibration, latency)."""
        t = self.lego.timings
        self.table  # noqa: B018 - profiles (or loads the profile) so profile_s is known
        return t["blockwise_s"] + t["joint_s"] + self.profile_s

    def smallest_frac(self) -> float:
        """The smallest composition's FLOPs fraction, from the untrained descendants: pruning
        fixes the architecture, so it is known before training (the joint stage's floor needs
        it) and cached, since building every descendant takes a while."""
        if self._smallest is None:
            from legoblocks.detect import detect_blocks
            from legoblocks.uniform import count_flops

            path = self.workdir / f"smallest-{self.name}-{acc._digest(self.block_key())}.json"
            if path.is_file():
                self._smallest = json.loads(path.read_text())["flops_frac"]
            else:
                scalable = acc._descendants(detect_blocks(self.teacher, SHAPE), self.s, self.name)
                smallest = scalable.compose(scalable.smallest_selection())
                self._smallest = count_flops(smallest, SHAPE) / self.teacher_flops
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps({"flops_frac": self._smallest}) + "\n")
                os.replace(tmp, path)
        return self._smallest

    def flops_budgets(self) -> list[float]:
        """n budgets from just above the smallest composition's FLOPs fraction to 1.0."""
        start = min(1.0, math.ceil((self.smallest_frac() + 0.002) * 100) / 100)
        n = self.e.n_budgets
        return [round(start + (1.0 - start) * i / (n - 1), 4) for i in range(n)] if n > 1 else [1.0]

    def measured(self, sel: Sequence[str]) -> dict[str, float]:
        """Test accuracy (%) and measured FLOPs fraction of a composition."""
        from legoblocks.train import evaluate
        from legoblocks.uniform import count_flops

        composed = self.scalable.compose(sel)
        return {"test_acc": round(100 * evaluate(composed, self.data["test"]), 2),
                "flops_frac": round(count_flops(composed, SHAPE) / self.teacher_flops, 4)}

    def latency_ms(self, module) -> float:
        from profiling.latency import measure_latency

        return measure_latency(module, SHAPE, batch_size=1, warmup=self.e.latency_warmup,
                               repeats=max(30, self.e.latency_repeats), threads=1).median_ms


# ----------------------------------------------------------------------------- baselines cache


def baselines(ctx: ModelContext, rerank_s: float | None = None) -> dict[str, Any]:
    """Uniform and scratch models for the accuracy figure's budgets, trained once and cached
    (JSON + one pickle-free module file per model), so the latency figure and re-renders reuse
    them. Each gets an equal share of LegoDNN's training wall time per budget.

    The cache is keyed by what defines the baselines (teacher, budgets, fine-tune settings),
    not by LegoDNN's joint stage: a set trained with at least LegoDNN's share is reused for
    another LegoDNN run (more time only favours the baselines), and one with less is never."""
    from legoblocks.serialize import load_module, save_module

    budgets = ctx.flops_budgets()
    family_spec = {"blocks": ctx.block_key(), "budgets": budgets, "uniform_lr": ctx.s.uniform_lr,
                   "prune_iterations": ctx.s.prune_iterations, "cap": ctx.e.baseline_cap_s}
    family = f"baselines-{ctx.name}-{acc._digest(family_spec)}"
    ctx.table  # noqa: B018 - profiles (or loads the profile) so profile_s is known
    served = {"lego": ctx.lego.key, "profile_s": round(ctx.profile_s, 3)}

    def load(root: Path, data: dict[str, Any]) -> dict[str, Any]:
        for row in data["rows"]:
            row["model"] = load_module(root / row.pop("file"))
        return data

    cached = [(root, json.loads((root / "baselines.json").read_text()))
              for root in sorted(ctx.workdir.glob(f"{family}-*")) if (root / "baselines.json").is_file()]
    for root, data in cached:
        if served in data["served"]:
            log.info("%s: uniform and scratch baselines loaded from cache %s", ctx.name, root)
            return load(root, data)
    if rerank_s is None:  # LegoDNN's re-ranking time is part of what the baselines get
        rerank_s = legodnn_flops_picks(ctx, budgets)[1]
    total = ctx.lego_train_s() + rerank_s
    n_train = max(1, sum(b < 1.0 for b in budgets))
    share = total / n_train
    if ctx.e.baseline_cap_s is not None:
        share = min(share, ctx.e.baseline_cap_s)
    enough = sorted(((data["share_s"], str(root)) for root, data in cached if data["share_s"] >= round(share, 2)))
    if enough:
        root = Path(enough[0][1])
        data = json.loads((root / "baselines.json").read_text())
        data["served"].append(served)
        tmp = root / f".baselines.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, root / "baselines.json")
        log.info("%s: baselines reused from %s: trained with %.1f s per budget, LegoDNN's share now %.1f s",
                 ctx.name, root, data["share_s"], share)
        return load(root, data)
    log.info("%s: baselines get %.1f s per budget (LegoDNN %.1f s over %d budgets < 1.0)",
             ctx.name, share, total, n_train)
    uniform = acc.uniform_baseline(ctx.name, ctx.s, ctx.data, ctx.teacher, budgets, seconds_per_budget=share,
                                   progress=ctx.progress)
    scratch = acc.scratch_baseline(ctx.name, ctx.s, ctx.data, ctx.teacher, budgets, seconds_per_budget=share,
                                   skip_unfit=True, progress=ctx.progress)
    rows = []
    root = ctx.workdir / f"{family}-{acc._digest(served)}"
    tmp = acc.cache_tmp(root)
    for method, results in (("uniform", uniform), ("scratch", scratch)):
        for r in results:
            file = f"{method}-{r.budget:.4f}.safetensors"
            save_module(r.model, tmp / file)
            extra = {k: v for k, v in r.extra.items() if k != "finetune_s"}
            rows.append({"method": method, "budget": r.budget, "flops_frac": round(r.flops_frac, 4),
                         "test_acc": round(100 * r.test_acc, 2), "train_s": round(r.seconds, 1),
                         "file": file, **extra})
    data = {"share_s": round(share, 2), "lego_total_s": round(total, 1), "rows": rows, "served": [served],
            "scratch_skipped": [b for b in budgets if b not in {r.budget for r in scratch}]}
    (tmp / "baselines.json").write_text(json.dumps(data, indent=2) + "\n")
    acc.publish_cache(tmp, root)
    return load(root, json.loads((root / "baselines.json").read_text()))


def legodnn_flops_picks(ctx: ModelContext, budgets: Sequence[float]):
    """LegoDNN's selection per FLOPs fraction: top-k re-ranked on validation data."""
    table = ctx.table  # first: loading the LegoRun settles ctx.s (the derived floor)
    return acc.select(table, ctx.scalable, ctx.data["val"], budgets, metric="flops", top_k=ctx.s.top_k, rerank=True,
                      trained_anchors=acc.trained_anchors(ctx.s), margin_se=ctx.s.rerank_margin_se)


# ----------------------------------------------------------------------------- figures


def fig_accuracy(ctx: ModelContext) -> dict[str, Any]:
    """LegoDNN vs uniform vs scratch at 10 FLOPs budgets, all measured on the test set."""
    budgets = ctx.flops_budgets()
    picks, rerank_s = legodnn_flops_picks(ctx, budgets)
    rows = []
    for pick in picks:
        rows.append({"method": "legodnn", "budget": pick.budget, **ctx.measured(pick.selection),
                     "predicted_val_acc": round(100 * pick.predicted, 2), "val_acc": round(100 * pick.val_acc, 2),
                     "selection": pick.selection})
    base = baselines(ctx, rerank_s)
    rows += [{k: v for k, v in r.items() if k != "model"} for r in base["rows"]]
    gaps = {}
    for other in ("uniform", "scratch"):
        diffs = [lego["test_acc"] - r["test_acc"] for lego in rows if lego["method"] == "legodnn"
                 for r in rows if r["method"] == other and r["budget"] == lego["budget"]]
        if not diffs:
            continue
        gaps[other] = {"max": round(max(diffs), 2), "mean": round(sum(diffs) / len(diffs), 2),
                       "min": round(min(diffs), 2)}
    t = ctx.lego.timings
    return {"teacher_test_acc": round(100 * ctx.teacher_acc, 2), "teacher_mflops": round(ctx.teacher_flops / 1e6, 3),
            "budgets": budgets, "rows": rows, "gaps": gaps,
            "lego_time_s": {"blockwise": t["blockwise_s"], "joint": t["joint_s"], "profile": round(ctx.profile_s, 1),
                            "rerank": round(rerank_s, 1), "total": round(ctx.lego_train_s() + rerank_s, 1)},
            "baseline_share_s": base["share_s"],
            "lego_share_s": round((ctx.lego_train_s() + rerank_s) / max(1, sum(b < 1.0 for b in budgets)), 2),
            "joint_floor": acc.joint_config(ctx.s).sandwich_floor, "lego_cached": ctx.lego.cached,
            "scratch_skipped": base.get("scratch_skipped", [])}


def fig_latency(ctx: ModelContext) -> dict[str, Any]:
    """LegoDNN picks by latency budget; every model's end-to-end latency is measured."""
    from legoblocks.train import evaluate

    table, names = ctx.latency_table(), ctx.scalable.block_names
    per_block = [[table.choice_latency_ms(b, c) for c in table.block(b).choices] for b in names]
    fastest, slowest = sum(min(v) for v in per_block), sum(max(v) for v in per_block)
    n = ctx.e.n_budgets
    budgets = [fastest * 1.001 + (slowest - fastest * 1.001) * i / max(1, n - 1) for i in range(n)]
    picks, _ = acc.select(table, ctx.scalable, ctx.data["val"], budgets, metric="latency", top_k=ctx.s.top_k,
                          rerank=True)
    rows, modules = [], []
    for pick in picks:
        first_ms = ctx.latency_ms(ctx.scalable.compose(pick.selection))
        selection, guard = pick.selection, None
        if first_ms > pick.budget:  # what a device does: time it, re-solve under a tightened budget
            guard = _measured_guard(ctx, table, pick.budget)
            selection = list(guard.solution.selection[table.model_name])
        rows.append({"method": "legodnn", "budget_ms": round(pick.budget, 4),
                     "predicted_ms": round(table.predicted_latency(selection), 4),
                     "predicted_raw_ms": round(table.predicted_latency(selection, raw=True), 4),
                     "first_pick_ms": round(first_ms, 4),
                     "guard_rounds": 0 if guard is None else len(guard.rounds),
                     **ctx.measured(selection), "selection": selection})
        modules.append(ctx.scalable.compose(selection))
    for r in baselines(ctx)["rows"]:
        rows.append({"method": r["method"], "budget": r["budget"], "flops_frac": r["flops_frac"],
                     "test_acc": round(100 * evaluate(r["model"], ctx.data["test"]), 2)})
        modules.append(r["model"])
    # Fresh timings for what is reported (the guard stops at its first timing under budget,
    # which may be a lucky one), every model in each pass, so a burst of interference on the
    # host hits one pass of many models rather than every pass of one.
    passes = [[ctx.latency_ms(m) for m in [*modules, ctx.teacher]] for _ in range(ctx.e.latency_passes)]
    for i, row in enumerate(rows):
        row["latency_ms"] = round(min(p[i] for p in passes), 4)
        row["latency_passes_ms"] = [round(p[i], 4) for p in passes]
    teacher_ms = min(p[-1] for p in passes)
    fit = {k: v for k, v in table.latency_calibration.items() if k != "points"}
    return {"budgets_ms": [round(b, 4) for b in budgets], "teacher_latency_ms": round(teacher_ms, 4),
            "teacher_latency_passes_ms": [round(p[-1], 4) for p in passes],
            "latency_calibration": fit,
            "teacher_test_acc": round(100 * ctx.teacher_acc, 2), "rows": rows,
            "note": "uniform and scratch are the accuracy figure's models (no extra training) at their "
                    f"measured latencies; latency = the fastest of {ctx.e.latency_passes} round-robin passes, "
                    "each the median of >= 30 runs at batch 1 on 1 thread"}


def _measured_guard(ctx: ModelContext, table, budget_ms: float):
    """optimizer.solve_measured on this host: the composition timed end to end each round."""
    from optimizer import parse_problem, solve_measured
    from profiling.table import to_problem

    problem = parse_problem(to_problem(table, {"latency_ms": budget_ms}))
    return solve_measured(problem, lambda sel: ctx.latency_ms(ctx.scalable.compose(sel[table.model_name])))


class _Reached(Exception):
    """Raised from the fine-tune callback to stop once the target accuracy is reached."""


def fig_options(ctx: ModelContext) -> dict[str, Any]:
    """Options count, LegoDNN's time for all of them, and uniform's time to match it at 50%."""
    from legoblocks.train import evaluate
    from legoblocks.uniform import finetune, prune_to_flops

    picks, _ = legodnn_flops_picks(ctx, [0.5])
    target = ctx.measured(picks[0].selection)
    lego_s = ctx.lego_train_s()
    cap = ctx.e.options_cap_s if ctx.e.options_cap_s is not None else ctx.e.options_cap_factor * lego_s
    test, train = ctx.data["test"], ctx.data["train"]
    with Timer() as t_prune:
        choice = prune_to_flops(ctx.teacher, 0.5, SHAPE, iterations=ctx.s.prune_iterations)
    steps_per_epoch = len(train) // 128
    horizon_epochs = _horizon_epochs(ctx, choice.model, cap, steps_per_epoch)
    curve = [(round(t_prune.seconds, 2), round(100 * evaluate(choice.model, test), 2))]
    clock = {"start": time.perf_counter(), "eval": 0.0}

    def train_s() -> float:
        return t_prune.seconds + time.perf_counter() - clock["start"] - clock["eval"]

    def on_step(step: int, loss: float) -> None:
        if step % ctx.e.options_eval_every and train_s() < cap:
            return
        elapsed, start = train_s(), time.perf_counter()
        model_acc = round(100 * evaluate(choice.model, test), 2)  # restores train mode
        clock["eval"] += time.perf_counter() - start
        curve.append((round(elapsed, 2), model_acc))
        if model_acc >= target["test_acc"] or elapsed >= cap:
            raise _Reached

    try:
        finetune(choice.model, ctx.teacher, train, epochs=horizon_epochs, lr=ctx.s.uniform_lr, seed=ctx.s.seed,
                 progress=ctx.progress, on_step=on_step)
        on_step(0, 0.0)  # the horizon ended before cap or target: one last evaluation
    except _Reached:
        pass
    reached = next((t for t, a in curve if a >= target["test_acc"]), None)
    return {"num_options": ctx.scalable.num_options(), "blocks": len(ctx.scalable.block_names),
            "lego_train_s": round(lego_s, 1), "lego_acc_at_50": target["test_acc"],
            "lego_flops_frac_at_50": target["flops_frac"], "lego_selection_at_50": picks[0].selection,
            "uniform_ratio": round(choice.ratio, 4), "uniform_flops_frac": round(choice.flops_frac, 4),
            "uniform_time_to_reach_s": reached, "cap_s": round(cap, 1), "horizon_epochs": round(horizon_epochs, 3),
            "ratio": round(lego_s / reached, 3) if reached else None, "curve": curve,
            "eval_every_steps": ctx.e.options_eval_every}


def _horizon_epochs(ctx: ModelContext, model, cap: float, steps_per_epoch: int) -> float:
    """Epochs of a cosine schedule that lasts about `cap` seconds, from a short timed trial
    on a copy (not counted): the schedule must not end (lr 0) before the cap."""
    from legoblocks.uniform import finetune

    trial = finetune(copy.deepcopy(model), ctx.teacher, ctx.data["train"], wall_time_s=min(3.0, max(0.3, cap / 20)),
                     lr=ctx.s.uniform_lr, seed=ctx.s.seed, progress=False)
    step_s = trial.seconds / max(1, trial.steps)
    return max(0.05, cap / step_s / max(1, steps_per_epoch))


def fig_switching(ctx: ModelContext) -> dict[str, Any]:
    """Block-level switching vs whole-model reloads over a seeded sequence of budgets, both
    reading the same per-block files (real file reads)."""
    import numpy as np
    import torch
    from torch import nn

    from legoblocks.serialize import load_module, save_module

    scalable, names = ctx.scalable, ctx.scalable.block_names
    root = ctx.workdir / f"switch-{ctx.name}-{ctx.lego.key}"
    if not (root / "complete").is_file():
        for b in names:
            for c in scalable.choices(b):
                save_module(scalable.variant(b, c), root / b / f"{c}.safetensors")
        (root / "complete").write_text("")
    rng = np.random.default_rng(ctx.s.seed)
    low = ctx.smallest_frac()
    fracs = [float(f) for f in rng.uniform(min(1.0, low + 0.002), 1.0, ctx.e.switch_steps + 1)]
    read = {"bytes": 0}

    def source(block: str, choice: str) -> nn.Module:
        path = root / block / f"{choice}.safetensors"
        read["bytes"] += path.stat().st_size
        return load_module(path)

    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0))
    runs = [_switch_run(ctx, root, names, fracs, penalty, source, read, x) for penalty in ctx.e.switch_penalties]
    plain = next((r for r in runs if r["penalty_points_per_mib"] == 0.0), runs[0])
    return {**plain, "penalties": runs,
            "note": "the initial load is not counted (both start from the same live model); files are read "
                    "through the OS page cache, which favours neither side"}


def _switch_run(ctx: ModelContext, root: Path, names: list[str], fracs: list[float], penalty: float,
                source, read: dict, x) -> dict[str, Any]:
    """One budget sequence, re-solved with `penalty` points per MiB loaded; block switching and
    whole-model reloads read the same per-block files."""
    import torch
    from torch import nn

    from legoblocks.compose import BlockSwitcher

    per_byte = penalty / 100.0 / 2**20
    plain = [acc.choose(ctx.table, f * ctx.teacher_flops, 1, "flops")[0] for f in fracs]
    sels = [plain[0]]
    for f in fracs[1:]:
        sels.append(acc.choose(ctx.table, f * ctx.teacher_flops, 1, "flops", current=sels[-1],
                               switch_penalty_per_byte=per_byte)[0] if penalty else plain[len(sels)])
    switcher = BlockSwitcher(source, names, sels[0])  # both start from the same loaded model
    steps = []
    for frac, sel, best in zip(fracs[1:], sels[1:], plain[1:]):
        read["bytes"] = 0
        report = switcher.switch(sel)
        block_bytes = read["bytes"]
        read["bytes"] = 0
        start = time.perf_counter()
        full = nn.Sequential(*(source(b, c) for b, c in zip(names, sel))).eval()
        full_s = time.perf_counter() - start
        with torch.no_grad():
            if not torch.allclose(switcher.model(x), full(x), atol=1e-5):
                raise AssertionError("switching: the switched model differs from the reloaded one")
        cost = 100 * (ctx.table.predicted_accuracy(best) - ctx.table.predicted_accuracy(sel))
        steps.append({"budget": round(frac, 4), "changed": len(report.changed), "block_bytes": block_bytes,
                      "block_s": round(report.seconds, 5), "full_bytes": read["bytes"], "full_s": round(full_s, 5),
                      "predicted_cost_points": round(cost, 4)})
    total = {k: sum(st[k] for st in steps) for k in ("block_bytes", "full_bytes", "block_s", "full_s")}
    return {"penalty_points_per_mib": penalty, "steps": steps, "n_changes": len(steps),
            **{f"total_{k}": round(v, 5) for k, v in total.items()},
            "bytes_ratio": round(total["block_bytes"] / total["full_bytes"], 4),
            "time_ratio": round(total["block_s"] / total["full_s"], 4) if total["full_s"] else None,
            "mean_predicted_cost_points": round(sum(st["predicted_cost_points"] for st in steps) / len(steps), 4)}


def fig_additivity(ctx: ModelContext) -> dict[str, Any]:
    """Predicted (raw, calibrated) vs measured validation accuracy on random compositions
    spread over the FLOPs range, drawn with a seed the calibration did not use."""
    from profiling.accuracy import SelectionEvaluator
    from profiling.calibrate import spread_compositions

    table = ctx.table
    flops = {b.name: {c: p.flops for c, p in b.choices.items()} for b in table.blocks}
    sels = spread_compositions(ctx.scalable, flops, ctx.e.additivity_n, seed=ctx.s.seed + 7919)
    measured = SelectionEvaluator(ctx.scalable, ctx.data["val"]).accuracy_many(sels)
    points = []
    for sel, m in zip(sels, measured):
        points.append({"selection": list(sel), "flops_frac": round(table.total(sel, "flops") / ctx.teacher_flops, 4),
                       "measured": round(100 * m, 2), "raw": round(100 * table.predicted_accuracy(sel, raw=True), 2),
                       "calibrated": round(100 * table.predicted_accuracy(sel), 2)})
    out: dict[str, Any] = {"n": len(points), "points": points, "split": "validation split (the one the profile uses)"}
    for kind in ("raw", "calibrated"):
        errors = [abs(p[kind] - p["measured"]) for p in points]
        out[f"mae_{kind}"] = round(sum(errors) / len(errors), 3)
        out[f"max_{kind}"] = round(max(errors), 3)
    return out


RUNNERS: dict[str, Callable[[ModelContext], dict[str, Any]]] = {
    "accuracy": fig_accuracy, "latency": fig_latency, "options": fig_options,
    "switching": fig_switching, "additivity": fig_additivity,
}


# ----------------------------------------------------------------------------- plots


def plot(figure: str, model: str, res: dict[str, Any], directory: Path) -> Path:
    """One PNG per (figure, model) with matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    try:
        PLOTTERS[figure](ax, res)
        ax.set_title(f"{model}: {figure}")
        ax.grid(alpha=0.3)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"eval-{figure}-{model}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path


def _lines(ax, rows: list[dict], x: str, methods=("legodnn", "uniform", "scratch")) -> None:
    for method, marker in zip(methods, ("o", "s", "^")):
        pts = sorted((r[x], r["test_acc"]) for r in rows if r["method"] == method)
        if pts:
            ax.plot(*zip(*pts), marker=marker, label=method)


def _plot_accuracy(ax, res):
    _lines(ax, res["rows"], "flops_frac")
    ax.axhline(res["teacher_test_acc"], ls="--", color="gray", label="teacher")
    ax.set_xlabel("measured FLOPs fraction of the teacher")
    ax.set_ylabel("test accuracy (%)")
    ax.legend()


def _plot_latency(ax, res):
    _lines(ax, res["rows"], "latency_ms")
    ax.axhline(res["teacher_test_acc"], ls="--", color="gray", label="teacher")
    ax.set_xlabel("measured latency (ms, batch 1, 1 thread)")
    ax.set_ylabel("test accuracy (%)")
    ax.legend()


def _plot_options(ax, res):
    if res["curve"]:
        ax.plot(*zip(*res["curve"]), marker=".", label="uniform @ 50% FLOPs, fine-tuning")
    ax.axhline(res["lego_acc_at_50"], ls="--", color="C1", label="LegoDNN accuracy @ 50%")
    ax.axvline(res["lego_train_s"], ls=":", color="C1", label="LegoDNN time (all options)")
    ax.set_xlabel("training wall time (s)")
    ax.set_ylabel("test accuracy (%)")
    ax.legend()


def _plot_switching(ax, res):
    import itertools

    steps = range(1, len(res["steps"]) + 1)
    ax.plot(steps, list(itertools.accumulate(s["block_bytes"] for s in res["steps"])), marker="o", label="block switching")
    ax.plot(steps, list(itertools.accumulate(s["full_bytes"] for s in res["steps"])), marker="s", label="whole-model reload")
    for run in res.get("penalties", []):
        if run["penalty_points_per_mib"]:
            ax.plot(steps, list(itertools.accumulate(s["block_bytes"] for s in run["steps"])), marker=".",
                    label=f"block switching, switch-aware ({run['penalty_points_per_mib']:g} points/MiB)")
    ax.set_xlabel("budget change")
    ax.set_ylabel("cumulative bytes read")
    ax.legend()


def _plot_additivity(ax, res):
    measured = [p["measured"] for p in res["points"]]
    ax.scatter(measured, [p["raw"] for p in res["points"]], label="raw", marker="x")
    ax.scatter(measured, [p["calibrated"] for p in res["points"]], label="calibrated", marker="o")
    lo, hi = min(measured + [p["raw"] for p in res["points"]]), max(measured + [p["raw"] for p in res["points"]])
    ax.plot([lo, hi], [lo, hi], color="gray", ls="--", label="y = x")
    ax.set_xlabel("measured validation accuracy (%)")
    ax.set_ylabel("predicted (%)")
    ax.legend()


PLOTTERS = {"accuracy": _plot_accuracy, "latency": _plot_latency, "options": _plot_options,
            "switching": _plot_switching, "additivity": _plot_additivity}


# ----------------------------------------------------------------------------- verdicts and markdown


def _met(ok: bool, missed_by: str) -> str:
    return "met" if ok else f"missed by {missed_by}"


def verdicts(figures: dict[str, dict[str, Any]]) -> list[str]:
    """One line per (figure, model) against issue 7's targets, from the JSON alone."""
    lines = []
    for model, r in figures.get("accuracy", {}).items():
        u, sc = r["gaps"]["uniform"], r["gaps"].get("scratch")
        worst = f"{-u['min']:.2f} points at the worst budget"
        vs_scratch = f"legodnn - scratch max {sc['max']:+.2f} / mean {sc['mean']:+.2f}" if sc else "no scratch model fits"
        lines.append(f"accuracy, {model}: legodnn - uniform max {u['max']:+.2f} / mean {u['mean']:+.2f} points; "
                     f"legodnn >= uniform at every budget: {_met(u['min'] >= 0, worst)}; {vs_scratch}")
    for model, r in figures.get("latency", {}).items():
        lego = [x for x in r["rows"] if x["method"] == "legodnn"]
        if lego:
            over = [x for x in lego if x["latency_ms"] > x["budget_ms"]]
            worst = max(x["latency_ms"] / x["budget_ms"] for x in lego)
            line = (f"latency, {model}: LegoDNN picks over their budget when timed: {len(over)} of {len(lego)} "
                    f"(worst {100 * (worst - 1):+.1f}%)")
            if "first_pick_ms" in lego[0]:
                first = [x for x in lego if x["first_pick_ms"] > x["budget_ms"]]
                line += f"; before the measured re-solve {len(first)} of {len(lego)}"
            lines.append(line)
    for model, r in figures.get("options", {}).items():
        head = f"options, {model}: {r['num_options']:,} models in {r['lego_train_s']:.0f} s; uniform "
        if r["ratio"] is None:
            # never reached within a cap >= LegoDNN's time means uniform is slower: ratio < 1
            verdict = "met" if r["cap_s"] >= r["lego_train_s"] else "undecided (cap below LegoDNN's time)"
            lines.append(head + f"did not reach {r['lego_acc_at_50']:.2f}% within {r['cap_s']:.0f} s: "
                         f"time ratio target <= 1.0 {verdict}")
        else:
            over = f"{r['ratio'] - 1:.2f}"
            lines.append(head + f"reached {r['lego_acc_at_50']:.2f}% in {r['uniform_time_to_reach_s']:.0f} s; "
                         f"ratio {r['ratio']:.2f} (target <= 1.0): {_met(r['ratio'] <= 1.0, over)}")
    for model, r in figures.get("switching", {}).items():
        over = f"{100 * (r['bytes_ratio'] - 0.3):.1f} points"
        lines.append(f"switching, {model}: block switching reads {100 * r['bytes_ratio']:.1f}% of the bytes of "
                     f"whole-model reloads (target <= 30%): {_met(r['bytes_ratio'] <= 0.3, over)}; time "
                     f"{100 * (r['time_ratio'] or 0):.1f}%")
        for run in r.get("penalties", []):
            if run["penalty_points_per_mib"]:
                miss = f"{100 * (run['bytes_ratio'] - 0.3):.1f} points"
                lines.append(f"switching, {model}, switch-aware ({run['penalty_points_per_mib']:g} points/MiB): "
                             f"{100 * run['bytes_ratio']:.1f}% of the bytes, time {100 * (run['time_ratio'] or 0):.1f}%, "
                             f"predicted accuracy given up {run['mean_predicted_cost_points']:.2f} points per change "
                             f"on average: {_met(run['bytes_ratio'] <= 0.3, miss)}")
    for model, r in figures.get("additivity", {}).items():
        over = f"{r['mae_calibrated'] - 0.5:.2f} points"
        lines.append(f"additivity, {model}: MAE raw {r['mae_raw']:.2f} / calibrated {r['mae_calibrated']:.2f} points, "
                     f"max {r['max_raw']:.2f} / {r['max_calibrated']:.2f} (issue 11 target MAE <= 0.5): "
                     f"{_met(r['mae_calibrated'] <= 0.5, over)}")
    return lines


def _img(path: str, md: Path) -> str:
    return os.path.relpath(REPO / path if not Path(path).is_absolute() else path, md.parent)


def markdown(result: dict[str, Any], md: Path) -> str:
    out = ["# Evaluation against the baselines (issue 7)", "",
           "Generated by `bench/evaluate.py` from `docs/results/evaluation.json`; every figure names the command "
           "that produced it. Test accuracy is measured on the Fashion-MNIST test set; wall times are on the "
           "machine named per figure (see docs/BENCHMARKS.md on the shared host).", "",
           "## Verdicts", ""] + [f"- {v}" for v in verdicts(result["figures"])] + [""]
    for figure in FIGURES:
        for model, r in result["figures"].get(figure, {}).items():
            out += [f"## {figure}: {model}", "",
                    f"`{r['command']}` - {r['date']}, {r['wall_s']} s, {r['machine']}.", "",
                    f"![{figure} {model}]({_img(r['png'], md)})", ""]
            out += SECTIONS[figure](r) + [""]
    out += ["## Settings (latest run)", "", "```json", json.dumps(result["settings"], indent=2), "```", ""]
    return "\n".join(out)


def _md_accuracy(r):
    t = r["lego_time_s"]
    lines = [f"Teacher {r['teacher_test_acc']:.2f}%, {r['teacher_mflops']} MFLOPs. LegoDNN time {t['total']} s "
             f"(per-block {t['blockwise']}, joint {t['joint']}, profile+calibration {t['profile']}, re-rank "
             f"{t['rerank']}){' (descendants from cache: original times)' if r.get('lego_cached') else ''}; each "
             f"baseline model got {r['baseline_share_s']} s (prune + train){_reused_note(r)}."
             + (f" Joint stage floor: {r['joint_floor']:.0%} of the FLOPs." if r.get("joint_floor") else ""), "",
             "| budget | legodnn | (FLOPs) | predicted val | uniform | (FLOPs) | scratch | (FLOPs) |",
             "|---|---|---|---|---|---|---|---|"]
    for b in r["budgets"]:
        cell = {m: next((x for x in r["rows"] if x["method"] == m and x["budget"] == b), None)
                for m in ("legodnn", "uniform", "scratch")}
        lego = cell["legodnn"] or {}
        parts = [f"{b:.3f}", f"{lego.get('test_acc', '-')}", f"{lego.get('flops_frac', '-')}",
                 f"{lego.get('predicted_val_acc', '-')}"]
        for m in ("uniform", "scratch"):
            parts += [f"{cell[m]['test_acc']}", f"{cell[m]['flops_frac']}"] if cell[m] else ["-", "-"]
        lines.append("| " + " | ".join(parts) + " |")
    lines.append("")
    for other, g in r["gaps"].items():
        lines.append(f"Gap legodnn - {other}: max {g['max']:+.2f}, mean {g['mean']:+.2f}, min {g['min']:+.2f} points.")
    if r.get("scratch_skipped"):
        lines.append(f"Scratch left out at budgets {r['scratch_skipped']}: no width of the family fits them "
                     "(its channel counts have a floor).")
    return lines


def _reused_note(r) -> str:
    fair = r.get("lego_share_s")
    if fair is None or r["baseline_share_s"] <= fair:
        return ""
    return (f", more than LegoDNN's {fair} s per budget: cached baselines trained for another LegoDNN run "
            "are reused only when they had at least this run's share, which favours them")


def _md_latency(r):
    lines = [f"Teacher {r['teacher_test_acc']:.2f}% at {r['teacher_latency_ms']:.3f} ms. {r['note']}.", "",
             "| method | budget | predicted ms (raw sum) | measured ms | test acc |", "|---|---|---|---|---|"]
    for x in r["rows"]:
        budget = f"{x['budget_ms']:.3f} ms" if "budget_ms" in x else f"{x['budget']:.3f} FLOPs"
        predicted = f"{x['predicted_ms']} ({x.get('predicted_raw_ms', '-')})" if "predicted_ms" in x else "-"
        lines.append(f"| {x['method']} | {budget} | {predicted} | {x['latency_ms']:.3f} | {x['test_acc']:.2f} |")
    cal = r.get("latency_calibration")
    if cal:
        lines += ["", f"Composition latency correction ({cal['method']}, k = {cal['k']}): measured = "
                  f"{cal['scale']:.3f} x summed block medians + {cal['offset_ms']:.3f} ms; leave-one-out MAE "
                  f"{cal['loo_mae_calibrated_ms']:.3f} ms (raw sum {cal['loo_mae_raw_ms']:.3f} ms)."]
    lego = [x for x in r["rows"] if x["method"] == "legodnn"]
    if lego:
        over = [x for x in lego if x["latency_ms"] > x["budget_ms"]]
        worst = max(x["latency_ms"] / x["budget_ms"] for x in lego)
        lines.append(f"LegoDNN picks over their budget when measured: {len(over)} of {len(lego)} "
                     f"(worst {100 * (worst - 1):+.1f}%).")
    if lego and "first_pick_ms" in lego[0]:
        first = [x for x in lego if x["first_pick_ms"] > x["budget_ms"]]
        worst = max(x["first_pick_ms"] / x["budget_ms"] for x in lego)
        lines.append(f"Before the measured re-solve (`optimizer.solve_measured`): {len(first)} of {len(lego)} over "
                     f"(worst {100 * (worst - 1):+.1f}%); re-solved picks took "
                     f"{sum(x['guard_rounds'] for x in lego)} timed rounds in all. The measured ms column is a "
                     "fresh timing of the final pick.")
    spread = [max(x["latency_passes_ms"]) / min(x["latency_passes_ms"]) for x in r["rows"] if x.get("latency_passes_ms")]
    if spread:
        lines.append(f"Timing noise on this host: the slowest pass of a model took up to {max(spread):.2f}x its "
                     f"fastest (median {sorted(spread)[len(spread) // 2]:.2f}x).")
    return lines


def _md_options(r):
    reached = (f"{r['uniform_time_to_reach_s']:.1f} s" if r["uniform_time_to_reach_s"] is not None
               else f"not reached within {r['cap_s']:.0f} s")
    return ["| distinct models | blocks | LegoDNN time (all) | LegoDNN acc @ 50% | uniform @ 50%: time to reach | ratio |",
            "|---|---|---|---|---|---|",
            f"| {r['num_options']:,} | {r['blocks']} | {r['lego_train_s']:.1f} s | {r['lego_acc_at_50']:.2f} "
            f"({r['lego_flops_frac_at_50']:.3f} FLOPs) | {reached} | {r['ratio'] if r['ratio'] is not None else '-'} |",
            "", f"Uniform: ratio {r['uniform_ratio']} ({r['uniform_flops_frac']:.3f} FLOPs), SGD cosine schedule over "
            f"{r['horizon_epochs']} epochs (sized to the {r['cap_s']:.0f} s cap), test accuracy every "
            f"{r['eval_every_steps']} steps, evaluation time excluded from its clock; pruning time included."]


def _md_switching(r):
    lines = [f"{r['n_changes']} budget changes (uniformly random over the FLOPs range): {r['note']}. Per-step "
             "numbers are in the JSON.", "",
             "| re-solve | block switching: bytes | s | whole-model reload: bytes | s | bytes ratio | time ratio "
             "| predicted accuracy given up per change (points) |", "|---|---|---|---|---|---|---|---|"]
    for run in r.get("penalties", [r]):
        penalty = run.get("penalty_points_per_mib", 0.0)
        label = "each budget on its own" if not penalty else f"switch-aware, {penalty:g} points/MiB"
        lines.append(f"| {label} | {run['total_block_bytes']:,} | {run['total_block_s']:.3f} | {run['total_full_bytes']:,} "
                     f"| {run['total_full_s']:.3f} | {100 * run['bytes_ratio']:.1f}% | {100 * (run['time_ratio'] or 0):.1f}% "
                     f"| {run.get('mean_predicted_cost_points', 0.0):.2f} |")
    return lines


def _md_additivity(r):
    return ["| prediction | MAE (points) | max (points) |", "|---|---|---|",
            f"| raw (summed per-block drops) | {r['mae_raw']:.2f} | {r['max_raw']:.2f} |",
            f"| calibrated | {r['mae_calibrated']:.2f} | {r['max_calibrated']:.2f} |", "",
            f"{r['n']} compositions spread over the FLOPs range, measured on the {r['split']}."]


SECTIONS = {"accuracy": _md_accuracy, "latency": _md_latency, "options": _md_options,
            "switching": _md_switching, "additivity": _md_additivity}


def write_markdown(path: Path, result: dict[str, Any]) -> None:
    """The generated page, keeping hand-written notes after bench/accuracy.py's marker."""
    notes = ""
    if path.is_file() and acc.NOTES_MARKER in path.read_text():
        notes = path.read_text().split(acc.NOTES_MARKER, 1)[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown(result, path) + "\n" + acc.NOTES_MARKER + (notes or "\n\n## Notes\n\n"))


# ----------------------------------------------------------------------------- MLflow


def log_mlflow(uri: str, result: dict[str, Any], pngs: list[Path], json_path: Path, figures: list[str]) -> str:
    """One run in experiment "legodnn-evaluation": settings as params, headline numbers as
    metrics, every PNG and the results JSON as artifacts. Returns the run id."""
    from infra.tracking import Tracker, check_tracking, default_artifact_root, flatten, ui_command

    check_tracking(uri)
    local = uri.startswith("sqlite:///")
    artifact_root = default_artifact_root(Path(uri[len("sqlite:///"):]).parent) if local else None
    tracker = Tracker(uri, EXPERIMENT, artifact_root=artifact_root)
    run_id = tracker.start_run("evaluate-" + "+".join(figures), kind="evaluation")
    try:
        tracker.log_params(run_id, {**flatten(result["settings"]), "figures": ",".join(figures)})
        tracker.log_metrics(run_id, headline_metrics(result["figures"], figures))
        for png in pngs:
            tracker.log_artifact(run_id, png, "figures")
        tracker.log_artifact(run_id, json_path)
    except BaseException:
        tracker.finish(run_id, "FAILED")
        raise
    tracker.finish(run_id)
    print(f"MLflow run {run_id} in experiment {EXPERIMENT!r}; open the UI with:\n  {ui_command(uri, artifact_root)}")
    return run_id


def headline_metrics(figures: dict[str, dict[str, Any]], which: Sequence[str]) -> dict[str, float]:
    m: dict[str, float] = {}
    for model, r in figures.get("accuracy", {}).items() if "accuracy" in which else ():
        for other, g in r["gaps"].items():
            m.update({f"{model}.accuracy.gap_{other}_max": g["max"], f"{model}.accuracy.gap_{other}_mean": g["mean"]})
        m[f"{model}.accuracy.lego_time_s"] = r["lego_time_s"]["total"]
    for model, r in figures.get("options", {}).items() if "options" in which else ():
        m.update({f"{model}.options.num_options": r["num_options"], f"{model}.options.lego_train_s": r["lego_train_s"],
                  f"{model}.options.ratio": r["ratio"], f"{model}.options.uniform_time_to_reach_s": r["uniform_time_to_reach_s"]})
    for model, r in figures.get("switching", {}).items() if "switching" in which else ():
        m.update({f"{model}.switching.bytes_ratio": r["bytes_ratio"], f"{model}.switching.time_ratio": r["time_ratio"]})
        for run in r.get("penalties", []):
            if run["penalty_points_per_mib"]:
                m[f"{model}.switching.bytes_ratio.penalty_{run['penalty_points_per_mib']:g}"] = run["bytes_ratio"]
    for model, r in figures.get("additivity", {}).items() if "additivity" in which else ():
        m.update({f"{model}.additivity.mae_raw": r["mae_raw"], f"{model}.additivity.mae_calibrated": r["mae_calibrated"],
                  f"{model}.additivity.max_calibrated": r["max_calibrated"]})
    for model, r in figures.get("latency", {}).items() if "latency" in which else ():
        m[f"{model}.latency.teacher_ms"] = r["teacher_latency_ms"]
    return m


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    d = acc.Settings()
    p = argparse.ArgumentParser(
        prog="bench/evaluate.py",
        description="Issue 7's evaluation: LegoDNN vs uniform pruning vs scratch under FLOPs and latency "
        "budgets, options and training cost, switching cost, additivity. Results merge into --out.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="figures: " + ", ".join(FIGURES) + ", all. Example (the full run):\n"
        "  .venv/bin/python bench/evaluate.py all --threads 1",
    )
    p.add_argument("figure", choices=[*FIGURES, "all"], help="which figure to (re)compute")
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS,
                   help="zoo models (default: resnet20 mobilenetv2; mobilenetv2 defaults to width_mult 0.5 and "
                   "4 teacher epochs unless --model-kwargs / --model-teacher-epochs say otherwise)")
    acc.add_common_arguments(p, d)
    p.add_argument("--budgets-n", type=int, default=EvalSettings.n_budgets, help="budgets per accuracy/latency figure")
    p.add_argument("--switch-steps", type=int, default=EvalSettings.switch_steps, help="budget changes in switching")
    p.add_argument("--additivity-n", type=int, default=EvalSettings.additivity_n, help="compositions in additivity")
    p.add_argument("--options-cap-factor", type=float, default=EvalSettings.options_cap_factor,
                   help="uniform's time cap in the options figure, as a multiple of LegoDNN's time")
    p.add_argument("--options-eval-every", type=int, default=EvalSettings.options_eval_every,
                   help="fine-tune steps between test evaluations in the options figure")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "evaluation.json")
    p.add_argument("--md", type=Path, default=REPO / "docs" / "benchmarks" / "evaluation.md")
    p.add_argument("--figures-dir", type=Path, default=REPO / "docs" / "figures")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store (default: MLFLOW_TRACKING_URI, else sqlite:///<repo>/.legodnn/mlflow.db)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.add_argument("--quick", action="store_true", help="tiny smoke setting (seconds per model, meaningless numbers)")
    return p


def settings_from(args: argparse.Namespace):
    s = acc.common_settings(args, models=list(args.models))
    s.model_kwargs = {**{m: k for m, k in DEFAULT_MODEL_KWARGS.items() if m in s.models}, **s.model_kwargs}
    s.model_teacher_epochs = {**{m: k for m, k in DEFAULT_MODEL_TEACHER_EPOCHS.items() if m in s.models},
                              **s.model_teacher_epochs}
    if args.quick:
        return acc.quick_settings(s), quick_eval_settings()
    e = EvalSettings(n_budgets=args.budgets_n, switch_steps=args.switch_steps, additivity_n=args.additivity_n,
                     options_cap_factor=args.options_cap_factor, options_eval_every=args.options_eval_every)
    if e.n_budgets < 2 or e.switch_steps < 1 or e.additivity_n < 2 or e.options_eval_every < 1:
        raise SystemExit("bench/evaluate.py: need --budgets-n >= 2, --switch-steps >= 1, --additivity-n >= 2, "
                         "--options-eval-every >= 1")
    return s, e


def merge(path: Path, new: dict[str, Any]) -> dict[str, Any]:
    """The results file with this run's (figure, model) entries replaced, the rest kept."""
    old = json.loads(path.read_text()) if path.is_file() else {}
    figures = old.get("figures", {})
    for figure, per_model in new["figures"].items():
        figures.setdefault(figure, {}).update(per_model)
    return {**old, **{k: v for k, v in new.items() if k != "figures"}, "schema": SCHEMA, "figures": figures}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    s, e = settings_from(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    figures = list(FIGURES) if args.figure == "all" else [args.figure]
    uri = None
    if not args.no_mlflow:
        from infra.tracking import check_tracking, resolve_tracking_uri

        uri = resolve_tracking_uri(REPO / ".legodnn", args.tracking_uri)
        check_tracking(uri)  # fail before hours of work, not after
    import torch

    threads = torch.get_num_threads()
    if s.threads is not None:
        torch.set_num_threads(s.threads)
    command = "bench/evaluate.py " + shlex.join(argv)
    new: dict[str, Any] = {"figures": {}}
    pngs: list[Path] = []
    try:
        machine = acc._machine()
        args.workdir.mkdir(parents=True, exist_ok=True)
        data = acc.load_data(s)
        joints: dict[str, Any] = {}
        for name in s.models:
            ctx = ModelContext(name, s, e, data, args.workdir, progress=not args.no_progress)
            for figure in figures:
                with Timer() as t:
                    res = RUNNERS[figure](ctx)
                png = plot(figure, name, res, args.figures_dir)
                pngs.append(png)
                try:
                    shown = str(png.resolve().relative_to(REPO))
                except ValueError:
                    shown = str(png.resolve())
                res.update(command=command, wall_s=round(t.seconds, 1), machine=machine, png=shown,
                           date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), seed=s.seed)
                new["figures"].setdefault(figure, {})[name] = res
                log.info("%s %s: %.1f s", figure, name, t.seconds)
            joints[name] = asdict(acc.joint_config(ctx.s))  # ctx.s carries the model's derived floor
    finally:
        torch.set_num_threads(threads)
    new.update(machine=machine, command=command, seed=s.seed,
               settings={"bench": {**acc.settings_record(s), "joint_effective": joints}, "evaluation": asdict(e)})
    result = merge(args.out, new)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    write_markdown(args.md, result)
    for line in verdicts(new["figures"]):
        print(line)
    print(f"wrote {args.out}, {args.md} and {len(pngs)} PNGs in {args.figures_dir}")
    if uri is not None:
        log_mlflow(uri, result, pngs, args.out, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
