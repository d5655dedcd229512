"""Make a pruned graph's constant reshapes follow its new channel counts.

A graph captured by torch.export spells reshapes with constant sizes: MobileViT's unfold of
a (B, C, H, W) map into patches becomes `reshape(x, [B*C*nh, ph, nw, pw])` with C baked
into the first size. Once pruning removes some of the C channels the reshape no longer
fits. The repair: run the pruned graph; at the first reshape or view that fails, find the
one size that scales with the removed channels - the only dimension of the original
output shape that the new element count divides evenly, preferring one equal to the input
dimension that changed - and write it as -1, so the reshape infers it at run time for
every width. Repeat until the graph runs. Sizes already inferred (-1) or ambiguous cases
are not guessed: the repair reports failure and the caller prunes without such groups.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import fx, nn

__all__ = ["record_shapes", "repair_reshapes", "resized_widths"]

_RESHAPE_METHODS = {"view", "reshape"}
_RESHAPE_FUNCTIONS = {torch.reshape, torch.Tensor.view, torch.Tensor.reshape}


class _Recorder(fx.Interpreter):
    """Runs the graph, remembering each node's input and output shapes and the node being run."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.current: fx.Node | None = None
        self.shapes: dict[str, tuple[tuple[int, ...] | None, tuple[int, ...] | None]] = {}

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        first = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
        before = self.env.get(first) if first is not None else None
        in_shape = tuple(before.shape) if isinstance(before, torch.Tensor) else None
        result = super().run_node(n)
        self.shapes[n.name] = (in_shape, tuple(result.shape) if isinstance(result, torch.Tensor) else None)
        return result


def resized_widths(before: nn.Module, after: nn.Module) -> set[tuple[int, int]]:
    """(old, new) output widths of the layers that differ between a module and its pruned copy."""
    out = set()
    modules = dict(after.named_modules())
    for name, m in before.named_modules():
        w0, w1 = _width(m), _width(modules.get(name))
        if w0 is not None and w1 is not None and w0 != w1:
            out.add((w0, w1))
    return out


def _width(m: nn.Module | None) -> int | None:
    for attr in ("out_channels", "out_features", "num_features"):
        if isinstance(getattr(m, attr, None), int):
            return int(getattr(m, attr))
    shape = getattr(m, "normalized_shape", None)
    return int(shape[-1]) if shape else None


def record_shapes(gm: fx.GraphModule, x: torch.Tensor) -> dict[str, tuple[tuple[int, ...] | None, tuple[int, ...] | None]]:
    """(input shape, output shape) of every node of `gm` on `x`."""
    rec = _Recorder(gm)
    with torch.no_grad():
        rec.run(x)
    return rec.shapes


def _sizes(node: fx.Node) -> tuple[list[Any], int] | None:
    """The size list of a reshape node and where it starts in `node.args`; None for other nodes."""
    is_reshape = (node.op == "call_method" and node.target in _RESHAPE_METHODS) or (
        node.op == "call_function" and node.target in _RESHAPE_FUNCTIONS)
    if not is_reshape or len(node.args) < 2:
        return None
    if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)):
        return list(node.args[1]), 1
    return list(node.args[1:]), -1


def _fix(node: fx.Node, original: tuple[tuple[int, ...] | None, tuple[int, ...] | None],
         now_in: tuple[int, ...], resized: set[tuple[int, int]]) -> bool:
    found = _sizes(node)
    if found is None:
        return False
    sizes, form = found
    orig_in, orig_out = original
    if orig_in is None or orig_out is None or len(sizes) != len(orig_out) or -1 in sizes:
        return False
    numel = math.prod(now_in)
    old = math.prod(orig_out)
    if numel == old:
        return False
    candidates = [j for j, d in enumerate(orig_out) if d * numel % old == 0 and d * numel // old > 0]
    if len(candidates) > 1:  # the size that is a multiple of a channel count pruning changed in that ratio
        widths = [(a, b) for a, b in resized if b * old == a * numel]
        candidates = [j for j in candidates if any(orig_out[j] % a == 0 for a, _ in widths)] or candidates
    if len(candidates) > 1:
        changed = {orig_in[i] for i in range(min(len(orig_in), len(now_in))) if orig_in[i] != now_in[i]}
        candidates = [j for j in candidates if any(orig_out[j] % c == 0 for c in changed)] or candidates
    if len(candidates) != 1:
        return False
    sizes[candidates[0]] = -1
    dropped = [a for a in found[0] if isinstance(a, fx.Node)]
    node.args = (node.args[0], sizes) if form == 1 else (node.args[0], *sizes)
    while dropped:  # the size arithmetic that fed only the replaced size
        arg = dropped.pop()
        if not arg.users and _size_arithmetic(arg):
            dropped.extend(a for a in arg.all_input_nodes if a.op != "placeholder")
            node.graph.erase_node(arg)
    return True


def _size_arithmetic(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target == "size"
    return node.op == "call_function" and getattr(node.target, "__module__", "") in ("_operator", "operator")


def repair_reshapes(gm: fx.GraphModule, x: torch.Tensor,
                    original: dict[str, tuple[tuple[int, ...] | None, tuple[int, ...] | None]],
                    resized: set[tuple[int, int]] = frozenset()) -> bool:
    """Turn the channel-carrying size of each failing constant reshape into -1; True when `gm` then runs.

    Args:
        gm: the pruned graph (edited in place and recompiled).
        x: an input batch.
        original: `record_shapes` of the unpruned graph on a batch of the same size.
        resized: (channels before, channels after) of the layers pruning changed; they
            decide between sizes the new element count divides equally well.
    """
    for _ in range(sum(1 for n in gm.graph.nodes if _sizes(n) is not None) + 1):
        rec = _Recorder(gm)
        try:
            with torch.no_grad():
                rec.run(x)
            return True
        except RuntimeError:
            node = rec.current
            first = node.args[0] if node is not None and node.args and isinstance(node.args[0], fx.Node) else None
            value = rec.env.get(first) if first is not None else None
            if node is None or not isinstance(value, torch.Tensor) or node.name not in original:
                return False
            if not _fix(node, original[node.name], tuple(value.shape), set(resized)):
                return False
            gm.recompile()
    return False
