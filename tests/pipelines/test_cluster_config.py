"""ray_cluster.yaml is a config Ray's own cluster launcher accepts."""

from __future__ import annotations

from pathlib import Path

import yaml

CONFIG = Path(__file__).resolve().parents[2] / "ray_cluster.yaml"


def test_cluster_config_passes_ray_schema_validation() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(CONFIG.read_text())
    validate_config(prepare_config(config))  # raises on any schema violation
    assert config["head_node_type"] in config["available_node_types"]


def test_setup_installs_the_project_with_pinned_cpu_torch() -> None:
    config = yaml.safe_load(CONFIG.read_text())
    setup = "\n".join(config["setup_commands"])
    assert '"torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu' in setup
    assert '"torch==2.13.0" -e ~/legodnn' in setup
    assert "dataset-fashion-mnist" in setup
    assert config["file_mounts"]["/home/ubuntu/legodnn"] == "."
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head  # the job API is not exposed publicly
