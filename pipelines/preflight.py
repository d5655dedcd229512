"""Everything that can fail on bad input, checked before the work directory is touched.

A refused run leaves nothing behind: config, checkpoint, model (built, run on a dummy batch,
cut into blocks), data (listed and checked, images' headers read), Ray address, MLflow store
and signing key are checked first, and what the checks derive (the data's reference and
fingerprint, the class names, the checkpoint's hash, the model name) becomes the `Facts` the
stages' jobs use.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from legoblocks.files import sha256_file
from pipelines.config import PipelineConfig
from pipelines.recipe.jobs import Facts, model_spec


class PreflightError(ValueError):
    """The run was refused before any work: bad input or an unreachable service."""


@dataclass(frozen=True)
class Checked:
    """Preflight's result: the facts every job needs and the services' resolved addresses."""

    facts: Facts
    ray_address: str | None
    tracking_uri: str


def model_name(cfg: PipelineConfig) -> str:
    from profiling.profile import default_model_name

    return cfg.publish.model_id or default_model_name(cfg.model.ref)


def check_model(cfg: PipelineConfig) -> None:
    """Build the network (and load the checkpoint), run it on a dummy batch of the configured
    input, and cut it into blocks: a bad model reference, a checkpoint of another model, a
    first layer that does not take the configured channels or size, or a model no graph
    capture can trace fails now, not minutes later inside a task."""
    import torch

    from legoblocks.detect import detect_blocks
    from legoblocks.modelref import ModelRefError
    from pipelines.recipe.model import build_model

    spec = model_spec(cfg)
    try:
        model = build_model(spec, cfg.model.checkpoint).eval()
    except (ModelRefError, ValueError, TypeError) as exc:
        raise PreflightError(f"model {cfg.model.ref!r}: {exc}") from exc
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *spec.input_shape))
    except Exception as exc:  # noqa: BLE001 - any failure here means the input does not fit the model
        raise PreflightError(
            f"model {cfg.model.ref!r} does not accept the configured input {list(spec.input_shape)} "
            f"(model.in_channels x model.input_size^2): {type(exc).__name__}: {exc}; set model.in_channels and "
            "model.input_size to what the model takes, or the data's channels and size to what it takes") from exc
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, spec.num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise PreflightError(f"model {cfg.model.ref!r} returns {shape} for a batch of 2, not (2, {spec.num_classes}) "
                             "logits; set model.num_classes to the model's output size")
    try:
        detect_blocks(model, spec.input_shape, target_blocks=cfg.blocks.target_blocks)
    except Exception as exc:  # noqa: BLE001 - detection's own errors already say what to change
        raise PreflightError(f"model {cfg.model.ref!r} cannot be cut into blocks: {exc}") from exc


def preflight(cfg: PipelineConfig, *, publish: bool = True) -> Checked:
    """Check every input and service before anything is written.

    Args:
        cfg: the validated config.
        publish: whether the run will publish (then the signing key is resolved too).

    Returns:
        The facts and resolved addresses; raises PreflightError naming the problem and fix.
    """
    from infra.tracking import TrackingError, check_tracking, resolve_tracking_uri
    from pipelines.data import DataError, data_ref, default_cache_dir, describe
    from pipelines.executors.ray import RayUnreachableError, check_ray_address

    checkpoint = cfg.model.checkpoint
    checkpoint_sha = None
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise PreflightError(
                f"checkpoint {checkpoint} does not exist; pass an existing state-dict file to "
                "--checkpoint (or model.checkpoint), or leave it out to train a teacher"
            )
        checkpoint_sha = sha256_file(checkpoint)
    check_model(cfg)
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir()
    try:
        info = describe(cfg, cache_dir)
    except DataError as exc:
        raise PreflightError(str(exc)) from exc
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or None
    if address:
        try:
            check_ray_address(address)
        except RayUnreachableError as exc:
            raise PreflightError(str(exc)) from exc
    workdir = Path(cfg.workdir).resolve()
    tracking_uri = resolve_tracking_uri(workdir, cfg.mlflow.tracking_uri)
    try:
        check_tracking(tracking_uri)
    except TrackingError as exc:
        raise PreflightError(str(exc)) from exc
    if publish and cfg.publish.enabled and cfg.publish.key is not None and not Path(cfg.publish.key).is_file():
        raise PreflightError(
            f"publish.key {cfg.publish.key} does not exist; create a key pair with `legodnn keys init DIR` "
            "and pass its private key file, or leave publish.key unset to use a key in the work directory"
        )
    facts = Facts(data=data_ref(cfg, info, cache_dir), classes=tuple(info.classes), checkpoint_sha256=checkpoint_sha,
                  model_name=model_name(cfg), tracking_uri=tracking_uri)
    return Checked(facts, address, tracking_uri)


def with_signing_key(cfg: PipelineConfig, facts: Facts) -> Facts:
    """The facts plus the bundle store and signing key (path, key id): the configured key, else
    one kept in the work directory (made on first use)."""
    import dataclasses

    from infra.signing import PRIVATE_KEY_NAME, generate_keypair, key_id, load_private_key

    workdir = Path(cfg.workdir).resolve()
    if cfg.publish.key is not None:
        private = Path(cfg.publish.key)
    else:
        private = workdir / "keys" / PRIVATE_KEY_NAME
        if not private.is_file():
            private = generate_keypair(workdir / "keys").private_key
    store = cfg.publish.store or (workdir / "bundles").as_uri()
    return dataclasses.replace(facts, store=store, key_path=str(private),
                               key_id=key_id(load_private_key(private).public_key()))
