"""The pipeline's configuration: YAML in, validated typed dataclasses out.

A typo in a config file must fail before any work starts, with the key path and what was
expected ("retrain.lr: expected a number, got a string"), because a multi-hour cluster job
that silently ignores `retrian:` is worse than no job. The dataclasses below are the one
source of the defaults; `pipelines/defaults.yaml` shows the same values with comments (a test
keeps the two equal). A user's file overrides them key by key, and `--set KEY=VALUE` flags
override the file.

Types and value ranges are checked by `legoblocks.schema` (msgspec) against the annotations
here; unknown keys are reported with the keys that are valid at that place; rules that span
fields (the ladder holds 0.0, the joint stage's own rules) are checked in `validate`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from msgspec import Meta

from legoblocks.joint import JointConfig as TrainerJointConfig
from legoblocks.retrain import RetrainConfig as TrainerRetrainConfig
from legoblocks.schema import NonNegativeInt, PositiveInt, convert
from profiling.serving import HELD_OUT_FRACTION

Fraction = Annotated[float, Meta(ge=0.0, le=1.0)]
PositiveNumber = Annotated[float, Meta(gt=0.0)]
NonEmpty = Annotated[str, Meta(min_length=1, pattern=r"\S")]


class ConfigError(ValueError):
    """A config file or value is invalid; the message names the key path and the fix."""


def _config_error(path: str, message: str) -> ConfigError:
    return ConfigError(f"{path}: {message}" if path else message)


@dataclass
class ModelConfig:
    """Which network to make scalable. `options` are extra zoo keyword arguments (e.g. width)."""

    ref: NonEmpty = "resnet20"
    checkpoint: str | None = None
    in_channels: PositiveInt = 1
    num_classes: PositiveInt = 10
    input_size: PositiveInt = 28
    options: dict[str, Any] = field(default_factory=lambda: {"width": 8})

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.input_size, self.input_size)


@dataclass
class DataConfig:
    """Where the images come from and how they become the model's input.

    `source`: "fashion-mnist" (the IDX files in `dir`), "imagefolder" (`dir` holds
    train/<class>/*.png and optionally val/ and test/; a local path or s3://bucket/prefix) or
    "factory" (`factory` = package.module:fn or file.py:fn returning torch Datasets). Sizes are
    seeded, disjoint subsets (None: all that is left); `check_size` images are held out of
    training, profiling and choosing (prediction checks). `mean`/`std` None: Fashion-MNIST's
    own, computed once over training images for a folder (cached). `resize` is the shorter
    side before the center crop (None: model.input_size); `augment` None: on for image folders.
    `workers` None: 0 for Fashion-MNIST, 2 otherwise. `cache_dir` None: ~/.cache/legodnn/data.
    """

    source: Literal["fashion-mnist", "imagefolder", "factory"] = "fashion-mnist"
    dir: str = "/usr/share/datasets/fashion-mnist"
    factory: str | None = None
    train_size: PositiveInt | None = 8000
    val_size: PositiveInt = 10000
    test_size: PositiveInt | None = 10000
    check_size: NonNegativeInt = 0
    seed: int = 0
    mean: list[float] | None = None
    std: list[float] | None = None
    resize: PositiveInt | None = None
    augment: bool | None = None
    workers: NonNegativeInt | None = None
    cache_dir: str | None = None


@dataclass
class TeacherConfig:
    """Used only when no checkpoint is given: the pipeline then trains the teacher itself."""

    epochs: PositiveInt = 4
    lr: PositiveNumber = 0.05
    batch_size: PositiveInt = 64
    weight_decay: Annotated[float, Meta(ge=0.0)] = 5e-4
    seed: int = 0


@dataclass
class BlocksConfig:
    target_blocks: PositiveInt | None = None


@dataclass
class DescendConfig:
    ladder: list[Annotated[float, Meta(ge=0.0, lt=1.0)]] = field(default_factory=lambda: [0.0, 0.2, 0.4, 0.6, 0.8])
    importance: Literal["magnitude", "l1", "bn_scale", "random"] = "magnitude"


@dataclass
class RetrainConfig(TrainerRetrainConfig):
    """Per-block distillation: the fields of `legoblocks.retrain.RetrainConfig`, inherited
    (a field added there is accepted here without an edit), plus the one frozen-teacher pass
    that records every block's inputs and outputs: its batch (`io_batch_size`), and how many
    training images it records (a seeded sample): at most `io_limit`, and no more than fit in
    `io_memory_mb` for all blocks together (so larger images record fewer)."""

    epochs: int = 2
    io_batch_size: PositiveInt = 256
    io_limit: PositiveInt | None = 10000
    io_memory_mb: PositiveInt = 1024

    def trainer(self) -> TrainerRetrainConfig:
        """The library's own config: every field of `legoblocks.retrain.RetrainConfig`."""
        return TrainerRetrainConfig(**_fields_of(TrainerRetrainConfig, self))


@dataclass
class JointConfig(TrainerJointConfig):
    """The composition-aware joint stage as a Ray Train job.

    Every training field (with its type, default and `validate` rules) is inherited from
    `legoblocks.joint.JointConfig`, so a field added there is accepted, type-checked and
    validated in the YAML file without an edit here. The pipeline's own defaults differ where
    set below; the last three fields say how the pipeline runs the stage.
    """

    steps: int = 250
    lr: float = 5e-4
    batch_size: int = 64
    enabled: bool = True
    num_workers: PositiveInt = 1
    checkpoint_every: PositiveInt = 50

    def trainer(self) -> TrainerJointConfig:
        """The library's own config: every field of `legoblocks.joint.JointConfig`."""
        return TrainerJointConfig(**_fields_of(TrainerJointConfig, self))


@dataclass
class ProfileConfig:
    """How descendants are measured. `held_out_fraction` of the validation split chooses
    nothing: what a served composition is told is measured there (`profiling.serving`)."""

    envs: PositiveInt = 1
    latency_batch_size: PositiveInt = 8
    latency_warmup: NonNegativeInt = 3
    latency_repeats: PositiveInt = 15
    latency_threads: PositiveInt = 1
    additivity_n: NonNegativeInt = 4
    calibration_k: NonNegativeInt = 6
    latency_calibration_k: NonNegativeInt = 6
    bn_recalibration_batches: NonNegativeInt = 0
    verify_top_k: NonNegativeInt = 5
    verify_budgets: list[Fraction] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    verify_metric: Literal["latency", "flops"] = "latency"
    held_out_fraction: Annotated[float, Meta(ge=0.0, lt=1.0)] = HELD_OUT_FRACTION
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
    num_cpus: PositiveNumber = 1.0
    max_retries: NonNegativeInt = 3
    scheduling: Literal["DEFAULT", "SPREAD"] = "DEFAULT"
    local_num_cpus: PositiveInt | None = None


@dataclass
class MlflowConfig:
    """`tracking_uri` None means MLFLOW_TRACKING_URI if set, else sqlite in the workdir."""

    tracking_uri: str | None = None
    experiment: NonEmpty = "legodnn"


@dataclass
class PipelineConfig:
    workdir: NonEmpty = ".legodnn"
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


def _fields_of(cls: type, obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(cls)}


def _check_keys(cls: type, data: Any, path: str) -> None:
    """Reject keys the dataclass does not have, naming the valid ones at that place."""
    if not isinstance(data, dict):
        return  # the type check reports it, with the path
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise ConfigError(f"{full}: unknown key; valid keys here are: {', '.join(sorted(fields))}")
        default = fields[key].default_factory() if fields[key].default_factory is not dataclasses.MISSING else fields[key].default  # type: ignore[misc]
        if dataclasses.is_dataclass(default):
            _check_keys(type(default), value, full)


def validate(cfg: PipelineConfig) -> PipelineConfig:
    """Rules across fields; raises ConfigError naming the key."""
    if 0.0 not in cfg.descend.ladder:
        raise ConfigError("descend.ladder: must contain 0.0 (the untouched original block)")
    if len(set(cfg.descend.ladder)) != len(cfg.descend.ladder):
        raise ConfigError(f"descend.ladder: sparsities must be distinct, got {cfg.descend.ladder}")
    for name, section in (("retrain", cfg.retrain.trainer()), ("joint", cfg.joint.trainer())):
        try:
            section.validate()  # the trainer's own rules, so they cannot drift from this file
        except ValueError as exc:
            raise ConfigError(f"{name}: {exc}") from exc
    return cfg


def default_dict() -> dict[str, Any]:
    """The embedded defaults as a plain mapping (the dataclass defaults)."""
    return PipelineConfig().to_dict()


def defaults_yaml() -> dict[str, Any]:
    """`pipelines/defaults.yaml`: the commented copy of the defaults users read."""
    text = resources.files("pipelines").joinpath("defaults.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text) or {}


def from_dict(data: dict[str, Any]) -> PipelineConfig:
    """Validate `data` (a partial config) over the defaults."""
    if not isinstance(data, dict):
        raise ConfigError(f"the config: expected a mapping of sections, got {type(data).__name__}")
    _check_keys(PipelineConfig, data, "")
    merged = merge_config(default_dict(), data)
    model = data.get("model")
    # The default model's options (e.g. width) belong to the default model only.
    if isinstance(model, dict) and model.get("ref", ModelConfig.ref) != ModelConfig.ref and "options" not in model:
        merged["model"]["options"] = {}
    return validate(convert(merged, PipelineConfig, error=_config_error))


def merge_config(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: sections merge key by key, leaves (incl. lists and model options) replace."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "options":
            out[key] = merge_config(out[key], value)
        else:
            out[key] = value
    return out


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
        raise ConfigError(f"config file {path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Defaults <- YAML file <- overrides (a nested mapping, e.g. from CLI flags)."""
    data = read_yaml(path) if path is not None else {}
    if overrides:
        data = merge_config(data, overrides)
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
