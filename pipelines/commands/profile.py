"""`legodnn profile`: profile a saved ScalableModel on the configured data and write its ProfileTable.

The validation images come from the data source of the config (`--config FILE`, `--set
data.KEY=VALUE`): Fashion-MNIST by default, an image folder or a factory as in `legodnn run`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from profiling.serving import HELD_OUT_FRACTION


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scalable", required=True, type=Path, metavar="DIR",
                        help="a ScalableModel directory (as written by ScalableModel.save)")
    parser.add_argument("--config", metavar="FILE", help="a pipeline config: its data and model sections say "
                        "where the images come from and how they are prepared")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set data.source=imagefolder --set data.dir=DIR")
    parser.add_argument("--data-dir", default=None, metavar="D", help="data.dir: the IDX folder, the image folder "
                        "or s3://bucket/prefix (default: the config's)")
    parser.add_argument("--val-size", type=_positive, default=1000, metavar="N",
                        help="data.val_size: validation images the accuracies are measured on (default 1000); "
                        "a seeded split of the training images (or of val/), disjoint from data.train_size")
    parser.add_argument("--held-out-fraction", type=_fraction, default=HELD_OUT_FRACTION, metavar="F",
                        help="of the validation images, the fraction that chooses nothing: drops and calibration "
                        f"use the rest, and a served composition's told accuracy is measured there (default "
                        f"{HELD_OUT_FRACTION}; 0: every image chooses and tells)")
    parser.add_argument("--out", required=True, type=Path, metavar="TABLE.json",
                        help="where to write the ProfileTable (atomically)")
    parser.add_argument("--envs", default="original,middle,largest",
                        help="comma-separated background environments: original, middle, largest")
    parser.add_argument("--additivity-n", type=_non_negative, default=20,
                        help="random compositions for the additivity check (default 20)")
    parser.add_argument("--calibration-k", type=_non_negative, default=16,
                        help="FLOPs-spread compositions to fit calibrated drops on; 0 = no calibration")
    parser.add_argument("--seed", type=int, default=0, help="seed for every random draw (default 0)")
    parser.add_argument("--bn-batches", type=_non_negative, default=0,
                        help="re-estimate BatchNorm of each composed model on this many training "
                        "batches before evaluating it (default 0: off)")
    parser.add_argument("--bn-batch-size", type=_positive, default=128,
                        help="images per BatchNorm re-estimation batch (default 128)")
    parser.add_argument("--batch-size", type=_positive, default=None,
                        help="evaluation batch size (default: legoblocks.train.EVAL_BATCH_SIZE, 64)")
    parser.add_argument("--latency-batch-size", type=_positive, default=1)
    parser.add_argument("--latency-warmup", type=_non_negative, default=5)
    parser.add_argument("--latency-repeats", type=_positive, default=30)
    parser.add_argument("--latency-threads", type=_positive, default=1)
    parser.add_argument("--model-name", default=None,
                        help="name of the model in the table and in optimizer problems "
                        "(default: from the model reference)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args: argparse.Namespace) -> int:
    from legoblocks.compose import ScalableModel
    from legoblocks.train import EVAL_BATCH_SIZE
    from pipelines.commands.run import overrides_from_args
    from pipelines.config import ConfigError, load_config
    from pipelines.data import DataError, data_ref, default_cache_dir, describe, load_splits
    from profiling.profile import LatencySettings, profile_model
    from profiling.table import save

    envs = [e.strip() for e in args.envs.split(",") if e.strip()]
    try:
        model = ScalableModel.load(args.scalable)
        overrides = overrides_from_args(args)
        overrides.setdefault("data", {}).update(val_size=args.val_size, seed=args.seed)
        overrides.setdefault("model", {}).update(in_channels=model.input_shape[0], input_size=model.input_shape[-1])
        cfg = load_config(args.config, overrides)
        cache = default_cache_dir() if cfg.data.cache_dir is None else Path(cfg.data.cache_dir)
        ref = data_ref(cfg, describe(cfg, cache), cache)
        splits = load_splits(ref)
        val_ds, bn_ds = splits.val, splits.train if args.bn_batches else None
        table = profile_model(
            model,
            val_ds,
            envs=envs,
            latency=LatencySettings(
                batch_size=args.latency_batch_size,
                warmup=args.latency_warmup,
                repeats=args.latency_repeats,
                threads=args.latency_threads,
            ),
            additivity_n=args.additivity_n,
            calibration_k=args.calibration_k,
            seed=args.seed,
            bn_recalibration_batches=args.bn_batches,
            bn_data=bn_ds,
            bn_batch_size=args.bn_batch_size,
            batch_size=args.batch_size or EVAL_BATCH_SIZE,
            model_name=args.model_name,
            held_out_fraction=args.held_out_fraction,
            progress=not args.no_progress,
        )
    except (ConfigError, DataError, FileNotFoundError, ValueError) as exc:
        print(f"legodnn profile: {exc}", file=sys.stderr)
        return 2
    table.settings["data"] = {"source": ref.source, "fingerprint": ref.fingerprint, "val_size": ref.val_size}
    save(table, args.out)
    print(f"wrote {args.out}: {len(table.blocks)} blocks, teacher accuracy "
          f"{100 * table.teacher_accuracy:.2f}%")
    if table.additivity:
        print(f"additivity over {table.additivity['n']} random compositions: MAE "
              f"{100 * table.additivity['mae']:.2f} points, max {100 * table.additivity['max_error']:.2f}")
    if table.calibration:
        c = table.calibration
        print(f"calibrated ({c['method']}): held-out MAE {100 * c['heldout_mae_raw']:.2f} -> "
              f"{100 * c['heldout_mae_calibrated']:.2f} points")
    return 0
