"""The data a run trains and measures on: Fashion-MNIST (embedded), an image folder (local or
s3://), or a user's factory of torch Datasets, streamed batch by batch in every stage.

`describe(cfg, cache_dir)` checks the source before any work (preflight); `data_ref` turns it
into the `DataRef` every stage's job carries; `load_splits(ref)` opens the same seeded splits
in any process.
"""

from pipelines.data.folders import DataError
from pipelines.data.sources import (
    FASHION_MNIST,
    FACTORY,
    IMAGEFOLDER,
    SOURCES,
    DataRef,
    SourceInfo,
    Splits,
    data_ref,
    default_cache_dir,
    describe,
    export_fashion_mnist,
    load_splits,
)
from pipelines.data.transforms import Preprocess

__all__ = [
    "FACTORY", "FASHION_MNIST", "IMAGEFOLDER", "SOURCES", "DataError", "DataRef", "Preprocess", "SourceInfo",
    "Splits", "data_ref", "default_cache_dir", "describe", "export_fashion_mnist", "load_splits",
]
