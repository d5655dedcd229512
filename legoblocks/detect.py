"""Cut a traced CNN into a chain of blocks that reproduces it exactly.

Algorithm (DESIGN.md step 1):

1. **Trace.** `torch.fx.symbolic_trace` on an eval-mode deep copy. A failure becomes an
   `UntraceableModelError` naming the user's source line and the fx limitation
   (data-dependent control flow and friends).
2. **Shapes.** One interpreted run (like `ShapeProp`) on a dummy batch of `input_shape`; a
   shape that does not fit becomes an `InputShapeError` naming the failing layer, what it
   expects and what it got.
3. **Cut points.** Nodes are numbered in graph order (`get_attr` constants are left out:
   they are copied into every block that reads them). A node is a cut point when it
   yields one tensor, has a user, and no edge jumps over it: every earlier value is dead
   afterwards, so exactly one tensor is live. The input placeholder is the first cut.
4. **Units.** The nodes between two consecutive cut points form a segment. A segment of
   several nodes that holds a parametrised layer (a residual unit, a concat branch) is an
   atomic *composite* unit; every other segment is a *plain* node.
5. **Head.** Everything after the last segment holding a convolution (global pooling,
   flatten, classifier) is the head.
6. **Ownership.** The parents of the composite units' common module paths (e.g. `layer1`
   for `layer1.0`) are unit containers; a plain node under `<container>.<child>` belongs to
   that child. Consecutive units with the same owner merge, so MobileNetV2's inverted
   residuals without a skip (plain chains) stay whole, named `features.2`.
7. **Stem.** The un-owned plain nodes before the first owned/composite unit; for a model
   without any (a plain chain such as VGG) the nodes up to its first down-sampling.
8. **Plain runs.** Other un-owned plain nodes are split after each down-sampling node
   (pooling, strided conv); a group with fewer than two conv/linear layers has no inner
   channels to prune, so it joins its next scalable neighbour (its previous one at the end).
9. **Target count.** With `target_blocks=K` (the total block count, stem and head
   included) the adjacent scalable pair with the smallest combined FLOPs merges until K
   blocks remain.
10. **Extract.** Each group becomes its own `torch.fx.GraphModule` (one input, one
    output, deep-copied so blocks share no parameters with the model or each other),
    named by its owner or the common module path of its layers (`layer1.0`, `cat2`), else
    `block<i>` (its chain index) when that path is empty or shared with another block;
    stem and head are `"stem"`/`"head"` and are not scalable. Params and FLOPs
    (`FlopCounterMode`, batch 1) are measured on each block alone, so the blocks' FLOPs sum
    to the model's.

Expected results: ResNet-20 -> stem + 9 residual blocks (`layer1.0` ... `layer3.2`) + head;
VGG-11 -> stem + 3 + head (the 128-channel stage, a single conv, joins the next stage);
MobileNetV2 -> stem + one block per inverted residual `features.0` ... `features.15` + one
block holding the last inverted residual and the final 1x1 conv (a lone conv has nothing to
prune, so it merges) + head = 19 blocks; pass `target_blocks` for fewer, FLOP-balanced
blocks. A model that starts with a residual unit has no stem, one that ends in a conv
has no head.
"""

from __future__ import annotations

import copy
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch import nn

from legoblocks.flops import count_flops

__all__ = [
    "BlockSpec",
    "BlockedModel",
    "UntraceableModelError",
    "InputShapeError",
    "ChainMismatchError",
    "detect_blocks",
    "verify_chain",
    "count_flops",
]

_TORCH_DIR = str(Path(torch.__file__).resolve().parent)
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CONV_FUNCS = {torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d,
               torch.conv1d, torch.conv2d, torch.conv3d}


class UntraceableModelError(TypeError):
    """torch.fx cannot trace the model symbolically (e.g. data-dependent control flow)."""


class InputShapeError(ValueError):
    """The dummy input of the given shape does not run through the model."""


class ChainMismatchError(AssertionError):
    """The chain of blocks does not reproduce the model's output."""


@dataclass(frozen=True)
class BlockSpec:
    """What the rest of the system knows about a block without loading it."""

    name: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    params: int
    flops: int
    scalable: bool

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["in_shape"], d["out_shape"] = list(self.in_shape), list(self.out_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BlockSpec":
        missing = {"name", "in_shape", "out_shape", "params", "flops", "scalable"} - set(d)
        if missing:
            raise ValueError(f"block spec {d.get('name', '?')!r} lacks field(s) {sorted(missing)}")
        return cls(
            name=str(d["name"]),
            in_shape=tuple(int(v) for v in d["in_shape"]),
            out_shape=tuple(int(v) for v in d["out_shape"]),
            params=int(d["params"]),
            flops=int(d["flops"]),
            scalable=bool(d["scalable"]),
        )


@dataclass
class BlockedModel:
    """A model as a chain of blocks: `chain()(x) == model(x)` to float tolerance."""

    specs: list[BlockSpec]
    blocks: list[nn.Module]
    input_shape: tuple[int, ...]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    def chain(self) -> nn.Sequential:
        """The blocks in order (the same module objects: deep-copy before changing them)."""
        return nn.Sequential(*self.blocks)


# ----------------------------------------------------------------------------- tracing

def _user_frame(exc: BaseException) -> str:
    """The innermost traceback frame outside torch: the user's line fx choked on."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not str(Path(f.filename).resolve()).startswith(_TORCH_DIR)]
    if not frames:
        return "an unknown location"
    f = frames[-1]
    code = f" `{f.line.strip()}`" if f.line else ""
    return f"{f.filename}:{f.lineno} in {f.name}(){code}"


def _trace(model: nn.Module) -> fx.GraphModule:
    work = copy.deepcopy(model).eval()
    try:
        return fx.symbolic_trace(work)
    except Exception as e:  # fx raises TraceError, TypeError, RuntimeError, ... on Proxies
        raise UntraceableModelError(
            f"torch.fx cannot trace {type(model).__name__}: {type(e).__name__}: {e} "
            f"(at {_user_frame(e)}). fx traces symbolically with placeholder tensors, so Python "
            "control flow that depends on tensor values (if/while on a tensor, len() or "
            "iteration over a tensor, .item(), data-dependent shapes) cannot be recorded. "
            "Fix: rewrite that step without data-dependent control flow (e.g. torch.where), or "
            "move it into a submodule the tracer treats as a leaf."
        ) from e


def _check_input_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(input_shape)
    if not shape or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape):
        raise InputShapeError(
            f"input_shape must be positive integers without the batch dimension, e.g. (1, 28, 28); got {input_shape!r}"
        )
    return shape


_SHAPE = "legodnn_shape"  # node.meta key: the full output shape (batch first), None if not a tensor


class _ShapeRecorder(fx.Interpreter):
    """Runs the graph once, records each node's output shape and the node being run.

    (torch's ShapeProp does the same but prints a traceback to stderr on failure; we want
    one clear error naming the node instead.)
    """

    current: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        result = super().run_node(n)
        n.meta[_SHAPE] = tuple(result.shape) if isinstance(result, torch.Tensor) else None
        return result


def _first_layer_expectation(gm: fx.GraphModule, shape: tuple[int, ...]) -> str:
    """What the first conv/linear layer wants, when the given shape contradicts it."""
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        m = modules[node.target]
        if isinstance(m, _CONV_TYPES):
            dims = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}.get(type(m), None)
            if dims is not None and len(shape) != dims + 1:
                return (f"the first layer '{node.target}' ({type(m).__name__}) expects an input of "
                        f"{dims + 1} dims (C, {', '.join('HWD'[:dims])}) but input_shape has {len(shape)}; ")
            if m.in_channels != shape[0]:
                return (f"the first layer '{node.target}' expects {m.in_channels} input channel(s) "
                        f"but input_shape has C={shape[0]}; ")
            return ""
        if isinstance(m, nn.Linear):
            return ""
    return ""


def _propagate_shapes(gm: fx.GraphModule, shape: tuple[int, ...]) -> None:
    prop = _ShapeRecorder(gm)
    try:
        with torch.no_grad():
            prop.run(torch.zeros(2, *shape))
    except Exception as e:
        # fx's Interpreter appends "While executing ..." to the message; the first line is the cause.
        cause = str(e).strip().split("\n")[0]
        node = prop.current
        where = f"at node '{node.name}' ({node.op} {node.target})" if node is not None else ""
        hint = _first_layer_expectation(gm, shape)
        failing = dict(gm.named_modules()).get(str(node.target)) if node is not None and node.op == "call_module" else None
        if not hint and isinstance(failing, nn.Linear):
            hint = (f"layer '{node.target}' expects {failing.in_features} input features, so the spatial "
                    f"size (H, W) in input_shape is probably not the one the model was built for; ")
        raise InputShapeError(
            f"input_shape {shape} does not fit the model: {hint}"
            f"running a dummy batch failed {where}: {type(e).__name__}: {cause}. "
            "Fix: pass the (C, H, W) shape the model was built for."
        ) from e


# ----------------------------------------------------------------------------- cut points

def _is_tensor(node: fx.Node) -> bool:
    return node.meta.get(_SHAPE) is not None


def _cut_points(order: list[fx.Node], output_arg: fx.Node) -> list[int]:
    """Indices (into `order`) of nodes after which exactly one tensor is live."""
    index = {n: i for i, n in enumerate(order)}
    out_pos = len(order)
    last_use = [max((index.get(u, out_pos) for u in n.users), default=-1) for n in order]
    cuts = [0]  # the placeholder
    reach = last_use[0]  # furthest use of any value produced before position i
    for i in range(1, len(order)):
        n = order[i]
        if reach <= i and n.users and _is_tensor(n):
            cuts.append(i)
        reach = max(reach, last_use[i])
    if order[cuts[-1]] is not output_arg:
        raise RuntimeError("internal error: the model output is not a cut point")
    return cuts


# ----------------------------------------------------------------------------- grouping

def _node_path(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack)) if stack else ""


def _common_path(paths: Sequence[str]) -> str:
    parts = [p.split(".") if p else [] for p in paths]
    common: list[str] = []
    for level in zip(*parts):
        if all(x == level[0] for x in level):
            common.append(level[0])
        else:
            break
    return ".".join(common)


@dataclass
class _Unit:
    """A run of graph nodes that will end up in one block."""

    nodes: list[fx.Node]
    composite: bool
    owner: str | None = None
    convs: int = 0        # conv layers inside
    param_layers: int = 0  # conv + linear layers: fewer than 2 means no inner channels
    downsamples: bool = False


def _layer_kind(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, _CONV_TYPES):
            return "conv"
        if isinstance(m, nn.Linear):
            return "linear"
        return "param" if any(True for _ in m.parameters()) else ""
    if node.op == "call_function":
        if node.target in _CONV_FUNCS:
            return "conv"
        if node.target in (torch.nn.functional.linear,):
            return "linear"
    return ""


def _spatial(node: fx.Node) -> int | None:
    shape = node.meta.get(_SHAPE)
    if shape is not None and len(shape) >= 3:
        size = 1
        for v in shape[2:]:
            size *= int(v)
        return size
    return None


def _make_units(segments: list[list[fx.Node]], prev_outputs: list[fx.Node],
                modules: dict[str, nn.Module]) -> list[_Unit]:
    units = []
    for seg, prev in zip(segments, prev_outputs):
        kinds = [_layer_kind(n, modules) for n in seg]
        unit = _Unit(
            nodes=seg,
            composite=len(seg) > 1 and any(kinds),
            convs=sum(k == "conv" for k in kinds),
            param_layers=sum(k in ("conv", "linear") for k in kinds),
        )
        before, after = _spatial(prev), _spatial(seg[-1])
        unit.downsamples = before is not None and after is not None and after < before
        units.append(unit)
    return units


def _assign_owners(units: list[_Unit]) -> None:
    containers = set()
    for u in units:
        if u.composite:
            path = _common_path([_node_path(n) for n in u.nodes])
            if "." in path:
                containers.add(path.rsplit(".", 1)[0])

    def owner_of(path: str) -> str | None:
        best = None
        for c in containers:
            if path.startswith(c + ".") and (best is None or len(c) > len(best)):
                best = c
        if best is None:
            return None
        child = path[len(best) + 1:].split(".", 1)[0]
        return f"{best}.{child}"

    for u in units:
        path = _common_path([_node_path(n) for n in u.nodes])
        u.owner = owner_of(path)


def _group_path(unit: _Unit, modules: dict[str, nn.Module]) -> str:
    """The name a group earns: its owner ("features.2"), else the common module path of its
    layers with parameters (so a pooling node merged in does not blur "cat2"), else of all nodes."""
    if unit.owner:
        return unit.owner
    layers = [n for n in unit.nodes if _layer_kind(n, modules)]
    return _common_path([_node_path(n) for n in (layers or unit.nodes)])


def _merge(a: _Unit, b: _Unit) -> _Unit:
    return _Unit(nodes=a.nodes + b.nodes, composite=a.composite or b.composite,
                 owner=a.owner if a.owner == b.owner else None, convs=a.convs + b.convs,
                 param_layers=a.param_layers + b.param_layers, downsamples=a.downsamples or b.downsamples)


def _group(units: list[_Unit]) -> tuple[_Unit | None, list[_Unit], _Unit | None]:
    """Split units into (stem, scalable groups, head) by the policy in the module docstring."""
    last_conv = max((i for i, u in enumerate(units) if u.convs), default=None)
    if last_conv is None:
        raise ValueError("found no convolution in the model: detect_blocks cuts CNNs into blocks "
                         "(a model without conv layers has no blocks to scale)")
    body, head_units = units[: last_conv + 1], units[last_conv + 1:]
    head = None
    for u in head_units:
        head = u if head is None else _merge(head, u)

    # Owned units (and composites) merge with their same-owner neighbours.
    merged: list[_Unit] = []
    for u in body:
        if merged and u.owner is not None and merged[-1].owner == u.owner:
            merged[-1] = _merge(merged[-1], u)
        else:
            merged.append(u)
    structural = [u.composite or u.owner is not None for u in merged]

    # Stem: the un-owned plain prefix, else (plain chain) the nodes up to the first down-sampling.
    stem = None
    start = 0
    if any(structural):
        while not structural[start]:
            stem = merged[start] if stem is None else _merge(stem, merged[start])
            start += 1
    else:
        while start < len(merged):
            u = merged[start]
            stem = u if stem is None else _merge(stem, u)
            start += 1
            if u.downsamples:
                break
        if start == len(merged):  # no down-sampling at all: keep the first layer as the stem
            stem, start = merged[0], 1

    # Plain runs split after down-sampling nodes; structural units stay as they are.
    groups: list[_Unit] = []
    plain_flags: list[bool] = []
    open_plain = False
    for u, is_structural in zip(merged[start:], structural[start:]):
        if is_structural:
            groups.append(u)
            plain_flags.append(False)
            open_plain = False
        elif open_plain:
            groups[-1] = _merge(groups[-1], u)
        else:
            groups.append(u)
            plain_flags.append(True)
            open_plain = True
        if not is_structural and u.downsamples:
            open_plain = False

    # A plain group with fewer than two conv/linear layers has no inner channels: merge it.
    i = 0
    while i < len(groups) and len(groups) > 1:
        if plain_flags[i] and groups[i].param_layers < 2:
            j = i + 1 if i + 1 < len(groups) else i - 1
            lo, hi = min(i, j), max(i, j)
            groups[lo] = _merge(groups[lo], groups[hi])
            plain_flags[lo] = plain_flags[lo] and plain_flags[hi]
            del groups[hi], plain_flags[hi]
            i = lo
            continue
        i += 1
    return stem, groups, head


# ----------------------------------------------------------------------------- extraction

def _extract(gm: fx.GraphModule, nodes: list[fx.Node], input_node: fx.Node) -> fx.GraphModule:
    """One block as its own GraphModule: placeholder -> the nodes -> their last node."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    x = graph.placeholder("x")
    x.meta = copy.copy(input_node.meta)
    env[input_node] = x

    def lookup(n: fx.Node) -> fx.Node:
        if n not in env:
            if n.op != "get_attr":
                raise RuntimeError(f"internal error: node {n.name} is used across a cut point")
            env[n] = graph.node_copy(n)
        return env[n]

    for n in nodes:
        env[n] = graph.node_copy(n, lookup)
    graph.output(env[nodes[-1]])
    return copy.deepcopy(fx.GraphModule(gm, graph)).eval()


def _shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(int(v) for v in node.meta[_SHAPE][1:])


def detect_blocks(model: nn.Module, input_shape: Sequence[int], *, target_blocks: int | None = None) -> BlockedModel:
    """Cut `model` into a chain of blocks (see the module docstring for the policy).

    The model is not modified: tracing works on an eval-mode deep copy, and every block is
    a deep copy, in eval mode.
    """
    shape = _check_input_shape(input_shape)
    if target_blocks is not None and (not isinstance(target_blocks, int) or target_blocks < 1):
        raise ValueError(f"target_blocks must be a positive integer, got {target_blocks!r}")
    gm = _trace(model)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ValueError(f"detect_blocks needs a model with exactly one tensor input; "
                         f"{type(model).__name__}.forward takes {len(placeholders)}")
    _propagate_shapes(gm, shape)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    out_arg = output.args[0]
    if not isinstance(out_arg, fx.Node) or not _is_tensor(out_arg):
        raise ValueError(f"detect_blocks needs a model that returns one tensor; "
                         f"{type(model).__name__} returns {type(out_arg).__name__}")

    order = [n for n in gm.graph.nodes if n.op not in ("get_attr", "output")]
    cuts = _cut_points(order, out_arg)
    segments = [order[a + 1: b + 1] for a, b in zip(cuts, cuts[1:])]
    inputs_of = [order[a] for a in cuts[:-1]]
    modules = dict(gm.named_modules())
    units = _make_units(segments, inputs_of, modules)
    _assign_owners(units)
    stem, groups, head = _group(units)

    first_input = {seg[0]: inp for seg, inp in zip(segments, inputs_of)}

    def build(unit: _Unit) -> fx.GraphModule:
        return _extract(gm, unit.nodes, first_input[unit.nodes[0]])

    fixed = (stem is not None) + (head is not None)
    if target_blocks is not None:
        natural = fixed + len(groups)
        if target_blocks < fixed + 1:
            raise ValueError(f"target_blocks={target_blocks} leaves no scalable block: the stem and head "
                             f"already take {fixed}; choose at least {fixed + 1}")
        if target_blocks > natural:
            raise ValueError(f"target_blocks={target_blocks} exceeds the {natural} atomic blocks of this model "
                             f"(residual/branched units are never split); choose at most {natural}")
        flops = [count_flops(build(g), _shape(first_input[g.nodes[0]])) for g in groups]
        while fixed + len(groups) > target_blocks:
            k = min(range(len(groups) - 1), key=lambda i: flops[i] + flops[i + 1])
            groups[k] = _merge(groups[k], groups[k + 1])
            flops[k] += flops.pop(k + 1)
            del groups[k + 1]

    ordered: list[tuple[_Unit, str | None, bool]] = []
    if stem is not None:
        ordered.append((stem, "stem", False))
    ordered.extend((g, None, True) for g in groups)
    if head is not None:
        ordered.append((head, "head", False))

    paths = [name or _group_path(u, modules) for u, name, _ in ordered]
    specs, blocks = [], []
    for i, ((unit, _, scalable), path) in enumerate(zip(ordered, paths)):
        name = path if path and paths.count(path) == 1 else f"block{i}"
        in_shape, out_shape = _shape(first_input[unit.nodes[0]]), _shape(unit.nodes[-1])
        block = build(unit)
        specs.append(BlockSpec(
            name=name, in_shape=in_shape, out_shape=out_shape,
            params=sum(p.numel() for p in block.parameters()),
            flops=count_flops(block, in_shape), scalable=scalable,
        ))
        blocks.append(block)
    return BlockedModel(specs=specs, blocks=blocks, input_shape=shape)


def verify_chain(model: nn.Module, blocked: BlockedModel, atol: float = 1e-5, *, batch_size: int = 4,
                 seed: int = 0) -> float:
    """Check that the chain of blocks reproduces the model in eval mode; return the max abs diff.

    Raises `ChainMismatchError` when the difference reaches `atol`. Both modules' train/eval
    flags are restored afterwards.
    """
    chain = blocked.chain()
    modes = {m: m.training for m in list(model.modules()) + list(chain.modules())}
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, *blocked.input_shape, generator=gen)
    try:
        model.eval()
        chain.eval()
        with torch.no_grad():
            diff = float((model(x) - chain(x)).abs().max())
    finally:
        for m, mode in modes.items():
            m.training = mode
    if not diff < atol:
        raise ChainMismatchError(f"the chain of {len(blocked.blocks)} blocks differs from the model by "
                                 f"{diff:.3g} (max abs), tolerance {atol:g}")
    return diff
