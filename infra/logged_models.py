"""Compositions as MLflow logged models (ONNX flavour) and their Model Registry versions.

A composition (one descendant per block) becomes one ONNX model: each chosen block is
exported with the bundle's own exporter (`infra.onnx_blocks.export_block`, checked against
its torch block) and the graphs are chained into one (`infra.device.export.merge_chain`),
input `input` (N, C, H, W) float32, output `output` (N, classes) logits. It is logged with
`mlflow.onnx` (never pickled PyTorch), a tensor signature and a few real input images as the
input example, so `mlflow.pyfunc.load_model("models:/<id>")` runs it with ONNX Runtime.

Everything goes through the `Tracker`'s explicit client (no process-wide tracking URI): the
steps of `mlflow.onnx.log_model` (create the logged model, link it to its run as an output,
save and upload the MLmodel folder, mark it READY) are spelled out here for that reason.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra.tracking import Tracker, _finite

MODEL_TYPE = "legodnn-composition"
_VERSIONS_TAG = "mlflow.modelVersions"  # the logged model -> registry link the UI shows


@dataclass(frozen=True)
class LoggedModelRef:
    """A logged model: its id, its name, where its files are, and the URI
    `mlflow.pyfunc.load_model` takes."""

    model_id: str
    name: str
    artifact_location: str

    @property
    def uri(self) -> str:
        return f"models:/{self.model_id}"


@dataclass(frozen=True)
class ModelVersionRef:
    """A registered model version and the alias that points at it."""

    name: str
    version: str
    alias: str | None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}@{self.alias}" if self.alias else f"models:/{self.name}/{self.version}"


@dataclass
class CompositionExporter:
    """ONNX models of compositions of one saved ScalableModel; each block variant is exported
    once however many compositions use it.

    Args:
        scalable_dir: a folder written by `ScalableModel.save()`.
        work: a scratch folder for the exported block graphs.
    """

    scalable_dir: Path
    work: Path
    _blocks: dict[tuple[str, str], Any] = field(default_factory=dict)
    _model: Any = None

    @property
    def model(self) -> Any:
        if self._model is None:
            from legoblocks.compose import ScalableModel

            self._model = ScalableModel.load(self.scalable_dir)
        return self._model

    def block(self, name: str, choice: str) -> Any:
        """The ModelProto of one block variant, weights inlined."""
        import onnx

        from infra.onnx_blocks import export_block

        if (name, choice) not in self._blocks:
            dest = self.work / name
            files = export_block(self.scalable_dir / name / f"{choice}.safetensors", self.model.spec(name).in_shape,
                                 dest, choice, where=f"{name}/{choice}")
            self._blocks[(name, choice)] = onnx.load(str(files.graph), load_external_data=True)
        return self._blocks[(name, choice)]

    def composition(self, selection: Sequence[str]) -> bytes:
        """The serialized ONNX model of `selection` (one choice id per block, in block order)."""
        from infra.device.export import merge_chain

        chosen = self.model.normalize_selection(list(selection))
        return merge_chain([self.block(n, c) for n, c in zip(self.model.block_names, chosen)]).SerializeToString()


def _signature(input_shape: Sequence[int], outputs: int) -> Any:
    import numpy as np
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *input_shape), "input")]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, outputs), "output")]))


def _requirements() -> list[str]:
    """What serving the model needs, pinned to what made it: given, not inferred (MLflow's
    inference imports the model in a subprocess, seconds per model)."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("onnx", "onnxruntime", "numpy")]


def log_onnx_model(tracker: Tracker, run_id: str, name: str, onnx_bytes: bytes, *, input_example: Any,
                   outputs: int, tags: Mapping[str, Any] | None = None, params: Mapping[str, Any] | None = None,
                   metrics: Mapping[str, Any] | None = None) -> LoggedModelRef:
    """Log one ONNX model as an MLflow logged model of `run_id`, READY to load.

    Args:
        tracker: the store and experiment.
        run_id: the run that produced it (the model's source run; it lists it as an output).
        name: the logged model's name, e.g. "resnet20-latency-33".
        onnx_bytes: a single-input ("input", N x C x H x W float32), single-output model.
        input_example: a float32 array (n, C, H, W) of real, preprocessed inputs.
        outputs: the model's output width (classes).
        tags, params: shown on the model's page and searchable (`search_logged_models`).
        metrics: logged to `run_id` linked to this model (the model page's metrics).

    Returns:
        The logged model's reference.
    """
    import mlflow.onnx
    import onnx
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric
    from mlflow.models import Model

    client = tracker.client
    str_params = {k: str(v) for k, v in (params or {}).items()}
    logged = client.create_logged_model(tracker.experiment_id, name=name, source_run_id=run_id,
                                        tags={k: str(v) for k, v in (tags or {}).items()}, params=str_params,
                                        model_type=MODEL_TYPE)
    try:
        client.log_outputs(run_id, models=[LoggedModelOutput(logged.model_id, step=0)])
        meta = Model(artifact_path=logged.artifact_location, model_uuid=logged.model_id, run_id=run_id,
                     model_id=logged.model_id)
        with tempfile.TemporaryDirectory(prefix="legodnn-mlmodel-") as tmp:
            path = Path(tmp) / "model"
            mlflow.onnx.save_model(onnx.load_model_from_string(onnx_bytes), str(path), mlflow_model=meta,
                                   signature=_signature(input_example.shape[1:], outputs),
                                   input_example=input_example, save_as_external_data=False,
                                   onnx_execution_providers=["CPUExecutionProvider"],
                                   pip_requirements=_requirements())
            client.log_model_artifacts(logged.model_id, str(path))
        if metrics:
            import time

            now = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, v, now, 0, model_id=logged.model_id)
                                              for k, v in _finite(metrics).items()])
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    except BaseException:
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    return LoggedModelRef(logged.model_id, name, logged.artifact_location)


def register_version(tracker: Tracker, name: str, model: LoggedModelRef, run_id: str, *,
                     tags: Mapping[str, Any] | None = None, alias: str | None = None,
                     description: str | None = None, model_description: str | None = None) -> ModelVersionRef:
    """A new version of registered model `name` (created if missing) from a logged model, and
    `alias` moved to it (the newest published version of that role).

    Args:
        tracker: the store (its registry).
        name: the registered model's name (the bundle's model id).
        model: the logged model the version points at.
        run_id: the run that made it.
        tags: the version's tags (bundle URI and version, budgets).
        alias: e.g. "latency-33"; MLflow reserves "latest" and "v<N>".
        description: the version's description; `model_description` the registered model's,
            set when the model is created.

    Returns:
        The new version.
    """
    from mlflow.exceptions import MlflowException

    client = tracker.client
    try:
        client.create_registered_model(name, description=model_description)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    # The source is the model's artifact location, not models:/<id>: a local registry store
    # resolves models:/ URIs with the process-wide tracking URI, not this client's.
    version = client.create_model_version(name, source=model.artifact_location, run_id=run_id,
                                          tags={k: str(v) for k, v in (tags or {}).items()},
                                          description=description, model_id=model.model_id)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    links = [{"name": name, "version": str(version.version)}]
    client.set_logged_model_tags(model.model_id, {_VERSIONS_TAG: json.dumps(links)})
    return ModelVersionRef(name, str(version.version), alias)
