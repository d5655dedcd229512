"""The ONNX Runtime device runtime: every block an `InferenceSession`, a model a chain of them.

A bundle (schema 2) ships each descendant as an ONNX graph whose floating-point
initializers live in a separate data file (ONNX external data, one file named
`<choice>.onnx.data`). Both are hash-checked bytes in memory when a session is built: the
data is handed to ONNX Runtime as an in-memory external file, so nothing is read from a
path the graph names. Latency depends on the graph, not the weight values, so a descendant
whose weights are not on the device yet is timed from its graph (a few KB) with zero
weights, as the torch runtime times a safetensors header.

Nothing here imports torch: this is the whole runtime of a device without PyTorch.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Sequence
from typing import Any

from infra.device.runtime import BlockFiles, Runtime, TimingStats, time_callable
from infra.errors import BundleError, BundleVerificationError
from infra.manifest import BlockEntry, DescendantEntry, FileEntry, onnx_data_location
from profiling.host import cpu_model


def check_graph(graph: bytes, location: str, data_bytes: int, where: str) -> None:
    """The graph parses, and every externally stored initializer lies inside its own data file.

    A graph that names another file (a path on the device) or a span past the data's end is
    refused: ONNX Runtime must only ever see the verified bytes.
    """
    import onnx

    try:
        model = onnx.load_model_from_string(graph)
    except Exception as e:  # noqa: BLE001 - protobuf raises its own DecodeError
        raise BundleVerificationError(f"{where}: not an ONNX graph ({type(e).__name__}: {e}); refusing it") from None
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        try:
            offset, length = int(info.get("offset", "0")), int(info["length"])
        except (KeyError, ValueError):
            raise BundleVerificationError(f"{where}: initializer {tensor.name!r} has no valid external span") from None
        if info.get("location") != location or offset < 0 or length < 0 or offset + length > data_bytes:
            raise BundleVerificationError(
                f"{where}: initializer {tensor.name!r} points at {info.get('location')!r} [{offset}, +{length}); "
                f"only {location!r} (its {data_bytes}-byte data file) is allowed. Refusing it."
            )


def load_session(graph: bytes, data: Any, location: str, *, threads: int, where: str) -> Any:
    """An InferenceSession for a block graph whose external data is `data` (bytes-like).

    `location` is the data file's name as the graph references it; `threads` the intra-op
    thread count. Raises BundleVerificationError when the graph is unusable.
    """
    import onnxruntime as ort

    check_graph(graph, location, len(data), where)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only: no optimizer chatter on the device's stderr
    if len(data):
        options.add_external_initializers_from_files_in_memory([location], [data], [len(data)])
    try:
        return ort.InferenceSession(graph, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidGraph types
        raise BundleVerificationError(f"{where}: ONNX Runtime cannot load it ({e}); refusing it") from None


class OnnxBlock:
    """One block as an ONNX Runtime session: `block(x)` runs a NumPy batch."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.input = session.get_inputs()[0].name

    def __call__(self, x: Any) -> Any:
        return self.session.run(None, {self.input: x})[0]


class OnnxChain:
    """A model as a list of block sessions run in order; `chain[i] = block` swaps one."""

    def __init__(self, blocks: Sequence[OnnxBlock]) -> None:
        self.blocks = list(blocks)

    def __getitem__(self, i: int) -> OnnxBlock:
        return self.blocks[i]

    def __setitem__(self, i: int, block: OnnxBlock) -> None:
        self.blocks[i] = block

    def __len__(self) -> int:
        return len(self.blocks)

    def __call__(self, x: Any) -> Any:
        for block in self.blocks:
            x = block(x)
        return x


class OnnxRuntime(Runtime):
    """Blocks as ONNX Runtime sessions on the CPU (see module docstring)."""

    name = "onnxruntime"

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        if settings.device != "cpu":
            raise ValueError(f"--torch-device {settings.device} applies to --runtime torch; onnxruntime runs on the cpu")

    def fingerprint(self) -> dict[str, Any]:
        import onnxruntime as ort

        info = {
            "cpu_model": cpu_model(),
            "logical_cores": os.cpu_count() or 0,
            "runtime": f"onnxruntime {ort.__version__}",
            "threads": self.settings.threads,
            "machine": platform.machine() or "unknown",
        }
        info["id"] = hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:12]
        return info

    def needs(self, d: DescendantEntry) -> list[FileEntry]:
        if d.onnx is None:
            raise BundleError(
                f"descendant {d.choice} has no ONNX graph: the bundle is schema 1 (published before ONNX blocks). "
                "Republish it with this legodnn, or run it with --runtime torch"
            )
        return [d.onnx.graph, d.onnx.data]

    def _session(self, d: DescendantEntry, graph: bytes, data: Any) -> OnnxBlock:
        assert d.onnx is not None
        session = load_session(graph, data, onnx_data_location(d.choice), threads=self.settings.threads,
                               where=d.onnx.graph.file)
        return OnnxBlock(session)

    def load(self, block: BlockEntry, d: DescendantEntry, files: BlockFiles) -> tuple[Any, int]:
        graph, data = (files.read(e) for e in self.needs(d))
        return self._session(d, graph, data), len(data)

    def load_for_timing(self, block: BlockEntry, d: DescendantEntry, files: BlockFiles) -> tuple[Any, str]:
        graph_entry, data_entry = self.needs(d)
        graph = files.read(graph_entry)  # a few KB: always fetched whole, verified and cached
        if files.cached(data_entry):
            return self._session(d, graph, files.read(data_entry)), "file"
        return self._session(d, graph, bytes(data_entry.bytes)), "graph"

    def chain(self, blocks: Sequence[Any]) -> OnnxChain:
        return OnnxChain(blocks)

    def time(self, model: Any, in_shape: Sequence[int]) -> TimingStats:
        import numpy as np

        s = self.settings
        x = np.random.default_rng(0).standard_normal((s.batch_size, *in_shape), dtype=np.float32)
        return time_callable(lambda: model(x), s.warmup, s.repeats)

    def infer(self, model: Any, x: Any) -> Any:
        return model(x)
