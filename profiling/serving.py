"""What a model is told it will get: the accuracy served, measured where it matters.

The additive prediction (teacher accuracy minus summed per-block drops) ranks millions of
compositions exactly, but it is only a prediction: on the compositions the optimizer picks
it is optimistic (it picks the ones it overrates), and near the full budget a noise-level
negative drop can make a pruned composition look better than the original. So the table
carries a *measured frontier* (`ProfileTable.measured`: the original, the anchors the joint
stage trained, every composition the profile and the re-ranking measured, with the number
of validation images) and the *prediction error* of the additive model on the optimizer's
own picks (`ProfileTable.prediction_error`: bias and spread). Then:

* The optimizer (`to_problem`) gets the measured compositions as whole-model candidates
  (`optimizer` problem `compositions`) at a *ranking value*: the measured accuracy minus
  `RANK_PENALTY_SE[kind]` standard errors (0 for the original, 1 for a trained anchor, 1.5
  for any other), so a pruned composition displaces the original only when it measures
  better beyond its noise, and a lucky draw does not displace a trained anchor. Compositions
  never measured rank at their prediction minus the bias and `PREDICTED_PENALTY_SD` (1.5)
  spreads: like a measured pick, each is the best of many candidates ranked by a noisy
  number, so it needs the same margin of its own uncertainty to displace a composition that
  was measured. The solve stays exact: these are values of whole compositions, not
  per-block corrections.
* What the user is told (`told`) is the measured accuracy with its standard error where the
  served composition was measured, else the prediction minus the bias with the spread as
  its standard error, never below the standard error of a measurement on the images the
  spread was estimated on (a few picks that happen to agree do not make a prediction surer
  than the measurement it was checked against); every report says which (`Told.source`).

A measured value that chose is a biased report of what it chose: the served composition is
the best of several measured on the same images, so its number carries the winner's curse
of that choice. So a fraction of the validation split (`HELD_OUT_FRACTION`) chooses
nothing: drops, calibration and the ranking values above use the rest, and every measured
composition is also measured on the held-out images (`Measured.held_out_accuracy`), which
is what `told` reports and what the prediction error is estimated against. That estimate is
the one way the held-out images reach a choice: its bias, one scalar pooled over every
re-ranked pick, shifts all unmeasured compositions against the measured ones. It is taken
there because the picks were chosen by drops from the choosing images, so on those images
the additive model would look less optimistic than it is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from profiling.table import Measured, PredictionError, ProfileTable

ORIGINAL_KIND, ANCHOR_KIND, MEASURED_KIND = "original", "anchor", "measured"
RANK_PENALTY_SE = {ORIGINAL_KIND: 0.0, ANCHOR_KIND: 1.0, MEASURED_KIND: 1.5}
PREDICTED_PENALTY_SD = 1.5  # unmeasured compositions rank at prediction - bias - this many spreads
MIN_PAIRS = 3  # measured picks needed to estimate the prediction error
HELD_OUT_FRACTION = 0.5  # of the validation images: they choose nothing, they tell


def held_out_count(val_size: int, fraction: float) -> int:
    """How many of `val_size` validation images are held out of choosing at `fraction`."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the held-out fraction must be in [0, 1), got {fraction}")
    return int(round(val_size * fraction))


def standard_error(accuracy: float, n: int) -> float:
    """Standard error of an accuracy (a fraction) measured on n samples."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    p = min(max(accuracy, 0.0), 1.0)
    return math.sqrt(p * (1.0 - p) / n)


@dataclass(frozen=True)
class PairedDifference:
    """One model's accuracy less another's on the same `n` samples (fractions), with the
    standard error of that difference.

    Each sample contributes -1, 0 or +1, so only the samples the two models disagree on add
    to the error: two similar models measured on the same images differ far less by chance
    than two independent measurements would (`standard_error` of each, combined).
    """

    difference: float
    se: float
    n: int


def paired_difference(a: Sequence[bool] | Any, b: Sequence[bool] | Any) -> PairedDifference:
    """Accuracy of `a` less accuracy of `b`, both per-sample correctness on the same samples in
    the same order (`legoblocks.train.correct`), with the standard error of the mean of the
    per-sample differences.

    Args:
        a: one model's correctness per sample (bools, or a bool tensor or array); or k models'
            as a (k, n) array, to compare k pairs at once (e.g. one per budget).
        b: the other model's (or the other k models'), on the same samples.

    Returns:
        The difference and its standard error, fractions of the n samples. For k pairs, the
        mean difference over the pairs, its error from each sample's mean over the pairs, so
        that pairs which err on the same samples are not counted as independent evidence.

    Raises:
        ValueError: the two have different shapes, or fewer than two samples.
    """
    import numpy as np

    x, y = np.asarray(a, dtype=np.int8), np.asarray(b, dtype=np.int8)
    if x.shape != y.shape or x.ndim not in (1, 2):
        raise ValueError(f"paired correctness must be vectors (or k rows of them) over the same samples, got "
                         f"shapes {x.shape} and {y.shape}")
    if x.shape[-1] < 2:
        raise ValueError(f"a paired difference needs at least 2 samples, got {x.shape[-1]}")
    d = (x - y).reshape(-1, x.shape[-1]).mean(axis=0)
    return PairedDifference(float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))), len(d))


@dataclass(frozen=True)
class Told:
    """The accuracy a composition is served at: value, standard error, and whether it was
    measured (on `n` validation images) or predicted by the additive model."""

    accuracy: float
    se: float
    source: Literal["measured", "predicted"]
    n: int = 0

    def text(self, digits: int = 2) -> str:
        """e.g. "92.31 ± 0.19 % (measured)"."""
        return f"{100 * self.accuracy:.{digits}f} ± {100 * self.se:.{digits}f} % ({self.source})"

    def to_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "se": self.se, "source": self.source, "n": self.n}


def prediction_error(pairs: Sequence[tuple[float, float]], fallback_sd: float = 0.0):
    """The additive model's error on measured compositions: bias = mean(predicted - measured)
    (> 0: optimistic) and spread = their standard deviation, from (predicted, measured) pairs.

    With fewer than `MIN_PAIRS` pairs the bias is 0 and the spread `fallback_sd`.
    """
    from profiling.table import PredictionError

    if len(pairs) < MIN_PAIRS:
        return PredictionError(bias=0.0, sd=float(fallback_sd), n=len(pairs))
    errors = [p - m for p, m in pairs]
    bias = sum(errors) / len(errors)
    sd = math.sqrt(sum((e - bias) ** 2 for e in errors) / (len(errors) - 1))
    return PredictionError(bias=float(bias), sd=float(sd), n=len(errors))


def rank_value(m: Measured) -> float:
    """A measured composition's value for the optimizer (see the module docstring)."""
    return max(0.0, m.accuracy - RANK_PENALTY_SE[m.kind] * standard_error(m.accuracy, m.n))


def _error(table: ProfileTable) -> PredictionError:
    from profiling.table import PredictionError

    return table.prediction_error or PredictionError(bias=0.0, sd=0.0, n=0)


def told(table: ProfileTable, selection: Sequence[str] | Mapping[str, str]) -> Told:
    """What serving `selection` is reported at (see the module docstring)."""
    chosen = tuple(table.normalize_selection(selection))
    measured = table.measured_by_selection().get(chosen)
    if measured is not None:
        accuracy, n = measured.told_value()
        return Told(accuracy, standard_error(accuracy, n), "measured", n)
    err = _error(table)
    accuracy = table.predicted_accuracy(list(chosen)) - err.bias
    checked = max((m.told_value()[1] for m in table.measured), default=0)
    floor = standard_error(accuracy, checked) if checked else 0.0
    return Told(accuracy, max(err.sd, floor), "predicted")


def compositions(table: ProfileTable) -> list[dict[str, Any]]:
    """The measured frontier as the optimizer's whole-model candidates, at their ranking values."""
    return [{"selection": list(m.selection), "accuracy": rank_value(m)} for m in table.measured_by_selection().values()]


def base_accuracy(table: ProfileTable) -> float:
    """The additive model's starting point for compositions never measured: the teacher's
    accuracy, less the prediction's bias and `PREDICTED_PENALTY_SD` spreads."""
    err = _error(table)
    return max(0.0, table.teacher_accuracy - err.bias - PREDICTED_PENALTY_SD * err.sd)


def even_selections(table: ProfileTable, budgets: Sequence[float]) -> list[list[str]]:
    """The even composition (`legoblocks.anchors`) of each FLOPs budget, a fraction of the
    original model's FLOPs, from the table's measured FLOPs: the anchors a joint stage trained
    for those budgets."""
    from legoblocks.anchors import even_selection

    flops = {b.name: {cid: c.flops for cid, c in b.choices.items()} for b in table.blocks}
    return [even_selection(flops, float(b), table.block_names) for b in budgets]


def _override_for(latency_override: Mapping[Any, Any] | None, table: ProfileTable,
                  several: bool) -> Mapping[tuple[str, str], float] | None:
    if not latency_override:
        return None
    if all(isinstance(k, str) for k in latency_override):
        return latency_override.get(table.model_name)
    if several:
        raise ValueError(
            "latency_override keyed by (block, choice) is ambiguous with several tables; key it "
            "by model name: {model_name: {(block, choice): ms}}"
        )
    return latency_override


def to_problem(
    tables: Sequence[ProfileTable] | ProfileTable,
    budgets: Mapping[str, float | None],
    current: Mapping[str, Sequence[str] | Mapping[str, str]] | None = None,
    weights: Mapping[str, float] | None = None,
    *,
    latency_override: Mapping[Any, Any] | None = None,
    deadlines: Mapping[str, float | None] | None = None,
    switch_penalty_per_byte: float = 0.0,
    raw_latency: bool = False,
    measured: bool = True,
) -> dict[str, Any]:
    """The optimizer's JSON problem (see `optimizer.problem`) for one or several models.

    Args:
        tables: one ProfileTable per model (model names unique).
        budgets: `latency_ms`, `memory_bytes`, `switch_bytes` (None: no limit).
        current: the running selection per model (switching cost).
        weights: per model (default 1).
        latency_override: the latency column measured elsewhere (a device): `{(block, choice): ms}`,
            or `{model_name: {...}}` for several tables; the table's own correction belongs to
            the host that profiled it.
        deadlines: per-model latency deadlines (ms).
        switch_penalty_per_byte: accuracy given up per byte a switch loads.
        raw_latency: the bare block medians instead of the table's composed-latency correction.
        measured: offer the measured frontier as whole-model candidates (`compositions`) and
            start unmeasured ones from `base_accuracy`; False: the plain additive model.

    Per choice: accuracy_drop = the table's calibrated drop; latency_ms as above; memory_bytes
    = peak_bytes (weights + peak live activation; summing blocks is conservative);
    load_bytes = weight_bytes (what a switch loads).
    """
    from profiling.table import ProfileTable

    table_list = [tables] if isinstance(tables, ProfileTable) else list(tables)
    if not table_list:
        raise ValueError("to_problem needs at least one ProfileTable")
    names = [t.model_name for t in table_list]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique across tables, got {names}; set model_name when profiling")
    for label, given in (("weights", weights), ("deadlines", deadlines), ("current", current)):
        unknown = sorted(set(given or {}) - set(names))
        if unknown:
            raise ValueError(f"{label} names unknown models {unknown}; models: {names}")
    unknown_budgets = sorted(set(budgets) - {"latency_ms", "memory_bytes", "switch_bytes"})
    if unknown_budgets:
        raise ValueError(f"unknown budget keys {unknown_budgets}; use latency_ms, memory_bytes, switch_bytes")
    models = []
    for table in table_list:
        override = _override_for(latency_override, table, len(table_list) > 1)
        blocks = []
        for block in table.blocks:
            choices = []
            for cid, c in block.choices.items():
                if override is not None:
                    if (block.name, cid) not in override:
                        raise ValueError(f"latency_override for {table.model_name!r} lacks ({block.name!r}, {cid!r}); "
                                         "it must cover every block and choice")
                    latency = float(override[(block.name, cid)])
                else:
                    latency = table.choice_latency_ms(block.name, cid, raw=raw_latency)
                choices.append({"id": cid, "accuracy_drop": c.accuracy_drop, "latency_ms": latency,
                                "memory_bytes": c.peak_bytes, "load_bytes": c.weight_bytes})
            blocks.append({"name": block.name, "choices": choices})
        model: dict[str, Any] = {
            "name": table.model_name, "weight": float((weights or {}).get(table.model_name, 1.0)),
            "base_accuracy": base_accuracy(table) if measured else table.teacher_accuracy,
            "latency_deadline_ms": (deadlines or {}).get(table.model_name), "blocks": blocks,
        }
        if measured and table.measured:
            model["compositions"] = compositions(table)
        models.append(model)
    problem: dict[str, Any] = {
        "models": models,
        "budgets": {k: budgets.get(k) for k in ("latency_ms", "memory_bytes", "switch_bytes")},
        "switch_penalty_per_byte": float(switch_penalty_per_byte),
    }
    if current is not None:
        by_name = {t.model_name: t for t in table_list}
        problem["current"] = {name: by_name[name].normalize_selection(sel) for name, sel in current.items()}
    return problem
