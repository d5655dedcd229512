"""How legoblocks drives Torch-Pruning: one place for guards, extension points and group rules.

Block detection (which channels could a block prune?) and descent (prune them) must agree,
so both build their dependency graphs here:

- **Guards.** A block's input and output channels must never change. The block is wrapped
  as `Sequential(guard_in, block, guard_out)` with depthwise 1x1 convs (a depthwise conv ties
  its input channels to its output channels) and both guards are ignored, so every group
  that reaches the block's boundary contains an ignored layer and is skipped.
- **Unwrapped parameters.** Parameters outside a layer Torch-Pruning knows (a layer scale
  `gamma`, a position embedding) are declared with the dimension that carries channels
  (the last non-singleton one), instead of letting Torch-Pruning guess and warn.
- **Layers that reorder channels** (`nn.ChannelShuffle`, `nn.PixelShuffle`,
  `nn.PixelUnshuffle`) get a customized pruner that reports their channels, and are
  ignored: a group that runs through one is left whole, because Torch-Pruning would
  otherwise treat the shuffle as element-wise and remove the wrong channels behind it.
- **Splitting groups** (channels split by `unbind` or broadcast by `expand`, as an
  attention's qkv is split into q, k, v and heads) are always left whole: Torch-Pruning
  maps indices through them as if element-wise. **Reshaping groups** (a reshape on the way,
  e.g. MobileViT's unfold of the transformer width into patches) prune fine when the
  graph computes the shapes at run time; graphs from torch.export bake them in, which
  `legoblocks.descend` repairs or, failing that, leaves such groups whole.

The graph is built through autograd, so building always runs with gradients enabled on
parameters that require them (Torch-Pruning silently prunes nothing otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
import torch_pruning as tp
from torch import nn

__all__ = ["Guarded", "guard", "guarded", "build_graph", "prunable_groups", "reshaping_group", "splitting_group",
           "reaches_output",
           "out_channel_modules", "unwrapped_parameters", "customized_pruners", "order_roots"]

_KNOWN_LAYERS = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
                 nn.modules.instancenorm._InstanceNorm, nn.PReLU, nn.Embedding)
_REORDERING = (nn.ChannelShuffle, nn.PixelShuffle, nn.PixelUnshuffle)
_RESHAPING = {tp.ops.OPTYPE.RESHAPE, tp.ops.OPTYPE.UNBIND, tp.ops.OPTYPE.EXPAND}
_SPLITTING = {tp.ops.OPTYPE.UNBIND, tp.ops.OPTYPE.EXPAND}


class _ReorderingPruner(tp.pruner.BasePruningFunc):
    """A channel-reordering layer: it has channels (so groups through it are found) but no weights."""

    def prune_out_channels(self, layer: nn.Module, idxs: Any) -> nn.Module:
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> None:
        return None

    get_in_channels = get_out_channels


def guard(channels: int, dims: int) -> nn.Module:
    """A depthwise 1x1 conv without bias: its input and output channels are the same channels."""
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    return conv(channels, channels, 1, groups=channels, bias=False)


@dataclass
class Guarded:
    """`Sequential(guard_in, block, guard_out)` plus what Torch-Pruning must leave alone."""

    model: nn.Sequential
    ignored: list[nn.Module]

    @property
    def block(self) -> nn.Module:
        return self.model[1]


def guarded(block: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...] | None) -> Guarded:
    """Wrap `block` (not copied) between guards; `out_shape` None guards the input only (whole models)."""
    guards = [guard(in_shape[0], len(in_shape) - 1)]
    if out_shape is not None and len(out_shape) >= 2:
        guards.append(guard(out_shape[0], len(out_shape) - 1))
    model = nn.Sequential(guards[0], block, *guards[1:]).eval()
    reordering = [m for m in block.modules() if isinstance(m, _REORDERING)]
    return Guarded(model, guards + reordering)


def unwrapped_parameters(model: nn.Module) -> list[tuple[nn.Parameter, int]]:
    """Parameters not held by a layer Torch-Pruning knows, each with its channel dimension."""
    owned = {id(p) for m in model.modules() if isinstance(m, _KNOWN_LAYERS) for p in m.parameters(recurse=False)}
    out = []
    for p in model.parameters():
        if id(p) in owned:
            continue
        dims = [i for i, s in enumerate(p.shape) if s > 1]
        if dims:
            out.append((p, dims[-1]))
    return out


def customized_pruners() -> dict[type, tp.pruner.BasePruningFunc]:
    return {cls: _ReorderingPruner() for cls in _REORDERING}


def build_graph(g: Guarded, in_shape: tuple[int, ...]) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of a guarded model (parameters must require grad)."""
    with torch.enable_grad():
        graph = tp.DependencyGraph().build_dependency(
            g.model, example_inputs=(torch.randn(1, *in_shape),), unwrapped_parameters=unwrapped_parameters(g.model),
            customized_pruners=customized_pruners(), verbose=False)
    order_roots(graph)
    return graph


def order_roots(graph: tp.DependencyGraph) -> None:
    """Let Torch-Pruning root each group at a layer that produces its channels.

    A group's channel count and ranking come from its root, the first of its layers that
    Torch-Pruning visits. A depthwise conv or an SE gate's expanding conv does not produce
    channels, it transforms or scales channels made earlier, and can see more of them than
    their producer has: behind a Ghost module's `cat([x1, cheap(x1)])` it sees twice the
    channels of the primary conv, and pruning by that count removes up to twice the channels
    asked for, or nothing once the request exceeds half. Such layers are visited last; the
    rest keep Torch-Pruning's own order (roots near the output first, which also keeps its
    index mapping through channel shuffles fast).
    """
    def rank(item: tuple[Any, Any]) -> int:
        module, node = item
        if isinstance(module, nn.modules.conv._ConvNd) and tp.ops.module2type(module) == tp.ops.OPTYPE.DEPTHWISE_CONV:
            return 1
        return 2 if _is_gate(node) else 0

    graph.module2node = dict(sorted(graph.module2node.items(), key=rank))


_GATE_STEPS = ("sigmoid", "hardsigmoid", "hardtanh", "relu6", "add", "div", "clamp", "tanh", "silu", "mul")


def _is_gate(node: Any, depth: int = 5) -> bool:
    """True when the layer's output reaches a product through activation-like steps only (an SE gate)."""
    frontier = [(n, 1) for n in node.outputs]
    while frontier:
        n, d = frontier.pop()
        if n.type != tp.ops.OPTYPE.ELEMENTWISE or d > depth:
            continue
        name = str(getattr(n.module, "_grad_fn", "")).lower()
        if "mulbackward" in name:
            return True
        if any(step in name for step in _GATE_STEPS):
            frontier.extend((m, d + 1) for m in n.outputs)
    return False


def reshaping_group(group: Any) -> bool:
    """True when the group's channels pass through a reshape, unbind or expand."""
    return any(dep.target.type in _RESHAPING for dep, _ in group)


def splitting_group(group: Any) -> bool:
    """True when the group's channels are split by `unbind` or broadcast by `expand` (an attention's qkv).

    Torch-Pruning maps indices through these as if element-wise, which mixes q, k and v
    channels and heads; such groups are always left whole.
    """
    return any(dep.target.type in _SPLITTING for dep, _ in group)


def reaches_output(graph: tp.DependencyGraph, group: Any, last: Any = None) -> bool:
    """True when the group prunes the model's output: an output op, or `last` (the output layer) on its output side."""
    return any(dep.target.type == tp.ops.OPTYPE.OUTPUT
               or (last is not None and dep.target.module is last and graph.is_out_channel_pruning_fn(dep.handler))
               for dep, _ in group)


def out_channel_modules(graph: tp.DependencyGraph, group: Any) -> list[nn.Module]:
    """The modules a group prunes on their output side: ignoring any of them skips the group."""
    return [dep.target.module for dep, _ in group
            if isinstance(dep.target.module, nn.Module) and graph.is_out_channel_pruning_fn(dep.handler)]


def prunable_groups(graph: tp.DependencyGraph, ignored: Iterable[nn.Module]) -> Iterator[Any]:
    """Every group Torch-Pruning would prune (rooted at convs and linears), ignored layers respected."""
    return graph.get_all_groups(ignored_layers=list(ignored),
                                root_module_types=(tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR))
