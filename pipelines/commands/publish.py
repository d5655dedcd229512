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
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON")


def run(args: argparse.Namespace) -> int:
    from infra.bundle import publish_bundle
    from infra.errors import BundleError

    try:
        published = publish_bundle(args.scalable, args.table, args.store, args.key, args.model_id,
                                   progress=sys.stderr.isatty())
    except (BundleError, FileNotFoundError, ValueError) as e:
        print(f"legodnn publish: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"uri": published.uri, "version": published.version, "manifest": published.manifest}, indent=1))
    else:
        n = sum(len(b["descendants"]) for b in published.manifest["blocks"])
        print(f"published {args.model_id} v{published.version}: {published.uri} ({n} descendants, signed by key "
              f"{published.manifest['signer_key_id']})")
    return 0
