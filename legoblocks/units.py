"""The model's own units, and the chain of blocks detection builds from them.

Between two cut points (nodes after which exactly one tensor is live) lies a *segment*;
segments are atomic. This module groups them in three steps:

1. **Ownership by the module hierarchy.** A segment of several nodes that holds a layer
   (a residual unit, a concat branch, an SE gate) is *composite*. The parents of the
   composite segments' module paths are *containers* (`features` for `features.3`,
   `blocks.1` for `blocks.1.0`). Only the outermost containers count - an SE gate inside
   an inverted residual makes `features.1.block` a container, but that lies inside the
   unit `features.1` - and a container's siblings whose children hold two or more
   conv/linear layers are containers too (EfficientNet's single-unit stages `blocks.0`,
   `blocks.6` next to `blocks.1`...). Every node under `<container>.<child>` belongs to that
   child, and a composite segment outside every container owns its own path (a top-level
   residual stem), so an inverted residual, MBConv, Ghost or ShuffleNet unit, a
   transformer block, skip or not, is one *unit* however finely the graph alone would cut
   it. Nodes outside any unit form plain runs, which end before the first layer after a
   down-sampling (a VGG stage ends at its pool); a piece without layers (an activation, a
   pooling between units) joins the one before. Everything after the last unit holding a
   convolution is the head.
2. **A price per candidate block.** Torch-Pruning's dependency graph of the whole model
   (`coupling`) says which channel groups a candidate block contains entirely - only those
   it can prune - and so what is left of its FLOPs with all of them pruned at the ladder's
   largest sparsity. A block is *scalable* when that leaves at most `MAX_SMALLEST_FRACTION`
   of its FLOPs; a non-scalable block is allowed first (the stem) and last (a final
   expansion conv only the classifier reads: it joins the head), and counts as useless
   anywhere else.
3. **The chain.** For every block count, a dynamic program over the units finds the
   partition with the fewest useless blocks, then the fewest FLOPs at full pruning. The
   chain kept is the longest without avoidable useless blocks whose smallest composition
   (head included, unpruned) stays within `TARGET_SMALLEST_FRACTION` of the model's FLOPs,
   or the longest when none does. So units that prune well stay one block each, and a unit
   that cannot shrink on its own (a lone conv, a depthwise conv tied to its input, a
   RepVGG unit whose identity branch ties its output channels to its input) joins the
   neighbours that free its channels. RepVGG shows why this must be global: a stage's
   identity branches tie all its channels together, so they are prunable only in a block
   spanning the whole stage plus the transitions on either side. Default chains longer
   than `MAX_DEFAULT_BLOCKS` are merged FLOP-balanced (the paper's models have 5-20 blocks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from torch import fx, nn

from legoblocks.capture import common_path, node_module_path
from legoblocks.coupling import POLICY_SPARSITY, Coupling, LayerCost, pruned_cost

__all__ = ["Unit", "Block", "MAX_SMALLEST_FRACTION", "MAX_DEFAULT_BLOCKS", "make_units", "assign_owners",
           "TARGET_SMALLEST_FRACTION", "split_head", "atoms", "choose_blocks", "merge_balanced", "block_label"]

#: A block is scalable when pruning all its inner channels at the largest sparsity leaves at most this share.
MAX_SMALLEST_FRACTION = 0.6
#: Default chains have at most this many blocks, stem and head included.
MAX_DEFAULT_BLOCKS = 20
#: The default chain is the longest whose smallest composition (estimated) stays within this share of the FLOPs.
TARGET_SMALLEST_FRACTION = 0.45

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass
class Unit:
    """A run of graph nodes that ends up in one block."""

    nodes: list[fx.Node]
    composite: bool
    owner: str | None = None
    convs: int = 0        # conv layers inside
    param_layers: int = 0  # conv + linear layers
    weighted: int = 0      # nodes of layers with parameters (norms included)
    downsamples: bool = False


@dataclass
class Block:
    """Pieces `start..stop-1` of the body; `kind` is "stem", "scalable", "fixed" or "tail".

    A non-scalable first block is the stem; a non-scalable last block (a final expansion
    conv whose channels only the classifier reads) joins the head.
    """

    start: int
    stop: int
    kind: str


def layer_kind(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """"conv", "linear", "param" (another layer with parameters) or ""."""
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, _CONV_TYPES):
            return "conv"
        if isinstance(m, nn.Linear):
            return "linear"
        return "param" if any(True for _ in m.parameters()) else ""
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        if name in ("conv1d", "conv2d", "conv3d"):
            return "conv"
        if name == "linear":
            return "linear"
    return ""


_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
          nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
          nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_POOL_FUNCS = {"max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
               "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_max_pool2d", "max_pool2d_with_indices"}


def _downsamples(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A pooling layer or a strided convolution (what ends a plain stage)."""
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, _POOLS):
            return True
        return isinstance(m, _CONV_TYPES) and any(int(s) > 1 for s in m.stride)
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        if name in _POOL_FUNCS:
            return True
        if name in ("conv1d", "conv2d", "conv3d"):
            stride = node.args[3] if len(node.args) > 3 else node.kwargs.get("stride", 1)
            return any(int(s) > 1 for s in (stride if isinstance(stride, (tuple, list)) else [stride]))
    return False


def make_units(segments: list[list[fx.Node]], modules: dict[str, nn.Module]) -> list[Unit]:
    units = []
    for seg in segments:
        kinds = [layer_kind(n, modules) for n in seg]
        units.append(Unit(
            nodes=seg, composite=len(seg) > 1 and any(kinds), convs=sum(k == "conv" for k in kinds),
            param_layers=sum(k in ("conv", "linear") for k in kinds), weighted=sum(bool(k) for k in kinds),
            downsamples=any(_downsamples(n, modules) for n in seg),
        ))
    return units


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def _outermost(containers: set[str]) -> set[str]:
    return {c for c in containers if not any(c.startswith(d + ".") for d in containers if d != c)}


def assign_owners(units: list[Unit], modules: dict[str, nn.Module]) -> None:
    """Set each unit's owner: `<container>.<child>` when it lies under a container (see module docstring)."""
    layers_under: dict[str, int] = {}
    for u in units:
        for n in u.nodes:
            if layer_kind(n, modules) in ("conv", "linear"):
                path = node_module_path(n)
                parts = path.split(".") if path else []
                for i in range(len(parts) + 1):
                    key = ".".join(parts[:i])
                    layers_under[key] = layers_under.get(key, 0) + 1
    containers = set()
    for u in units:
        if u.composite:
            path = common_path([node_module_path(n) for n in u.nodes])
            if "." in path:
                containers.add(_parent(path))
    containers = _outermost(containers)
    promoted = set(containers)
    for c in containers:
        for sibling in (p for p in layers_under if p and _parent(p) == _parent(c) and p not in containers):
            if any(_parent(child) == sibling and count >= 2 for child, count in layers_under.items() if child):
                promoted.add(sibling)
    containers = _outermost(promoted)
    # A composite unit outside every container (a top-level residual stem, a concat unit) owns its own path.
    loose = {common_path([node_module_path(n) for n in u.nodes]) for u in units if u.composite}
    loose = {p for p in loose if p and not any(p.startswith(c + ".") for c in containers)}

    def owner_of(path: str) -> str | None:
        for c in containers:
            if path.startswith(c + "."):
                return f"{c}.{path[len(c) + 1:].split('.', 1)[0]}"
        for p in loose:
            if path == p or path.startswith(p + "."):
                return p
        return None

    for u in units:
        u.owner = owner_of(common_path([node_module_path(n) for n in u.nodes]))


def merge(a: Unit, b: Unit) -> Unit:
    return Unit(nodes=a.nodes + b.nodes, composite=a.composite or b.composite,
                owner=a.owner if a.owner == b.owner else None, convs=a.convs + b.convs,
                param_layers=a.param_layers + b.param_layers, weighted=a.weighted + b.weighted,
                downsamples=a.downsamples or b.downsamples)


def split_head(units: list[Unit]) -> tuple[list[Unit], Unit | None]:
    """(body, head): the head is everything after the last unit holding a convolution (units as owned)."""
    last_conv = max((i for i, u in enumerate(units) if u.convs), default=None)
    if last_conv is None:
        raise ValueError("found no convolution in the model: detect_blocks cuts CNNs into blocks "
                         "(a model without conv layers has no blocks to scale)")
    end = last_conv + 1
    while end < len(units) and units[end].owner is not None and units[end].owner == units[last_conv].owner:
        end += 1  # the rest of the last unit (its activation) stays with it
    head = None
    for u in units[end:]:
        head = u if head is None else merge(head, u)
    return units[:end], head


def atoms(body: list[Unit]) -> list[Unit]:
    """The smallest pieces a block is made of: one per owned unit, composite unit or plain run."""
    merged: list[Unit] = []
    for u in body:
        if merged and u.owner is not None and merged[-1].owner == u.owner:
            merged[-1] = merge(merged[-1], u)
        else:
            merged.append(u)
    out: list[Unit] = []
    open_plain = False
    for u in merged:
        structural = u.composite or u.owner is not None
        # A plain run ends before the first layer after a down-sampling (a VGG stage ends at its pool),
        # never between a strided conv and its BatchNorm and activation.
        if open_plain and not structural and not (out[-1].downsamples and u.param_layers):
            out[-1] = merge(out[-1], u)
        else:
            out.append(u)
        open_plain = not structural
    # Pieces without any layer (an activation, a pooling between units) belong to the layer before them.
    pieces: list[Unit] = []
    for u in out:
        if pieces and not u.weighted:
            pieces[-1] = _absorb(pieces[-1], u)
        elif pieces and not pieces[-1].weighted:
            pieces[-1] = _absorb(u, pieces[-1], after=False)
        else:
            pieces.append(u)
    return pieces


def _absorb(unit: Unit, extra: Unit, after: bool = True) -> Unit:
    """`unit` with a layer-less neighbour added; it keeps its own owner (so its name)."""
    both = merge(unit, extra) if after else merge(extra, unit)
    both.owner = unit.owner
    return both


# ----------------------------------------------------------------------------- the chain


class _Pricer:
    """Prices candidate blocks (runs of atoms) from the whole-model channel coupling."""

    def __init__(self, pieces: list[Unit], coupling: Coupling) -> None:
        index = {n.name: i for i, u in enumerate(pieces) for n in u.nodes}
        outside = len(pieces)  # a group touching the head (or nothing we know) never fits a body block
        self.span = {g: (min(index.get(n, outside) for n in names), max(index.get(n, outside) for n in names))
                     for g, names in coupling.members.items() if names}
        self.layers: list[list[LayerCost]] = [[coupling.layers[n.name] for n in u.nodes if n.name in coupling.layers]
                                              for u in pieces]
        self.flops = [sum(c.flops for c in layers) for layers in self.layers]

    def price(self, i: int, j: int) -> tuple[int, float]:
        """(FLOPs, FLOPs left at full pruning) of the block made of pieces i..j-1."""
        inside = {g for g, (lo, hi) in self.span.items() if lo >= i and hi < j}
        layers = [c for k in range(i, j) for c in self.layers[k]]
        return sum(self.flops[i:j]), _exact(layers, inside)


def _exact(layers: list[LayerCost], inside: set[int]) -> float:
    return round(pruned_cost(layers, inside, POLICY_SPARSITY), 6)


def choose_blocks(pieces: list[Unit], coupling: Coupling, *, other_flops: int = 0,
                  max_fraction: float = MAX_SMALLEST_FRACTION,
                  target_fraction: float = TARGET_SMALLEST_FRACTION) -> list[Block]:
    """The partition of `pieces` into blocks (see the module docstring).

    For every block count k, a dynamic program finds the partition with
    the fewest useless middle blocks, then the fewest FLOPs left at full pruning. The
    chain returned is the longest whose smallest composition (with `other_flops`, the
    head's, added unpruned) stays within `target_fraction` of the model's FLOPs, or the
    longest when none does; never one with avoidable useless blocks.
    """
    pricer = _Pricer(pieces, coupling)
    n = len(pieces)
    # best[j][k]: (useless blocks, FLOPs left, start of the last block, its kind) of the best
    # chain of k blocks over pieces 0..j-1
    best: list[list[tuple[int, float, int, str] | None]] = [[None] * (n + 1) for _ in range(n + 1)]
    best[0][0] = (0, 0.0, 0, "")
    for j in range(1, n + 1):
        for i in range(j):
            flops, cost = pricer.price(i, j)
            if flops > 0 and cost <= max_fraction * flops:
                kind = "scalable"
            else:
                kind, cost = ("stem" if i == 0 else "tail" if j == n else "fixed"), float(flops)
            for k in range(1, i + 2):
                prev = best[i][k - 1]
                if prev is None:
                    continue
                cand = (prev[0] + (kind == "fixed"), round(prev[1] + cost, 3), i, kind)
                if best[j][k] is None or cand[:2] < best[j][k][:2]:
                    best[j][k] = cand
    options = [(k, best[n][k]) for k in range(1, n + 1) if best[n][k] is not None]
    fewest_fixed = min(o[0] for _, o in options)
    options = [(k, o) for k, o in options if o[0] == fewest_fixed]
    total = sum(pricer.flops) + other_flops
    fitting = [(k, o) for k, o in options if o[1] + other_flops <= target_fraction * total]
    k = max(fitting or options, key=lambda t: t[0])[0]
    chain: list[Block] = []
    j = n
    while k > 0:
        _, _, i, kind = best[j][k]  # type: ignore[misc]
        chain.append(Block(i, j, kind))
        j, k = i, k - 1
    return chain[::-1]


def merge_balanced(blocks: list[Block], flops: list[int], target: int) -> list[Block]:
    """Merge the adjacent pair of non-stem blocks with the smallest combined FLOPs until `target` remain."""
    blocks = list(blocks)
    cost = [sum(flops[b.start:b.stop]) for b in blocks]
    while len(blocks) > target:
        pairs = [k for k in range(len(blocks) - 1) if blocks[k].kind != "stem" and blocks[k + 1].kind != "tail"]
        if not pairs:
            break
        k = min(pairs, key=lambda i: cost[i] + cost[i + 1])
        kind = "scalable" if "scalable" in (blocks[k].kind, blocks[k + 1].kind) else "fixed"
        blocks[k] = Block(blocks[k].start, blocks[k + 1].stop, kind)
        cost[k] += cost.pop(k + 1)
        del blocks[k + 1]
    return blocks


def unit_label(unit: Unit, modules: dict[str, nn.Module]) -> str:
    """What a unit is called: its owner, else the common module path of its layers (or of all its nodes)."""
    if unit.owner:
        return unit.owner
    layers = [n for n in unit.nodes if layer_kind(n, modules)]
    return common_path([node_module_path(n) for n in (layers or unit.nodes)])


def block_label(pieces: Sequence[Unit], modules: dict[str, nn.Module]) -> str:
    """`features.3` for one unit, `stages.0.0-1.0` for units stages.0.0 ... stages.1.0, "" when unnamed."""
    labels = [lab for lab in (unit_label(u, modules) for u in pieces) if lab]
    if not labels:
        return ""
    first, last = labels[0], labels[-1]
    if first == last:
        return first
    prefix = common_path([first, last])
    if not prefix:
        return f"{first}-{last}"
    if first == prefix or last == prefix:
        return prefix
    cut = len(prefix) + 1
    return f"{prefix}.{first[cut:]}-{last[cut:]}"
