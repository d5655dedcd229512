"""The work of each pipeline stage, as plain functions a Ray task runs.

Every stage function has the form `fn(out: Path, **kwargs) -> meta`: it reads its inputs
from files (upstream unit directories, named in kwargs), writes its outputs under `out`
(a temporary directory the cache commits atomically), and returns a small JSON-able dict
of facts for the summary and MLflow. Nothing here knows about Ray, caching or MLflow, so
each stage can be run and tested in-process; `pipelines.dag` wires them into the DAG.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from profiling.rerank import DEFAULT_MARGIN_SE, pick_measured

log = logging.getLogger(__name__)

TEACHER_FILE = "teacher.safetensors"
BLOCKS_JSON = "blocks.json"
SCALABLE_DIR = "scalable"
TABLE_FILE = "profile.json"
POINTS_FILE = "points.json"
# Test hook: the first retrain task to see this marker path creates it and exits hard,
# like a worker killed mid-task; Ray's retry then has to produce identical outputs.
FAIL_ONCE_ENV = "LEGODNN_TEST_FAIL_ONCE"


# --------------------------------------------------------------------------- shared helpers


@dataclass
class Splits:
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset


def load_splits(data: dict[str, Any]) -> Splits:
    """Disjoint seeded train/val subsets of the training file and a test subset.

    Every task calls this with the same config section and gets the same samples, so no
    index list (or tensor) has to travel between tasks.
    """
    from legoblocks.data import load_fashion_mnist, split, subset

    full = load_fashion_mnist(data["dir"], train=True)
    train, val = split(full, [data["train_size"], data["val_size"]], seed=data["seed"])
    test = subset(load_fashion_mnist(data["dir"], train=False), data["test_size"], seed=data["seed"])
    return Splits(train, val, test)


def input_shape(model_cfg: dict[str, Any]) -> tuple[int, int, int]:
    return (int(model_cfg["in_channels"]), int(model_cfg["input_size"]), int(model_cfg["input_size"]))


def build_model(model_cfg: dict[str, Any], checkpoint: str | Path | None = None) -> nn.Module:
    """The model a config names; `options` (e.g. width) go to the zoo builder."""
    from legoblocks.modelref import ModelRefError, load_checkpoint, load_model

    common = {
        "in_channels": model_cfg["in_channels"],
        "num_classes": model_cfg["num_classes"],
        "input_size": model_cfg["input_size"],
    }
    options = model_cfg.get("options") or {}
    if not options:
        return load_model(model_cfg["ref"], checkpoint, **common)
    from legoblocks.zoo import ZOO, build_zoo_model

    if model_cfg["ref"] not in ZOO:
        raise ModelRefError(
            f"model.options {options} apply to zoo models only, but model.ref is {model_cfg['ref']!r}; "
            "give the options defaults in your factory instead"
        )
    model = build_zoo_model(model_cfg["ref"], **common, **options)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model


def load_teacher(model_cfg: dict[str, Any], teacher_dir: str | Path) -> nn.Module:
    from safetensors.torch import load_file

    model = build_model(model_cfg)
    model.load_state_dict(load_file(str(Path(teacher_dir) / TEACHER_FILE)), strict=True)
    return model.eval()


def read_blocks(detect_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(detect_dir) / BLOCKS_JSON).read_text(encoding="utf-8"))


def block_file(detect_dir: str | Path, name: str) -> Path:
    return Path(detect_dir) / "blocks" / f"{name}.safetensors"


def load_scalable(scalable_dir: str | Path):
    from legoblocks.compose import ScalableModel

    return ScalableModel.load(Path(scalable_dir))


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


# --------------------------------------------------------------------------- stages


def teacher_stage(out: Path, *, model: dict, data: dict, teacher: dict, checkpoint: str | None) -> dict:
    """Load the given checkpoint or train a teacher; record its validation/test accuracy."""
    from legoblocks.train import evaluate, save_state_dict, train_teacher

    splits = load_splits(data)
    torch.manual_seed(teacher["seed"])  # the model's initial weights
    net = build_model(model, checkpoint)
    meta: dict[str, Any] = {"trained": checkpoint is None}
    if checkpoint is None:
        report = train_teacher(
            net, splits.train, epochs=teacher["epochs"], lr=teacher["lr"],
            batch_size=teacher["batch_size"], weight_decay=teacher["weight_decay"],
            seed=teacher["seed"], progress=False,
        )
        meta.update(train_seconds=report.seconds, train_loss=report.final_loss)
    net.eval()
    meta["val_accuracy"] = evaluate(net, splits.val)
    meta["test_accuracy"] = evaluate(net, splits.test)
    save_state_dict(net, out / TEACHER_FILE)
    return meta


def detect_stage(out: Path, *, model: dict, teacher_dir: str, target_blocks: int | None) -> dict:
    """Cut the teacher into blocks; each block becomes one safe file."""
    from legoblocks.detect import detect_blocks, verify_chain
    from legoblocks.serialize import save_module

    net = load_teacher(model, teacher_dir)
    blocked = detect_blocks(net, input_shape(model), target_blocks=target_blocks)
    verify_chain(net, blocked)
    (out / "blocks").mkdir()
    for spec, block in zip(blocked.specs, blocked.blocks):
        save_module(block, block_file(out, spec.name))
    info = {
        "input_shape": list(blocked.input_shape),
        "specs": [spec.to_dict() for spec in blocked.specs],
    }
    (out / BLOCKS_JSON).write_text(json.dumps(info, indent=1), encoding="utf-8")
    return {"blocks": [s.name for s in blocked.specs], "scalable": [s.name for s in blocked.specs if s.scalable]}


def descend_stage(out: Path, *, detect_dir: str, block: str, ladder: list[float], importance: str) -> dict:
    """Prune one block at every sparsity of the ladder (I/O shapes unchanged)."""
    from legoblocks.descend import make_descendants
    from legoblocks.serialize import load_module, save_module

    spec = next(s for s in read_blocks(detect_dir)["specs"] if s["name"] == block)
    module = load_module(block_file(detect_dir, block))
    if spec["scalable"]:
        descendants = make_descendants(module, tuple(spec["in_shape"]), ladder, importance=importance)
    else:
        descendants = {"0.0": module}
    params = {}
    for choice, desc in descendants.items():
        save_module(desc, out / f"{choice}.safetensors")
        params[choice] = sum(p.numel() for p in desc.parameters())
    return {"block": block, "choices": sorted(descendants, key=float), "params": params}


def blockio_stage(out: Path, *, model: dict, detect_dir: str, data: dict, limit: int | None,
                  batch_size: int, seed: int) -> dict:
    """One frozen-teacher pass: every block's (input, output) pairs, one file per block."""
    from legoblocks.retrain import collect_block_io
    from legoblocks.serialize import load_module

    names = [s["name"] for s in read_blocks(detect_dir)["specs"]]
    blocks = [load_module(block_file(detect_dir, n)) for n in names]
    datas = collect_block_io(blocks, load_splits(data).train, limit=limit, batch_size=batch_size, seed=seed)
    variance = {}
    for name, block_data in zip(names, datas):
        block_data.save(out / f"{name}.safetensors")
        variance[name] = float(block_data.outputs.var())
    return {"samples": len(datas[0]), "output_variance": variance}


def retrain_stage(out: Path, *, descend_dir: str, blockio_file: str, block: str, retrain: dict) -> dict:
    """Distill all descendants of one block together on the teacher's block I/O."""
    from legoblocks.retrain import BlockData, RetrainConfig, retrain_descendants
    from legoblocks.serialize import load_module, save_module

    _fail_once_hook()
    # Every library field the stage's config carries (the pipeline's extra ones stay out).
    cfg = RetrainConfig(**{f.name: retrain[f.name] for f in dataclasses.fields(RetrainConfig) if f.name in retrain})
    choices = sorted((p.stem for p in Path(descend_dir).glob("*.safetensors")), key=float)
    descendants = {c: load_module(Path(descend_dir) / f"{c}.safetensors") for c in choices}
    data = BlockData.load(blockio_file)
    reports = retrain_descendants(descendants, data, cfg, progress=False)
    for choice, module in descendants.items():
        save_module(module, out / f"{choice}.safetensors")
    return {
        "block": block,
        "reports": {c: {"loss_before": r.loss_before, "loss_after": r.loss_after, "seconds": r.seconds}
                    for c, r in reports.items()},
        "output_variance": float(data.outputs.var()),
    }


def assemble_stage(out: Path, *, model: dict, detect_dir: str, variant_dirs: dict[str, str]) -> dict:
    """Gather every block's variants into one ScalableModel directory."""
    from legoblocks.compose import ScalableModel
    from legoblocks.detect import BlockSpec
    from legoblocks.serialize import load_module

    info = read_blocks(detect_dir)
    specs = [BlockSpec.from_dict(s) for s in info["specs"]]
    variants = {}
    for spec in specs:
        folder = Path(variant_dirs[spec.name])
        choices = sorted((p.stem for p in folder.glob("*.safetensors")), key=float)
        variants[spec.name] = {c: load_module(folder / f"{c}.safetensors") for c in choices}
    scalable = ScalableModel(specs, variants, tuple(info["input_shape"]), model_ref=model["ref"])
    scalable.save(out / SCALABLE_DIR)
    return {"num_options": scalable.num_options(), "choices": {b: scalable.choices(b) for b in scalable.block_names}}


def apply_joint_state(scalable_dir: str | Path, state_path: str | Path, out: Path) -> None:
    """Load the ScalableModel, put the joint stage's trained weights in, save it under out."""
    from legoblocks.joint import load_state_file

    scalable = load_scalable(scalable_dir)
    state = load_state_file(state_path)
    for key, weights in state["variants"].items():
        block, choice = key.rsplit("/", 1)
        scalable.variant(block, choice).load_state_dict(weights)
    scalable.save(out / SCALABLE_DIR)


def cost_stage(out: Path, *, scalable_dir: str, block: str, profile: dict) -> dict:
    """Params, bytes, FLOPs and latency of every variant of one block."""
    from profiling.cost import measure_cost
    from profiling.latency import fingerprint, measure_latency

    scalable = load_scalable(scalable_dir)
    spec = next(s for s in scalable.specs if s.name == block)
    rows = {}
    for choice in scalable.choices(block):
        module = scalable.variant(block, choice)
        cost = measure_cost(module, spec.in_shape)
        latency = measure_latency(
            module, spec.in_shape, batch_size=profile["latency_batch_size"],
            warmup=profile["latency_warmup"], repeats=profile["latency_repeats"],
            threads=profile["latency_threads"],
        )
        rows[choice] = {"cost": cost.to_dict(), "latency": latency.to_dict()}
    result = {"block": block, "choices": rows, "fingerprint": fingerprint(profile["latency_threads"])}
    (out / "cost.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    return {"block": block, "node": result["fingerprint"].get("hostname", "")}


def accuracy_stage(out: Path, *, scalable_dir: str, data: dict, selections: list[list[str]],
                   bn_recalibration_batches: int, seed: int) -> dict:
    """Validation accuracy of a chunk of composed selections."""
    from profiling.accuracy import SelectionEvaluator

    scalable = load_scalable(scalable_dir)
    splits = load_splits(data)
    evaluator = SelectionEvaluator(
        scalable, splits.val, bn_data=splits.train if bn_recalibration_batches else None,
        bn_recalibration_batches=bn_recalibration_batches, seed=seed,
    )
    # One batched call shares the forward pass of common block prefixes across selections.
    accuracies = evaluator.accuracy_many(selections)
    measured = [{"selection": sel, "accuracy": acc} for sel, acc in zip(selections, accuracies)]
    (out / "accuracy.json").write_text(json.dumps(measured, indent=1), encoding="utf-8")
    return {"evaluated": len(measured)}


# --------------------------------------------------------------------------- profile table


def _selection_key(selection: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    return tuple(str(c) for c in selection)


def read_accuracies(accuracy_dirs: list[str]) -> dict[tuple[str, ...], float]:
    measured: dict[tuple[str, ...], float] = {}
    for folder in accuracy_dirs:
        for row in json.loads((Path(folder) / "accuracy.json").read_text(encoding="utf-8")):
            measured[_selection_key(row["selection"])] = float(row["accuracy"])
    return measured


def read_costs(cost_dirs: list[str]) -> dict[str, dict[str, Any]]:
    """block -> cost.json content (choices with cost and latency, and the host fingerprint)."""
    rows = {}
    for folder in cost_dirs:
        data = json.loads((Path(folder) / "cost.json").read_text(encoding="utf-8"))
        rows[data["block"]] = data
    return rows


def table_stage(out: Path, *, scalable_dir: str, cost_dirs: list[str], accuracy_dirs: list[str],
                plan: dict, profile: dict, model_name: str, data: dict,
                anchor_budgets: list[float] | None = None) -> dict:
    """Assemble the ProfileTable: drops over environments, additivity, calibration, costs,
    and the measured top-k winners of a budget grid (the joint stage's anchor compositions
    for `anchor_budgets` compete there too)."""
    import dataclasses

    from profiling.accuracy import (
        AdditivityPoint, AdditivityReport, SelectionEvaluator, accuracy_drops, plan_units,
        results_from_accuracies, summed_drop,
    )
    from profiling.calibrate import fit_calibration
    from profiling.cost import Cost
    from profiling.latency import LatencyStats
    from profiling.profile import assemble_table
    from profiling.table import even_selections
    from profiling.table import save as save_table

    scalable = load_scalable(scalable_dir)
    names = scalable.block_names
    measured = read_accuracies(accuracy_dirs)
    teacher = measured[_selection_key(["0.0"] * len(names))]
    units = plan_units(scalable, plan["envs"])
    drops = accuracy_drops(scalable, results_from_accuracies(units, measured))

    def points(selections: list[list[str]]) -> list[AdditivityPoint]:
        return [
            AdditivityPoint(_selection_key(s), teacher - summed_drop(names, drops, s), measured[_selection_key(s)])
            for s in selections
        ]

    additivity = AdditivityReport.from_points(points(plan["additivity"])) if plan["additivity"] else None
    costs_raw = read_costs(cost_dirs)
    costs = {b: {c: Cost(**row["cost"]) for c, row in costs_raw[b]["choices"].items()} for b in names}
    calibration = None
    if plan["calibration"] and additivity is not None:
        flops = {b: {c: cost.flops for c, cost in per.items()} for b, per in costs.items()}
        calibration = fit_calibration(names, drops, teacher, points(plan["calibration"]), additivity.points,
                                      flops=flops)
    latencies = {b: {c: LatencyStats(**row["latency"]) for c, row in costs_raw[b]["choices"].items()} for b in names}
    hosts = {b: costs_raw[b]["fingerprint"] for b in names}
    first_host = hosts[names[0]]
    settings = {
        "seed": profile["seed"], "val_size": data["val_size"], "envs": plan["env_names"],
        "additivity_n": len(plan["additivity"]), "calibration_k": len(plan["calibration"]),
        "latency": {"batch_size": profile["latency_batch_size"], "warmup": profile["latency_warmup"],
                    "repeats": profile["latency_repeats"], "threads": profile["latency_threads"]},
        "evaluations": len(measured),
    }
    table = assemble_table(
        scalable, teacher_accuracy=teacher, costs=costs, latencies=latencies, host=first_host,
        drops_raw=drops, additivity=additivity, calibration=calibration,
        environments=plan["environments"], bn_recalibration_batches=profile["bn_recalibration_batches"],
        model_name=model_name, settings=settings,
    )
    # Latency units may have run on different nodes: each choice keeps its own host's id.
    blocks = []
    for block in table.blocks:
        host = hosts[block.name]
        choices = {
            cid: dataclasses.replace(c, latency=dataclasses.replace(c.latency, fingerprint=host["id"]))
            for cid, c in block.choices.items()
        }
        blocks.append(dataclasses.replace(block, choices=choices))
    table.blocks = blocks
    table.fingerprints = {h["id"]: dict(h) for h in hosts.values()}
    latency_fit = _latency_calibration(table, scalable, profile)
    if profile["verify_top_k"] and profile["verify_budgets"]:
        splits = load_splits(data)
        bn = profile["bn_recalibration_batches"]
        evaluator = SelectionEvaluator(scalable, splits.val, bn_data=splits.train if bn else None,
                                       bn_recalibration_batches=bn, seed=profile["seed"])
        evaluator.update(measured)
        table.verified = verify_top_k(table, evaluator, profile["verify_budgets"], profile["verify_top_k"],
                                      extra=even_selections(table, anchor_budgets or []))
    save_table(table, out / TABLE_FILE)
    return {
        "teacher_val_accuracy": teacher,
        "additivity_mae": additivity.mae if additivity else None,
        "calibrated_mae": calibration.heldout_calibrated.mae if calibration else None,
        "calibration_method": calibration.method if calibration else None,
        "latency_calibration": {k: v for k, v in latency_fit.to_dict().items() if k != "points"} if latency_fit else None,
        "drops": {b: dict(d) for b, d in drops.items()},
        "hosts": sorted(table.fingerprints),
        "verified": [{"fraction": v["fraction"], "optimizer_rank": v["optimizer_rank"],
                      "measured_accuracy": v["measured_accuracy"]} for v in table.verified],
    }


def _latency_calibration(table, scalable, profile: dict):
    """Time a few compositions end to end here and store the fit in the table, when every
    block was timed on this same host (a fit mixes block and chain timings of one host)."""
    from profiling.latency import fingerprint
    from profiling.latency_fit import measure_latency_calibration

    k = int(profile.get("latency_calibration_k") or 0)
    if k == 0:
        return None
    here = fingerprint(threads=profile["latency_threads"])
    if set(table.fingerprints) != {here["id"]}:
        log.warning("latency calibration skipped: blocks were timed on %s, this host is %s",
                    sorted(table.fingerprints), here["id"])
        return None
    medians = {b.name: {c: ch.latency.median_ms for c, ch in b.choices.items()} for b in table.blocks}
    fit = measure_latency_calibration(
        scalable, medians, fingerprint=here["id"], k=k, seed=profile["seed"],
        batch_size=profile["latency_batch_size"], warmup=profile["latency_warmup"],
        repeats=profile["latency_repeats"], threads=profile["latency_threads"],
    )
    table.latency_calibration = fit.to_dict()
    return fit


# --------------------------------------------------------------------------- optimizer points


def _solve(table, budgets: dict[str, float | None], top_k: int = 1) -> dict[str, Any]:
    """The optimizer's choice for one table under `budgets`, plus up to top_k-1 runners-up."""
    from optimizer import parse_problem, solve
    from profiling.table import to_problem

    solution = solve(parse_problem(to_problem(table, budgets)), top_k=top_k)
    candidates = [list(s.selection[table.model_name]) for s in [solution, *solution.alternatives]
                  if s.feasible and s.selection]
    return {"feasible": bool(solution.feasible), "selection": candidates[0] if candidates else None,
            "candidates": candidates, "solution": solution.as_dict()}


def verify_top_k(table, evaluator, fractions: list[float], k: int,
                 extra: list[list[str]] | None = None, margin_se: float = DEFAULT_MARGIN_SE) -> list[dict[str, Any]]:
    """Measured re-ranking: at each latency budget of the grid, measure the optimizer's top k
    on validation data and record the measured winner (ProfileTable.verified).

    The additive prediction ranks near-ties by noise; measuring a handful of them picks the
    composition that is actually best, and a device whose budget matches a grid point uses it.
    `extra` selections (the joint stage's anchors) join the candidates of every budget whose
    predicted latency they fit. At the smallest grid budget an anchor fits, it was trained
    for about that budget: there it is kept unless a candidate measures better by more than
    `margin_se` standard errors of the validation accuracy (`profiling.rerank`). The original
    model counts as an anchor (at a fraction of 1.0): single-swap drops measured within noise
    of zero, some negative, would otherwise let a pruned composition "beat" it there.
    """
    names = table.block_names
    original = ["0.0"] * len(names)
    smallest = [max(table.block(b).choices, key=float) for b in names]
    lo, hi = table.predicted_latency(smallest), table.predicted_latency(original)
    n = len(evaluator.val_ds)
    anchors = [list(sel) for sel in extra or []]
    if original not in anchors:  # the whole model needs no training to be right: where it fits, it is preferred
        anchors.append(original)
    # The smallest grid budget each anchor fits: where it is preferred.
    home: dict[int, float] = {}
    for i, sel in enumerate(anchors):
        fits = [f for f in sorted(fractions) if table.predicted_latency(sel) <= lo + f * (hi - lo) * (1 + 1e-12)]
        if fits:
            home[i] = fits[0]
    verified = []
    for fraction in fractions:
        budget = lo + fraction * (hi - lo)
        solved = _solve(table, {"latency_ms": budget}, top_k=k)
        for sel in anchors:
            if sel not in solved["candidates"] and table.predicted_latency(sel) <= budget * (1 + 1e-12):
                solved["candidates"].append(list(sel))
        if not solved["candidates"]:
            continue
        candidates = solved["candidates"]
        accuracies = evaluator.accuracy_many(candidates)
        measured = [
            {"selection": sel, "predicted_accuracy": table.predicted_accuracy(sel), "measured_accuracy": acc}
            for sel, acc in zip(candidates, accuracies)
        ]
        preferred = [candidates.index(anchors[i]) for i, f in home.items() if f == fraction]
        best = measured[pick_measured(accuracies, preferred, n=n, margin_se=margin_se)]
        verified.append({
            "budget": {"latency_ms": budget}, "fraction": fraction, "selection": best["selection"],
            "measured_accuracy": best["measured_accuracy"], "optimizer_rank": measured.index(best) + 1,
            "anchor": measured.index(best) in preferred, "candidates": measured,
        })
    return verified


def points_stage(out: Path, *, scalable_dir: str, table_dir: str, data: dict, grid: int,
                 measure_fractions: list[float]) -> dict:
    """Optimizer-chosen compositions across latency and memory budgets (the Pareto points),
    with test accuracy measured for the compositions at `measure_fractions` of the range."""
    from legoblocks.train import evaluate
    from profiling.table import load as load_table

    table = load_table(Path(table_dir) / TABLE_FILE)
    names = table.block_names
    original = ["0.0"] * len(names)
    smallest = [max(table.block(b).choices, key=float) for b in names]
    scalable = None
    test = None
    result: dict[str, Any] = {"latency": [], "memory": [], "measured": []}

    def row(budget_key: str, budget: float, fraction: float) -> dict[str, Any]:
        solved = _solve(table, {budget_key: budget})
        entry: dict[str, Any] = {"budget_key": budget_key, "budget": budget, "fraction": fraction,
                                 "feasible": solved["feasible"], "selection": solved["selection"]}
        if solved["feasible"] and solved["selection"] is not None:
            sel = solved["selection"]
            entry.update(
                predicted_accuracy=table.predicted_accuracy(sel),
                latency_ms=table.predicted_latency(sel),
                memory_bytes=table.total(sel, "peak_bytes"),
                flops=table.total(sel, "flops"),
            )
        return entry

    def total(sel: list[str], metric: str) -> float:
        return table.predicted_latency(sel) if metric == "latency" else table.total(sel, metric)

    for key, metric in (("latency_ms", "latency"), ("memory_bytes", "peak_bytes")):
        lo, hi = total(smallest, metric), total(original, metric)
        for i in range(grid):
            fraction = i / max(1, grid - 1)
            result["latency" if key == "latency_ms" else "memory"].append(row(key, lo + fraction * (hi - lo), fraction))
    lo, hi = table.predicted_latency(smallest), table.predicted_latency(original)
    for fraction in measure_fractions:
        entry = row("latency_ms", lo + fraction * (hi - lo), fraction)
        if entry["feasible"]:
            if scalable is None:
                scalable = load_scalable(scalable_dir)
                test = load_splits(data).test
            entry["measured_test_accuracy"] = evaluate(scalable.compose(entry["selection"]), test)
        result["measured"].append(entry)
    result["original"] = {"latency_ms": hi, "memory_bytes": table.total(original, "peak_bytes"),
                          "flops": table.total(original, "flops"), "predicted_accuracy": table.teacher_accuracy}
    (out / POINTS_FILE).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return {"points": len(result["latency"]) + len(result["memory"]), "measured": len(result["measured"])}


# --------------------------------------------------------------------------- publish


def publish_stage(out: Path, *, scalable_dir: str, table_dir: str, store: str, key: str, model_id: str) -> dict:
    """Sign and publish the bundle (infra.bundle); record where it went."""
    from infra.bundle import publish_bundle
    from infra.manifest import FASHION_MNIST_CLASSES, FASHION_MNIST_PREPROCESSING

    # The embedded Fashion-MNIST source; the lead fills these from the data source config.
    published = publish_bundle(Path(scalable_dir), Path(table_dir) / TABLE_FILE, store, key, model_id,
                               preprocessing=FASHION_MNIST_PREPROCESSING, classes=FASHION_MNIST_CLASSES)
    info = {"uri": published.uri, "version": published.version, "manifest": published.manifest}
    (out / "publish.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
    return {"uri": published.uri, "version": published.version}
