"""`legodnn bundles list URI`: the complete (signed) bundle versions in a store."""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="list signed versions under a store root, a model URI or a version URI")
    ls.add_argument("uri", help="file:///DIR, a directory, or s3://BUCKET/PREFIX[/MODEL_ID[/vN]]")
    ls.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    from infra.bundle import list_bundles
    from infra.errors import BundleError

    try:
        refs = list_bundles(args.uri)
    except BundleError as e:
        print(f"legodnn bundles: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([r.__dict__ for r in refs], indent=1))
        return 0
    if not refs:
        print(f"no signed bundles under {args.uri}")
        return 0
    width = max(len(r.model_id) for r in refs)
    for r in refs:
        print(f"{r.model_id:<{width}}  v{r.version:<4} {'latest' if r.latest else '      '}  {r.uri}")
    return 0
