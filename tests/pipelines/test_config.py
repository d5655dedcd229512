"""Config loading: defaults, overrides, and errors that name the key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.config import ConfigError, PipelineConfig, from_dict, load_config, set_dotted


def test_embedded_defaults_are_a_complete_valid_config() -> None:
    cfg = load_config()
    assert isinstance(cfg, PipelineConfig)
    assert cfg.model.ref == "resnet20"
    assert 0.0 in cfg.descend.ladder
    assert cfg.ray.address is None and cfg.mlflow.tracking_uri is None


def test_yaml_file_and_overrides_merge_key_by_key(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("retrain: {lr: 0.005}\nmodel: {options: {width: 4}}\n")
    cfg = load_config(path, {"retrain": {"epochs": 3}})
    assert cfg.retrain.lr == 0.005 and cfg.retrain.epochs == 3
    assert cfg.retrain.batch_size == load_config().retrain.batch_size  # untouched default kept
    assert cfg.model.options == {"width": 4}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"retrain": {"lr": "fast"}}, "retrain.lr: expected a number, got 'fast'"),
        ({"retrian": {}}, "retrian: unknown key"),
        ({"profile": {"envz": 2}}, "profile.envz: unknown key"),
        ({"model": {"checkpoint": 3}}, "model.checkpoint: expected a string or null, got 3"),
        ({"ray": {"num_cpus": True}}, "ray.num_cpus: expected a number, got True"),
        ({"descend": {"ladder": [0.0, "x"]}}, "descend.ladder[1]: expected a number"),
        ({"descend": {"ladder": [0.2, 0.4]}}, "descend.ladder: must contain 0.0"),
        ({"retrain": {"epochs": 0}}, "retrain: RetrainConfig.epochs must be >= 1, got 0"),
        ({"profile": {"verify_budgets": [0.5, 1.5]}}, "profile.verify_budgets[1]: expected a number <= 1.0, got 1.5"),
        ({"ray": {"scheduling": "RANDOM"}}, "ray.scheduling: expected one of 'DEFAULT', 'SPREAD', got 'RANDOM'"),
        ({"joint": {"enabled": "yes"}}, "joint.enabled: expected true or false"),
        ({"data": [1, 2]}, "data: expected a mapping"),
    ],
)
def test_bad_values_are_rejected_with_the_key_path(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_dict(data)
    assert message in str(info.value)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("retrain: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    typed = tmp_path / "typed.yaml"
    typed.write_text("teacher: {lr: fast}\n")
    with pytest.raises(ConfigError, match=r"typed.yaml: teacher.lr: expected a number"):
        load_config(typed)


def test_set_dotted_builds_nested_overrides() -> None:
    data: dict = {}
    set_dotted(data, "retrain.lr", 0.1)
    set_dotted(data, "workdir", "/x")
    assert data == {"retrain": {"lr": 0.1}, "workdir": "/x"}


def test_cli_flags_map_to_config_keys() -> None:
    import argparse

    from pipelines.commands.run import add_arguments, overrides_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--workdir", "/w", "--no-publish", "--model", "vgg11",
                              "--set", "retrain.lr=0.002", "--set", "descend.ladder=[0.0, 0.5]"])
    cfg = from_dict(overrides_from_args(args))
    assert cfg.workdir == "/w" and cfg.publish.enabled is False and cfg.model.ref == "vgg11"
    assert cfg.retrain.lr == 0.002 and cfg.descend.ladder == [0.0, 0.5]
    bad = parser.parse_args(["--set", "retrain.lr"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        overrides_from_args(bad)


def test_default_model_options_do_not_leak_to_another_model() -> None:
    assert load_config().model.options == {"width": 8}
    assert load_config(None, {"model": {"ref": "mobilenetv2"}}).model.options == {}
    assert load_config(None, {"model": {"ref": "vgg11", "options": {"width": 16}}}).model.options == {"width": 16}


def test_joint_section_takes_every_trainer_field_and_its_rules() -> None:
    """`joint` is derived from legoblocks.joint.JointConfig: a field added there needs no edit here."""
    import dataclasses

    from legoblocks.joint import JointConfig as TrainerJointConfig

    trainer_fields = {f.name for f in dataclasses.fields(TrainerJointConfig)}
    cfg = load_config()
    section = dataclasses.asdict(cfg.joint)
    assert trainer_fields | {"enabled", "num_workers", "checkpoint_every"} == section.keys()
    assert cfg.joint.steps == 250  # pipelines/defaults.yaml still sets the pipeline's values
    flipped = {name: not value for name, value in section.items() if isinstance(value, bool)}
    assert "sandwich_smallest" in flipped  # a trainer field, typed bool, set from YAML
    changed = from_dict({"joint": flipped})
    assert all(getattr(changed.joint, name) is value for name, value in flipped.items())
    trainer = changed.joint.trainer()
    assert type(trainer) is TrainerJointConfig and trainer.sandwich_smallest is False  # what the stage gets


@pytest.mark.parametrize(
    ("joint", "message"),
    [
        ({"frezze_bn": True}, "joint.frezze_bn: unknown key; valid keys here are: "),
        ({"kd_weight": "high"}, "joint.kd_weight: expected a number, got 'high'"),
        ({"lr": 0}, "joint: invalid JointConfig: lr must be > 0 (got 0.0)"),
        ({"kd_weight": 0.0, "feature_weight": 0.0, "ce_weight": 0.0}, "joint: invalid JointConfig: all loss weights are 0"),
        ({"num_workers": 0}, "joint.num_workers: expected an integer >= 1, got 0"),
        ({"anchor_budgets": "half"}, "joint.anchor_budgets: expected a list, got 'half'"),
        ({"anchor_budgets": [0.5, 2]}, "joint: invalid JointConfig: anchor_budgets must be FLOPs fractions in (0, 1]"),
        ({"optimizer": "rmsprop"}, "joint: invalid JointConfig: optimizer must be one of ['adam', 'sgd']"),
        ({"sandwich_floor": "low"}, "joint.sandwich_floor: expected a number"),
        ({"sandwich_floor": 1.5}, "joint: invalid JointConfig: sandwich_floor must be a FLOPs fraction in (0, 1]"),
    ],
)
def test_bad_joint_values_are_rejected(joint: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_dict({"joint": joint})
    assert message in str(info.value)


def test_retrain_section_takes_every_trainer_field() -> None:
    import dataclasses

    from legoblocks.retrain import RetrainConfig as TrainerRetrainConfig

    section = dataclasses.asdict(load_config().retrain)
    assert {f.name for f in dataclasses.fields(TrainerRetrainConfig)} | {"io_batch_size", "io_limit", "io_memory_mb"} == section.keys()
    assert type(load_config().retrain.trainer()) is TrainerRetrainConfig
    assert from_dict({"retrain": {"limit": 100}}).retrain.limit == 100


def test_defaults_yaml_shows_exactly_the_dataclass_defaults() -> None:
    """pipelines/defaults.yaml is the commented copy users read; the dataclasses are the source."""
    from pipelines.config import default_dict, defaults_yaml

    assert defaults_yaml() == default_dict()
