"""What a block costs to store and run: parameters, bytes, FLOPs and peak memory at batch 1.

The optimizer budgets memory on a device, so "memory" here means what running the block
needs (its weights plus the activations alive at the same time), not the size of a file.
FLOPs come from PyTorch's own counter (`torch.utils.flop_counter.FlopCounterMode`), never
hand counting, and are reported as FLOPs: 2 per multiply-add (1 MAC = 2 FLOPs).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from legoblocks.flops import count_flops


@dataclass(frozen=True)
class Cost:
    """Static and batch-1 costs of one module.

    params: number of parameter elements. weight_bytes: bytes of every parameter and buffer
    (BatchNorm running statistics ship with the weights). flops: FLOPs of one forward pass
    at batch 1 (2 per multiply-add). activation_bytes: bytes of the output at batch 1.
    peak_bytes: weight_bytes plus the largest total of activations alive at once at batch 1.
    """

    params: int
    weight_bytes: int
    flops: int
    activation_bytes: int
    peak_bytes: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def _unique_tensors(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    # Tied weights appear once in memory, so they are counted once.
    seen: set[int] = set()
    unique = []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            unique.append(t)
    return unique


def count_params(module: nn.Module) -> int:
    """Parameter elements, each shared tensor counted once."""
    return sum(p.numel() for p in _unique_tensors(module.parameters()))


def weight_bytes(module: nn.Module) -> int:
    """Bytes of parameters and buffers: what a device must hold to run the module."""
    tensors = _unique_tensors([*module.parameters(), *module.buffers()])
    return sum(t.numel() * t.element_size() for t in tensors)


def _device_of(module: nn.Module) -> torch.device:
    first = next(module.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _example(module: nn.Module, in_shape: Sequence[int]) -> torch.Tensor:
    if not in_shape or any(int(d) <= 0 for d in in_shape):
        raise ValueError(
            f"in_shape must be a non-empty (C, H, W)-like shape of positive sizes without the "
            f"batch dimension, got {tuple(in_shape)}"
        )
    return torch.zeros(1, *(int(d) for d in in_shape), device=_device_of(module))


def _nbytes(value: object) -> int:
    """Bytes of a tensor, or of every tensor inside a (nested) tuple/list/dict output."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    return 0


def _meta_bytes(meta: object) -> int:
    """Bytes described by ShapeProp's `tensor_meta` (a TensorMetadata or a nest of them)."""
    if meta is None:
        return 0
    if hasattr(meta, "shape") and hasattr(meta, "dtype"):
        numel = 1
        for d in meta.shape:
            numel *= int(d)
        return numel * torch.empty((), dtype=meta.dtype).element_size()
    if isinstance(meta, (tuple, list)):
        return sum(_meta_bytes(m) for m in meta)
    if isinstance(meta, dict):
        return sum(_meta_bytes(m) for m in meta.values())
    return 0


# Operations whose result shares storage with their first input: they allocate nothing.
_VIEW_METHODS = {
    "view", "reshape", "flatten", "squeeze", "unsqueeze", "permute", "transpose", "expand",
    "view_as", "reshape_as", "t", "narrow", "unflatten", "detach",
}
_VIEW_FUNCTIONS = {
    torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute,
    torch.transpose, torch.narrow, torch.detach, operator.getitem,
}
_VIEW_MODULES = (nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout)


def _is_inplace_module(module: nn.Module) -> bool:
    return bool(getattr(module, "inplace", False))


def _aliases_input(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True when `node`'s output reuses the storage of its first tensor argument."""
    if node.op == "call_method":
        return node.target in _VIEW_METHODS or str(node.target).endswith("_")
    if node.op == "call_function":
        if node.target in _VIEW_FUNCTIONS:
            return True
        return bool(node.kwargs.get("inplace", False)) or getattr(node.target, "__name__", "").endswith("_")
    if node.op == "call_module":
        sub = gm.get_submodule(str(node.target))
        # Dropout is the identity at inference time.
        return isinstance(sub, _VIEW_MODULES) or _is_inplace_module(sub)
    return False


def _first_node_arg(node: fx.Node) -> fx.Node | None:
    for arg in node.args:
        if isinstance(arg, fx.Node):
            return arg
    return None


def graph_peak_activation_bytes(gm: fx.GraphModule, example: torch.Tensor) -> int:
    """Largest total of simultaneously live activation bytes when `gm` runs on `example`.

    Method: ShapeProp runs the graph once and records every value's shape and dtype. The
    nodes are then walked in execution order (the order the generated forward runs them).
    Each value is a buffer that is allocated when its node runs and freed right after its
    last user has run; the block input is live from the start and the output until the end.
    Views, `getitem` and in-place ops (ReLU(inplace=True), `add_`) allocate nothing and
    keep their source buffer alive as long as they are used. While a node runs, its inputs
    and its freshly allocated output are live together; the peak is the largest such sum.
    Workspace inside a single kernel (e.g. im2col buffers) is not visible to the graph and
    is not counted: the figure is a lower bound on what an allocator needs.
    """
    ShapeProp(gm).propagate(example)
    nodes = list(gm.graph.nodes)
    order = {node: i for i, node in enumerate(nodes)}

    # Each value's storage root: itself, or (for aliasing ops) its source's root.
    root: dict[fx.Node, fx.Node] = {}
    size: dict[fx.Node, int] = {}
    for node in nodes:
        source = _first_node_arg(node)
        if source is not None and _aliases_input(gm, node):
            root[node] = root[source]
        else:
            root[node] = node
            size[node] = 0 if node.op in ("output", "get_attr") else _meta_bytes(node.meta.get("tensor_meta"))

    # A buffer lives until the last user of any of its aliases has run.
    last_use: dict[fx.Node, int] = {r: order[r] for r in size}
    for node in nodes:
        for user in node.users:
            r = root[node]
            last_use[r] = max(last_use[r], order[user])
    # Values returned by the block stay live to the end.
    for node in nodes:
        if node.op == "output":
            for returned in node.all_input_nodes:
                last_use[root[returned]] = len(nodes)

    live: dict[fx.Node, int] = {}
    peak = 0
    for i, node in enumerate(nodes):
        r = root[node]
        if r is node and size.get(node, 0) > 0:
            live[node] = size[node]
        peak = max(peak, sum(live.values()))
        for buffer in [b for b in live if last_use[b] <= i]:
            del live[buffer]
    return peak


def hook_peak_activation_bytes(module: nn.Module, example: torch.Tensor) -> int:
    """Estimate for modules torch.fx cannot trace: the largest (input + output) of any leaf.

    Forward hooks see each leaf module's input and output, not which tensors a Python
    forward keeps alive (e.g. a residual branch's input), so this is an estimate. It is
    at least the block's own input plus output.
    """
    largest = 0
    handles = []

    def record(_mod: nn.Module, inputs: tuple, output: object) -> None:
        nonlocal largest
        largest = max(largest, _nbytes(inputs) + _nbytes(output))

    for sub in module.modules():
        if not list(sub.children()):
            handles.append(sub.register_forward_hook(record))
    try:
        with torch.no_grad():
            out = module(example)
    finally:
        for handle in handles:
            handle.remove()
    return max(largest, _nbytes(example) + _nbytes(out))


def peak_activation_bytes(module: nn.Module, in_shape: Sequence[int]) -> int:
    """Peak live activation bytes at batch 1: exact graph walk when traceable, else a hook estimate."""
    example = _example(module, in_shape)
    gm = module if isinstance(module, fx.GraphModule) else None
    if gm is None:
        try:
            gm = fx.symbolic_trace(module)
        except Exception:  # noqa: BLE001 - any tracing failure means "use the estimate"
            gm = None
    if gm is None:
        return hook_peak_activation_bytes(module, example)
    with torch.no_grad():
        return graph_peak_activation_bytes(gm, example)


def measure_cost(module: nn.Module, in_shape: Sequence[int]) -> Cost:
    """Every cost of `module` for an input of shape `in_shape` (no batch dimension), at batch 1.

    The module is run in eval mode (so BatchNorm uses its running statistics and nothing
    is updated); its previous mode is restored.
    """
    was_training = module.training
    module.eval()
    try:
        example = _example(module, in_shape)
        with torch.no_grad():
            activation = _nbytes(module(example))
        weights = weight_bytes(module)
        return Cost(
            params=count_params(module),
            weight_bytes=weights,
            flops=count_flops(module, in_shape),
            activation_bytes=activation,
            peak_bytes=weights + peak_activation_bytes(module, in_shape),
        )
    finally:
        module.train(was_training)
