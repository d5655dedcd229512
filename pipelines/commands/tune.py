"""`legodnn tune`: Optuna search over the retraining hyperparameters (trials as Ray tasks)."""

from __future__ import annotations

import argparse
import sys

EPILOG = """\
Searches retrain.lr, retrain.epochs, retrain.batch_size and retrain.weight_decay. The
objective is the held-out feature MSE after retraining, summed over blocks (each block's
MSE divided by its teacher-output variance); a MedianPruner stops trials whose partial
sum after a block is worse than the median of earlier trials there. The stages up to
the teacher's block I/O are shared with `legodnn run` (same cache). The study lives in
sqlite:///<workdir>/optuna.db unless --storage is given; each trial is an MLflow run.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipelines.commands.run import add_arguments as add_run_arguments

    parser.add_argument("--trials", type=int, default=10, metavar="N", help="number of trials (default 10)")
    parser.add_argument("--study", metavar="NAME", help="study name (default retrain-<model ref>); an existing one is continued")
    parser.add_argument("--storage", metavar="URL", help="Optuna RDB storage (default sqlite:///<workdir>/optuna.db)")
    parser.add_argument("--parallel", type=int, metavar="N", help="trials in flight at once (default: cluster CPUs / ray.num_cpus)")
    parser.add_argument("--write-back", metavar="FILE", help="write the best retrain.* values into this YAML config file")
    add_run_arguments(parser)  # the same config flags as `legodnn run`
    parser.epilog = EPILOG


def run(args: argparse.Namespace) -> int:
    import json
    import logging

    from infra.tracking import TrackingError
    from legoblocks.modelref import ModelRefError
    from pipelines.commands.run import overrides_from_args
    from pipelines.config import ConfigError, load_config
    from pipelines.executors import RayUnreachableError
    from pipelines.preflight import PreflightError
    from pipelines.units import PipelineError
    from pipelines.tune import tune

    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("optuna").setLevel(logging.WARNING)
    try:
        cfg = load_config(args.config, overrides_from_args(args))
        result = tune(cfg, trials=args.trials, study_name=args.study, storage=args.storage,
                      parallel=args.parallel, write_back_to=args.write_back, live=args.live)
    except (ConfigError, PreflightError, RayUnreachableError, TrackingError, ModelRefError, ValueError) as exc:
        print(f"legodnn tune: error: {exc}", file=sys.stderr)
        return 2
    except PipelineError as exc:
        print(f"legodnn tune: failed: {exc}", file=sys.stderr)
        return 1
    states = {s: sum(t.state == s for t in result.trials) for s in ("COMPLETE", "PRUNED", "FAIL")}
    if args.json:
        print(json.dumps({
            "study": result.study_name, "storage": result.storage, "best_value": result.best_value,
            "best_params": result.best_params, "states": states, "written_to": result.written_to,
            "parent_run_id": result.parent_run_id,
            "trials": [t.__dict__ for t in result.trials],
        }, indent=1, default=str))
        return 0
    print(f"study {result.study_name} in {result.storage}: {len(result.trials)} trials this run "
          f"({states['COMPLETE']} complete, {states['PRUNED']} pruned, {states['FAIL']} failed)")
    print(f"best objective {result.best_value:.5f} with " +
          ", ".join(f"retrain.{k}={v}" for k, v in result.best_params.items()))
    if result.written_to:
        print(f"written back to {result.written_to}")
    print(f"MLflow: {result.tracking_uri} (tune run {result.parent_run_id})")
    return 0
