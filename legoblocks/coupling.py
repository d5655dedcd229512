"""Which channels of a captured model could be pruned inside which blocks.

A block keeps its input and output channels, so a channel group (channels Torch-Pruning
must prune together: a conv's filters, the BatchNorm after it, the next layer's inputs, a
residual stream through every unit of a stage, RepVGG's identity branches, ...) is
prunable in a block only when every layer of the group lies inside that block. This module
runs Torch-Pruning's dependency graph once on the whole model (input guarded) and reports,
for every layer that costs FLOPs, the group of its input channels and the group of its
output channels, and for every group the graph nodes it touches. Detection turns that into
group spans over its units and prices candidate blocks with `pruned_cost`.

Groups Torch-Pruning would not prune count as fixed: those reaching the model input, those
through channel-reordering layers, those split by `unbind` (an attention's q, k, v) and
those that reach the model's output (see `pruners`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

from torch import fx, nn

__all__ = ["Coupling", "LayerCost", "Window", "channel_coupling", "coupling_by_windows", "pruned_cost"]

#: The sparsity detection prices blocks at: the largest of the default ladder.
POLICY_SPARSITY = 0.8


@dataclass(frozen=True)
class LayerCost:
    """One FLOP-costing node: its FLOPs and the channel groups on its two sides (None = fixed)."""

    node: str
    flops: int
    in_group: int | None
    out_group: int | None


@dataclass
class Coupling:
    """`layers` costs by node name; `members[g]` the node names channel group g touches."""

    layers: dict[str, LayerCost] = field(default_factory=dict)
    members: dict[int, list[str]] = field(default_factory=dict)
    sides: dict[tuple[str, str], int] = field(default_factory=dict)  # (node, "in"/"out") -> group


def channel_coupling(gm: fx.GraphModule, in_shape: tuple[int, ...], flops: dict[str, int]) -> Coupling:
    """Channel groups of `gm` (not modified) and the groups around each FLOP-costing node.

    Args:
        gm: the captured model.
        in_shape: its input shape without the batch dimension.
        flops: FLOPs per node name at batch 1 (nodes without FLOPs may be absent).

    Raises:
        Whatever Torch-Pruning raises when it cannot analyse the whole model (its reshape
        index mapping divides by zero on some channel shuffles); `coupling_by_windows` is
        the fallback.
    """
    result = Coupling()
    for names, sides in _groups(gm, in_shape, None):
        _add(result, names, sides)
    _add_costs(result, flops)
    return result


Window = Callable[[int, int], tuple[fx.GraphModule, tuple[int, ...], tuple[int, ...]]]


def coupling_by_windows(window: Window, count: int, flops: dict[str, int], *, width: int = 3) -> Coupling:
    """The same analysis on overlapping windows of `width` consecutive units, each guarded on both sides.

    `window(i, j)` returns units i..j-1 as one module with its input and output shapes.
    Groups spanning more than `width` units are not seen (they count as fixed), so this can
    only under-estimate what a block could prune. A window Torch-Pruning cannot analyse is
    analysed unit by unit; a unit it cannot analyse contributes no groups.
    """
    result = Coupling()
    seen: set[frozenset[str]] = set()
    for start in range(count):
        spans = [(start, min(count, start + width))]
        for i, j in spans:
            try:
                found = _groups(*window(i, j))
            except Exception:  # noqa: BLE001 - Torch-Pruning's shape inference fails on some graphs
                if j - i > 1:
                    spans.extend((k, k + 1) for k in range(i, j))
                continue
            for names, sides in found:
                if frozenset(names) not in seen:
                    seen.add(frozenset(names))
                    _add(result, names, sides)
    _add_costs(result, flops)
    return result


def _add(result: Coupling, names: list[str], sides: dict[tuple[str, str], bool]) -> None:
    gid = len(result.members)
    result.members[gid] = names
    for key in sides:
        result.sides[key] = gid


_Found = list[tuple[list[str], dict[tuple[str, str], bool]]]


def _groups(gm: fx.GraphModule, in_shape: tuple[int, ...], out_shape: tuple[int, ...] | None) -> _Found:
    """Each prunable group of `gm` as (node names it touches, {(node, "in"/"out"): True})."""
    from legoblocks import pruners  # Torch-Pruning loads only when analysing (detect's types are on the device path)

    work = copy.deepcopy(gm).eval().requires_grad_(True)
    g = pruners.guarded(work, in_shape, out_shape)
    graph = pruners.build_graph(g, in_shape)
    by_module: dict[int, list[str]] = {}
    for node in work.graph.nodes:
        if node.op in ("call_module", "get_attr"):
            by_module.setdefault(id(_resolve(work, str(node.target))), []).append(node.name)
    output = next(n for n in work.graph.nodes if n.op == "output").args[0]
    last = _resolve(work, str(output.target)) if isinstance(output, fx.Node) and output.op == "call_module" else None
    found = []
    for group in pruners.prunable_groups(graph, g.ignored):
        if pruners.splitting_group(group) or pruners.reaches_output(graph, group, last):
            continue  # left whole: attention's qkv split, or the model's outputs (class scores)
        names: list[str] = []
        sides: dict[tuple[str, str], bool] = {}
        for dep, _ in group:
            module = dep.target.module
            side = "out" if graph.is_out_channel_pruning_fn(dep.handler) else "in"
            for name in by_module.get(id(module), []):
                names.append(name)
                sides[(name, side)] = True
                if isinstance(module, nn.modules.conv._ConvNd) and module.groups == module.in_channels > 1:
                    sides[(name, "in" if side == "out" else "out")] = True  # depthwise: one group both sides
        found.append((sorted(set(names)), sides))
    return found


def _add_costs(result: Coupling, flops: dict[str, int]) -> None:
    for name, value in flops.items():
        if value > 0:
            result.layers[name] = LayerCost(name, value, result.sides.get((name, "in")), result.sides.get((name, "out")))


def _resolve(root: nn.Module, path: str) -> object:
    obj: object = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def pruned_cost(layers: list[LayerCost], inside: set[int], sparsity: float = POLICY_SPARSITY) -> float:
    """FLOPs left of `layers` when every group in `inside` is pruned at `sparsity` and the rest is fixed.

    A layer's FLOPs scale with its input and its output channels; a depthwise conv's two
    sides are one group, so it shrinks once.
    """
    keep = 1.0 - sparsity
    total = 0.0
    for layer in layers:
        factor = 1.0
        if layer.in_group is not None and layer.in_group in inside:
            factor *= keep
        if layer.out_group is not None and layer.out_group in inside and layer.out_group != layer.in_group:
            factor *= keep
        total += layer.flops * factor
    return total

