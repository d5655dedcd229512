"""Batches from a dataset: the one way every trainer and evaluator streams its data.

A map-style dataset decodes a sample when it is asked for; a torch DataLoader with
`num_workers` processes decodes batches ahead of the model, so no process holds the data set
in memory. A dataset that augments per (seed, epoch, index) exposes `set_epoch(epoch)` (as a
`DistributedSampler` does): `epoch_batches` calls it before each epoch's pass, and workers,
started per pass, see it. Shuffles come from a seeded generator, so the order does not
depend on the number of workers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset


def set_epoch(ds: Dataset, epoch: int) -> None:
    """Tell a dataset (or the dataset under a `Subset`) which epoch is being read."""
    while isinstance(ds, Subset):
        ds = ds.dataset
    setter = getattr(ds, "set_epoch", None)
    if callable(setter):
        setter(epoch)


def loader(ds: Dataset, batch_size: int, *, shuffle: bool = False, seed: int = 0, drop_last: bool = False,
           num_workers: int = 0) -> DataLoader:
    """A DataLoader over `ds` (seeded shuffle when asked), with `num_workers` decoding processes."""
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, num_workers=num_workers,
                      generator=torch.Generator().manual_seed(seed) if shuffle else None,
                      persistent_workers=False)


def epoch_batches(batches: DataLoader, epoch: int) -> Iterator:
    """One pass over `batches` as epoch `epoch` (set on the dataset first)."""
    set_epoch(batches.dataset, epoch)
    return iter(batches)


def index_batches(ds: Dataset, index_batches: Sequence[Tensor] | Iterable[Tensor], *, epoch: int = 0,
                  num_workers: int = 0) -> Iterator:
    """The samples of `ds` at each given index batch, in order (e.g. a trainer's per-step
    batches), decoded by `num_workers` processes."""
    set_epoch(ds, epoch)
    batches = [list(map(int, b)) for b in index_batches]
    return iter(DataLoader(ds, batch_sampler=batches, num_workers=num_workers))
