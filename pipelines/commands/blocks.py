"""`legodnn blocks [MODEL] [--input-shape C,H,W]`: show how a model is cut into blocks.

The model is built exactly as `legodnn run` builds it (the same config: embedded defaults <-
`--config FILE` <- flags <- `--set KEY=VALUE`), so `legodnn blocks` with no argument shows the
blocks of the model `legodnn run` would train.

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
    parser.add_argument("model", metavar="MODEL", nargs="?",
                        help="zoo name (resnet20, resnet32, resnet56, vgg11, vgg16, mobilenetv2), "
                             "path/to/file.py:factory or package.module:factory (model.ref; default: the run's)")
    parser.add_argument("--input-shape", type=parse_shape, metavar="C,H,W",
                        help="input shape without the batch dimension, e.g. 1,28,28 or 3,64,64 (model.in_channels, "
                             "model.input_size; default: the config's)")
    parser.add_argument("--num-classes", type=_positive, metavar="N", help="classifier outputs (model.num_classes)")
    parser.add_argument("--checkpoint", metavar="FILE", help="state dict to load (model.checkpoint)")
    parser.add_argument("--config", metavar="FILE", help="a pipeline config: its model section says what to build")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set model.options.width=16")
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


def _config(args: argparse.Namespace) -> Any:
    """The run's config with this command's flags applied (the same model a run builds)."""
    from pipelines.commands.run import overrides_from_args
    from pipelines.config import load_config, set_dotted

    overrides = overrides_from_args(argparse.Namespace(set=args.set))
    if args.model:
        set_dotted(overrides, "model.ref", args.model)
    if args.input_shape:
        c, h, w = args.input_shape
        if h != w:
            raise ValueError(f"--input-shape {c},{h},{w}: the pipeline takes square inputs (model.input_size); "
                             "give H == W")
        set_dotted(overrides, "model.in_channels", c)
        set_dotted(overrides, "model.input_size", h)
    for flag, key in (("num_classes", "model.num_classes"), ("checkpoint", "model.checkpoint"),
                      ("target_blocks", "blocks.target_blocks")):
        if getattr(args, flag) is not None:
            set_dotted(overrides, key, getattr(args, flag))
    return load_config(args.config, overrides)


def run(args: argparse.Namespace) -> int:
    from legoblocks.detect import InputShapeError, UntraceableModelError, detect_blocks
    from legoblocks.modelref import ModelRefError
    from pipelines.config import ConfigError
    from pipelines.recipe.jobs import model_spec
    from pipelines.recipe.model import build_model

    try:
        cfg = _config(args)
        args.model, args.input_shape = cfg.model.ref, cfg.model.input_shape
        model = build_model(model_spec(cfg), cfg.model.checkpoint)
        blocked = detect_blocks(model, cfg.model.input_shape, target_blocks=cfg.blocks.target_blocks)
    except (ConfigError, ModelRefError, UntraceableModelError, InputShapeError, ValueError) as e:
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
