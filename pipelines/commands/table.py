"""`legodnn table show FILE`: print a ProfileTable readably; `legodnn table check FILE` validates it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = sub.add_parser("show", help="print the table: one section per block, plus accuracy figures")
    show.add_argument("file", type=Path, metavar="FILE", help="a ProfileTable JSON file")
    show.add_argument("--json", action="store_true", help="print the validated table as JSON instead")
    check = sub.add_parser("check", help="validate the table; exit 0 when valid, 2 with the bad field otherwise")
    check.add_argument("file", type=Path, metavar="FILE")


def _points(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _flops(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def _summary_lines(table) -> list[str]:
    lines = [
        f"model {table.model_name} (ref {table.model_ref or '-'}), input {tuple(table.input_shape)}, "
        f"schema {table.schema_version}, created {table.created}",
        f"teacher accuracy {_points(table.teacher_accuracy)}%  |  environments: "
        f"{', '.join(e.get('name', '?') for e in table.environments) or '-'}  |  "
        f"BatchNorm re-estimation: {table.bn_recalibration_batches or 'off'}"
        + (" batches" if table.bn_recalibration_batches else ""),
    ]
    for fid, fp in table.fingerprints.items():
        lines.append(
            f"latency host {fid}: {fp.get('cpu_model', '?')}, {fp.get('logical_cores', '?')} cores, "
            f"torch {fp.get('torch_version', '?')}, {fp.get('threads', '?')} thread(s)"
        )
    add = table.additivity
    if add:
        lines.append(
            f"additivity (raw drops, {add.get('n')} random compositions): MAE {_points(add.get('mae'))} "
            f"points, max {_points(add.get('max_error'))}"
        )
    else:
        lines.append("additivity: not measured")
    cal = table.calibration
    if cal and cal.get("method") == "identity":
        lines.append(
            f"calibration: the fitted scale {cal.get('scale', 0):.3f} (k={cal.get('k')}) did not beat the raw "
            "drops in cross-validation, so accuracy_drop = raw drop"
        )
    elif cal:
        lines.append(
            f"calibration ({cal.get('method')}, scale {cal.get('scale', 0):.3f}, k={cal.get('k')}): held-out "
            f"MAE {_points(cal.get('heldout_mae_raw'))} -> {_points(cal.get('heldout_mae_calibrated'))} points, "
            f"max {_points(cal.get('heldout_max_raw'))} -> {_points(cal.get('heldout_max_calibrated'))}"
        )
    else:
        lines.append("calibration: none (accuracy_drop = raw drop)")
    if table.verified:
        lines.append(f"verified selections: {len(table.verified)}")
    return lines


def _print_rich(table) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        # Piped or captured: do not squeeze the columns into 80 characters.
        console = Console(width=160, no_color=True)
    for line in _summary_lines(table):
        console.print(line, highlight=False)
    headers = ("choice", "params", "weights", "FLOPs", "out act", "peak mem", "drop pts", "raw drop pts",
               "latency ms", "p10-p90 ms", "cv")
    for block in table.blocks:
        spec = block.spec
        title = (f"{block.name}  {tuple(spec['in_shape'])} -> {tuple(spec['out_shape'])}"
                 f"{'' if spec['scalable'] else '  (not scalable)'}")
        t = Table(title=title, title_justify="left")
        for h in headers:
            t.add_column(h, justify="left" if h == "choice" else "right")
        for c in block.choices.values():
            lat = c.latency
            t.add_row(
                c.id, f"{c.params:,}", _bytes(c.weight_bytes), _flops(c.flops), _bytes(c.activation_bytes),
                _bytes(c.peak_bytes), _points(c.accuracy_drop), _points(c.accuracy_drop_raw),
                f"{lat.median_ms:.3f}", f"{lat.p10_ms:.3f}-{lat.p90_ms:.3f}", f"{lat.cv:.2f}",
            )
        console.print(t)


def run(args: argparse.Namespace) -> int:
    from profiling.table import TableError, load

    try:
        table = load(args.file)
    except TableError as exc:
        print(f"legodnn table: {exc}", file=sys.stderr)
        return 2
    if args.action == "check":
        print(f"{args.file}: valid ProfileTable (schema {table.schema_version}, {len(table.blocks)} blocks)")
        return 0
    if args.json:
        print(json.dumps(table.to_dict(), indent=1))
        return 0
    _print_rich(table)
    return 0
