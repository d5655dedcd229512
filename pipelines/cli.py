"""The `legodnn` command line.

Each subcommand lives in its own module under `pipelines/commands/` and is imported only
when it runs, so a light command (`legodnn solve`) never pays for importing Ray or MLflow.
A command module defines `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

# name -> (module, one-line help). Order is the order `legodnn --help` lists them.
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("pipelines.commands.run", "run the offline pipeline (teacher -> blocks -> descendants -> retrain -> profile -> publish)"),
    "tune": ("pipelines.commands.tune", "search retraining hyperparameters with Optuna (trials as Ray tasks)"),
    "blocks": ("pipelines.commands.blocks", "detect and print the blocks of a model; --verify checks the chain and descendants"),
    "profile": ("pipelines.commands.profile", "profile a model's retrained descendants and write its ProfileTable"),
    "table": ("pipelines.commands.table", "inspect a ProfileTable (`legodnn table show FILE`)"),
    "solve": ("pipelines.commands.solve", "solve a scaling problem (JSON) exactly and print the selection"),
    "keys": ("pipelines.commands.keys", "manage bundle signing keys (`legodnn keys init DIR`)"),
    "publish": ("pipelines.commands.publish", "publish a signed block bundle to file:// or s3://"),
    "bundles": ("pipelines.commands.bundles", "list published bundles (`legodnn bundles list URI`)"),
}


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="legodnn",
        description="LegoDNN at scale: make a trained vision DNN scalable at block granularity "
        "and ship it to devices. Run `legodnn COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and the code version, and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def version_text() -> str:
    """`legodnn 0.1.0 (code <hash>)`: the package version and the code version that keys the
    cache and MLflow's `code_version` param."""
    from infra.device.cli import package_version
    from pipelines.cache import code_version

    return f"legodnn {package_version()} (code {code_version()[:16]})"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0 if argv else 2
    name = argv[0]
    if name in ("--version", "-V"):
        print(version_text())
        return 0
    if name not in COMMANDS:
        top.error(f"unknown command {name!r}; choose one of: {', '.join(COMMANDS)}")
    module_name, help_text = COMMANDS[name]
    try:
        if name != "solve":  # the exact solver runs on numpy alone
            import torch  # noqa: F401 - every other command needs the pipeline install
    except ImportError:
        print("legodnn: this install has only the device side (legodnn-fetch); install the pipeline with "
              "`pip install 'legodnn-at-scale[pipeline]' torch==2.13.0`", file=sys.stderr)
        return 2
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"legodnn {name}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
