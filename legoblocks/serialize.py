"""Safe module files: one `.safetensors` file = tensors + a declarative torch.fx graph spec.

Descendant blocks travel from the pipeline to devices through buckets and caches that an
attacker may write to. `torch.load` of a whole module unpickles code, so a block file here
holds only data: the tensors (safetensors, which is a JSON header plus raw bytes) and,
in the header metadata under `legodnn.spec`, a JSON description of the module as an fx
graph. Loading rebuilds the module from the allow-lists of `legoblocks.allowlist` only:
leaf layers from a fixed table of `torch.nn` classes with literal constructor arguments,
functions from the `operator`, `torch`, `torch.nn.functional`, `torch.Tensor` and (as
torch.export spells them) `torch.ops.aten` namespaces, Tensor methods by name. Nothing
named in a file is ever imported, and nothing is ever unpickled.

Constructor arguments are read from the live module when saving, weight shapes first,
because Torch-Pruning edits modules in place and the weights are the ground truth of what
`forward` computes.
"""

from __future__ import annotations

import json
import keyword
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as save_bytes
from torch import fx, nn

from legoblocks.allowlist import LEAF_TYPES, LEAVES, function_names, function_table, tensor_attributes, tensor_methods
from legoblocks.files import write_atomic
from legoblocks.modtree import install

SPEC_KEY = "legodnn.spec"
FORMAT = "legodnn.module"
VERSION = 1
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class UnsafeFileError(ValueError):
    """A module file was refused: not safetensors, or it names something outside the allow-lists."""


# --------------------------------------------------------------------------- value codec


def _encode(value: Any) -> Any:
    """Node args/kwargs and constructor arguments as JSON; each non-JSON type gets one tag."""
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, torch.Size):
        return {"size": [int(v) for v in value]}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise ValueError(f"cannot save a dict with non-string keys: {value!r}")
        return {"dict": [[k, _encode(v)] for k, v in value.items()]}
    if isinstance(value, slice):
        return {"slice": [_encode(value.start), _encode(value.stop), _encode(value.step)]}
    if value is Ellipsis:
        return {"ellipsis": None}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    raise ValueError(
        f"cannot save a graph argument of type {type(value).__name__} ({value!r}); "
        "only literals, tuples/lists/dicts/slices of them, dtypes, devices and graph nodes are supported"
    )


def _torch_constant(kind: str, name: Any, expected: type) -> Any:
    obj = getattr(torch, name, None) if isinstance(name, str) and not name.startswith("_") else None
    if not isinstance(obj, expected):
        raise UnsafeFileError(f"spec names {kind} {name!r}, which is not a torch {kind}")
    return obj


def _decode(value: Any, nodes: Mapping[str, fx.Node] | None) -> Any:
    """Inverse of _encode; `nodes` is None where node references are not allowed."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_decode(v, nodes) for v in value]
    if not isinstance(value, dict) or len(value) != 1:
        raise ValueError(f"malformed value in spec: {value!r}")
    (tag, body), = value.items()
    if tag == "node":
        if nodes is None:
            raise ValueError(f"node reference {body!r} where only literals are allowed")
        if body not in nodes:
            raise ValueError(f"spec refers to node {body!r} before it is defined")
        return nodes[body]
    if tag == "float":
        if body not in ("inf", "-inf", "nan"):
            raise ValueError(f"malformed float {body!r} in spec")
        return float(body)
    if tag == "size":
        return torch.Size([int(v) for v in body])
    if tag == "tuple":
        return tuple(_decode(v, nodes) for v in body)
    if tag == "dict":
        return {str(k): _decode(v, nodes) for k, v in body}
    if tag == "slice":
        return slice(*(_decode(v, nodes) for v in body))
    if tag == "ellipsis":
        return Ellipsis
    if tag == "dtype":
        return _torch_constant("dtype", body, torch.dtype)
    if tag == "device":
        return torch.device(str(body))
    if tag == "memory_format":
        return _torch_constant("memory_format", body, torch.memory_format)
    if tag == "layout":
        return _torch_constant("layout", body, torch.layout)
    raise ValueError(f"unknown value tag {tag!r} in spec")


# --------------------------------------------------------------------------- save


class _AllowListTracer(fx.Tracer):
    """Stops at allowed layers, traces through everything else (containers, user modules)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return type(m) in LEAF_TYPES or super().is_leaf_module(m, module_qualified_name)


def _as_graph_module(module: nn.Module) -> fx.GraphModule:
    """The module as a flat GraphModule whose call_module nodes are all allowed layers."""
    if isinstance(module, fx.GraphModule) and all(
        type(module.get_submodule(n.target)) in LEAF_TYPES
        for n in module.graph.nodes if n.op == "call_module"
    ):
        return module
    tracer = _AllowListTracer()
    try:
        graph = tracer.trace(module)
    except Exception as exc:
        raise ValueError(
            f"cannot save {type(module).__name__}: torch.fx cannot trace it "
            f"({type(exc).__name__}: {exc}); only fx-traceable modules (no data-dependent "
            "control flow) can be saved"
        ) from exc
    return fx.GraphModule(tracer.root, graph, class_name=type(module).__name__)


def _spec_and_tensors(gm: fx.GraphModule) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    modules: dict[str, Any] = {}
    attrs: dict[str, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    nodes: list[dict[str, Any]] = []
    names = function_names()
    for node in gm.graph.nodes:
        target: Any = node.target
        if node.op == "call_module":
            sub = gm.get_submodule(target)
            kind = LEAF_TYPES.get(type(sub))
            if kind is None:
                raise ValueError(
                    f"cannot save module {target!r} of type {type(sub).__module__}.{type(sub).__qualname__}: "
                    f"it is not in the allow-list of layers ({', '.join(sorted(LEAVES))})"
                )
            if target not in modules:
                modules[target] = {
                    "type": kind,
                    "kwargs": _encode(LEAVES[kind].kwargs(sub)),
                    "training": sub.training,  # modes can be mixed (e.g. frozen BatchNorm)
                }
                for key, t in sub.state_dict().items():
                    tensors[f"{target}.{key}"] = t
        elif node.op == "get_attr":
            value = _get_path(gm, target)
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"cannot save get_attr {target!r}: it is a {type(value).__name__}, not a tensor")
            attrs[target] = "parameter" if isinstance(value, nn.Parameter) else "buffer"
            tensors[target] = value
        elif node.op == "call_function":
            try:
                target = names.get(target)
            except TypeError:
                target = None
            if target is None:
                raise ValueError(
                    f"cannot save node {node.name!r}: function {_describe(node.target)} is not in the "
                    "allow-list (operator, torch, torch.nn.functional, torch.Tensor, builtins.getattr)"
                )
        elif node.op == "call_method" and node.target not in tensor_methods():
            raise ValueError(f"cannot save node {node.name!r}: {node.target!r} is not an allowed Tensor method")
        elif node.op == "placeholder" and not str(target).isidentifier():
            raise ValueError(f"cannot save input {target!r}: forward(*args/**kwargs) is not supported")
        nodes.append({
            "op": node.op,
            "name": node.name,
            "target": target,
            "args": _encode(tuple(node.args)),
            "kwargs": _encode(dict(node.kwargs)),
        })
    spec = {
        "format": FORMAT,
        "version": VERSION,
        "training": gm.training,
        "modules": modules,
        "attrs": attrs,
        "nodes": nodes,
    }
    # Clones: safetensors refuses tensors that share storage, and views must be contiguous.
    return spec, {k: t.detach().cpu().contiguous().clone() for k, t in tensors.items()}


def _describe(fn: Any) -> str:
    return f"{getattr(fn, '__module__', None) or '?'}.{getattr(fn, '__qualname__', repr(fn))}"


def _get_path(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def save_module(module: nn.Module, path: str | Path) -> None:
    """Write `module` (an fx-traceable nn.Module or a GraphModule) as one safe .safetensors file."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"save_module needs an nn.Module, got {type(module).__name__}")
    spec, tensors = _spec_and_tensors(_as_graph_module(module))
    write_safetensors(tensors, path, {SPEC_KEY: json.dumps(spec, allow_nan=False)})


def write_safetensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """A safetensors file written atomically: readers never see half a file."""
    write_atomic(path, save_bytes(tensors, metadata=metadata))


# --------------------------------------------------------------------------- load

_PART = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+")


def _check_path(path: Any, what: str) -> str:
    """Module/attribute paths become Python attribute access in generated code: keep them plain."""
    if not isinstance(path, str) or not path:
        raise UnsafeFileError(f"{what} path {path!r} is not a non-empty string")
    for part in path.split("."):
        if (
            not _PART.fullmatch(part)
            or part.startswith("__")
            or keyword.iskeyword(part)
            or hasattr(fx.GraphModule, part)
        ):
            raise UnsafeFileError(f"{what} path {path!r} has a forbidden component {part!r}")
    return path


def _check_identifier(name: Any, what: str) -> str:
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name) or name.startswith("__"):
        raise UnsafeFileError(f"{what} {name!r} is not a plain Python identifier")
    return name


def _read_spec(path: Path) -> dict[str, Any]:
    """Parse the safetensors header ourselves, so a non-safetensors file is refused up front."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise UnsafeFileError(f"{path} is not a safetensors file (only {size} bytes)")
        n = int.from_bytes(head, "little")
        if n > size - 8 or n > _MAX_HEADER_BYTES:
            if head[:2] == b"PK" or head[:1] == b"\x80":  # zip (torch.save) or pickle protocol 2+
                raise UnsafeFileError(
                    f"{path} is a pickle/torch.save file, not safetensors; it is refused and never unpickled"
                )
            raise UnsafeFileError(f"{path} is not a safetensors file (header length {n} vs file size {size})")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnsafeFileError(f"{path} is not a safetensors file (header is not JSON: {exc})") from exc
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or SPEC_KEY not in meta:
        raise UnsafeFileError(
            f"{path} is a safetensors file without a {SPEC_KEY!r} module spec; "
            "write it with legoblocks.serialize.save_module"
        )
    try:
        spec = json.loads(meta[SPEC_KEY])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: module spec is not valid JSON ({exc})") from exc
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        found = spec.get("format") if isinstance(spec, dict) else spec
        raise ValueError(f"{path}: module spec has format {found!r}, expected {FORMAT!r}")
    if spec.get("version") != VERSION:
        raise ValueError(
            f"{path}: module spec version {spec.get('version')!r} is not supported (this reader: {VERSION})"
        )
    for key, kind in (("modules", dict), ("attrs", dict), ("nodes", list)):
        if not isinstance(spec.get(key), kind):
            raise ValueError(f"{path}: module spec field {key!r} is missing or not a {kind.__name__}")
    return spec


def _build_leaf(target: str, entry: Any) -> nn.Module:
    if not isinstance(entry, dict) or set(entry) != {"type", "kwargs", "training"}:
        raise ValueError(f"module {target!r}: malformed entry {entry!r}")
    kind = entry["type"]
    leaf = LEAVES.get(kind) if isinstance(kind, str) else None
    if leaf is None:
        raise UnsafeFileError(
            f"module {target!r} has type {kind!r}, which is not in the allow-list ({', '.join(sorted(LEAVES))})"
        )
    kwargs = _decode(entry["kwargs"], None)
    if not isinstance(kwargs, dict) or set(kwargs) != leaf.keys():
        got = sorted(kwargs) if isinstance(kwargs, dict) else kwargs
        raise ValueError(f"module {target!r} ({kind}): constructor arguments {got} != expected {sorted(leaf.keys())}")
    try:
        # On the meta device: sizes in the spec cannot make us allocate before they are
        # checked against the tensors actually in the file.
        with torch.device("meta"):
            return leaf.cls(**kwargs)
    except Exception as exc:
        raise ValueError(f"module {target!r}: {kind}(**{kwargs}) failed: {type(exc).__name__}: {exc}") from exc


def _resolve_target(node: Mapping[str, Any], modules: Mapping[str, nn.Module], attrs: Mapping[str, str]) -> Any:
    op, target = node["op"], node["target"]
    if op == "placeholder":
        return _check_identifier(target, "placeholder")
    if op == "output":
        if target != "output":
            raise ValueError(f"output node has target {target!r}, expected 'output'")
        return target
    if op == "call_module":
        if target not in modules:
            raise ValueError(f"node {node['name']!r} calls module {target!r}, which the spec does not define")
        return target
    if op == "get_attr":
        if target not in attrs:
            raise ValueError(f"node {node['name']!r} reads attribute {target!r}, which the spec does not define")
        return target
    if op == "call_method":
        if not isinstance(target, str) or target not in tensor_methods():
            raise UnsafeFileError(
                f"node {node['name']!r} calls method {target!r}, which is not an allowed Tensor method"
            )
        return target
    if op == "call_function":
        fn = function_table().get(target) if isinstance(target, str) else None
        if fn is None:
            raise UnsafeFileError(
                f"node {node['name']!r} calls function {target!r}, which is not in the allow-list "
                "(operator, torch, torch.nn.functional, torch.Tensor, builtins.getattr)"
            )
        return fn
    raise UnsafeFileError(f"node {node.get('name')!r} has unknown op {op!r}")


def _build_graph(spec: Mapping[str, Any], modules: Mapping[str, nn.Module], attrs: Mapping[str, str]) -> fx.Graph:
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    specs = spec["nodes"]
    for i, node in enumerate(specs):
        if not isinstance(node, dict) or set(node) != {"op", "name", "target", "args", "kwargs"}:
            raise ValueError(f"node #{i} is malformed: {node!r}")
        name = _check_identifier(node["name"], "node name")
        if name in env:
            raise ValueError(f"node name {name!r} appears twice")
        if (node["op"] == "output") != (i == len(specs) - 1):
            raise ValueError("the spec must end with exactly one output node")
        target = _resolve_target(node, modules, attrs)
        args, kwargs = _decode(node["args"], env), _decode(node["kwargs"], env)
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise ValueError(f"node {name!r}: args must be a tuple and kwargs a dict")
        for key in kwargs:  # keyword names are pasted into generated code as they are
            _check_identifier(key, f"node {name!r} keyword argument")
        if target is getattr and not (
            len(args) == 2 and isinstance(args[1], str) and args[1] in tensor_attributes()
        ):
            raise UnsafeFileError(
                f"node {name!r}: getattr{args!r} reads something other than a public Tensor attribute"
            )
        env[name] = graph.create_node(node["op"], target, args, kwargs, name=name)
    if not specs:
        raise ValueError("the spec has no nodes")
    graph.lint()
    return graph


def load_module(path: str | Path) -> fx.GraphModule:
    """Rebuild a module written by save_module, trusting nothing in the file.

    Refused with UnsafeFileError: anything that is not safetensors (pickles included) and
    specs naming a layer, function, method or attribute outside the allow-lists. Refused
    with ValueError: structural problems (missing/extra tensors, shapes that do not match
    the constructor arguments, dangling node references).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"module file {path} does not exist")
    spec = _read_spec(path)
    try:
        tensors = load_file(str(path))
    except SafetensorError as exc:
        raise UnsafeFileError(f"{path} is not a valid safetensors file: {exc}") from exc
    try:
        return _rebuild(spec, tensors, path)
    except (TypeError, KeyError, AttributeError, RuntimeError) as exc:
        # A hand-edited spec with the wrong JSON shapes somewhere: say so, not a bare TypeError.
        raise ValueError(f"{path}: malformed module spec ({type(exc).__name__}: {exc})") from exc


def _rebuild(spec: Mapping[str, Any], tensors: dict[str, torch.Tensor], path: Path) -> fx.GraphModule:
    root = nn.Module()
    modules: dict[str, nn.Module] = {}
    expected: dict[str, torch.Size] = {}
    for target, entry in spec["modules"].items():
        _check_path(target, "module")
        modules[target] = module = _build_leaf(target, entry)
        for key, t in module.state_dict().items():
            expected[f"{target}.{key}"] = t.shape
        install(root, target, module, "module")
    attrs: dict[str, str] = {}
    for target, kind in spec["attrs"].items():
        _check_path(target, "attribute")
        if kind not in ("parameter", "buffer"):
            raise ValueError(f"attribute {target!r} has kind {kind!r}, expected 'parameter' or 'buffer'")
        attrs[target] = kind

    missing = sorted(k for k in expected if k not in tensors)
    extra = sorted(k for k in tensors if k not in expected and k not in attrs)
    absent_attrs = sorted(k for k in attrs if k not in tensors and k not in expected)
    if missing or extra or absent_attrs:
        raise ValueError(
            f"{path}: tensors do not match the spec: missing {missing + absent_attrs or 'none'}, "
            f"unexpected {extra or 'none'}"
        )
    wrong = [f"{k} {tuple(tensors[k].shape)} vs {tuple(s)}" for k, s in expected.items() if tensors[k].shape != s]
    if wrong:
        raise ValueError(f"{path}: tensor shapes do not match the layers' constructor arguments: {'; '.join(wrong)}")
    for target, module in modules.items():
        prefix = f"{target}."
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, assign=True)
    for target, module in modules.items():
        if any(t.is_meta for t in [*module.parameters(), *module.buffers()]):
            raise ValueError(f"{path}: layer {target!r} has state that is not in the file")
    for target, kind in attrs.items():
        if target not in expected:  # else it is a leaf layer's own tensor, loaded above
            install(root, target, tensors[target], kind)

    graph = _build_graph(spec, modules, attrs)
    gm = fx.GraphModule(root, graph, class_name="LoadedModule")
    gm.train(bool(spec.get("training", False)))
    for target, entry in spec["modules"].items():
        gm.get_submodule(target).train(bool(entry["training"]))
    return gm
