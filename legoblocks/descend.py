"""Descendants of a block: the block with a fraction of its inner filters removed.

DESIGN.md step 2. Torch-Pruning's dependency graph does the channel surgery (a conv's
output channels, the BN after it, the next conv's input channels, concat offsets, ...),
with a uniform per-layer ratio equal to the sparsity. Three traps, all handled here:

- Torch-Pruning would also prune the block's *input and output* channels, which must stay
  fixed so the block still fits its neighbours. Guard: wrap the block as
  `Sequential(depthwise 1x1 conv(C_in), block, depthwise 1x1 conv(C_out))` and mark both
  guards ignored. A depthwise conv ties its input channels to its output channels, so
  every group that touches the block's boundary contains an ignored layer and is skipped.
- The dependency graph is built by running the block through autograd: under
  `torch.no_grad()` or with frozen parameters Torch-Pruning silently prunes nothing. We
  prune a deep copy with `requires_grad_(True)` inside `torch.enable_grad()`.
- Channel counts round down (16 channels at 0.2/0.4/0.6/0.8 keep 12/9/6/3), so a
  descendant's cost must be measured, never inferred from its sparsity.

The graph is built in eval mode, so the example forward pass leaves the BatchNorm running
statistics of the copy untouched.
"""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING, Iterable, Sequence

import torch
from torch import nn

from legoblocks.choices import ORIGINAL, choice_id, validate_ladder

if TYPE_CHECKING:
    import torch_pruning as tp

__all__ = ["DEFAULT_LADDER", "IMPORTANCES", "choice_id", "validate_ladder", "make_descendants", "count_params"]

log = logging.getLogger(__name__)

DEFAULT_LADDER: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8)

# Which filters go first. "magnitude" (L2 norm of each channel's weights across its group)
# is the LegoDNN default; the others are for experiments.
IMPORTANCES = ("magnitude", "l1", "bn_scale", "random")


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _importance(name: str) -> tp.importance.Importance:
    import torch_pruning as tp

    if name == "magnitude":
        return tp.importance.MagnitudeImportance(p=2)
    if name == "l1":
        return tp.importance.MagnitudeImportance(p=1)
    if name == "bn_scale":
        return tp.importance.BNScaleImportance()
    if name == "random":
        return tp.importance.RandomImportance()
    raise ValueError(f"unknown importance {name!r}; choose one of {', '.join(IMPORTANCES)}")


def _guard(channels: int, dims: int) -> nn.Module:
    """A depthwise 1x1 conv: its input and output channels are the same channels."""
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    return conv(channels, channels, 1, groups=channels, bias=False)


def _prune_once(block: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...], sparsity: float,
                importance: str) -> nn.Module:
    """A pruned deep copy of `block` (input and output channels untouched)."""
    work = copy.deepcopy(block)
    work.requires_grad_(True)
    guard_in, guard_out = _guard(in_shape[0], len(in_shape) - 1), _guard(out_shape[0], len(out_shape) - 1)
    wrapped = nn.Sequential(guard_in, work, guard_out).eval()
    import torch_pruning as tp

    with torch.enable_grad():
        pruner = tp.pruner.BasePruner(
            wrapped,
            example_inputs=torch.randn(1, *in_shape),
            importance=_importance(importance),
            pruning_ratio=sparsity,
            global_pruning=False,
            ignored_layers=[guard_in, guard_out],
        )
        pruner.step()
    return wrapped[1]


def make_descendants(block: nn.Module, in_shape: Sequence[int], ladder: Iterable[float] = DEFAULT_LADDER, *,
                     importance: str = "magnitude") -> dict[str, nn.Module]:
    """Prune `block` at each sparsity of `ladder`; keys are choice ids, `"0.0"` is a plain copy.

    Every returned descendant takes and yields exactly the block's shapes and, for
    sparsity > 0, has strictly fewer parameters. A sparsity that prunes nothing (too few
    inner channels to round away one) is left out with a warning; a block with no inner
    channels at all (every channel is tied to its input or output) yields only `"0.0"`.
    The block itself is not modified. Descendants are in eval mode; pruned ones have
    `requires_grad=True` (they are about to be retrained), `"0.0"` keeps the block's flags.
    """
    sparsities = validate_ladder(ladder)
    _importance(importance)  # fail on a bad name before any work
    shape = tuple(int(v) for v in in_shape)
    if len(shape) not in (2, 3, 4):
        raise ValueError(f"in_shape must be (C, L), (C, H, W) or (C, D, H, W) without the batch dimension, got {tuple(in_shape)}")
    original = copy.deepcopy(block).eval()
    x = torch.randn(2, *shape)
    with torch.no_grad():
        try:
            reference = original(x)
        except Exception as e:
            raise ValueError(f"the block does not run on in_shape {shape}: {type(e).__name__}: {e}") from e
    out_shape = tuple(reference.shape[1:])
    if len(out_shape) != len(shape):
        log.warning("block maps %s to %s: only blocks from a feature map to a feature map of the same rank are "
                    "pruned; keeping only the original", shape, out_shape)
        return {ORIGINAL: original}

    base_params = count_params(original)
    result: dict[str, nn.Module] = {ORIGINAL: original}
    skipped: list[str] = []
    for s in sparsities:
        if s == 0.0:
            continue
        pruned = _prune_once(original, shape, out_shape, s, importance).eval()
        with torch.no_grad():
            try:
                y = pruned(x)
            except RuntimeError as e:
                raise RuntimeError(f"pruning at sparsity {s} broke the block's input side ({e}): an input "
                                   "channel was not guarded") from e
        if tuple(y.shape) != tuple(reference.shape):
            raise RuntimeError(
                f"pruning at sparsity {s} changed the block's output from {tuple(reference.shape[1:])} to "
                f"{tuple(y.shape[1:])}: an input/output channel was not guarded"
            )
        if count_params(pruned) >= base_params:
            skipped.append(choice_id(s))
            continue
        result[choice_id(s)] = pruned
    if len(result) == 1:
        log.warning("nothing to prune in this block (%d params): Torch-Pruning found no inner channels - every "
                    "channel is tied to the block's input or output (e.g. a single conv, or a depthwise conv on the "
                    "input), or the layers are invisible to it (e.g. F.conv2d on raw parameters); the block keeps "
                    "only its original", base_params)
    elif skipped:
        log.warning("sparsity %s removes no channel from this block (too few inner channels); left out",
                    ", ".join(skipped))
    return result
