"""The typed job of every stage: exactly the configuration its units read (and are keyed by).

Each stage's job is built from the `PipelineConfig` and the preflight `Facts` by one function
here. A stage function sees only its job, so a config value it does not receive cannot change
its output without changing its key. Fields marked `NOT_KEYED` (a path to content identified
by a hash, a thread count) travel to the unit but stay out of the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from legoblocks.joint import JointConfig as TrainerJointConfig
from legoblocks.retrain import RetrainConfig as TrainerRetrainConfig
from pipelines.config import PipelineConfig, TeacherConfig
from pipelines.data import DataRef, Preprocess
from pipelines.stage import NOT_KEYED
from profiling.profile import LatencySettings

# Grid of the Pareto points the summary and MLflow show, and the fractions of the latency
# range whose optimizer pick is measured on the test split.
PARETO_GRID = 9
MEASURE_FRACTIONS = (0.0, 1 / 3, 2 / 3, 1.0)
# Selections one accuracy unit evaluates: enough to amortize loading the model.
ACCURACY_CHUNK = 8


@dataclass(frozen=True)
class Facts:
    """What preflight derived from the config and the world before any work: how every unit
    opens the data (its fingerprint keys them) and what the bundle records about it."""

    data: DataRef
    classes: tuple[str, ...] = ()
    checkpoint_sha256: str | None = None
    model_name: str = "model"
    store: str | None = None
    key_path: str | None = None
    key_id: str | None = None
    tracking_uri: str | None = None


@dataclass(frozen=True)
class ModelSpec:
    """How to build the network (the checkpoint travels in the teacher job)."""

    ref: str
    in_channels: int
    num_classes: int
    input_size: int
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.input_size, self.input_size)


@dataclass(frozen=True)
class TeacherJob:
    model: ModelSpec
    data: DataRef
    teacher: TeacherConfig | None  # None when a checkpoint is given
    checkpoint_sha256: str | None
    checkpoint: str | None = field(default=None, metadata=NOT_KEYED)


@dataclass(frozen=True)
class DetectJob:
    model: ModelSpec
    target_blocks: int | None


@dataclass(frozen=True)
class DescendJob:
    ladder: list[float]
    importance: str


@dataclass(frozen=True)
class BlockIOJob:
    data: DataRef
    limit: int | None
    memory_mb: int
    batch_size: int
    seed: int


@dataclass(frozen=True)
class RetrainJob:
    retrain: TrainerRetrainConfig


@dataclass(frozen=True)
class AssembleJob:
    model_ref: str


@dataclass(frozen=True)
class JointJob:
    joint: TrainerJointConfig
    data: DataRef
    num_workers: int
    checkpoint_every: int = field(default=50, metadata=NOT_KEYED)
    threads: int = field(default=1, metadata=NOT_KEYED)
    storage: str = field(default="", metadata=NOT_KEYED)  # Ray Train's checkpoints (<workdir>/raytrain)


@dataclass(frozen=True)
class CostJob:
    latency: LatencySettings


@dataclass(frozen=True)
class ProfilePlanJob:
    """What the accuracy units and the table both need: environments, checks, seed."""

    envs: int
    additivity_n: int
    calibration_k: int
    seed: int


@dataclass(frozen=True)
class AccuracyJob:
    data: DataRef
    bn_recalibration_batches: int
    seed: int
    held_out_fraction: float


@dataclass(frozen=True)
class TableJob:
    plan: ProfilePlanJob
    data: DataRef
    latency: LatencySettings
    latency_calibration_k: int
    bn_recalibration_batches: int
    verify_top_k: int
    verify_budgets: list[float]
    verify_metric: str
    anchor_budgets: list[float]
    model_name: str
    held_out_fraction: float


@dataclass(frozen=True)
class PointsJob:
    data: DataRef
    grid: int = PARETO_GRID
    fractions: tuple[float, ...] = MEASURE_FRACTIONS


@dataclass(frozen=True)
class PublishJob:
    store: str
    key_id: str
    model_id: str
    preprocess: Preprocess  # what the bundle tells a device about preparing an image
    classes: tuple[str, ...]
    key_path: str = field(default="", metadata=NOT_KEYED)


# --------------------------------------------------------------------------- builders


def model_spec(cfg: PipelineConfig) -> ModelSpec:
    m = cfg.model
    return ModelSpec(m.ref, m.in_channels, m.num_classes, m.input_size, dict(m.options))


def data_ref(cfg: PipelineConfig, facts: Facts) -> DataRef:
    return facts.data


def latency_settings(cfg: PipelineConfig) -> LatencySettings:
    p = cfg.profile
    return LatencySettings(batch_size=p.latency_batch_size, warmup=p.latency_warmup,
                           repeats=p.latency_repeats, threads=p.latency_threads)


def teacher_job(cfg: PipelineConfig, facts: Facts) -> TeacherJob:
    checkpoint = cfg.model.checkpoint
    return TeacherJob(model_spec(cfg), data_ref(cfg, facts), None if checkpoint else cfg.teacher,
                      facts.checkpoint_sha256, checkpoint=checkpoint)


def detect_job(cfg: PipelineConfig, facts: Facts) -> DetectJob:
    return DetectJob(model_spec(cfg), cfg.blocks.target_blocks)


def descend_job(cfg: PipelineConfig, facts: Facts) -> DescendJob:
    return DescendJob(list(cfg.descend.ladder), cfg.descend.importance)


def blockio_job(cfg: PipelineConfig, facts: Facts) -> BlockIOJob:
    r = cfg.retrain
    return BlockIOJob(data_ref(cfg, facts), r.io_limit, r.io_memory_mb, r.io_batch_size, r.seed)


def retrain_job(cfg: PipelineConfig, facts: Facts) -> RetrainJob:
    return RetrainJob(cfg.retrain.trainer())


def assemble_job(cfg: PipelineConfig, facts: Facts) -> AssembleJob:
    return AssembleJob(cfg.model.ref)


def joint_job(cfg: PipelineConfig, facts: Facts) -> JointJob:
    j = cfg.joint
    return JointJob(j.trainer(), data_ref(cfg, facts), j.num_workers, checkpoint_every=j.checkpoint_every,
                    threads=max(1, int(cfg.ray.num_cpus)),
                    storage=str((Path(cfg.workdir) / "raytrain").resolve()))


def cost_job(cfg: PipelineConfig, facts: Facts) -> CostJob:
    return CostJob(latency_settings(cfg))


def plan_job(cfg: PipelineConfig) -> ProfilePlanJob:
    p = cfg.profile
    return ProfilePlanJob(p.envs, p.additivity_n, p.calibration_k, p.seed)


def accuracy_job(cfg: PipelineConfig, facts: Facts) -> AccuracyJob:
    p = cfg.profile
    return AccuracyJob(data_ref(cfg, facts), p.bn_recalibration_batches, p.seed, p.held_out_fraction)


def trained_budgets(cfg: PipelineConfig) -> list[float]:
    """The FLOPs budgets whose even composition the joint stage trains (when it runs)."""
    return cfg.joint.trainer().trained_budgets() if cfg.joint.enabled else []


def table_job(cfg: PipelineConfig, facts: Facts) -> TableJob:
    p = cfg.profile
    return TableJob(plan_job(cfg), data_ref(cfg, facts), latency_settings(cfg), p.latency_calibration_k,
                    p.bn_recalibration_batches, p.verify_top_k, list(p.verify_budgets), p.verify_metric,
                    trained_budgets(cfg), facts.model_name, p.held_out_fraction)


def points_job(cfg: PipelineConfig, facts: Facts) -> PointsJob:
    """The summary's measured points: the re-ranking grid (measured there) and the full budget."""
    p = cfg.profile
    fractions = sorted({*p.verify_budgets, 1.0}) if p.verify_metric == "latency" else MEASURE_FRACTIONS
    return PointsJob(data_ref(cfg, facts), fractions=tuple(fractions))


def publish_job(cfg: PipelineConfig, facts: Facts) -> PublishJob:
    if facts.store is None or facts.key_id is None or facts.key_path is None:
        raise ValueError("publish needs a store and a signing key (preflight sets them)")
    return PublishJob(facts.store, facts.key_id, facts.model_name, facts.data.preprocess, tuple(facts.classes),
                      key_path=facts.key_path)
