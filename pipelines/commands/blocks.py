"""`legodnn blocks MODEL --input-shape C,H,W`: show how a model is cut into blocks.

The first thing to run on a new model: it says whether the model can be captured, where
the cut points fall and what each block costs, and with `--verify` whether the chain
reproduces the model, every default-ladder descendant keeps its block's shapes - the
properties the whole offline pipeline relies on - and the FLOPs of the smallest and the
largest composition, so the scaling range is known before anything is trained.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any


def parse_shape(text: str) -> tuple[int, ...]:
    """`"1,28,28"` -> `(1, 28, 28)`; argparse turns the ValueError into a usage error."""
    parts = [p.strip() for p in text.replace("x", ",").split(",")]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a shape: write C,H,W as positive integers, e.g. 1,28,28"
        ) from None
    if len(shape) != 3 or any(v < 1 for v in shape):
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape: write C,H,W as three positive integers, e.g. 1,28,28")
    return shape


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help="zoo name (resnet20, resnet32, resnet56, vgg11, vgg16, mobilenetv2), "
                             "path/to/file.py:factory or package.module:factory")
    parser.add_argument("--input-shape", required=True, type=parse_shape, metavar="C,H,W",
                        help="input shape without the batch dimension, e.g. 1,28,28 (Fashion-MNIST) or 3,32,32")
    parser.add_argument("--num-classes", type=_positive, default=10, metavar="N", help="classifier outputs (default 10)")
    parser.add_argument("--checkpoint", metavar="FILE", help="state dict to load (torch.save(model.state_dict()))")
    parser.add_argument("--target-blocks", type=_positive, metavar="K",
                        help="merge adjacent blocks (FLOP-balanced) until K blocks remain, stem and head included")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--verify", action="store_true",
                        help="check that the chain of blocks reproduces the model (max abs diff < 1e-5) and that "
                             "every default-ladder descendant keeps its block's input/output shapes; prints the FLOPs "
                             "of the smallest and the largest composition (the scaling range)")


def _fmt_int(n: int) -> str:
    for unit, size in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _table(rows: list[dict[str, Any]]) -> str:
    header = ("block", "in", "out", "params", "FLOPs", "scalable")
    lines = [(r["name"], "x".join(map(str, r["in_shape"])), "x".join(map(str, r["out_shape"])),
              _fmt_int(r["params"]), _fmt_int(r["flops"]), "yes" if r["scalable"] else "no") for r in rows]
    lines.append(("total", "", "", _fmt_int(sum(r["params"] for r in rows)),
                  _fmt_int(sum(r["flops"] for r in rows)), ""))
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(len(header))]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*row) for row in lines]
    return "\n".join(out)


def _verify(model: Any, blocked: Any) -> dict[str, Any]:
    """Chain equivalence, descendant shapes and the composition FLOPs range; failures are collected, not raised."""
    import torch

    from legoblocks.descend import DEFAULT_LADDER, make_descendants
    from legoblocks.detect import ChainMismatchError, verify_chain
    from legoblocks.flops import count_flops

    report: dict[str, Any] = {"ok": True, "failures": [], "descendants": {}}
    try:
        report["max_abs_diff"] = verify_chain(model, blocked)
    except ChainMismatchError as e:
        report["ok"] = False
        report["failures"].append(f"chain: {e}")
    smallest = 0
    for spec, block in zip(blocked.specs, blocked.blocks):
        if not spec.scalable:
            smallest += spec.flops
            continue
        try:
            descendants = make_descendants(block, spec.in_shape, DEFAULT_LADDER)
        except Exception as e:  # a pruning failure is a verification result, not a crash
            report["ok"] = False
            report["failures"].append(f"{spec.name}: making descendants failed: {type(e).__name__}: {e}")
            smallest += spec.flops
            continue
        x = torch.zeros(1, *spec.in_shape)
        for cid, module in descendants.items():
            with torch.no_grad():
                out = tuple(module.eval()(x).shape[1:])
            if out != spec.out_shape:
                report["ok"] = False
                report["failures"].append(f"{spec.name}@{cid}: output {out} != {spec.out_shape}")
        report["descendants"][spec.name] = sorted(descendants, key=float)
        smallest += min(count_flops(module, spec.in_shape) for module in descendants.values())
    largest = sum(spec.flops for spec in blocked.specs)
    report["composition_flops"] = {"smallest": smallest, "largest": largest,
                                   "smallest_fraction": smallest / largest if largest else 1.0}
    return report


def run(args: argparse.Namespace) -> int:
    from legoblocks.detect import InputShapeError, UntraceableModelError, detect_blocks
    from legoblocks.modelref import ModelRefError, load_model

    c, h, _w = args.input_shape
    try:
        model = load_model(args.model, args.checkpoint, in_channels=c, num_classes=args.num_classes, input_size=h)
        blocked = detect_blocks(model, args.input_shape, target_blocks=args.target_blocks)
    except (ModelRefError, UntraceableModelError, InputShapeError, ValueError) as e:
        print(f"legodnn blocks: error: {e}", file=sys.stderr)
        return 2

    rows = [s.to_dict() for s in blocked.specs]
    report = None
    if args.verify:
        # Descent warns per block with nothing to prune; the report lists the choices instead.
        descend_log = logging.getLogger("legoblocks.descend")
        level = descend_log.level
        descend_log.setLevel(logging.ERROR)
        try:
            report = _verify(model, blocked)
        finally:
            descend_log.setLevel(level)

    if args.json:
        payload: dict[str, Any] = {"model": args.model, "input_shape": list(args.input_shape), "blocks": rows}
        if report is not None:
            payload["verify"] = report
        print(json.dumps(payload, indent=2))
    else:
        print(f"{args.model}: {len(rows)} blocks for input {'x'.join(map(str, args.input_shape))}")
        print(_table(rows))
        if report is not None:
            if report["ok"]:
                print(f"verify: OK (chain max abs diff {report['max_abs_diff']:.2g}; "
                      f"descendants keep shapes: " + ", ".join(
                          f"{name} {len(cids)}" for name, cids in report["descendants"].items()) + ")")
            else:
                print("verify: FAILED\n  " + "\n  ".join(report["failures"]))
            flops = report["composition_flops"]
            print(f"composition FLOPs: smallest {_fmt_int(flops['smallest'])} ({flops['smallest_fraction']:.1%}), "
                  f"largest {_fmt_int(flops['largest'])} (100%): every block at its sparsest descendant vs the original")
    if report is not None and not report["ok"]:
        print("legodnn blocks: verification failed: " + "; ".join(report["failures"]), file=sys.stderr)
        return 1
    return 0
