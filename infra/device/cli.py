"""`legodnn-fetch`: the device command line.

    legodnn-fetch URI [URI ...] --public-key KEY --cache DIR [--latency-ms X] [--memory-mb Y]
                  [--runtime torch|onnxruntime] [--json] [--watch FILE] [--offline]
                  [--verify-latency ROUNDS] [--export DIR] [--allow-downgrade]
    legodnn-fetch predict IMAGE [IMAGE ...] --bundle URI [--bundle URI ...] (same options) [--top K]

Exit codes: 0 success; 1 store, cache, runtime or budget problem (including a pick that
`--verify-latency` timed over the budget); 2 bad command line; 3 refused: something did not
verify, or a rollback. Every error is one message on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from infra.device.report import measured_line, print_result
from infra.device.runtime import RUNTIMES, DeviceLatencySettings, default_runtime
from infra.device.session import MIB, DeviceBudgets, FetchResult, fetch, ms
from infra.errors import BundleError, BundleVerificationError

PROG = "legodnn-fetch"
DISTRIBUTION = "legodnn-at-scale"


def package_version() -> str:
    """The installed legodnn distribution's version: what both CLIs' `--version` print."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _count(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {minimum}, got {text}")
        return value

    return parse


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--public-key", required=True, type=Path, help="the publisher's public key (PEM)")
    p.add_argument("--cache", required=True, type=Path, help="cache directory on this device (made if missing)")
    p.add_argument("--latency-ms", type=_positive, default=None, help="latency budget, all models together (ms)")
    p.add_argument("--memory-mb", type=_positive, default=None, help="memory budget, all models together (MiB)")
    p.add_argument("--runtime", choices=RUNTIMES, default=None,
                   help=f"how blocks run: torch or onnxruntime (default here: {default_runtime()}; "
                   "onnxruntime wherever torch is not installed)")
    p.add_argument("--json", action="store_true", help="print JSON (one line per event with --watch)")
    p.add_argument("--offline", action="store_true", help="use only the cache; never contact the store")
    p.add_argument("--allow-downgrade", action="store_true",
                   help="accept a version older than the one this device already runs (refused by default)")
    p.add_argument("--threads", type=_count(1), default=1, help="runtime threads for timing and running (default 1)")
    p.add_argument("--torch-device", default="cpu", help="--runtime torch: cpu (default) or cuda")
    p.add_argument("--repeats", type=_count(1), default=30, help="timed runs per descendant (default 30)")
    p.add_argument("--verify-latency", type=_count(0), default=0, metavar="ROUNDS",
                   help="time the assembled models here and, while they run over --latency-ms, re-solve under a "
                   "tightened budget, at most ROUNDS timings; still over after that exits 1 (default 0: trust the "
                   "summed block timings); with --watch, after every budget change too")
    p.add_argument("--attempts", type=_count(1), default=3, help="resume a dropped download this many times (default 3)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Fetch signed LegoDNN block bundles, time them on this device, pick the most accurate "
        "blocks that fit the budgets, and assemble the models. `legodnn-fetch predict -h` classifies images.",
    )
    p.add_argument("--version", action="version", version=f"{PROG} {package_version()}")
    p.add_argument("uris", nargs="+", metavar="URI",
                   help="bundle URI: s3://BUCKET/PREFIX/MODEL_ID (latest version), .../MODEL_ID/vN, or file:///DIR/...")
    _common(p)
    p.add_argument("--watch", type=Path, metavar="FILE",
                   help='re-read budgets from FILE ({"latency_ms": X, "memory_mb": Y}) on change and swap blocks')
    p.add_argument("--watch-interval", type=_positive, default=0.5, help="seconds between checks of --watch FILE")
    p.add_argument("--watch-max-changes", type=_count(1), default=None, help="stop watching after this many changes")
    p.add_argument("--watch-timeout", type=_positive, default=None, help="stop watching after this many seconds")
    p.add_argument("--export", type=Path, metavar="DIR",
                   help="write each chosen composition as DIR/<model_id>.onnx + .json (and .pte where ExecuTorch is "
                   "installed, with --runtime torch)")
    return p


def build_predict_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"{PROG} predict",
        description="Fetch and assemble the models as legodnn-fetch does, then classify image files with each.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    p.add_argument("--bundle", dest="uris", action="append", required=True, metavar="URI",
                   help="bundle URI (repeat for several models, solved jointly)")
    _common(p)
    p.add_argument("--top", type=_count(1), default=3, help="classes to print per image (default 3)")
    return p


def _fetch(args: argparse.Namespace) -> FetchResult:
    budgets = DeviceBudgets(args.latency_ms, None if args.memory_mb is None else args.memory_mb * MIB)
    settings = DeviceLatencySettings(threads=args.threads, repeats=args.repeats, device=args.torch_device)
    return fetch(args.uris, budgets, public_key=args.public_key, cache=args.cache, runtime=args.runtime,
                 offline=args.offline, settings=settings, attempts=args.attempts, progress=sys.stderr.isatty(),
                 verify_latency_rounds=args.verify_latency, allow_downgrade=args.allow_downgrade)


def _over_budget(result: FetchResult) -> int:
    """1 with a message when --verify-latency timed the pick over the budget, else 0."""
    if not result.over_budget:
        return 0
    assert result.measured is not None
    print(f"{PROG}: {measured_line(result.measured, result.budgets.latency_ms)}; the models run over the "
          f"{ms(result.budgets.latency_ms)} latency budget on this device: raise --latency-ms, or more "
          "--verify-latency rounds", file=sys.stderr)
    return 1


def _run_fetch(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    result = _fetch(args)
    _warn(result)
    if args.watch:
        from infra.device.watch import read_budget_text

        baseline = read_budget_text(args.watch)  # before the result is printed: a reply to it is a change
    if args.json:
        print(json.dumps(result.to_dict(), indent=None if args.watch else 1), flush=True)
    else:
        print_result(result, sys.stdout)
    if _over_budget(result):
        return 1
    if args.export:
        from infra.device.export import export_models

        for e in export_models(result.session, args.export):
            if not args.json:
                extra = f" and {e.pte}" if e.pte else ""
                print(f"exported {e.model_id}: {e.onnx}{extra} ({e.metadata}); max abs difference to the running "
                      f"model {e.max_abs_diff:.1e}")
    if args.watch:
        from infra.device.watch import watch

        watch(result, args.watch, out=sys.stdout, as_json=args.json, poll_s=args.watch_interval,
              max_changes=args.watch_max_changes, max_seconds=args.watch_timeout,
              verify_latency_rounds=args.verify_latency, baseline=baseline)
    return 0


def _run_predict(argv: Sequence[str]) -> int:
    from infra.device.predict import predict_images

    args = build_predict_parser().parse_args(argv)
    result = _fetch(args)
    _warn(result)
    if _over_budget(result):
        return 1
    predictions = predict_images(result.session, args.images, top=args.top)
    if args.json:
        print(json.dumps({"models": [dataclasses.asdict(m) for m in result.models],
                          "runtime": result.session.runtime.name,
                          "predictions": [dataclasses.asdict(p) for p in predictions]}, indent=1))
    else:
        for p in predictions:
            print(f"{p.image}  {p.model_id}: " + ", ".join(f"{name} {prob:.3f}" for name, prob in p.top))
    return 0


def _warn(result: FetchResult) -> None:
    for warning in result.session.stats.warnings:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """The console script; returns the exit code (see module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["predict"]:
            return _run_predict(argv[1:])
        return _run_fetch(argv)
    except BundleVerificationError as e:
        print(f"{PROG}: REFUSED: {e}", file=sys.stderr)
        return 3
    except (BundleError, ValueError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        if isinstance(e, BrokenPipeError) or e.errno == 32:  # output piped into `head`: stop quietly
            _silence_stdout()
            return 1
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"{PROG}: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - a device command never ends in a traceback
        if os.environ.get("LEGODNN_DEBUG"):
            raise
        print(f"{PROG}: unexpected {type(e).__name__}: {e}. This is a bug: rerun with LEGODNN_DEBUG=1 for the "
              "traceback and report it", file=sys.stderr)
        return 1


def _silence_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null so the interpreter's final flush cannot fail."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


if __name__ == "__main__":
    raise SystemExit(main())
