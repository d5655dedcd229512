"""Optuna search over the retraining hyperparameters; trials run as Ray tasks.

Objective: the held-out feature MSE after retraining, summed over blocks, each block's
MSE divided by the variance of the teacher's output of that block (mean over the
block's descendants). Why this and not composed accuracy:

* it is exactly what retraining minimizes, measured on pairs the descendants never
  trained on (`RetrainConfig.val_fraction`), so it rewards generalization, not memorizing;
* it needs no profiling: one trial costs one retraining pass, while composed accuracy
  would need every descendant composed and evaluated (the whole accuracy stage) per trial;
* it is monotone in what profiling later measures: a descendant that reproduces its
  block's output better loses less accuracy when swapped in;
* normalizing by the output variance makes blocks with large activations (late stages)
  count no more than early ones.

Each trial retrains the blocks one after another and reports the running sum after each
block, so the MedianPruner stops a trial as soon as its partial sum is worse than the
median of earlier trials at the same block (the pipeline's per-block retraining has no
per-epoch hook; blocks are the natural steps of this objective). Trials report to the
RDB storage (sqlite in the work directory by default) from inside their Ray task, so
pruning decisions see every finished trial of every process.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from legoblocks.files import write_atomic
from pipelines.config import PipelineConfig, dump_yaml, read_yaml, set_dotted

TUNED_KEYS = ("lr", "epochs", "batch_size", "weight_decay")
# Optuna does not store the pruner with the study: driver and trial tasks build the same one.
PRUNER = {"n_startup_trials": 2, "n_warmup_steps": 0}


def make_pruner(settings: Mapping[str, int] = PRUNER) -> Any:
    import optuna

    return optuna.pruners.MedianPruner(**settings)


@dataclass
class SearchSpace:
    """Ranges of the retraining hyperparameters a trial draws from."""

    lr: tuple[float, float] = (1e-4, 1e-2)
    epochs: tuple[int, int] = (1, 3)
    batch_sizes: tuple[int, ...] = (32, 64, 128)
    weight_decays: tuple[float, ...] = (0.0, 1e-5, 1e-4)

    def suggest(self, trial: Any) -> dict[str, Any]:
        return {
            "lr": trial.suggest_float("lr", *self.lr, log=True),
            "epochs": trial.suggest_int("epochs", *self.epochs),
            "batch_size": trial.suggest_categorical("batch_size", list(self.batch_sizes)),
            "weight_decay": trial.suggest_categorical("weight_decay", list(self.weight_decays)),
        }


@dataclass
class TrialResult:
    number: int
    params: dict[str, Any]
    state: str  # COMPLETE, PRUNED or FAIL
    value: float | None
    block_losses: dict[str, float] = field(default_factory=dict)
    node_id: str | None = None
    seconds: float = 0.0


@dataclass
class TuneResult:
    study_name: str
    storage: str
    best_value: float
    best_params: dict[str, Any]
    trials: list[TrialResult]
    parent_run_id: str
    tracking_uri: str
    written_to: str | None = None


def run_trial(
    *,
    storage: str,
    study_name: str,
    trial_id: int,
    params: dict[str, Any],
    retrain: Any,
    blocks: list[dict[str, str]],
    pruner: Mapping[str, int] = PRUNER,
) -> dict[str, Any]:
    """Body of one trial's Ray task: retrain every block with `params`, report per block."""
    import optuna
    import ray

    from legoblocks.choices import ORIGINAL
    from legoblocks.retrain import BlockData, retrain_descendants
    from legoblocks.serialize import load_module
    from pipelines.recipe.model import variant_files

    started = time.perf_counter()
    study = optuna.load_study(study_name=study_name, storage=storage, pruner=make_pruner(pruner))
    trial = optuna.trial.Trial(study, trial_id)
    cfg = dataclasses.replace(retrain, **params)
    losses: dict[str, float] = {}
    total = 0.0
    node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    for step, block in enumerate(blocks):
        folder = Path(block["descend_dir"])
        descendants = {c: load_module(p) for c, p in variant_files(folder).items()}
        data = BlockData.load(block["blockio_file"])
        variance = float(data.outputs.var()) or 1.0
        reports = retrain_descendants(descendants, data, cfg, progress=False)
        pruned = [r.loss_after for c, r in reports.items() if c != ORIGINAL]
        losses[block["name"]] = sum(pruned) / len(pruned) / variance
        total += losses[block["name"]]
        if not math.isfinite(total):
            return {"state": "FAIL", "value": None, "block_losses": losses, "node_id": node_id,
                    "seconds": time.perf_counter() - started}
        trial.report(total, step)
        if trial.should_prune():
            return {"state": "PRUNED", "value": total, "block_losses": losses, "node_id": node_id,
                    "seconds": time.perf_counter() - started}
        del descendants, data
    return {"state": "COMPLETE", "value": total, "block_losses": losses, "node_id": node_id,
            "seconds": time.perf_counter() - started}


def write_back(path: str | Path, params: Mapping[str, Any]) -> Path:
    """Set retrain.<param> in a YAML config (created if absent); other keys are kept.

    PyYAML does not keep comments: the rewritten file has the same keys and values.
    """
    path = Path(path)
    data = read_yaml(path) if path.exists() else {}
    for key in TUNED_KEYS:
        if key in params:
            set_dotted(data, f"retrain.{key}", params[key])
    return write_atomic(path, dump_yaml(data))


def tune(
    cfg: PipelineConfig,
    *,
    trials: int,
    study_name: str | None = None,
    storage: str | None = None,
    parallel: int | None = None,
    space: SearchSpace | None = None,
    write_back_to: str | Path | None = None,
    live: bool | None = None,
) -> TuneResult:
    """Run `trials` Optuna trials (as Ray tasks) and return the best retraining parameters."""
    import optuna
    import ray

    from infra.tracking import Tracker, default_artifact_root, is_local_store
    from pipelines.preflight import preflight
    from pipelines.progress import PipelineProgress
    from pipelines.recipe import STAGES
    from pipelines.run import make_executor, run_recipe
    from pipelines.units import PipelineError

    if trials < 1:
        raise ValueError(f"--trials must be >= 1, got {trials}")
    space = space or SearchSpace()
    checked = preflight(cfg)
    workdir = Path(cfg.workdir).resolve()
    storage = storage or f"sqlite:///{workdir / 'optuna.db'}"
    study_name = study_name or f"retrain-{cfg.model.ref}"
    tracking_uri = checked.tracking_uri
    artifact_root = default_artifact_root(workdir) if is_local_store(tracking_uri) else None
    workdir.mkdir(parents=True, exist_ok=True)
    executor = make_executor(cfg, "ray", checked.ray_address)
    tracker = Tracker(tracking_uri, cfg.mlflow.experiment, artifact_root=artifact_root)
    parent_id = tracker.start_run(f"tune-{study_name}", kind="tune")
    try:
        with PipelineProgress(live=live) as progress:
            # The recipe up to the teacher's block I/O: what retraining starts from (cached like a run).
            prefix = run_recipe(cfg, executor=executor, stages=STAGES[:4], observers=[progress], checked=checked)
            blockio_dir = prefix.dir("blockio")
            blocks = [
                {"name": r.unit, "descend_dir": str(prefix.dir("descend", r.unit)),
                 "blockio_file": str(blockio_dir / f"{r.unit}.safetensors")}
                for r in prefix.records["descend"] if len(r.meta["choices"]) > 1
            ]
            executor.ensure_ray()
            if parallel is None:
                parallel = max(1, int(ray.cluster_resources().get("CPU", 1) // cfg.ray.num_cpus))
            study = optuna.create_study(
                study_name=study_name, storage=storage, direction="minimize", load_if_exists=True,
                sampler=optuna.samplers.TPESampler(seed=cfg.retrain.seed),
                pruner=make_pruner(),
            )
            tracker.log_params(parent_id, {"study": study_name, "storage": storage, "trials": trials,
                                           "objective": "sum over blocks of held-out feature MSE / output variance"})
            remote = ray.remote(run_trial).options(num_cpus=cfg.ray.num_cpus, max_retries=cfg.ray.max_retries,
                                                   scheduling_strategy=cfg.ray.scheduling)
            results: list[TrialResult] = []
            pending: dict[Any, tuple[Any, dict[str, Any]]] = {}
            asked = 0
            progress.start_stage("tune", total=trials, cached=0)
            while asked < trials or pending:
                while asked < trials and len(pending) < parallel:
                    trial = study.ask()
                    params = space.suggest(trial)
                    ref = remote.remote(storage=storage, study_name=study_name, trial_id=trial._trial_id,
                                        params=params, retrain=cfg.retrain.trainer(), blocks=blocks)
                    pending[ref] = (trial, params)
                    asked += 1
                done, _ = ray.wait(list(pending), num_returns=1)
                trial, params = pending.pop(done[0])
                try:
                    out = ray.get(done[0])
                except Exception as exc:  # noqa: BLE001 - a failed trial is recorded, the study goes on
                    out = {"state": "FAIL", "value": None, "block_losses": {}, "error": str(exc)}
                state = getattr(optuna.trial.TrialState, out["state"])
                if state == optuna.trial.TrialState.COMPLETE:
                    study.tell(trial, out["value"])
                else:
                    study.tell(trial, state=state)
                result = TrialResult(trial.number, params, out["state"], out["value"], out["block_losses"],
                                     out.get("node_id"), out.get("seconds", 0.0))
                results.append(result)
                _log_trial(tracker, parent_id, study_name, result)
                progress.advance("tune")
            progress.end_stage("tune", executed=len(results), skipped=0)
        complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if not complete:
            raise PipelineError(f"no trial of study {study_name!r} completed; see the MLflow runs for errors")
        best = study.best_trial
        tracker.log_metrics(parent_id, {"best_value": best.value})
        tracker.log_params(parent_id, {f"best.{k}": v for k, v in best.params.items()})
        written = str(write_back(write_back_to, best.params)) if write_back_to else None
        tracker.finish(parent_id)
        return TuneResult(study_name, storage, float(best.value), dict(best.params), results,
                          parent_id, tracking_uri, written)
    except BaseException:
        tracker.finish(parent_id, status="FAILED")
        raise
    finally:
        executor.close()


def _log_trial(tracker: Any, parent_id: str, study_name: str, result: TrialResult) -> None:
    run_id = tracker.start_run(f"trial-{result.number}", kind="trial", parent_id=parent_id,
                               tags={"legodnn.study": study_name, "legodnn.trial_state": result.state})
    tracker.log_params(run_id, {**result.params, "trial": result.number})
    metrics = {"objective": result.value, "seconds": result.seconds}
    metrics.update({f"mse.{b}": v for b, v in result.block_losses.items()})
    tracker.log_metrics(run_id, metrics)
    tracker.finish(run_id, status="FINISHED" if result.state != "FAIL" else "FAILED")
