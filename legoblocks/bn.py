"""BatchNorm re-estimation for composed models.

A composed model mixes blocks that were trained apart: each descendant's BatchNorm running
statistics were collected behind the *teacher's* earlier blocks, so once pruned blocks sit in
front of it the activations it normalises have drifted. Re-estimating the running mean and
variance on a few training batches of the *composed* model removes most of that mismatch at
the cost of a few forward passes.

The work always happens on a deep copy: the caller's model (often a live block shared with a
`ScalableModel` or a `BlockSwitcher`) is never touched.
"""

from __future__ import annotations

import copy
import logging
from typing import Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from legoblocks.devices import device_of

log = logging.getLogger(__name__)

Batch = Tensor | tuple[Tensor, ...] | list[Tensor]


def _inputs(batch: Batch) -> Tensor:
    """A batch may be a bare input tensor or an (inputs, labels, ...) tuple from a loader."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise TypeError(
        f"recalibrate_bn: a batch must be a Tensor or an (inputs, labels) tuple, got "
        f"{type(batch).__name__}; pass e.g. a DataLoader or calibration_batches(ds, ...)"
    )


def recalibrate_bn(model: nn.Module, batches: Iterable[Batch]) -> nn.Module:
    """Return a deep copy of `model` whose BatchNorm running statistics are re-estimated.

    Every BatchNorm layer of the copy is reset and then accumulates a cumulative (equal
    weight per batch, `momentum=None`) average over `batches`, in train mode under
    `no_grad`; all other layers stay in eval mode so that e.g. dropout does not distort the
    statistics being measured. The copy is returned in eval mode with each layer's original
    `momentum` restored, so only BatchNorm buffers differ from `model`.
    """
    calibrated = copy.deepcopy(model)
    calibrated.eval()
    norms = [m for m in calibrated.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        log.info("recalibrate_bn: the model has no BatchNorm layer; returning an unchanged copy")
        return calibrated
    momenta = [m.momentum for m in norms]
    for norm in norms:
        if not norm.track_running_stats:
            continue
        norm.reset_running_stats()
        norm.momentum = None  # cumulative moving average: every batch counts the same
        norm.train()
    device = device_of(calibrated)
    seen = 0
    with torch.no_grad():
        for batch in batches:
            calibrated(_inputs(batch).to(device))
            seen += 1
    if seen == 0:
        raise ValueError(
            "recalibrate_bn: got no batches; pass at least one batch of training inputs "
            "(e.g. calibration_batches(train_ds, num_batches=8))"
        )
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    return calibrated.eval()


def calibration_batches(
    ds: Dataset, *, num_batches: int = 8, batch_size: int = 128, seed: int = 0
) -> list[Tensor]:
    """Draw `num_batches` disjoint random input batches from `ds` (reproducible by `seed`).

    Kept small on purpose: the statistics converge within a few thousand images, and this is
    the tensor a bundle ships to the device for on-device re-estimation.
    """
    if num_batches < 1 or batch_size < 1:
        raise ValueError(
            f"calibration_batches: num_batches ({num_batches}) and batch_size ({batch_size}) "
            "must both be >= 1"
        )
    size = len(ds)  # type: ignore[arg-type]
    if size == 0:
        raise ValueError("calibration_batches: the dataset is empty")
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    wanted = min(size, num_batches * batch_size)
    return [_gather_inputs(ds, order[i : i + batch_size]) for i in range(0, wanted, batch_size)]


def _gather_inputs(ds: Dataset, index: Tensor) -> Tensor:
    tensors = getattr(ds, "tensors", None)
    if tensors is not None:
        return tensors[0][index]
    return torch.stack([_inputs(ds[int(i)]) for i in index])


def iter_batches(x: Tensor, batch_size: int) -> Iterator[Tensor]:
    """Split one calibration tensor `[N, C, H, W]` (as shipped in a bundle) into batches."""
    for start in range(0, x.shape[0], batch_size):
        yield x[start : start + batch_size]
