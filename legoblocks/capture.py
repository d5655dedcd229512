"""Capture a model as one clean `torch.fx` graph that block detection can cut.

Two capture methods, tried in order:

1. **torch.fx symbolic tracing** of an eval-mode deep copy: module-level graphs with the
   model's own layers, shapes computed at run time (`x.shape` stays symbolic).
2. **torch.export** (non-strict, batch dimension dynamic) when fx fails, e.g. on
   shape-dependent Python control flow such as MobileViT's `if new_h != H:` or
   `math.ceil(H / patch)`: export runs the model on real shapes and specializes such
   branches. Its aten-level operators are translated back to the `torch`,
   `torch.nn.functional` and Tensor-method calls they bind to (`aten.add.Tensor` ->
   `torch.add`, `aten.view` -> `Tensor.view`, `aten.sym_size` -> `Tensor.size`, ...), so the
   graph reads like a traced one, serializes with the same allow-list and exports to ONNX.

Only when both fail does `UntraceableModelError` say why, naming the user's source line.

Either graph is then **canonicalized**:

- assertions (`torch._assert`, export's runtime guards) are dropped together with the
  shape arithmetic that fed only them: the chain is verified numerically instead;
- *functional layers* - `F.conv2d` / `F.linear` / `F.batch_norm` / `F.layer_norm` /
  `F.group_norm` (or their `torch.*` twins) on parameters read with `get_attr` - become
  real `nn.Conv2d` / `nn.Linear` / `nn.BatchNorm2d` / ... modules holding the same
  tensors. This is what timm's `BatchNormAct2d` and `LayerNorm2d` (subclasses whose forward
  calls the functional op) and every export graph produce. Torch-Pruning only prunes
  layers it sees as modules: a BatchNorm left functional gets its affine weights pruned
  as "unwrapped parameters" but not its running statistics, which breaks the block;
- module paths are made plain identifiers (`block1-0` -> `block1_0`), which the safe
  module files require.

Node metadata keeps each node's `nn_module_stack`, so detection can still group nodes by
the model's own module hierarchy whichever capture produced them.
"""

from __future__ import annotations

import contextlib
import copy
import io
import keyword
import operator
import re
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from legoblocks.modtree import install

__all__ = ["BATCH_FIRST_KEY", "BATCH_KEY", "CapturedGraph", "InputShapeError", "UntraceableModelError", "capture_graph",
           "common_path", "node_module_path"]

_TORCH_DIR = str(Path(torch.__file__).resolve().parent)


class UntraceableModelError(TypeError):
    """Neither torch.fx nor torch.export can capture the model as a graph."""


class InputShapeError(ValueError):
    """The dummy input of the given shape does not run through the model."""


@dataclass
class CapturedGraph:
    """A model as one canonical GraphModule; `method` is "fx" or "export"."""

    graph_module: fx.GraphModule
    method: str


def node_module_path(node: fx.Node) -> str:
    """The dotted path of the innermost model module a node belongs to ("" at the top level).

    Read from `nn_module_stack` (kept by both fx and export, with original names), so it
    is independent of the sanitized attribute paths in the captured GraphModule.
    """
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        value = next(reversed(stack.values()))
        path = value[0] if isinstance(value, tuple) else value
        return str(path)
    return str(node.target) if node.op == "call_module" else ""


# ----------------------------------------------------------------------------- errors


def _user_frame(exc: BaseException) -> str:
    """The innermost traceback frame outside torch: the user's line the capture choked on."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not str(Path(f.filename).resolve()).startswith(_TORCH_DIR)
              and not str(Path(f.filename).resolve()) == str(Path(__file__).resolve())]
    if not frames:
        return "an unknown location"
    f = frames[-1]
    code = f" `{f.line.strip()}`" if f.line else ""
    return f"{f.filename}:{f.lineno} in {f.name}(){code}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().split("\n")[0]
    return text[:400]


def _check_runs(model: nn.Module, shape: tuple[int, ...]) -> None:
    """Run the model eagerly once, so a wrong input shape is reported as such, not as a capture failure."""
    entered: list[str] = []
    names = {m: n for n, m in model.named_modules()}
    hooks = [m.register_forward_pre_hook(lambda mod, _a: entered.append(names[mod])) for m in model.modules()]
    try:
        with torch.no_grad():
            model(torch.zeros(2, *shape))
    except Exception as e:  # noqa: BLE001 - any failure of the dummy batch is an input problem
        where = f" in module '{entered[-1]}'" if entered and entered[-1] else ""
        raise InputShapeError(
            f"input_shape {shape} does not fit the model: running a dummy batch failed{where}: "
            f"{type(e).__name__}: {_first_line(e)}. Fix: pass the (C, H, W) shape the model was built for."
        ) from e
    finally:
        for h in hooks:
            h.remove()


# ----------------------------------------------------------------------------- capture


def capture_graph(model: nn.Module, shape: tuple[int, ...]) -> CapturedGraph:
    """Capture `model` (not modified) for inputs `(N, *shape)`: fx first, torch.export second.

    Raises:
        InputShapeError: fx failed and the model does not even run on a batch of `shape`.
        UntraceableModelError: both captures failed; the message names both causes.
    """
    work = copy.deepcopy(model).eval()
    try:
        gm = fx.symbolic_trace(work)
        method = "fx"
    except Exception as fx_error:  # fx raises TraceError, TypeError, RuntimeError, ... on Proxies
        _check_runs(work, shape)
        try:
            gm = _export(work, shape)
            method = "export"
        except Exception as export_error:  # noqa: BLE001 - reported together with the fx failure
            raise UntraceableModelError(
                f"torch.fx cannot trace {type(model).__name__}: {type(fx_error).__name__}: {_first_line(fx_error)} "
                f"(at {_user_frame(fx_error)}). fx traces symbolically with placeholder tensors, so Python "
                "control flow that depends on tensor values (if/while on a tensor, len() or iteration over a "
                "tensor, .item(), data-dependent shapes) cannot be recorded. torch.export, which specializes "
                f"shape-dependent branches, failed too: {type(export_error).__name__}: {_first_line(export_error)} "
                f"(at {_user_frame(export_error)}). Fix: rewrite that step without data-dependent control flow "
                "(e.g. torch.where), or move it into a submodule the tracer treats as a leaf."
            ) from fx_error
    gm = _canonicalize(gm, work, shape)
    if method == "export":
        _mark_batch(gm)
    return CapturedGraph(gm, method)


#: node.meta key: True on integer nodes computed from the batch size alone (blocks recompute them).
BATCH_KEY = "legodnn_batch"
#: node.meta key: False on tensors whose first dimension is not the batch (never a block boundary).
BATCH_FIRST_KEY = "legodnn_batch_first"


def _mark_batch(gm: fx.GraphModule) -> None:
    """Mark export's batch-size arithmetic, and tensors that do not start with the batch dimension.

    torch.export computes the symbolic batch size once (`x.size(0)`) and reuses it in every
    later reshape, which would keep an integer live across the whole graph; a block can
    recompute it from its own input instead, as long as block inputs start with the batch.
    """
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    val = placeholder.meta.get("val")
    batch = str(val.shape[0]) if isinstance(val, torch.Tensor) else None
    for node in gm.graph.nodes:
        if node.op == "call_method" and node.target == "size" and node.args[:2] == (placeholder, 0):
            node.meta[BATCH_KEY] = True
        elif node.op == "call_function" and getattr(node.target, "__module__", "") in ("_operator", "operator") \
                and node.all_input_nodes and all(n.meta.get(BATCH_KEY) for n in node.all_input_nodes):
            node.meta[BATCH_KEY] = True
        value = node.meta.get("val")
        if batch is not None and isinstance(value, torch.Tensor) and value.dim() > 0:
            node.meta[BATCH_FIRST_KEY] = str(value.shape[0]) == batch


def _export(model: nn.Module, shape: tuple[int, ...]) -> fx.GraphModule:
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    # torch.export prints the partial graph of a failed export to stderr; the failure is reported in our error.
    with contextlib.redirect_stderr(io.StringIO()):
        program = torch.export.export(model, (torch.zeros(2, *shape),), dynamic_shapes=({0: batch},), strict=False)
    gm = program.module()
    _translate_aten(gm.graph)
    return gm


# ----------------------------------------------------------------------------- aten -> torch

_ATEN = torch.ops.aten
# aten ops that are the functional form of a torch.nn.functional function with the same arguments.
_FUNCTIONAL = ("hardswish", "hardsigmoid", "silu", "gelu", "linear", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
               "avg_pool2d", "avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
               "hardtanh", "relu6", "leaky_relu", "mish", "pad", "softplus", "glu", "scaled_dot_product_attention")
# aten ops best written as a Tensor method (views, and sym_size -> size).
_METHODS = {"view": "view", "expand": "expand", "contiguous": "contiguous", "sym_size": "size",
            "unflatten": "unflatten", "repeat": "repeat", "view_as": "view_as", "expand_as": "expand_as"}
_DROPPED = {"_assert_tensor_metadata", "_assert_scalar", "_assert_async", "sym_constrain_range_for_size",
            "sym_constrain_range"}
_UPSAMPLE = {"upsample_bilinear2d": "bilinear", "upsample_nearest2d": "nearest", "upsample_bicubic2d": "bicubic"}


def _translate_aten(graph: fx.Graph) -> None:
    """Rewrite aten-level call_function nodes in place as the torch-level calls they bind to."""
    for node in list(graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        packet = node.target.overloadpacket.__name__
        if packet in _DROPPED:
            if not node.users:
                graph.erase_node(node)
            continue
        if packet in _METHODS:
            node.op, node.target = "call_method", _METHODS[packet]
        elif packet == "slice":
            _slice_to_getitem(node)
        elif packet in _UPSAMPLE:
            _upsample_to_interpolate(node, _UPSAMPLE[packet])
        elif packet in _FUNCTIONAL and callable(getattr(F, packet, None)):
            node.target = getattr(F, packet)
        elif callable(getattr(torch, packet, None)) and not packet.startswith("_"):
            node.target = getattr(torch, packet)
        elif packet.endswith("_") and packet[:-1] in _FUNCTIONAL:  # silu_, hardswish_, ...
            node.target, node.kwargs = getattr(F, packet[:-1]), {**node.kwargs, "inplace": True}
        elif packet.endswith("_") and not packet.startswith("_") and callable(getattr(torch.Tensor, packet, None)):
            node.op, node.target = "call_method", packet  # in-place ops: add_, relu_, ...
        # Anything else stays an aten op; the safe module files accept it only where it is
        # the same computation as an allowed torch function.


def _slice_to_getitem(node: fx.Node) -> None:
    x, dim, start, end, step = (list(node.args) + [0, None, None, 1][len(node.args) - 1:])[:5]
    index = tuple([slice(None)] * int(dim) + [slice(start, end, step)])
    node.target, node.args, node.kwargs = operator.getitem, (x, index), {}


def _upsample_to_interpolate(node: fx.Node, mode: str) -> None:
    x, size = node.args[0], node.args[1]
    kwargs: dict[str, Any] = {"size": tuple(size) if size is not None else None, "mode": mode}
    if mode != "nearest":
        kwargs["align_corners"] = bool(node.args[2]) if len(node.args) > 2 else False
        scales = node.args[3] if len(node.args) > 3 else None
    else:
        scales = node.args[2] if len(node.args) > 2 else None
    if size is None:
        kwargs["scale_factor"] = tuple(scales)
    node.target, node.args, node.kwargs = F.interpolate, (x,), kwargs


# ----------------------------------------------------------------------------- canonical form

_ASSERTS: set[Any] = {torch._assert}
_CONVS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3, torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_LAYERS: dict[Any, tuple[str, tuple[str, ...]]] = {
    **{fn: ("conv", _CONV_ARGS) for fn in _CONVS},
    F.linear: ("linear", ("input", "weight", "bias")),
    F.batch_norm: ("batch_norm", ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")),
    torch.batch_norm: ("batch_norm", ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum",
                                      "eps", "cudnn_enabled")),
    F.layer_norm: ("layer_norm", ("input", "normalized_shape", "weight", "bias", "eps")),
    torch.layer_norm: ("layer_norm", ("input", "normalized_shape", "weight", "bias", "eps", "cudnn_enable")),
    F.group_norm: ("group_norm", ("input", "num_groups", "weight", "bias", "eps")),
    torch.group_norm: ("group_norm", ("input", "num_groups", "weight", "bias", "eps", "cudnn_enabled")),
}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def _canonicalize(gm: fx.GraphModule, original: nn.Module, shape: tuple[int, ...]) -> fx.GraphModule:
    if any(n.op == "call_function" and n.target in _LAYERS for n in gm.graph.nodes):
        with torch.no_grad():  # input ranks for the lifted norms
            ShapeProp(gm).propagate(torch.zeros(2, *shape))
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "output":
            result = node.args[0]
            while isinstance(result, (tuple, list)) and len(result) == 1:  # export returns (out,)
                result = result[0]
            graph.output(fx.map_arg(result, lambda n: env[n]))
        elif node.op == "call_module" and node.target == "_guards_fn":
            continue
        elif node.op == "call_function" and node.target in _ASSERTS:
            continue
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.eliminate_dead_code(is_impure_node=_is_impure)
    lifted: dict[str, tuple[nn.Module, str]] = {}
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _LAYERS:
            _lift(node, graph, gm, original, lifted)
    graph.eliminate_dead_code(is_impure_node=_is_impure)
    root, paths = nn.Module(), _Paths()
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr") and node.target not in lifted:
            node.target = paths.place(root, node.target, _get_path(gm, node.target))
    for node in graph.nodes:
        if node.op == "call_module" and node.target in lifted:
            module, prefix = lifted[node.target]
            node.target = paths.place(root, _module_path(prefix, paths), module)
    graph.lint()
    return fx.GraphModule(root, graph, class_name=type(original).__name__).eval()


def _is_impure(node: fx.Node) -> bool:
    if node.op in ("placeholder", "output"):
        return True
    if node.op == "call_module":
        return False  # the model's own layers, in eval mode: pure
    if node.op == "call_method":
        return str(node.target).endswith("_")  # in-place Tensor methods mutate their input
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return name.endswith("_") or node.is_impure()
    return False


def _get_path(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+")


class _Paths:
    """Places modules and tensors in a fresh root under plain, unique attribute paths."""

    def __init__(self) -> None:
        self.taken: dict[str, Any] = {}
        self.inner: set[str] = set()  # strict ancestors of taken paths
        self.renamed: dict[str, str] = {}

    @staticmethod
    def sanitize(path: str) -> str:
        parts = []
        for part in path.split("."):
            clean = re.sub(r"[^A-Za-z0-9_]", "_", part) or "m"
            if not _PLAIN.fullmatch(clean):
                clean = f"m{clean}"
            if clean.startswith("__") or keyword.iskeyword(clean) or hasattr(fx.GraphModule, clean):
                clean = f"m_{clean}"
            parts.append(clean)
        return ".".join(parts)

    def free(self, path: str) -> bool:
        parts = path.split(".")
        ancestors = (".".join(parts[:i]) for i in range(1, len(parts)))
        return path not in self.taken and path not in self.inner and not any(a in self.taken for a in ancestors)

    def place(self, root: nn.Module, path: str, value: Any) -> str:
        """Install `value` at the sanitized `path` (or a numbered variant) once; return where it went."""
        if path in self.renamed and self.taken.get(self.renamed[path]) is value:
            return self.renamed[path]
        base = self.sanitize(path)
        try:
            if _get_path(root, base) is value:  # e.g. a weight read by get_attr from a layer already placed
                self.renamed[path] = base
                return base
        except AttributeError:
            pass
        flat = base.replace(".", "_")
        candidates = [base, *(f"{base}_{i}" for i in range(1, 10)), *(f"{flat}_{i}" for i in range(1, 10_000))]
        new = next(c for c in candidates if self.free(c))
        install(root, new, value)
        self.taken[new] = value
        parts = new.split(".")
        self.inner.update(".".join(parts[:i]) for i in range(1, len(parts)))
        self.renamed[path] = new
        return new


def _bind(node: fx.Node, names: Sequence[str]) -> dict[str, Any]:
    bound = dict(zip(names, node.args))
    bound.update(node.kwargs)
    return bound


def _stored(gm: fx.GraphModule, arg: Any) -> torch.Tensor | None:
    """The tensor a get_attr argument reads, None for an absent one; KeyError for a computed one."""
    if arg is None:
        return None
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        return _get_path(gm, arg.target)
    raise KeyError("not a stored tensor")


_KIND_NAME = {"conv": "conv", "linear": "linear", "batch_norm": "bn", "layer_norm": "norm", "group_norm": "norm"}


def _build_layer(kind: str, dims: int, a: dict[str, Any], weight: Any, bias: Any, stats: tuple[Any, Any],
                 rank: int, source: nn.Module | None) -> nn.Module:
    """The nn layer computing what the functional call computes (on the meta device; tensors adopted later)."""
    if kind == "conv":
        groups = int(a.get("groups", 1))
        conv_cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
        return conv_cls(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride=a.get("stride", 1),
                        padding=a.get("padding", 0), dilation=a.get("dilation", 1), groups=groups, bias=bias is not None)
    if kind == "linear":
        return nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    if kind == "batch_norm":
        momentum = source.momentum if isinstance(source, nn.modules.batchnorm._BatchNorm) else a.get("momentum", 0.1)
        return _BN.get(rank, nn.BatchNorm2d)(stats[0].shape[0], eps=float(a.get("eps", 1e-5)), momentum=momentum,
                                               affine=weight is not None)
    if kind == "layer_norm":
        return nn.LayerNorm(tuple(int(v) for v in a["normalized_shape"]), eps=float(a.get("eps", 1e-5)),
                            elementwise_affine=weight is not None, bias=bias is not None)
    return nn.GroupNorm(int(a["num_groups"]), weight.shape[0], eps=float(a.get("eps", 1e-5)), affine=True)


def _lift(node: fx.Node, graph: fx.Graph, gm: fx.GraphModule, original: nn.Module,
          lifted: dict[str, tuple[nn.Module, str]]) -> None:
    """Replace one functional layer on stored parameters by the equivalent nn layer (in place).

    The call becomes a call_module to a temporary target registered in `lifted`, with the
    path prefix its parameters had; a call whose weights are computed (weight
    standardization, ...) or whose arguments do not fit a layer stays functional.
    """
    kind, names = _LAYERS[node.target]
    a = _bind(node, names)
    try:
        weight, bias = _stored(gm, a.get("weight")), _stored(gm, a.get("bias"))
        stats = (_stored(gm, a.get("running_mean")), _stored(gm, a.get("running_var")))
    except KeyError:
        return
    if (weight is not None and not isinstance(weight, nn.Parameter)) or (
            kind in ("conv", "linear", "group_norm") and weight is None):
        return
    if kind == "batch_norm" and (a.get("training", False) or stats[0] is None or stats[1] is None):
        return
    dims = _CONVS.get(node.target, 0)
    if kind == "conv" and weight.dim() - 2 != dims:
        return
    meta = node.meta.get("tensor_meta")
    rank = len(meta.shape) if meta is not None and hasattr(meta, "shape") else 4
    source = _original_module(original, node)
    try:
        with torch.device("meta"):
            module = _build_layer(kind, dims, a, weight, bias, stats, rank, source)
    except Exception:  # noqa: BLE001 - an unusual argument combination: leave the op functional
        return
    if weight is not None:
        module.weight = weight
    if bias is not None:
        module.bias = bias
    if kind == "batch_norm":
        module.running_mean, module.running_var = stats
        tracked = getattr(source, "num_batches_tracked", None)
        module.num_batches_tracked = tracked if isinstance(tracked, torch.Tensor) else torch.tensor(0)
    prefix = common_path([n.target.rsplit(".", 1)[0] if "." in n.target else "" for n in node.all_input_nodes
                          if n.op == "get_attr"])
    key = f"__lifted_{len(lifted)}"
    path = f"{prefix}.{_KIND_NAME[kind]}" if prefix else _KIND_NAME[kind]
    lifted[key] = (module.eval(), path)
    with graph.inserting_before(node):
        call = graph.create_node("call_module", key, (a["input"],), {}, name=_Paths.sanitize(path).replace(".", "_"))
    call.meta = dict(node.meta)
    node.replace_all_uses_with(call)
    graph.erase_node(node)


def _module_path(path: str, paths: _Paths) -> str:
    """A lifted layer lives at its parameters' owner path (`bn1`), or `<owner>.<kind>` when that is taken."""
    owner = path.rsplit(".", 1)[0] if "." in path else ""
    return owner if owner and paths.free(paths.sanitize(owner)) else path


def common_path(paths: Sequence[str]) -> str:
    """The longest common dotted prefix of module paths ("" when they share none)."""
    parts = [p.split(".") if p else [] for p in paths]
    common: list[str] = []
    for level in zip(*parts):
        if all(x == level[0] for x in level):
            common.append(level[0])
        else:
            break
    return ".".join(common)


def _original_module(original: nn.Module, node: fx.Node) -> nn.Module | None:
    try:
        return original.get_submodule(node_module_path(node))
    except AttributeError:
        return None
