"""Cut a captured CNN into a chain of blocks that reproduces it exactly.

Algorithm (DESIGN.md step 1):

1. **Capture.** `legoblocks.capture`: torch.fx symbolic tracing of an eval-mode deep copy,
   or torch.export when fx cannot trace (shape-dependent control flow); functional layers
   become modules and assertions are dropped. When both fail, `UntraceableModelError`
   names the user's source line and both causes.
2. **Shapes and FLOPs.** One interpreted run on a dummy batch of `input_shape` records every
   node's output shape and FLOPs; a shape that does not fit becomes an `InputShapeError`
   naming the failing layer, what it expects and what it got.
3. **Cut points.** Nodes are numbered in graph order (`get_attr` constants are left out:
   they are copied into every block that reads them). A node is a cut point when it
   yields one tensor, has a user, and no edge jumps over it: every earlier value is dead
   afterwards, so exactly one tensor is live. The input placeholder is the first cut.
4. **Units and the chain.** `legoblocks.units`: the segments between cut points are grouped
   by the model's own module hierarchy into units (one per residual / inverted-residual /
   MBConv / Ghost / ShuffleNet / transformer unit, skip or not); everything after the last
   convolution is the head; Torch-Pruning's dependency graph of the whole model
   (`legoblocks.coupling`) prices every candidate block by the FLOPs left when all channels
   it can prune are pruned, and a dynamic program picks the chain with the most blocks
   that can shrink (a non-scalable stem allowed first), merging units that cannot shrink
   alone with the neighbours that free their channels. Default chains longer than
   `units.MAX_DEFAULT_BLOCKS` are merged FLOP-balanced.
5. **Target count.** With `target_blocks=K` (the total block count, stem and head
   included) the adjacent scalable pair with the smallest combined FLOPs merges until K
   blocks remain.
6. **Extract.** Each group becomes its own `torch.fx.GraphModule` (one input, one
   output, deep-copied so blocks share no parameters with the model or each other),
   named by its unit (`layer1.0`), a range of units (`features.1-2`) or the common module
   path of its layers, else `block<i>` (its chain index) when that name is empty or taken;
   stem and head are `"stem"`/`"head"` and are not scalable. Params and FLOPs
   (`legoblocks.flops`, batch 1) are measured on each block alone, so the blocks' FLOPs sum
   to the model's.

Expected results: ResNet-20 -> stem + 9 residual blocks (`layer1.0` ... `layer3.2`) + head;
VGG-11 -> stem + 3 + head (the 128-channel stage, a single conv, joins the next stage);
MobileNetV2 -> stem + `features.0-1` (the first inverted residual is a depthwise conv tied
to its input: alone it cannot shrink) + one block per inverted residual up to
`features.15` + the last one merged with the lone final 1x1 conv + head = 18 blocks;
MobileNetV3 / EfficientNet / GhostNet / ShuffleNetV2 / MobileViT: one block per unit;
RepVGG-A0: stem + 2 blocks spanning whole stages + head. Pass `target_blocks` for fewer,
FLOP-balanced blocks. A model that starts with a scalable unit has no stem, one that ends
in a conv has no head.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch import nn

from legoblocks import units as U
from legoblocks.capture import BATCH_FIRST_KEY, BATCH_KEY, InputShapeError, UntraceableModelError, capture_graph
from legoblocks.coupling import channel_coupling, coupling_by_windows
from legoblocks.flops import count_flops, flops_counted

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

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


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


def _check_input_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(input_shape)
    if not shape or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape):
        raise InputShapeError(
            f"input_shape must be positive integers without the batch dimension, e.g. (1, 28, 28); got {input_shape!r}"
        )
    return shape


_SHAPE = "legodnn_shape"  # node.meta key: the full output shape (batch first), None if not a tensor


class _ShapeRecorder(fx.Interpreter):
    """Runs the graph once, records each node's output shape and FLOPs and the node being run.

    (torch's ShapeProp does the same but prints a traceback to stderr on failure; we want
    one clear error naming the node instead.)
    """

    current: fx.Node | None = None
    flops_so_far: Callable[[], int] | None = None
    flops: dict[str, int]

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        before = self.flops_so_far() if self.flops_so_far is not None else 0
        result = super().run_node(n)
        if self.flops_so_far is not None:
            self.flops[n.name] = self.flops_so_far() - before
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


def _propagate_shapes(gm: fx.GraphModule, shape: tuple[int, ...]) -> dict[str, int]:
    """Record every node's output shape (batch 2) in its meta; return FLOPs per node at batch 1."""
    prop = _ShapeRecorder(gm)
    prop.flops = {}
    try:
        with torch.no_grad(), flops_counted() as so_far:
            prop.flops_so_far = so_far
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
    return {name: value // 2 for name, value in prop.flops.items()}


# ----------------------------------------------------------------------------- cut points

def _is_tensor(node: fx.Node) -> bool:
    return node.meta.get(_SHAPE) is not None


def _is_batch(node: fx.Node) -> bool:
    return bool(node.meta.get(BATCH_KEY))


def _cut_points(order: list[fx.Node], output_arg: fx.Node) -> list[int]:
    """Indices (into `order`) of nodes after which exactly one tensor is live.

    Batch-size arithmetic (`BATCH_KEY`) is not in `order` and does not keep values live:
    every block recomputes it from its own input.
    """
    index = {n: i for i, n in enumerate(order)}
    out_pos = len(order)
    last_use = [max((index.get(u, out_pos) for u in n.users if not _is_batch(u)), default=-1) for n in order]
    cuts = [0]  # the placeholder
    reach = last_use[0]  # furthest use of any value produced before position i
    for i in range(1, len(order)):
        n = order[i]
        if reach <= i and n.users and _is_tensor(n) and n.meta.get(BATCH_FIRST_KEY, True):
            cuts.append(i)
        reach = max(reach, last_use[i])
    if order[cuts[-1]] is not output_arg:
        raise RuntimeError("internal error: the model output is not a cut point")
    return cuts


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
            if n.op == "call_method" and n.target == "size" and _is_batch(n):
                env[n] = graph.call_method("size", (x, 0))  # the batch size, from this block's input
            elif n.op == "get_attr" or _is_batch(n):
                env[n] = graph.node_copy(n, lookup)
            else:
                raise RuntimeError(f"internal error: node {n.name} is used across a cut point")
        return env[n]

    for n in nodes:
        env[n] = graph.node_copy(n, lookup)
    graph.output(env[nodes[-1]])
    block = copy.deepcopy(fx.GraphModule(gm, graph)).eval()
    _keep_input_intact(block)
    return block


def _keep_input_intact(block: fx.GraphModule) -> None:
    """Make the block's first layers out-of-place where they would overwrite the block's input.

    The input is the previous block's output, which the pipeline keeps (recorded block I/O,
    the joint stage's feature loss): a ReLU(inplace=True) right after a cut would change it.
    """
    x = next(n for n in block.graph.nodes if n.op == "placeholder")
    for user in x.users:
        if user.op == "call_module":
            layer = block.get_submodule(str(user.target))
            if getattr(layer, "inplace", False):
                layer.inplace = False
        elif user.op == "call_function" and user.kwargs.get("inplace"):
            user.kwargs = {**user.kwargs, "inplace": False}
        elif user.op == "call_method" and str(user.target).endswith("_") and user.args and user.args[0] is x:
            user.target = str(user.target)[:-1]  # x.add_(y) -> x.add(y)
    block.recompile()


def _shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(int(v) for v in node.meta[_SHAPE][1:])


def detect_blocks(model: nn.Module, input_shape: Sequence[int], *, target_blocks: int | None = None) -> BlockedModel:
    """Cut `model` into a chain of blocks (see the module docstring for the policy).

    The model is not modified: capture works on an eval-mode deep copy, and every block is
    a deep copy, in eval mode.

    Args:
        model: the CNN (any nn.Module taking one tensor and returning one tensor).
        input_shape: its input shape without the batch dimension, e.g. `(3, 64, 64)`.
        target_blocks: the total block count wanted (stem and head included); default:
            the model's own units (see `legoblocks.units`).

    Returns:
        The blocks, their specs and the input shape; `verify_chain` checks the equivalence.
    """
    shape = _check_input_shape(input_shape)
    if target_blocks is not None and (not isinstance(target_blocks, int) or target_blocks < 1):
        raise ValueError(f"target_blocks must be a positive integer, got {target_blocks!r}")
    captured = capture_graph(model, shape)
    gm = captured.graph_module
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ValueError(f"detect_blocks needs a model with exactly one tensor input; "
                         f"{type(model).__name__}.forward takes {len(placeholders)}")
    flops = _propagate_shapes(gm, shape)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    out_arg = output.args[0]
    if not isinstance(out_arg, fx.Node) or not _is_tensor(out_arg):
        raise ValueError(f"detect_blocks needs a model that returns one tensor; "
                         f"{type(model).__name__} returns {type(out_arg).__name__}")

    order = [n for n in gm.graph.nodes if n.op not in ("get_attr", "output") and not _is_batch(n)]
    cuts = _cut_points(order, out_arg)
    segments = [order[a + 1: b + 1] for a, b in zip(cuts, cuts[1:])]
    inputs_of = [order[a] for a in cuts[:-1]]
    modules = dict(gm.named_modules())
    found = U.make_units(segments, modules)
    U.assign_owners(found, modules)
    body, head = U.split_head(found)
    pieces = U.atoms(body)
    first_input = {seg[0]: inp for seg, inp in zip(segments, inputs_of)}
    try:
        coupling = channel_coupling(gm, shape, flops)
    except Exception:  # noqa: BLE001 - Torch-Pruning fails on some whole models: analyse a few units at a time
        def window(i: int, j: int) -> tuple[fx.GraphModule, tuple[int, ...], tuple[int, ...]]:
            nodes = [n for p in pieces[i:j] for n in p.nodes]
            return _extract(gm, nodes, first_input[nodes[0]]), _shape(first_input[nodes[0]]), _shape(nodes[-1])

        coupling = coupling_by_windows(window, len(pieces), flops)
    head_flops = sum(flops.get(n.name, 0) for n in head.nodes) if head is not None else 0
    chain = U.choose_blocks(pieces, coupling, other_flops=head_flops)
    head_nodes = head.nodes if head is not None else []
    if chain[-1].kind == "tail":  # a final expansion only the classifier reads: part of the head
        head_nodes = [n for p in pieces[chain[-1].start:] for n in p.nodes] + head_nodes
        chain = chain[:-1]
    piece_flops = [sum(flops.get(n.name, 0) for n in p.nodes) for p in pieces]
    has_head = bool(head_nodes)
    fixed = has_head + (chain[0].kind == "stem")
    natural = len(chain) + has_head
    if target_blocks is not None:
        if target_blocks < fixed + 1:
            raise ValueError(f"target_blocks={target_blocks} leaves no scalable block: the stem and head "
                             f"already take {fixed}; choose at least {fixed + 1}")
        if target_blocks > natural:
            raise ValueError(f"target_blocks={target_blocks} exceeds the {natural} atomic blocks of this model "
                             f"(residual/branched units are never split); choose at most {natural}")
        chain = U.merge_balanced(chain, piece_flops, target_blocks - has_head)
    elif natural > U.MAX_DEFAULT_BLOCKS:
        chain = U.merge_balanced(chain, piece_flops, U.MAX_DEFAULT_BLOCKS - has_head)

    ordered: list[tuple[list[fx.Node], str, bool]] = []
    for b in chain:
        members = pieces[b.start:b.stop]
        nodes = [n for p in members for n in p.nodes]
        label = "stem" if b.kind == "stem" else U.block_label(members, modules)
        ordered.append((nodes, label, b.kind != "stem"))
    if has_head:
        ordered.append((head_nodes, "head", False))

    labels = [label for _, label, _ in ordered]
    specs, blocks = [], []
    for i, (nodes, label, scalable) in enumerate(ordered):
        name = label if label and labels.count(label) == 1 else f"block{i}"
        in_shape, out_shape = _shape(first_input[nodes[0]]), _shape(nodes[-1])
        block = _extract(gm, nodes, first_input[nodes[0]])
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
