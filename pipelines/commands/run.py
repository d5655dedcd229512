"""`legodnn run`: the offline pipeline, from a trained (or freshly trained) model to a bundle.

Runs on a local Ray by default and on a cluster under `ray job submit`; results are cached
in the work directory, so running it again does no work and resuming after a crash
recomputes nothing that finished.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

EPILOG = """\
Configuration: the embedded defaults (pipelines/defaults.yaml: ResNet-20 width 8 on a
Fashion-MNIST subset) <- --config FILE <- the flags above <- --set KEY=VALUE. Unknown keys
and wrong types are rejected with the key path.

Ray: with neither --ray-address nor RAY_ADDRESS a local Ray bound to 127.0.0.1 is started.
On a cluster: ray job submit --address http://HEAD:8265 -- legodnn run --config FILE
(see docs/CLUSTER.md).

MLflow: --mlflow-uri, else MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db; the
summary prints the command that opens the MLflow UI.

Exit status: 0 done, 1 a stage failed, 2 bad input or an unreachable service (checked
before any work, so nothing is written).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--config", metavar="FILE", help="YAML config file (overrides the embedded defaults)")
    parser.add_argument("--workdir", metavar="DIR", help="work directory: cache, MLflow store, bundles (workdir)")
    parser.add_argument("--data-dir", metavar="DIR", help="folder with the Fashion-MNIST IDX .gz files (data.dir)")
    parser.add_argument("--model", metavar="REF", help="zoo name, path/to/file.py:factory or package.module:factory (model.ref)")
    parser.add_argument("--checkpoint", metavar="FILE", help="teacher state dict; without one a teacher is trained (model.checkpoint)")
    parser.add_argument("--ray-address", metavar="ADDR", help="Ray cluster to join (ray.address; default RAY_ADDRESS or a local Ray)")
    parser.add_argument("--mlflow-uri", metavar="URI", help="MLflow tracking URI (mlflow.tracking_uri)")
    parser.add_argument("--experiment", metavar="NAME", help="MLflow experiment name (mlflow.experiment)")
    parser.add_argument("--store", metavar="URI", help="bundle store: file:///dir or s3://bucket/prefix (publish.store)")
    parser.add_argument("--key", metavar="FILE", help="Ed25519 private key that signs the bundle (publish.key)")
    parser.add_argument("--no-publish", action="store_true", help="skip the publish stage (publish.enabled=false)")
    parser.add_argument("--no-joint", action="store_true", help="skip the joint stage (joint.enabled=false)")
    parser.add_argument("--num-cpus", type=float, metavar="N", help="CPUs each Ray task declares (ray.num_cpus)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set retrain.lr=0.002 (VALUE is YAML); repeatable")
    live = parser.add_mutually_exclusive_group()
    live.add_argument("--progress", dest="live", action="store_const", const=True,
                      help="live progress bars even when stderr is not a terminal")
    live.add_argument("--quiet", dest="live", action="store_const", const=False,
                      help="no live bars: one line per finished stage, and a progress line (loss, ETA) at most every 30 s")
    parser.add_argument("--executor", choices=("ray", "local"), default="ray",
                        help="where units run: Ray tasks (default; a local Ray or the cluster) or this process "
                        "(no Ray: a laptop, a debugger); both write identical artifacts")
    parser.add_argument("--json", action="store_true", help="print the run summary as JSON instead of text")


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Flags -> a nested override mapping for `load_config` (flag names map to config keys)."""
    import yaml

    from pipelines.config import ConfigError, set_dotted

    data: dict[str, Any] = {}
    flags = {
        "workdir": "workdir", "data_dir": "data.dir", "model": "model.ref", "checkpoint": "model.checkpoint",
        "ray_address": "ray.address", "mlflow_uri": "mlflow.tracking_uri", "experiment": "mlflow.experiment",
        "store": "publish.store", "key": "publish.key", "num_cpus": "ray.num_cpus",
    }
    for attr, dotted in flags.items():
        value = getattr(args, attr, None)
        if value is not None:
            set_dotted(data, dotted, value)
    if getattr(args, "no_publish", False):
        set_dotted(data, "publish.enabled", False)
    if getattr(args, "no_joint", False):
        set_dotted(data, "joint.enabled", False)
    for item in getattr(args, "set", []) or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: write KEY=VALUE, e.g. --set retrain.lr=0.002")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: VALUE is not valid YAML ({exc})") from exc
        set_dotted(data, key.strip(), value)
    return data


def run(args: argparse.Namespace) -> int:
    import json
    import logging

    from infra.tracking import TrackingError
    from legoblocks.modelref import ModelRefError
    from pipelines.config import ConfigError, load_config
    from pipelines.executors import RayUnreachableError
    from pipelines.preflight import PreflightError
    from pipelines.run import run_pipeline
    from pipelines.units import PipelineError

    logging.getLogger("alembic").setLevel(logging.WARNING)  # MLflow's schema migrations are noise here
    try:
        cfg = load_config(args.config, overrides_from_args(args))
        result = run_pipeline(cfg, live=args.live, executor=args.executor)
    except (ConfigError, PreflightError, RayUnreachableError, TrackingError, ModelRefError) as exc:
        print(f"legodnn run: error: {exc}", file=sys.stderr)
        return 2
    except PipelineError as exc:
        print(f"legodnn run: failed: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.to_dict(), indent=1, default=str))
    else:
        print("\n".join(result.summary_lines()))
    return 0
