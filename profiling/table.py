"""The ProfileTable: everything the optimizer needs to know about one scalable model.

One versioned JSON file per model. It is the hand-off between the offline pipeline and
every optimizer (server side and device side), so `load()` trusts nothing: it checks the
schema version, the block order against the entries, and every value, and names the exact
field that is wrong ("blocks[3].choices['0.4'].flops: missing") so a broken file is fixed
at its source instead of producing a silently wrong selection.

Units: accuracies and drops are fractions in [0, 1] (not percent); bytes are bytes; FLOPs
are FLOPs (2 per multiply-add); latencies are milliseconds.

Schema history: 1 had one accuracy drop per choice; 2 carries the raw drop and the
calibrated one (`accuracy_drop`, what the optimizer uses) plus the calibration figures.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from legoblocks.choices import ORIGINAL
from legoblocks.files import write_atomic
from profiling.latency_fit import LatencyCalibration

SCHEMA_VERSION = 2

_COST_FIELDS = ("params", "weight_bytes", "flops", "activation_bytes", "peak_bytes")
_LATENCY_FIELDS = ("median_ms", "p10_ms", "p90_ms", "cv")
_SPEC_FIELDS = ("name", "in_shape", "out_shape", "params", "flops", "scalable")


class TableError(ValueError):
    """A ProfileTable is malformed; the message starts with the path of the bad field."""


@dataclass(frozen=True)
class LatencyColumn:
    """One descendant's latency on one host (ms); `fingerprint` keys the table's fingerprints."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    cv: float
    fingerprint: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "median_ms": self.median_ms,
            "p10_ms": self.p10_ms,
            "p90_ms": self.p90_ms,
            "cv": self.cv,
            "fingerprint": self.fingerprint,
        }


@dataclass(frozen=True)
class ChoiceProfile:
    """One descendant of one block: its costs, accuracy drops and latency.

    accuracy_drop is what the optimizer uses: the calibrated drop when the table was
    calibrated, else equal to accuracy_drop_raw (the mean single-swap drop over the
    environments). Drops may be slightly negative: a swap can gain accuracy within noise.
    """

    id: str
    sparsity: float
    params: int
    weight_bytes: int
    flops: int
    activation_bytes: int
    peak_bytes: int
    accuracy_drop: float
    accuracy_drop_raw: float
    latency: LatencyColumn

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "sparsity": self.sparsity,
            "params": self.params,
            "weight_bytes": self.weight_bytes,
            "flops": self.flops,
            "activation_bytes": self.activation_bytes,
            "peak_bytes": self.peak_bytes,
            "accuracy_drop": self.accuracy_drop,
            "accuracy_drop_raw": self.accuracy_drop_raw,
            "latency": self.latency.to_dict(),
        }


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
        return {
            "name": self.name,
            "spec": dict(self.spec),
            "choices": {cid: c.to_dict() for cid, c in self.choices.items()},
        }


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
    the host named by its `fingerprint` (`to_problem` applies it to this table's medians).
    verified: measured top-k winners per budget grid point, each {budget, selection,
    measured_accuracy} (issue 11 item 4; written by the pipeline).
    settings: how the table was made (seed, validation size, latency settings, ...).
    """

    model_ref: str
    model_name: str
    input_shape: tuple[int, ...]
    teacher_accuracy: float
    blocks: list[BlockProfile]
    fingerprints: dict[str, dict[str, Any]]
    environments: list[dict[str, Any]] = field(default_factory=list)
    additivity: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    latency_calibration: dict[str, Any] | None = None
    bn_recalibration_batches: int = 0
    verified: list[dict[str, Any]] = field(default_factory=list)
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

    def normalize_selection(self, selection: Sequence[str] | Mapping[str, str]) -> list[str]:
        """A selection as a list in block order; accepts a list or a {block: choice} dict."""
        names = self.block_names
        if isinstance(selection, Mapping):
            unknown = sorted(set(selection) - set(names))
            missing = [n for n in names if n not in selection]
            if unknown or missing:
                raise ValueError(
                    f"selection for {self.model_name!r} must name every block exactly: "
                    f"unknown {unknown}, missing {missing}"
                )
            chosen = [str(selection[n]) for n in names]
        else:
            chosen = [str(c) for c in selection]
            if len(chosen) != len(names):
                raise ValueError(
                    f"selection for {self.model_name!r} has {len(chosen)} choices but the model "
                    f"has {len(names)} blocks ({names})"
                )
        for name, cid in zip(names, chosen):
            if cid not in self.block(name).choices:
                raise ValueError(
                    f"selection for {self.model_name!r}: block {name!r} has no choice {cid!r}; "
                    f"choices: {list(self.block(name).choices)}"
                )
        return chosen

    def predicted_accuracy(self, selection: Sequence[str] | Mapping[str, str], *, raw: bool = False) -> float:
        """Teacher accuracy minus the summed (calibrated, or raw) drops of `selection`."""
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
            "schema_version": self.schema_version,
            "model_ref": self.model_ref,
            "model_name": self.model_name,
            "input_shape": list(self.input_shape),
            "teacher_accuracy": self.teacher_accuracy,
            "block_order": self.block_names,
            "blocks": [b.to_dict() for b in self.blocks],
            "fingerprints": {k: dict(v) for k, v in self.fingerprints.items()},
            "environments": [dict(e) for e in self.environments],
            "additivity": self.additivity,
            "calibration": self.calibration,
            "latency_calibration": self.latency_calibration,
            "bn_recalibration_batches": self.bn_recalibration_batches,
            "verified": [dict(v) for v in self.verified],
            "settings": dict(self.settings),
            "created": self.created,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProfileTable:
        """Validate `data` (see `validate`) and build the table; raises TableError."""
        validate(data)
        blocks = []
        for raw in data["blocks"]:
            choices = {}
            for cid, c in raw["choices"].items():
                lat = c["latency"]
                choices[cid] = ChoiceProfile(
                    id=cid,
                    sparsity=float(c["sparsity"]),
                    **{k: int(c[k]) for k in _COST_FIELDS},
                    accuracy_drop=float(c["accuracy_drop"]),
                    accuracy_drop_raw=float(c["accuracy_drop_raw"]),
                    latency=LatencyColumn(
                        **{k: float(lat[k]) for k in _LATENCY_FIELDS}, fingerprint=str(lat["fingerprint"])
                    ),
                )
            blocks.append(BlockProfile(name=raw["name"], spec=dict(raw["spec"]), choices=choices))
        return cls(
            model_ref=data["model_ref"],
            model_name=data["model_name"],
            input_shape=tuple(int(d) for d in data["input_shape"]),
            teacher_accuracy=float(data["teacher_accuracy"]),
            blocks=blocks,
            fingerprints={k: dict(v) for k, v in data["fingerprints"].items()},
            environments=[dict(e) for e in data.get("environments") or []],
            additivity=data.get("additivity"),
            calibration=data.get("calibration"),
            latency_calibration=data.get("latency_calibration"),
            bn_recalibration_batches=int(data.get("bn_recalibration_batches") or 0),
            verified=[dict(v) for v in data.get("verified") or []],
            settings=dict(data.get("settings") or {}),
            created=str(data.get("created") or ""),
            schema_version=int(data["schema_version"]),
        )


# --------------------------------------------------------------------------- validation


def _fail(path: str, problem: str) -> TableError:
    return TableError(f"{path}: {problem}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _number(obj: Mapping[str, Any], key: str, path: str, *, minimum: float | None = 0.0,
            maximum: float | None = None, integer: bool = False) -> float:
    """The value at obj[key], checked present, numeric, finite and within bounds."""
    where = f"{path}.{key}" if path else key
    if key not in obj or obj[key] is None:
        raise _fail(where, "missing")
    v = obj[key]
    if not _is_number(v):
        raise _fail(where, f"expected a number, got {v!r}")
    if math.isnan(v):
        raise _fail(where, "NaN is not allowed (the measurement failed; re-profile this block)")
    if math.isinf(v):
        raise _fail(where, "infinite values are not allowed")
    if integer and float(v) != int(v):
        raise _fail(where, f"expected an integer, got {v!r}")
    if minimum is not None and v < minimum:
        raise _fail(where, f"must be >= {minimum}, got {v!r}")
    if maximum is not None and v > maximum:
        raise _fail(where, f"must be <= {maximum}, got {v!r}")
    return float(v)


def _mapping(obj: Mapping[str, Any], key: str, path: str) -> Mapping[str, Any]:
    if key not in obj or obj[key] is None:
        raise _fail(f"{path}.{key}" if path else key, "missing")
    v = obj[key]
    if not isinstance(v, Mapping):
        raise _fail(f"{path}.{key}" if path else key, f"expected an object, got {type(v).__name__}")
    return v


def _string(obj: Mapping[str, Any], key: str, path: str, *, allow_empty: bool = False) -> str:
    where = f"{path}.{key}" if path else key
    if key not in obj or obj[key] is None:
        raise _fail(where, "missing")
    v = obj[key]
    if not isinstance(v, str) or (not allow_empty and not v):
        raise _fail(where, f"expected a non-empty string, got {v!r}")
    return v


def _shape(obj: Mapping[str, Any], key: str, path: str) -> None:
    where = f"{path}.{key}" if path else key
    v = obj.get(key)
    if v is None:
        raise _fail(where, "missing")
    if not isinstance(v, (list, tuple)) or not v or not all(
        isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in v
    ):
        raise _fail(where, f"expected a non-empty list of positive integers, got {v!r}")


def _check_schema_version(data: Mapping[str, Any]) -> None:
    version = data.get("schema_version")
    if version is None:
        raise _fail("schema_version", f"missing (this code reads schema version {SCHEMA_VERSION}; "
                    "is this a ProfileTable written by `legodnn profile`?)")
    if version != SCHEMA_VERSION:
        hint = (
            "version 1 tables carry no calibrated drops; " if version == 1 else ""
        )
        raise _fail(
            "schema_version",
            f"the table has schema version {version!r} but this code reads version "
            f"{SCHEMA_VERSION}; {hint}re-create it with `legodnn profile` (or the pipeline's "
            "profile stage) using this version of legodnn",
        )


def _check_choice(c: Any, path: str, cid: str, fingerprints: Mapping[str, Any]) -> None:
    if not isinstance(c, Mapping):
        raise _fail(path, f"expected an object, got {type(c).__name__}")
    if c.get("id") != cid:
        raise _fail(f"{path}.id", f"must equal its key {cid!r}, got {c.get('id')!r}")
    _number(c, "sparsity", path, minimum=0.0, maximum=1.0)
    for key in _COST_FIELDS:
        _number(c, key, path, integer=True)
    for key in ("accuracy_drop", "accuracy_drop_raw"):
        drop = _number(c, key, path, minimum=-1.0, maximum=1.0)
        if cid == ORIGINAL and drop != 0.0:
            raise _fail(f"{path}.{key}", f"the original choice {ORIGINAL!r} must have drop exactly 0, got {drop!r}")
    lat = _mapping(c, "latency", path)
    for key in _LATENCY_FIELDS:
        _number(lat, key, f"{path}.latency")
    fp = lat.get("fingerprint")
    if not isinstance(fp, str) or not fp:
        raise _fail(f"{path}.latency.fingerprint", "missing (every latency column names the host it was measured on)")
    if fp not in fingerprints:
        raise _fail(f"{path}.latency.fingerprint", f"{fp!r} is not in the table's fingerprints ({sorted(fingerprints)})")


def _check_block(block: Any, path: str, expected_name: str, fingerprints: Mapping[str, Any]) -> None:
    if not isinstance(block, Mapping):
        raise _fail(path, f"expected an object, got {type(block).__name__}")
    name = _string(block, "name", path)
    if name != expected_name:
        raise _fail(f"{path}.name", f"is {name!r} but block_order has {expected_name!r} at this position")
    spec = _mapping(block, "spec", path)
    for key in _SPEC_FIELDS:
        if key not in spec:
            raise _fail(f"{path}.spec.{key}", "missing")
    if spec["name"] != name:
        raise _fail(f"{path}.spec.name", f"is {spec['name']!r}, expected {name!r}")
    _shape(spec, "in_shape", f"{path}.spec")
    _shape(spec, "out_shape", f"{path}.spec")
    choices = _mapping(block, "choices", path)
    if ORIGINAL not in choices:
        raise _fail(f"{path}.choices", f"missing the original choice {ORIGINAL!r} (every block has it)")
    if not spec["scalable"] and len(choices) != 1:
        raise _fail(f"{path}.choices", f"a non-scalable block has only {ORIGINAL!r}, got {sorted(choices)}")
    for cid, c in choices.items():
        _check_choice(c, f"{path}.choices[{cid!r}]", cid, fingerprints)


def _check_additivity(report: Any) -> None:
    if report is None:
        return
    if not isinstance(report, Mapping):
        raise _fail("additivity", f"expected an object or null, got {type(report).__name__}")
    _number(report, "mae", "additivity", maximum=1.0)
    _number(report, "max_error", "additivity", maximum=1.0)
    _number(report, "n", "additivity", integer=True)


def _check_calibration(cal: Any, order: Sequence[str]) -> None:
    if cal is None:
        return
    if not isinstance(cal, Mapping):
        raise _fail("calibration", f"expected an object or null, got {type(cal).__name__}")
    if cal.get("method") not in ("identity", "scale", "scale+flops", "ridge"):
        raise _fail("calibration.method",
                    f"expected 'identity', 'scale', 'scale+flops' or 'ridge', got {cal.get('method')!r}")
    _number(cal, "scale", "calibration")
    if cal.get("flops_weight") is not None:
        _number(cal, "flops_weight", "calibration")
    weights = _mapping(cal, "block_weights", "calibration")
    for name in order:
        _number(weights, name, "calibration.block_weights")
    for key in ("heldout_mae_raw", "heldout_max_raw", "heldout_mae_calibrated", "heldout_max_calibrated"):
        _number(cal, key, "calibration", maximum=1.0)
    _number(cal, "k", "calibration", integer=True)


def _check_latency_calibration(cal: Any, fingerprints: Mapping[str, Any]) -> None:
    if cal is None:
        return
    if not isinstance(cal, Mapping):
        raise _fail("latency_calibration", f"expected an object or null, got {type(cal).__name__}")
    if cal.get("method") not in ("identity", "scale", "affine"):
        raise _fail("latency_calibration.method",
                    f"expected 'identity', 'scale' or 'affine', got {cal.get('method')!r}")
    _number(cal, "scale", "latency_calibration", minimum=None)
    if not cal["scale"] > 0:
        raise _fail("latency_calibration.scale", f"must be > 0, got {cal['scale']}")
    _number(cal, "offset_ms", "latency_calibration")
    _number(cal, "k", "latency_calibration", integer=True)
    fp = _string(cal, "fingerprint", "latency_calibration")
    if fp not in fingerprints:
        raise _fail("latency_calibration.fingerprint",
                    f"{fp!r} is not in fingerprints ({sorted(fingerprints)}); the fit must name the host it timed")


def validate(data: Any) -> None:
    """Raise TableError naming the first bad field of a table in its JSON form."""
    if not isinstance(data, Mapping):
        raise TableError(f"(top level): expected a JSON object, got {type(data).__name__}")
    _check_schema_version(data)
    _string(data, "model_ref", "", allow_empty=True)
    _string(data, "model_name", "")
    _shape(data, "input_shape", "")
    _number(data, "teacher_accuracy", "", maximum=1.0)
    fingerprints = _mapping(data, "fingerprints", "")
    order = data.get("block_order")
    if not isinstance(order, list) or not order or not all(isinstance(n, str) and n for n in order):
        raise _fail("block_order", f"expected a non-empty list of block names, got {order!r}")
    if len(set(order)) != len(order):
        dup = sorted({n for n in order if order.count(n) > 1})
        raise _fail("block_order", f"duplicate block names {dup}")
    blocks = data.get("blocks")
    if not isinstance(blocks, list):
        raise _fail("blocks", "missing" if blocks is None else f"expected a list, got {type(blocks).__name__}")
    for i, name in enumerate(order):
        if i >= len(blocks):
            raise _fail(f"blocks[{i}]", f"missing (block_order names {name!r} but there is no entry for it)")
        _check_block(blocks[i], f"blocks[{i}]", name, fingerprints)
    if len(blocks) > len(order):
        raise _fail(f"blocks[{len(order)}]", f"not in block_order (block_order has {len(order)} blocks)")
    _check_additivity(data.get("additivity"))
    _check_calibration(data.get("calibration"), order)
    _check_latency_calibration(data.get("latency_calibration"), fingerprints)
    verified = data.get("verified") or []
    if not isinstance(verified, list):
        raise _fail("verified", f"expected a list, got {type(verified).__name__}")
    for i, v in enumerate(verified):
        if not isinstance(v, Mapping) or not {"budget", "selection", "measured_accuracy"} <= set(v):
            raise _fail(f"verified[{i}]", "expected an object with budget, selection and measured_accuracy")
        _number(v, "measured_accuracy", f"verified[{i}]", maximum=1.0)


# --------------------------------------------------------------------------- files


def save(table: ProfileTable, path: str | Path) -> Path:
    """Validate and write `table` as JSON atomically (`legoblocks.files.write_atomic`).

    A reader never sees a half-written table, and an invalid one is never written.
    """
    data = table.to_dict()
    validate(data)
    return write_atomic(path, json.dumps(data, indent=1, allow_nan=False) + "\n")


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
        return ProfileTable.from_dict(data)
    except TableError as exc:
        raise TableError(f"{path}: {exc}") from None


# --------------------------------------------------------------------------- optimizer input


def _override_for(
    latency_override: Mapping[Any, Any] | None, table: ProfileTable, several: bool
) -> Mapping[tuple[str, str], float] | None:
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


def even_selections(table: ProfileTable, budgets: Sequence[float]) -> list[list[str]]:
    """The even composition (`legoblocks.anchors`) of each FLOPs budget, a fraction of the
    original model's FLOPs, from the table's measured FLOPs: the anchors a joint stage trained
    for those budgets, as re-ranking candidates."""
    from legoblocks.anchors import even_selection

    flops = {b.name: {cid: c.flops for cid, c in b.choices.items()} for b in table.blocks}
    return [even_selection(flops, float(b), table.block_names) for b in budgets]


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
) -> dict[str, Any]:
    """The optimizer's JSON problem (see `optimizer.problem`) for one or several models.

    Per choice: accuracy_drop = the table's (calibrated) drop (it may be slightly negative;
    the optimizer accepts that);
    latency_ms = the table's median corrected by its latency calibration (see
    `ProfileTable.choice_latency_ms`; `raw_latency=True` uses the bare medians), or
    `latency_override[(block, choice)]` as given (for several tables
    `{model_name: {(block, choice): ms}}`), since a device measures its own and the
    table's correction belongs to the host that profiled it;
    memory_bytes = peak_bytes = weights + peak live activation at batch 1 (summing blocks
    is conservative: activations of different blocks are not alive together);
    load_bytes = weight_bytes (what a switch must load).
    `weights` and `deadlines` are keyed by model name (default weight 1, no deadline).
    """
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
                        raise ValueError(
                            f"latency_override for {table.model_name!r} lacks ({block.name!r}, {cid!r}); "
                            "it must cover every block and choice"
                        )
                    latency = float(override[(block.name, cid)])
                else:
                    latency = table.choice_latency_ms(block.name, cid, raw=raw_latency)
                choices.append(
                    {
                        "id": cid,
                        "accuracy_drop": c.accuracy_drop,
                        "latency_ms": latency,
                        "memory_bytes": c.peak_bytes,
                        "load_bytes": c.weight_bytes,
                    }
                )
            blocks.append({"name": block.name, "choices": choices})
        models.append(
            {
                "name": table.model_name,
                "weight": float((weights or {}).get(table.model_name, 1.0)),
                "base_accuracy": table.teacher_accuracy,
                "latency_deadline_ms": (deadlines or {}).get(table.model_name),
                "blocks": blocks,
            }
        )
    problem: dict[str, Any] = {
        "models": models,
        "budgets": {k: budgets.get(k) for k in ("latency_ms", "memory_bytes", "switch_bytes")},
        "switch_penalty_per_byte": float(switch_penalty_per_byte),
    }
    if current is not None:
        by_name = {t.model_name: t for t in table_list}
        problem["current"] = {name: by_name[name].normalize_selection(sel) for name, sel in current.items()}
    return problem
