"""The ProfileTable: everything the optimizer needs to know about one scalable model.

One versioned JSON file per model. It is the hand-off between the offline pipeline and
every optimizer (server side and device side), so `load()` trusts nothing: it checks the
schema version, the block order against the entries, and every value, and names the exact
field that is wrong ("blocks[3].choices['0.4'].flops: missing required field") so a broken
file is fixed at its source instead of producing a silently wrong selection. Types and
ranges are checked by `legoblocks.schema` (msgspec) against the records below; what spans
fields (block order, ids, fingerprints, the original's zero drop) is checked here.

Units: accuracies and drops are fractions in [0, 1] (not percent); bytes are bytes; FLOPs
are FLOPs (2 per multiply-add); latencies are milliseconds.

Schema history: 1 had one accuracy drop per choice; 2 carries the raw drop and the
calibrated one (`accuracy_drop`, what the optimizer uses) plus the calibration figures; 3
adds the measured frontier (`measured`) and the additive model's `prediction_error`
(`profiling.serving`). Version 2 tables still load (no frontier).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from msgspec import Meta

from legoblocks.choices import ORIGINAL
from legoblocks.files import write_atomic
from legoblocks.schema import Finite, NonNegative, NonNegativeInt, PositiveInt, convert
from profiling.latency_fit import LatencyCalibration

SCHEMA_VERSION = 3
READABLE_VERSIONS = (2, 3)

Fraction = Annotated[float, Meta(ge=0.0, le=1.0)]
Drop = Annotated[float, Meta(ge=-1.0, le=1.0)]
Name = Annotated[str, Meta(min_length=1)]


class TableError(ValueError):
    """A ProfileTable is malformed; the message starts with the path of the bad field."""


def _error(path: str, message: str) -> TableError:
    return TableError(f"{path}: {message}" if path else message)


@dataclass(frozen=True)
class LatencyColumn:
    """One descendant's latency on one host (ms); `fingerprint` keys the table's fingerprints."""

    median_ms: NonNegative
    p10_ms: NonNegative
    p90_ms: NonNegative
    cv: NonNegative
    fingerprint: Name


@dataclass(frozen=True)
class ChoiceProfile:
    """One descendant of one block: its costs, accuracy drops and latency.

    accuracy_drop is what the optimizer uses: the calibrated drop when the table was
    calibrated, else the mean single-swap drop over the environments clipped at 0 (a swap
    measured "better" than the original is noise, not a gain the optimizer may count on).
    accuracy_drop_raw is the measured mean, unclipped.
    """

    id: str
    sparsity: Fraction
    params: NonNegativeInt
    weight_bytes: NonNegativeInt
    flops: NonNegativeInt
    activation_bytes: NonNegativeInt
    peak_bytes: NonNegativeInt
    accuracy_drop: Drop
    accuracy_drop_raw: Drop
    latency: LatencyColumn

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class BlockProfile:
    """A block's spec (as `legoblocks.detect.BlockSpec.to_dict()` writes it) and its choices.

    The spec stays a plain dict so reading a table needs neither torch nor legoblocks
    (the device side reads tables too); `choices` is ordered by sparsity, "0.0" first.
    """

    name: str
    spec: dict[str, Any]
    choices: dict[str, ChoiceProfile]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "spec": dict(self.spec), "choices": {c: ch.to_dict() for c, ch in self.choices.items()}}


@dataclass(frozen=True)
class Measured:
    """A composition measured on `n` validation images that choose (`accuracy`: what ranks
    it) and on `held_out_n` held-out ones that choose nothing (`held_out_accuracy`: what it
    is told, `profiling.serving`; absent when none were held out). `kind`: "original" (the
    teacher), "anchor" (a composition the joint stage trained for a budget) or "measured"."""

    selection: tuple[str, ...]
    accuracy: Fraction
    n: PositiveInt
    kind: Literal["original", "anchor", "measured"] = "measured"
    held_out_accuracy: Fraction | None = None
    held_out_n: NonNegativeInt = 0

    def told_value(self) -> tuple[float, int]:
        """(accuracy, images) a served composition reports: held-out where measured there."""
        if self.held_out_n and self.held_out_accuracy is not None:
            return self.held_out_accuracy, self.held_out_n
        return self.accuracy, self.n


@dataclass(frozen=True)
class PredictionError:
    """The additive prediction's error on measured compositions the optimizer picked:
    `bias` = mean(predicted - measured) (> 0: optimistic), `sd` their spread, over `n`."""

    bias: Finite
    sd: NonNegative
    n: NonNegativeInt


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class ProfileTable:
    """The profile of one scalable model (see the module docstring for units).

    environments: the background selections the drops were averaged over.
    additivity: AdditivityReport.to_dict() (mae, max_error, n, points) of the raw drops.
    calibration: Calibration.to_dict() or None when the drops are uncalibrated.
    latency_calibration: `profiling.latency_fit.LatencyCalibration.to_dict()` or None: the
    fitted scale and offset that turn summed block medians into composed-model latency on
    the host named by its `fingerprint`.
    measured: the measured frontier; prediction_error: see `profiling.serving`.
    verified: what the pipeline served at each budget of its grid, with what it was told.
    settings: how the table was made (seed, validation size, latency settings, ...).
    """

    model_ref: str
    model_name: str
    input_shape: tuple[PositiveInt, ...]
    teacher_accuracy: Fraction
    blocks: list[BlockProfile]
    fingerprints: dict[str, dict[str, Any]]
    environments: list[dict[str, Any]] = field(default_factory=list)
    additivity: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    latency_calibration: dict[str, Any] | None = None
    bn_recalibration_batches: NonNegativeInt = 0
    verified: list[dict[str, Any]] = field(default_factory=list)
    measured: list[Measured] = field(default_factory=list)
    prediction_error: PredictionError | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=_now)
    schema_version: int = SCHEMA_VERSION

    @property
    def block_names(self) -> list[str]:
        return [b.name for b in self.blocks]

    def block(self, name: str) -> BlockProfile:
        for b in self.blocks:
            if b.name == name:
                return b
        raise KeyError(f"block {name!r} is not in table {self.model_name!r}; blocks: {self.block_names}")

    def measured_by_selection(self) -> dict[tuple[str, ...], Measured]:
        """The measured frontier by selection, among the choices the table offers; a composition
        measured twice keeps its larger `n`, and a trained kind (original, anchor) wins over
        "measured"."""
        rank = {"original": 2, "anchor": 1, "measured": 0}
        out: dict[tuple[str, ...], Measured] = {}
        for m in self.measured:
            if not all(c in b.choices for b, c in zip(self.blocks, m.selection)):
                continue  # a table restricted to some choices (a device offline) offers only what it has
            old = out.get(m.selection)
            if old is None or (rank[m.kind], m.n) > (rank[old.kind], old.n):
                out[m.selection] = m
        return out

    def normalize_selection(self, selection: Sequence[str] | Mapping[str, str]) -> list[str]:
        """A selection as a list in block order; accepts a list or a {block: choice} dict."""
        names = self.block_names
        if isinstance(selection, Mapping):
            unknown = sorted(set(selection) - set(names))
            missing = [n for n in names if n not in selection]
            if unknown or missing:
                raise ValueError(f"selection for {self.model_name!r} must name every block exactly: "
                                 f"unknown {unknown}, missing {missing}")
            chosen = [str(selection[n]) for n in names]
        else:
            chosen = [str(c) for c in selection]
            if len(chosen) != len(names):
                raise ValueError(f"selection for {self.model_name!r} has {len(chosen)} choices but the model "
                                 f"has {len(names)} blocks ({names})")
        for name, cid in zip(names, chosen):
            if cid not in self.block(name).choices:
                raise ValueError(f"selection for {self.model_name!r}: block {name!r} has no choice {cid!r}; "
                                 f"choices: {list(self.block(name).choices)}")
        return chosen

    def predicted_accuracy(self, selection: Sequence[str] | Mapping[str, str], *, raw: bool = False) -> float:
        """Teacher accuracy minus the summed (calibrated, or raw) drops of `selection`: the
        additive model alone (`profiling.serving.told` is what serving it is reported at)."""
        chosen = self.normalize_selection(selection)
        total = 0.0
        for b, cid in zip(self.blocks, chosen):
            c = b.choices[cid]
            total += c.accuracy_drop_raw if raw else c.accuracy_drop
        return self.teacher_accuracy - total

    def predicted_latency(self, selection: Sequence[str] | Mapping[str, str], *, raw: bool = False) -> float:
        """Composed-model latency (ms) on the profiling host: the summed block medians,
        corrected by the latency calibration unless `raw` or the table has none."""
        summed = self.total(selection, "latency")
        if raw or not self.latency_calibration:
            return summed
        return LatencyCalibration.from_dict(self.latency_calibration).predict(summed)

    def choice_latency_ms(self, block: str, choice: str, *, raw: bool = False) -> float:
        """One choice's additive latency share: summed over a selection it gives
        `predicted_latency` (the offset is spread evenly over the blocks)."""
        ms = self.block(block).choices[choice].latency.median_ms
        if raw or not self.latency_calibration:
            return ms
        return LatencyCalibration.from_dict(self.latency_calibration).per_choice(ms, len(self.blocks))

    def total(self, selection: Sequence[str] | Mapping[str, str], metric: str) -> float:
        """Sum of a per-choice metric (`flops`, `params`, `latency`, ...) over a selection
        (`latency`: the raw block medians; see `predicted_latency` for the composed model)."""
        chosen = self.normalize_selection(selection)
        values = []
        for b, cid in zip(self.blocks, chosen):
            c = b.choices[cid]
            values.append(c.latency.median_ms if metric == "latency" else getattr(c, metric))
        return sum(values)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version, "model_ref": self.model_ref, "model_name": self.model_name,
            "input_shape": list(self.input_shape), "teacher_accuracy": self.teacher_accuracy,
            "block_order": self.block_names, "blocks": [b.to_dict() for b in self.blocks],
            "fingerprints": {k: dict(v) for k, v in self.fingerprints.items()},
            "environments": [dict(e) for e in self.environments], "additivity": self.additivity,
            "calibration": self.calibration, "latency_calibration": self.latency_calibration,
            "bn_recalibration_batches": self.bn_recalibration_batches, "verified": [dict(v) for v in self.verified],
            "measured": [{**dataclasses.asdict(m), "selection": list(m.selection)} for m in self.measured],
            "prediction_error": dataclasses.asdict(self.prediction_error) if self.prediction_error else None,
            "settings": dict(self.settings), "created": self.created,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProfileTable:
        """Validate `data` (see `validate`) and build the table; raises TableError."""
        return validate(data)


# --------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class _Spec:
    name: str
    in_shape: Annotated[list[PositiveInt], Meta(min_length=1)]
    out_shape: Annotated[list[PositiveInt], Meta(min_length=1)]
    params: NonNegativeInt
    flops: NonNegativeInt
    scalable: bool


@dataclass(frozen=True)
class _LatencyFit:
    method: Literal["identity", "scale", "affine"]
    scale: Annotated[float, Meta(gt=0.0)]
    offset_ms: NonNegative
    k: NonNegativeInt
    fingerprint: Name


@dataclass(frozen=True)
class _Calibration:
    method: Literal["identity", "scale", "scale+flops", "ridge"]
    scale: NonNegative
    block_weights: dict[str, NonNegative]
    heldout_mae_raw: Fraction
    heldout_max_raw: Fraction
    heldout_mae_calibrated: Fraction
    heldout_max_calibrated: Fraction
    k: NonNegativeInt
    flops_weight: NonNegative | None = None


@dataclass(frozen=True)
class _Additivity:
    mae: Fraction
    max_error: Fraction
    n: NonNegativeInt


@dataclass(frozen=True)
class _Told:
    accuracy: Fraction
    se: NonNegative
    source: Literal["measured", "predicted"]
    n: NonNegativeInt = 0


@dataclass(frozen=True)
class _Verified:
    budget: dict[str, Any]
    selection: list[str]
    told: _Told


def _check_schema_version(data: Mapping[str, Any]) -> None:
    version = data.get("schema_version")
    if version is None:
        raise _error("schema_version", f"missing (this code reads schema version {SCHEMA_VERSION}; "
                     "is this a ProfileTable written by `legodnn profile`?)")
    if version not in READABLE_VERSIONS:
        hint = "version 1 tables carry no calibrated drops; " if version == 1 else ""
        raise _error("schema_version", f"the table has schema version {version!r} but this code reads versions "
                     f"{', '.join(map(str, READABLE_VERSIONS))} (it writes version {SCHEMA_VERSION}); {hint}re-create "
                     "it with `legodnn profile` (or the pipeline's profile stage) using this version of legodnn")


def _blocks(data: Mapping[str, Any]) -> list[BlockProfile]:
    """Every block against `block_order`, each choice converted on its own so an error names
    the choice by id (`blocks[2].choices['0.4'].flops`)."""
    order = convert(data.get("block_order"), Annotated[list[Name], Meta(min_length=1)], error=_error, path="block_order")
    if len(set(order)) != len(order):
        raise _error("block_order", f"duplicate block names {sorted({n for n in order if order.count(n) > 1})}")
    raw_blocks = convert(data.get("blocks"), list[dict[str, Any]], error=_error, path="blocks")
    fingerprints = convert(data.get("fingerprints"), dict[str, dict[str, Any]], error=_error, path="fingerprints")
    if len(raw_blocks) > len(order):
        raise _error(f"blocks[{len(order)}]", f"not in block_order (block_order has {len(order)} blocks)")
    blocks = []
    for i, expected in enumerate(order):
        path = f"blocks[{i}]"
        if i >= len(raw_blocks):
            raise _error(path, f"missing (block_order names {expected!r} but there is no entry for it)")
        raw = raw_blocks[i]
        if raw.get("name") != expected:
            raise _error(f"{path}.name", f"is {raw.get('name')!r} but block_order has {expected!r} at this position")
        spec = convert(raw.get("spec"), _Spec, error=_error, path=f"{path}.spec")
        if spec.name != expected:
            raise _error(f"{path}.spec.name", f"is {spec.name!r}, expected {expected!r}")
        choices_raw = convert(raw.get("choices"), dict[str, Any], error=_error, path=f"{path}.choices")
        if ORIGINAL not in choices_raw:
            raise _error(f"{path}.choices", f"missing the original choice {ORIGINAL!r} (every block has it)")
        if not spec.scalable and len(choices_raw) != 1:
            raise _error(f"{path}.choices", f"a non-scalable block has only {ORIGINAL!r}, got {sorted(choices_raw)}")
        choices = {}
        for cid, c in choices_raw.items():
            where = f"{path}.choices[{cid!r}]"
            choice = convert(c, ChoiceProfile, error=_error, path=where)
            if choice.id != cid:
                raise _error(f"{where}.id", f"must equal its key {cid!r}, got {choice.id!r}")
            if cid == ORIGINAL and (choice.accuracy_drop != 0.0 or choice.accuracy_drop_raw != 0.0):
                raise _error(f"{where}.accuracy_drop", f"the original choice {ORIGINAL!r} must have drop exactly 0")
            if choice.latency.fingerprint not in fingerprints:
                raise _error(f"{where}.latency.fingerprint", f"{choice.latency.fingerprint!r} is not in the table's "
                             f"fingerprints ({sorted(fingerprints)})")
            choices[cid] = choice
        blocks.append(BlockProfile(name=expected, spec=dict(raw["spec"]), choices=choices))
    return blocks


def validate(data: Any) -> ProfileTable:
    """The table in `data` (its JSON form), checked; TableError names the first bad field."""
    if not isinstance(data, Mapping):
        raise TableError(f"(top level): expected a JSON object, got {type(data).__name__}")
    _check_schema_version(data)
    blocks = _blocks(data)
    table = convert({**data, "blocks": [], "schema_version": SCHEMA_VERSION}, ProfileTable, error=_error)
    table.blocks = blocks
    if not table.model_name:
        raise _error("model_name", "missing (a non-empty name)")
    if table.additivity is not None:
        convert(table.additivity, _Additivity, error=_error, path="additivity")
    if table.calibration is not None:
        cal = convert(table.calibration, _Calibration, error=_error, path="calibration")
        missing = [n for n in table.block_names if n not in cal.block_weights]
        if missing:
            raise _error(f"calibration.block_weights.{missing[0]}", "missing")
    if table.latency_calibration is not None:
        fit = convert(table.latency_calibration, _LatencyFit, error=_error, path="latency_calibration")
        if fit.fingerprint not in table.fingerprints:
            raise _error("latency_calibration.fingerprint", f"{fit.fingerprint!r} is not in fingerprints "
                         f"({sorted(table.fingerprints)}); the fit must name the host it timed")
    for i, v in enumerate(table.verified):
        convert(v, _Verified, error=_error, path=f"verified[{i}]")
    for i, m in enumerate(table.measured):
        try:
            table.normalize_selection(list(m.selection))
        except ValueError as exc:
            raise _error(f"measured[{i}].selection", str(exc)) from None
    return table


# --------------------------------------------------------------------------- files


def save(table: ProfileTable, path: str | Path) -> Path:
    """Validate and write `table` as JSON atomically (`legoblocks.files.write_atomic`).

    A reader never sees a half-written table, and an invalid one is never written.
    """
    data = table.to_dict()
    validate(data)
    try:
        text = json.dumps(data, indent=1, allow_nan=False)
    except ValueError as exc:
        raise TableError(f"a value is not finite ({exc}); re-profile") from None
    return write_atomic(path, text + "\n")


def load(path: str | Path) -> ProfileTable:
    """Read and validate a table; TableError names the file and the exact bad field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TableError(f"{path}: no such file (write one with `legodnn profile ... --out {path}`)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TableError(f"{path}: cannot read it ({exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TableError(f"{path}: not valid JSON ({exc}); the file is corrupt, re-create it") from None
    try:
        return validate(data)
    except TableError as exc:
        raise TableError(f"{path}: {exc}") from None
