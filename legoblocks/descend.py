"""Descendants of a block: the block with a fraction of its inner filters removed.

DESIGN.md step 2. Torch-Pruning's dependency graph does the channel surgery (a conv's
output channels, the BN after it, the next conv's input channels, concat offsets, an SE
gate's `x * gate(x)`, a RepVGG unit's 3x3, 1x1 and identity branches alike, an MLP's
hidden width, ...), with a uniform per-group ratio equal to the sparsity. How it is driven
(guards, unwrapped parameters, customized pruners, ignored layers) is `legoblocks.pruners`,
shared with block detection. The traps, all handled:

- Torch-Pruning would also prune the block's *input and output* channels, which must stay
  fixed so the block still fits its neighbours: the block is wrapped between two ignored
  depthwise 1x1 guard convs, so every group that touches its boundary is skipped.
- The dependency graph is built by running the block through autograd: under
  `torch.no_grad()` or with frozen parameters Torch-Pruning silently prunes nothing. We
  prune a deep copy with `requires_grad_(True)` inside `torch.enable_grad()`.
- A group whose channels pass through a reshape (MobileViT's unfold of the transformer
  width into patches) breaks the block when the reshape's sizes are constants, as in
  graphs captured by torch.export: `legoblocks.reshapes` rewrites the size that carries
  the channels as -1. If the block still does not run, it is pruned again with such
  groups left whole. Groups split by `unbind` (an attention's q, k, v and heads) are
  always left whole.
- A group's channel count comes from its root layer: rooted at a depthwise conv or an SE
  gate behind a Ghost module's `cat`, it counts each channel twice and removes up to twice
  the share asked for. `pruners.order_roots` roots groups at the layers that produce them.
- Channel counts round down (16 channels at 0.2/0.4/0.6/0.8 keep 12/9/6/3), so a
  descendant's cost must be measured, never inferred from its sparsity.

Because every branch of a group loses the same channels, a pruned RepVGG-style unit keeps
its 3x3 + 1x1 + identity structure and can still be re-parameterized into one conv.
The graph is built in eval mode, so the example forward pass leaves the BatchNorm running
statistics of the copy untouched.
"""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING, Iterable, Sequence

import torch
from torch import fx, nn

from legoblocks.choices import ORIGINAL, choice_id, validate_ladder
from legoblocks.reshapes import record_shapes, repair_reshapes, resized_widths

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


def _prune_once(block: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...], sparsity: float,
                importance: str, keep_reshaping: bool) -> nn.Module:
    """A pruned deep copy of `block` (input and output channels untouched).

    Groups split by `unbind` (attention heads) always stay whole; with `keep_reshaping`,
    so do groups whose channels pass through a reshape.
    """
    import torch_pruning as tp

    from legoblocks import pruners  # Torch-Pruning loads only when pruning (compose is on the device path)

    work = copy.deepcopy(block)
    work.requires_grad_(True)
    guarded = pruners.guarded(work, in_shape, out_shape)

    with torch.enable_grad():
        pruner = tp.pruner.BasePruner(
            guarded.model,
            example_inputs=(torch.randn(1, *in_shape),),
            importance=_importance(importance),
            pruning_ratio=sparsity,
            global_pruning=False,
            ignored_layers=guarded.ignored,
            unwrapped_parameters=pruners.unwrapped_parameters(guarded.model),
            customized_pruners=pruners.customized_pruners(),
        )
        pruners.order_roots(pruner.DG)
        for group in list(pruners.prunable_groups(pruner.DG, pruner.ignored_layers)):
            if pruners.splitting_group(group) or (keep_reshaping and pruners.reshaping_group(group)):
                pruner.ignored_layers.extend(pruners.out_channel_modules(pruner.DG, group))
        pruner.step()
    return guarded.block


def _runs(module: nn.Module, x: torch.Tensor, expected: tuple[int, ...]) -> str | None:
    """None when `module` maps `x` to the expected shape, else what went wrong."""
    with torch.no_grad():
        try:  # GraphModule.forward directly: its __call__ prints the traceback of an expected failure
            y = module.forward(x) if isinstance(module, fx.GraphModule) else module(x)
        except RuntimeError as e:
            return f"{type(e).__name__}: {str(e).splitlines()[0]}"
    if tuple(y.shape) != expected:
        return f"output {tuple(y.shape[1:])} instead of {expected[1:]}"
    return None


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
    keep_reshaping = False
    shapes = record_shapes(original, x) if isinstance(original, fx.GraphModule) else {}
    for s in sparsities:
        if s == 0.0:
            continue
        pruned = _prune_once(original, shape, out_shape, s, importance, keep_reshaping).eval()
        problem = _runs(pruned, x, tuple(reference.shape))
        if problem is not None and shapes and repair_reshapes(pruned, x, shapes, resized_widths(original, pruned)):
            problem = _runs(pruned, x, tuple(reference.shape))
        if problem is not None and not keep_reshaping:
            keep_reshaping = True  # a reshape with constant sizes: leave such groups whole from now on
            pruned = _prune_once(original, shape, out_shape, s, importance, keep_reshaping).eval()
            problem = _runs(pruned, x, tuple(reference.shape))
        if problem is not None:
            raise RuntimeError(f"pruning at sparsity {s} broke the block ({problem}): a channel group was pruned "
                               "inconsistently; the block's input/output channels must stay fixed")
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
