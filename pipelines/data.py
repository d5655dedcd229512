"""The data every stage reads, opened the same way in every process from its `DataRef`.

Every unit calls `load_splits` with the same reference and gets the same samples, so no index
list (or tensor) travels between tasks.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import Dataset

from pipelines.recipe.jobs import DataRef


@dataclass
class Splits:
    """Disjoint seeded train / val subsets of the training images and a test subset."""

    train: Dataset
    val: Dataset
    test: Dataset


def load_splits(ref: DataRef) -> Splits:
    from legoblocks.data import load_fashion_mnist, split, subset

    full = load_fashion_mnist(ref.dir, train=True)
    train, val = split(full, [ref.train_size, ref.val_size], seed=ref.seed)
    test = subset(load_fashion_mnist(ref.dir, train=False), ref.test_size, seed=ref.seed)
    return Splits(train, val, test)
