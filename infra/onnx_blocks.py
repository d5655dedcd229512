"""Descendant blocks as ONNX graphs, for devices without PyTorch (the publisher's side).

Each descendant's safetensors module (loaded with the same safe loader a torch device uses)
is exported with `torch.onnx.export` at `infra.manifest.ONNX_OPSET` with a dynamic batch
dimension. Its floating-point initializers are then moved into a separate data file (ONNX
external data, 16-byte aligned, named `<choice>.onnx.data`), so the graph alone is a few KB:
a device times a descendant from its graph with zero weights and downloads the weights only
for the blocks it runs. Integer initializers (shapes, indices) stay in the graph, so a
zero-weight graph still computes with the real shapes.

Every exported block is checked before it is published: the graph loads through the
device's own loader (`infra.device.runtime_onnx.load_session`) and its output on a seeded
random batch must match the torch block's within `ONNX_ATOL` (relative to the output's
magnitude), or publishing stops naming the block.

The exporter is torch's TorchScript-based one (`dynamo=False`): about 40 ms a block against
1-2 s for the torch.export-based one, it folds BatchNorm into the convolutions, and it needs
only the `onnx` package (the other needs onnxscript). torch 2.13 marks it deprecated; moving
to `dynamo=True` is one argument here, checked by the same comparison.
"""

from __future__ import annotations

import io
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from infra.manifest import ONNX_OPSET, onnx_data_location
from legoblocks.files import write_atomic

ONNX_ATOL = 1e-4
_ALIGN = 16
# torch's TorchScript exporter keeps process-wide state (GLOBALS.in_onnx_export): publishers
# running in threads of one process must export one block at a time.
_EXPORT_LOCK = threading.Lock()


@dataclass(frozen=True)
class OnnxBlockFiles:
    """An exported descendant: graph and data files, and how far ONNX Runtime was from torch."""

    graph: Path
    data: Path
    max_abs_diff: float


def _externalize(model: object, location: str) -> bytes:
    """Move every floating-point initializer of `model` (a ModelProto) into one data blob."""
    import onnx
    from onnx import numpy_helper

    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
    data = bytearray()
    for tensor in model.graph.initializer:  # type: ignore[attr-defined]
        if tensor.data_type not in floats or tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue
        array = numpy_helper.to_array(tensor)
        raw = array.astype(array.dtype.newbyteorder("<")).tobytes()  # ONNX stores little-endian
        data += bytes(-len(data) % _ALIGN)
        offset = len(data)
        data += raw
        for field in ("raw_data", "float_data", "double_data", "int32_data"):
            tensor.ClearField(field)
        del tensor.external_data[:]
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(raw)))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        tensor.data_location = onnx.TensorProto.EXTERNAL
    return bytes(data)


def export_block(source: Path, in_shape: Sequence[int], dest: Path, choice: str, *, where: str) -> OnnxBlockFiles:
    """Export the safetensors descendant at `source` to `dest/<choice>.onnx` (+ `.onnx.data`)
    and check it against torch (see module docstring). `where` names it in errors."""
    import onnx
    import torch

    from infra.device.runtime_onnx import load_session
    from legoblocks.serialize import load_module

    module = load_module(source).eval()
    buffer = io.BytesIO()
    with _EXPORT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(module, (torch.zeros(1, *in_shape),), buffer, dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["input"], output_names=["output"], do_constant_folding=True,
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    model = onnx.load_model_from_string(buffer.getvalue())
    location = onnx_data_location(choice)
    data = _externalize(model, location)
    graph = model.SerializeToString()
    session = load_session(graph, data, location, threads=1, where=where)
    x = torch.randn(2, *in_shape, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = module(x).numpy()
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    diff = float(abs(got - expected).max()) if got.shape == expected.shape else float("inf")
    if not diff <= ONNX_ATOL * max(1.0, float(abs(expected).max())):
        raise ValueError(f"{where}: the ONNX export differs from the torch block by {diff:.2e} (shapes "
                         f"{list(got.shape)} vs {list(expected.shape)}); not publishing a block that computes "
                         "something else")
    return OnnxBlockFiles(write_atomic(dest / f"{choice}.onnx", graph), write_atomic(dest / location, data), diff)
