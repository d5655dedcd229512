"""The figures a pipeline run logs to MLflow: the Pareto plot and the per-block plot.

Both are drawn on a bare `matplotlib.figure.Figure` with the Agg backend (no display on
cluster nodes, no pyplot global state) and written as PNG, which the MLflow artifact viewer
shows inline.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from profiling.serving import standard_error


@dataclass(frozen=True)
class BlockPoint:
    """One variant of one block in the per-block plot."""

    sparsity: float
    accuracy_drop: float  # fraction of accuracy (0.01 = one point)
    latency_ms: float  # median
    latency_p10_ms: float
    latency_p90_ms: float


def _figure(width: float, height: float) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def _save(fig: Any, path: str | Path, title: str) -> Path:
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


def pareto_plot(points: Mapping[str, Any], path: str | Path, *, title: str = "",
                teacher_accuracy: float | None = None, test_size: int | None = None,
                latency_spread: Sequence[tuple[float, float] | None] | None = None) -> Path:
    """PNG of predicted accuracy vs latency and vs memory of the optimizer's choices.

    Args:
        points: the pipeline's points.json: for a grid of latency budgets and of memory
            budgets, the composition served and the accuracy it is told (`told`), and the
            `measured` compositions with their test accuracy.
        path: the PNG to write.
        title: the figure's title (the model).
        teacher_accuracy: the teacher's test accuracy, drawn as a horizontal line.
        test_size: images of the test split: the measured points get +-1 standard error bars.
        latency_spread: per `measured` entry, its (p10, p90) latency in ms: horizontal bars.

    Returns:
        `path`.
    """
    fig = _figure(11, 4.2)
    panels = (("latency", "latency_ms", "latency (ms, summed blocks)", 1.0),
              ("memory", "memory_bytes", "memory (KiB, weights + peak activation)", 1 / 1024))
    measured = [(i, p) for i, p in enumerate(points.get("measured", []))
                if p.get("feasible") and "measured_test_accuracy" in p]
    for n, (group, key, label, scale) in enumerate(panels):
        ax = fig.add_subplot(1, 2, n + 1)
        rows = [p for p in points.get(group, []) if p.get("feasible")]
        ax.plot([p[key] * scale for p in rows], [100 * p["told"]["accuracy"] for p in rows],
                "o-", label="served (accuracy told: measured or predicted)")
        if measured:
            xs = [p[key] * scale for _, p in measured]
            ys = [100 * p["measured_test_accuracy"] for _, p in measured]
            yerr = [100 * standard_error(p["measured_test_accuracy"], test_size) for _, p in measured] \
                if test_size else None
            xerr = None
            if group == "latency" and latency_spread is not None:
                spread = [latency_spread[i] if i < len(latency_spread) else None for i, _ in measured]
                xerr = [[max(0.0, x - s[0]) if s else 0.0 for x, s in zip(xs, spread)],
                        [max(0.0, s[1] - x) if s else 0.0 for x, s in zip(xs, spread)]]
            ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt="s", capsize=3, color="tab:red",
                        label="measured (test set" + (", +-1 SE" if test_size else "")
                        + (", p10-p90 latency" if xerr is not None else "") + ")")
        if teacher_accuracy is not None:
            ax.axhline(100 * teacher_accuracy, color="gray", linestyle="--", linewidth=1,
                       label=f"teacher (test) {100 * teacher_accuracy:.1f}%")
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path, title)


def block_plot(blocks: Mapping[str, Sequence[BlockPoint]], path: str | Path, *, title: str = "") -> Path:
    """PNG of each block's accuracy drop and latency against sparsity (one line per block).

    Args:
        blocks: block name -> its variants, in chain order; blocks with one variant (not
            scalable) are left out of the drop panel's legend noise but drawn as one point.
        path: the PNG to write.
        title: the figure's title (the model).

    Returns:
        `path`.
    """
    fig = _figure(11, 4.2)
    drop_ax, lat_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for name, variants in blocks.items():
        rows = sorted(variants, key=lambda v: v.sparsity)
        xs = [100 * v.sparsity for v in rows]
        style = "o-" if len(rows) > 1 else "o"
        drop_ax.plot(xs, [100 * v.accuracy_drop for v in rows], style, markersize=4, label=name)
        lat_ax.errorbar(xs, [v.latency_ms for v in rows],
                        yerr=[[max(0.0, v.latency_ms - v.latency_p10_ms) for v in rows],
                              [max(0.0, v.latency_p90_ms - v.latency_ms) for v in rows]],
                        fmt=style, markersize=4, capsize=2, label=name)
    drop_ax.set_xlabel("sparsity (%)")
    drop_ax.set_ylabel("accuracy drop (points, calibrated)")
    lat_ax.set_xlabel("sparsity (%)")
    lat_ax.set_ylabel("latency (ms, median, p10-p90 bars)")
    for ax in (drop_ax, lat_ax):
        ax.grid(True, alpha=0.3)
    lat_ax.legend(loc="upper right", fontsize=7, ncol=2)
    return _save(fig, path, title)
