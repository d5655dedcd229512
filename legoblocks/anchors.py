"""Budget anchors: the one "even" composition that fits each FLOPs budget a user serves.

Measured on full Fashion-MNIST (docs/benchmarks/accuracy.md): the composition the joint stage
trains every step (the smallest, by the sandwich rule) ends up as accurate as a uniformly
pruned model fine-tuned for that budget alone, while mid-range compositions, which share
their training with millions of others, fall behind. Budgets that a deployment is known to
serve (the pipeline's verification grid, a benchmark's budgets) can get the same treatment:
the joint stage trains their anchor compositions in turn, and the measured re-ranking adds
the anchors to the optimizer's candidates, so a well-trained anchor is picked when it wins on
validation data and is ignored otherwise. Every other composition stays available.

An anchor is "even": every scalable block as close to one common sparsity as the budget
allows. A greedy walk starts from the smallest composition and repeatedly makes the
sparsest block one step denser (the cheapest such step first) while the whole model stays
within the budget. Even compositions keep every block's descendants used in the company of
similarly pruned neighbours, which is also where the random joint-stage compositions put
them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from legoblocks.choices import ORIGINAL

log = logging.getLogger(__name__)



def choice_flops(model) -> dict[str, dict[str, int]]:
    """FLOPs of every descendant of a `ScalableModel`, per block and choice id, each measured
    on its block's input shape (per-block FLOPs add up exactly to the composed model's)."""
    from legoblocks.flops import count_flops

    return {
        spec.name: {cid: count_flops(module, tuple(spec.in_shape)) for cid, module in model.variants[spec.name].items()}
        for spec in model.specs
    }


def even_selection(flops: dict[str, dict[str, int]], budget: float, order: Sequence[str] | None = None) -> list[str]:
    """The even composition whose FLOPs fit `budget` (a fraction of the all-original model's).

    `flops` maps block -> choice id -> FLOPs (see `choice_flops`); `order` is the block
    order of the result (default: the mapping's). When not even the smallest composition
    fits, the smallest is returned, with a warning: it is the nearest one.
    """
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"anchor budget must be a FLOPs fraction in (0, 1], got {budget}")
    blocks = list(order) if order is not None else list(flops)
    # Per block: choices from sparsest to densest (by FLOPs, ties by sparsity).
    ladders = {b: sorted(flops[b], key=lambda c: (flops[b][c], -float(c))) for b in blocks}
    level = {b: 0 for b in blocks}
    total = sum(flops[b][ladders[b][0]] for b in blocks)
    full = sum(flops[b][ORIGINAL] for b in blocks)
    limit = budget * full
    if total > limit:
        log.warning("anchor budget %.3f is below the smallest composition (%.3f of the FLOPs); "
                    "using the smallest", budget, total / full)
    while True:
        steps = []
        for i, b in enumerate(blocks):
            if level[b] + 1 < len(ladders[b]):
                here, there = ladders[b][level[b]], ladders[b][level[b] + 1]
                steps.append((-float(here), flops[b][there] - flops[b][here], i, b))
        # Only the sparsest blocks may move, so the composition stays even; among them the
        # cheapest step first. When none of those fits, no denser block may move either.
        sparsest = min((s[0] for s in steps), default=None)
        fitting = sorted(s for s in steps if s[0] == sparsest and total + s[1] <= limit)
        if not fitting:
            break
        _, delta, _, b = fitting[0]
        total += delta
        level[b] += 1
    return [ladders[b][level[b]] for b in blocks]


def anchor_selections(model, budgets: Sequence[float], flops: dict[str, dict[str, int]] | None = None) -> list[list[str]]:
    """The even composition of a `ScalableModel` for each budget, in budget order (duplicates
    kept, so index i always belongs to budgets[i])."""
    flops = choice_flops(model) if flops is None else flops
    return [even_selection(flops, float(b), model.block_names) for b in budgets]
