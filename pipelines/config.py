"""The pipeline's configuration: YAML in, validated typed dataclasses out.

A typo in a config file must fail before any work starts, with the key path and what was
expected ("retrain.lr: expected a number, got 'fast'"), because a multi-hour cluster job
that silently ignores `retrian:` is worse than no job. The embedded defaults
(`pipelines/defaults.yaml`) are a complete config; a user's file overrides them key by key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Union

import yaml

from legoblocks.joint import JointConfig as TrainerJointConfig
from legoblocks.retrain import RetrainConfig as TrainerRetrainConfig


class ConfigError(ValueError):
    """A config file or value is invalid; the message names the key path and the fix."""


@dataclass
class ModelConfig:
    """Which network to make scalable. `options` are extra zoo keyword arguments (e.g. width)."""

    ref: str = "resnet20"
    checkpoint: str | None = None
    in_channels: int = 1
    num_classes: int = 10
    input_size: int = 28
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Fashion-MNIST subsets: train feeds teacher and retraining, val the accuracy profile."""

    dir: str = "/usr/share/datasets/fashion-mnist"
    train_size: int = 2000
    val_size: int = 500
    test_size: int = 1000
    seed: int = 0


@dataclass
class TeacherConfig:
    """Used only when no checkpoint is given: the pipeline then trains the teacher itself."""

    epochs: int = 2
    lr: float = 0.05
    batch_size: int = 64
    weight_decay: float = 5e-4
    seed: int = 0


@dataclass
class BlocksConfig:
    target_blocks: int | None = None


@dataclass
class DescendConfig:
    ladder: list[float] = field(default_factory=lambda: [0.0, 0.2, 0.4, 0.6, 0.8])
    importance: str = "magnitude"


@dataclass
class RetrainConfig(TrainerRetrainConfig):
    """Per-block distillation: the fields of `legoblocks.retrain.RetrainConfig`, inherited
    (a field added there is accepted here without an edit), plus `io_batch_size`, the batch
    of the one frozen-teacher pass that records every block's inputs and outputs."""

    io_batch_size: int = 256


@dataclass
class JointConfig(TrainerJointConfig):
    """The composition-aware joint stage as a Ray Train job.

    Every training field (with its type, default and `validate` rules) is inherited from
    `legoblocks.joint.JointConfig`, so a field added there is accepted, type-checked and
    validated in the YAML file without an edit here; `pipelines/defaults.yaml` sets the
    pipeline's own values. The fields below say how the pipeline runs the stage.
    """

    enabled: bool = True
    num_workers: int = 1
    checkpoint_every: int = 50


@dataclass
class ProfileConfig:
    envs: int = 2
    latency_batch_size: int = 1
    latency_warmup: int = 3
    latency_repeats: int = 10
    latency_threads: int = 1
    additivity_n: int = 4
    calibration_k: int = 8
    latency_calibration_k: int = 6
    bn_recalibration_batches: int = 0
    verify_top_k: int = 5
    verify_budgets: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    seed: int = 0


@dataclass
class PublishConfig:
    """Where the bundle goes. `store` None means file://<workdir>/bundles."""

    enabled: bool = True
    store: str | None = None
    key: str | None = None
    model_id: str | None = None


@dataclass
class RayConfig:
    """`address` None means: RAY_ADDRESS if set, else a local Ray on 127.0.0.1."""

    address: str | None = None
    num_cpus: float = 1.0
    max_retries: int = 3
    scheduling: str = "DEFAULT"
    local_num_cpus: int | None = None


@dataclass
class MlflowConfig:
    """`tracking_uri` None means MLFLOW_TRACKING_URI if set, else sqlite in the workdir."""

    tracking_uri: str | None = None
    experiment: str = "legodnn"


@dataclass
class PipelineConfig:
    workdir: str = ".legodnn"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    blocks: BlocksConfig = field(default_factory=BlocksConfig)
    descend: DescendConfig = field(default_factory=DescendConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    joint: JointConfig = field(default_factory=JointConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def section(self, name: str) -> dict[str, Any]:
        """One section as a plain dict: what cache keys hash and tasks receive."""
        return dataclasses.asdict(getattr(self, name))


# Value rules beyond types: (path, predicate, what is expected).
_RULES: list[tuple[str, typing.Callable[[Any], bool], str]] = [
    ("data.train_size", lambda v: v > 0, "a positive integer"),
    ("data.val_size", lambda v: v > 0, "a positive integer"),
    ("data.test_size", lambda v: v > 0, "a positive integer"),
    ("teacher.epochs", lambda v: v > 0, "a positive integer"),
    ("teacher.lr", lambda v: v > 0, "a positive number"),
    ("teacher.batch_size", lambda v: v > 0, "a positive integer"),
    ("blocks.target_blocks", lambda v: v is None or v > 0, "a positive integer or null"),
    ("descend.ladder", lambda v: len(v) > 0 and all(0.0 <= s < 1.0 for s in v), "a non-empty list of sparsities in [0, 1)"),
    ("descend.importance", lambda v: v in ("magnitude", "l1", "bn_scale", "random"), "one of magnitude, l1, bn_scale, random"),
    ("retrain.epochs", lambda v: v > 0, "a positive integer"),
    ("retrain.lr", lambda v: v > 0, "a positive number"),
    ("retrain.batch_size", lambda v: v > 0, "a positive integer"),
    ("retrain.weight_decay", lambda v: v >= 0, "a number >= 0"),
    ("retrain.limit", lambda v: v is None or v > 0, "a positive integer or null"),
    ("retrain.val_fraction", lambda v: 0.0 <= v < 1.0, "a fraction in [0, 1)"),
    ("joint.num_workers", lambda v: v >= 1, "an integer >= 1"),
    ("joint.checkpoint_every", lambda v: v >= 1, "an integer >= 1"),
    ("profile.envs", lambda v: v >= 1, "an integer >= 1"),
    ("profile.latency_repeats", lambda v: v >= 1, "an integer >= 1"),
    ("profile.latency_threads", lambda v: v >= 1, "an integer >= 1"),
    ("profile.latency_calibration_k", lambda v: v == 0 or v >= 3, "0 (off) or an integer >= 3"),
    ("profile.verify_top_k", lambda v: v >= 0, "an integer >= 0 (0 turns measured re-ranking off)"),
    ("profile.verify_budgets", lambda v: all(0.0 <= f <= 1.0 for f in v), "fractions in [0, 1]"),
    ("ray.num_cpus", lambda v: v > 0, "a positive number"),
    ("ray.max_retries", lambda v: v >= 0, "an integer >= 0"),
    ("ray.scheduling", lambda v: v in ("DEFAULT", "SPREAD"), "DEFAULT or SPREAD"),
    ("ray.local_num_cpus", lambda v: v is None or v >= 1, "an integer >= 1 or null"),
    ("mlflow.experiment", lambda v: bool(v.strip()), "a non-empty experiment name"),
    ("workdir", lambda v: bool(v.strip()), "a non-empty path"),
]


def _describe(value: Any) -> str:
    return repr(value) if not isinstance(value, (dict, list)) else type(value).__name__


def _check_value(path: str, tp: Any, value: Any) -> Any:
    """Coerce-free type check of one leaf; returns the value (ints accepted as floats)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        errors = []
        for arg in non_none:
            try:
                return _check_value(path, arg, value)
            except ConfigError as exc:
                errors.append(str(exc))
        if len(errors) == 1 and type(None) not in args:
            raise ConfigError(errors[0])
        raise ConfigError(
            f"{path}: expected {' or '.join(_type_name(a) for a in non_none)}"
            f"{' or null' if type(None) in args else ''}, got {_describe(value)}"
        )
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {_describe(value)}")
        return [_check_value(f"{path}[{i}]", item_tp, v) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{path}: expected a mapping of names to values, got {_describe(value)}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {_describe(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {_describe(value)}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    raise TypeError(f"config type {tp!r} at {path} is not supported")  # a bug in this module


def _type_name(tp: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if tp in names:
        return names[tp]
    if typing.get_origin(tp) is list:
        return "a list"
    return "a mapping"


def _build(cls: type, data: Any, path: str) -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    where = path or "the config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            full = f"{path}.{key}" if path else str(key)
            raise ConfigError(f"{full}: unknown key; valid keys here are: {', '.join(sorted(known))}")
    values = {}
    for f in dataclasses.fields(cls):
        full = f"{path}.{f.name}" if path else f.name
        if f.name in data:
            values[f.name] = _check_value(full, hints[f.name], data[f.name])
    return cls(**values)


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: sections merge key by key, leaves (incl. lists) replace."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "options":
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _get(data: dict[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        node = node[part]
    return node


def validate(cfg: PipelineConfig) -> PipelineConfig:
    """Check value ranges and cross-field rules; raises ConfigError naming the key."""
    data = cfg.to_dict()
    for dotted, ok, expected in _RULES:
        value = _get(data, dotted)
        if not ok(value):
            raise ConfigError(f"{dotted}: expected {expected}, got {_describe(value)}")
    if 0.0 not in cfg.descend.ladder:
        raise ConfigError("descend.ladder: must contain 0.0 (the untouched original block)")
    if len(set(cfg.descend.ladder)) != len(cfg.descend.ladder):
        raise ConfigError(f"descend.ladder: sparsities must be distinct, got {cfg.descend.ladder}")
    try:
        cfg.joint.validate()  # the trainer's own rules, so they cannot drift from this file
    except ValueError as exc:
        raise ConfigError(f"joint: {exc}") from exc
    return cfg


def default_dict() -> dict[str, Any]:
    """The embedded defaults (pipelines/defaults.yaml) as a plain mapping."""
    text = resources.files("pipelines").joinpath("defaults.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text) or {}


def from_dict(data: dict[str, Any], *, with_defaults: bool = True) -> PipelineConfig:
    """Validate `data` (merged over the embedded defaults)."""
    if with_defaults:
        defaults = default_dict()
        model = data.get("model")
        # The default model's options (e.g. width) belong to the default model only.
        if isinstance(model, dict) and "ref" in model and "options" not in model:
            defaults.get("model", {})["options"] = {}
        merged = _merge(defaults, data)
    else:
        merged = data
    return validate(_build(PipelineConfig, merged, ""))


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a file, with the file named in every error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping of sections, got {_describe(data)}")
    return data


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Defaults <- YAML file <- overrides (a nested mapping, e.g. from CLI flags)."""
    data = read_yaml(path) if path is not None else {}
    if overrides:
        data = _merge(data, overrides)
    try:
        return from_dict(data)
    except ConfigError as exc:
        if path is not None:
            raise ConfigError(f"{path}: {exc}") from exc
        raise


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """data['a']['b'] = value for 'a.b', creating sections as needed (CLI overrides)."""
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def dump_yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)
