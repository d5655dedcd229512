"""`legodnn-fetch --export DIR`: the chosen composition as one standalone model file.

For each model, `DIR/<model_id>.onnx` is the chosen blocks' ONNX graphs (from the signed
bundle, weights inlined) merged into one graph with input `input` (N, C, H, W) and output
`output`, loadable by any ONNX runtime (ONNX Runtime Mobile included) without legodnn.
`DIR/<model_id>.json` says what the app needs around it: preprocessing, class names, input
and output names, the selection and its predicted accuracy and device latency. Where the
ExecuTorch toolchain is installed and the device runs `--runtime torch`,
`DIR/<model_id>.pte` is written too.

Before anything is written, the merged graph runs in a plain ONNX Runtime session and
must give the running model's logits (max abs difference <= 1e-4), or the export fails.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from infra.device.session import DeviceSession
from infra.errors import BundleError
from infra.manifest import onnx_data_location
from legoblocks.files import write_atomic, write_json_atomic

EXPORT_ATOL = 1e-4


@dataclass(frozen=True)
class ExportedModel:
    model_id: str
    onnx: Path
    metadata: Path
    pte: Path | None
    max_abs_diff: float  # merged graph vs the running model, on a random batch


def _inline(graph: bytes, data: bytes, location: str) -> Any:
    """A block's ModelProto with its external weights copied in."""
    import onnx

    model = onnx.load_model_from_string(graph)
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in tensor.external_data}
            assert info.get("location") == location  # checked when the block was verified (check_graph)
            offset, length = int(info.get("offset", "0")), int(info["length"])
            tensor.raw_data = data[offset:offset + length]
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
    return model


def merge_chain(blocks: Sequence[Any]) -> Any:
    """One ModelProto running `blocks` (single-input, single-output ModelProtos) in order."""
    import onnx
    from onnx import compose, helper

    nodes, initializers, value_info = [], [], []
    previous = "input"
    for i, block in enumerate(blocks):
        g = compose.add_prefix(block, prefix=f"b{i}_").graph
        src, dst = g.input[0].name, g.output[0].name
        last = i == len(blocks) - 1
        for node in g.node:
            node.input[:] = [previous if n == src else n for n in node.input]
            if last:
                node.output[:] = ["output" if n == dst else n for n in node.output]
        nodes += g.node
        initializers += g.initializer
        value_info += [v for v in g.value_info if v.name not in (src, dst)]
        previous = dst
    first, final = blocks[0].graph.input[0], blocks[-1].graph.output[0]
    inp = helper.make_value_info("input", first.type)
    out = helper.make_value_info("output", final.type)
    graph = helper.make_graph(nodes, "legodnn", [inp], [out], initializer=initializers, value_info=value_info)
    model = helper.make_model(graph, opset_imports=blocks[0].opset_import, producer_name="legodnn-fetch")
    model.ir_version = blocks[0].ir_version
    onnx.checker.check_model(model)
    return model


def _export_pte(session: DeviceSession, model_id: str, path: Path) -> Path | None:
    """An ExecuTorch program of the running torch model, where ExecuTorch is installed."""
    if session.runtime.name != "torch" or importlib.util.find_spec("executorch") is None:
        return None
    import torch
    from executorch.exir import to_edge

    model = session.switchers[model_id].model
    example = (torch.zeros(1, *session.bundles[model_id].manifest.input_shape),)
    program = to_edge(torch.export.export(model, example)).to_executorch()
    write_atomic(path, program.buffer)
    return path


def export_models(session: DeviceSession, out_dir: str | Path) -> list[ExportedModel]:
    """Write every running model of `session` to `out_dir` (see module docstring)."""
    import numpy as np
    import onnxruntime as ort

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--export {out} is a file; give a directory (made if missing)")
    exported = []
    for model_id, switcher in session.switchers.items():
        b = session.bundles[model_id]
        blocks = []
        for block, choice in zip(b.manifest.blocks, switcher.selection):
            d = block.descendant(choice)
            if d.onnx is None:
                raise BundleError(f"{model_id} v{b.version} is a schema 1 bundle without ONNX blocks; republish it")
            blocks.append(_inline(b.source.read(d.onnx.graph), b.source.read(d.onnx.data),
                                  onnx_data_location(choice)))
        merged = merge_chain(blocks).SerializeToString()
        x = np.random.default_rng(0).standard_normal((2, *b.manifest.input_shape), dtype=np.float32)
        plain = ort.InferenceSession(merged, providers=["CPUExecutionProvider"])
        diff = float(np.abs(plain.run(None, {"input": x})[0] - session.predict(model_id, x)).max())
        if not diff <= EXPORT_ATOL:
            raise BundleError(f"--export {model_id}: the merged ONNX model differs from the running model by {diff:.2e} "
                              f"(> {EXPORT_ATOL}); not written")
        onnx_path = write_atomic(out / f"{model_id}.onnx", merged)
        pte = _export_pte(session, model_id, out / f"{model_id}.pte")
        report = session.report({model_id: switcher.selection})[0]
        meta = write_json_atomic(out / f"{model_id}.json", {
            "model_id": model_id, "version": b.version, "uri": b.model_uri,
            "selection": [[block, choice] for block, choice in report.selection.items()],  # chain order
            "onnx": onnx_path.name, "pte": None if pte is None else pte.name, "opset": b.manifest.onnx_opset,
            "input": {"name": "input", "shape": ["N", *b.manifest.input_shape], "dtype": "float32"},
            "output": {"name": "output", "shape": ["N", *b.manifest.blocks[-1].out_shape], "dtype": "float32"},
            "preprocessing": None if b.manifest.preprocessing is None else asdict(b.manifest.preprocessing),
            "classes": None if b.manifest.classes is None else list(b.manifest.classes),
            "accuracy": report.accuracy.to_dict(), "latency_ms": report.latency_ms,
            "memory_bytes": report.memory_bytes, "runtime": session.runtime.name,
        })
        exported.append(ExportedModel(model_id, onnx_path, meta, pte, diff))
    session.commit()  # graphs and weights downloaded for the export join the cache
    return exported
