"""`legodnn publish`: sign a ScalableModel + ProfileTable and publish it as the next bundle version."""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scalable", required=True, help="ScalableModel directory (scalable.json + block files)")
    parser.add_argument("--table", required=True, help="its ProfileTable JSON")
    parser.add_argument("--to", required=True, dest="store", metavar="URI",
                        help="store root: file:///DIR, a directory, or s3://BUCKET/PREFIX (honours AWS_ENDPOINT_URL)")
    parser.add_argument("--key", required=True, help="private key from `legodnn keys init`")
    parser.add_argument("--model-id", required=True, help="name devices fetch it by (<store>/<model-id>)")
    parser.add_argument("--config", metavar="FILE", help="a pipeline config whose data section says how images are "
                        "prepared and what the classes are (default: the embedded Fashion-MNIST source)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set data.source=imagefolder --set data.dir=DIR")
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON")


def data_description(table_path: str, config: str | None, sets: list[str]):
    """The bundle's preprocessing and class names, from the configured data source at the
    table's input shape (the same description the pipeline's publish stage records)."""
    from pathlib import Path

    from pipelines.commands.run import overrides_from_args
    from pipelines.config import load_config
    from pipelines.data import default_cache_dir, describe
    from pipelines.recipe.serve import manifest_preprocessing
    from profiling.table import load

    shape = load(table_path).input_shape
    overrides = overrides_from_args(argparse.Namespace(set=sets))
    overrides.setdefault("model", {}).update(in_channels=shape[0], input_size=shape[-1])
    cfg = load_config(config, overrides)
    info = describe(cfg, Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir())
    return manifest_preprocessing(info.preprocess), info.classes


def run(args: argparse.Namespace) -> int:
    from infra.bundle import publish_bundle
    from infra.errors import BundleError
    from pipelines.config import ConfigError
    from pipelines.data import DataError

    try:
        preprocessing, classes = data_description(args.table, args.config, args.set)
        published = publish_bundle(args.scalable, args.table, args.store, args.key, args.model_id,
                                   preprocessing=preprocessing, classes=classes, progress=sys.stderr.isatty())
    except (BundleError, ConfigError, DataError, FileNotFoundError, ValueError) as e:
        print(f"legodnn publish: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"uri": published.uri, "version": published.version, "manifest": published.manifest}, indent=1))
    else:
        n = sum(len(b["descendants"]) for b in published.manifest["blocks"])
        print(f"published {args.model_id} v{published.version}: {published.uri} ({n} descendants, signed by key "
              f"{published.manifest['signer_key_id']})")
    return 0
