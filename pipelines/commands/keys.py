"""`legodnn keys init DIR`: make the Ed25519 key pair that signs bundles."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    init = sub.add_parser("init", help="create bundle-signing.key (private, mode 0600) and bundle-signing.pub in DIR")
    init.add_argument("dir", help="directory for the key pair (created if missing; existing keys are never overwritten)")


def run(args: argparse.Namespace) -> int:
    from infra.signing import generate_keypair

    try:
        kp = generate_keypair(args.dir)
    except FileExistsError as e:
        print(f"legodnn keys: {e}", file=sys.stderr)
        return 1
    print(f"private key: {kp.private_key}  (keep it on the publishing host only)")
    print(f"public key:  {kp.public_key}  (copy it to devices: legodnn-fetch --public-key)")
    print(f"key id:      {kp.key_id}")
    return 0
