"""Which measured candidate to keep when re-ranking the optimizer's top k on validation data.

Measured re-ranking picks among near-ties: the optimizer's top k differ by tenths of a point,
and the validation set measures each of them with a standard error of about
sqrt(acc * (1 - acc) / n), 0.75 points for 94% on 1,000 images. Taking the best measured
candidate then mostly picks the luckiest draw. A composition the joint stage trained for
this budget (an anchor, `legoblocks.anchors`) carries more information than one lucky
measurement: it is kept unless another candidate measures better by more than `margin_se`
standard errors. On full Fashion-MNIST (ResNet-20) the anchors measured within about 0.1
point of each other on the test set across joint-stage runs, while the best-measured
non-anchor picks scattered over half a point and more (docs/benchmarks/accuracy.md,
session 5). The original model, where a budget admits it, is preferred the same way: it
needs no training to be right, while joint-trained descendants profile within noise of
zero drop (some below), so a pruned composition would otherwise "beat" it by one lucky draw.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

DEFAULT_MARGIN_SE = 1.0


def standard_error(accuracy: float, n: int) -> float:
    """Standard error of an accuracy (a fraction) measured on n samples."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    p = min(max(accuracy, 0.0), 1.0)
    return math.sqrt(p * (1.0 - p) / n)


def pick_measured(
    measured: Sequence[float],
    preferred: Collection[int] = (),
    *,
    n: int,
    margin_se: float = DEFAULT_MARGIN_SE,
) -> int:
    """Index of the candidate to keep, given measured accuracies (fractions) on n samples.

    The best measured candidate (the first on ties, i.e. the optimizer's better rank),
    unless a `preferred` candidate (an index) measures within `margin_se` standard errors
    of it: then the best preferred one. `margin_se=0` keeps the best measured candidate.
    """
    if not measured:
        raise ValueError("pick_measured needs at least one measured candidate")
    if margin_se < 0:
        raise ValueError(f"margin_se must be >= 0, got {margin_se}")
    bad = [i for i in preferred if not 0 <= i < len(measured)]
    if bad:
        raise ValueError(f"preferred indices {bad} are outside the {len(measured)} candidates")
    best = max(range(len(measured)), key=lambda i: (measured[i], -i))
    if not preferred:
        return best
    anchor = max(preferred, key=lambda i: (measured[i], -i))
    margin = margin_se * standard_error(measured[best], n)
    return anchor if measured[anchor] >= measured[best] - margin else best
