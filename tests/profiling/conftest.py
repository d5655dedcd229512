"""Profiling fixtures: a tiny real ResNet made scalable, trained briefly on real Fashion-MNIST.

The whole chain is the real one (zoo -> detect -> descend -> retrain -> ScalableModel),
kept tiny (ResNet-8 at width 8, a thousand images, one epoch) so the package's tests run
in well under three minutes on 2 shared cores. The teacher need not be good: the tests
check the profiler's bookkeeping, not the model's quality.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from legoblocks.compose import ScalableModel
from legoblocks.data import load_fashion_mnist, split
from legoblocks.descend import DEFAULT_LADDER, make_descendants
from legoblocks.detect import detect_blocks
from legoblocks.retrain import RetrainConfig, collect_block_io, retrain_descendants
from legoblocks.train import train_teacher
from legoblocks.zoo import resnet
from profiling.profile import LatencySettings, profile_model
from profiling.table import ProfileTable

INPUT_SHAPE = (1, 28, 28)
# Small but complete: 3 environments, a few additivity and calibration compositions.
PROFILE_KW = dict(
    envs=("original", "middle", "largest"),
    latency=LatencySettings(batch_size=1, warmup=1, repeats=3, threads=1),
    additivity_n=6,
    calibration_k=6,
    seed=0,
)


@pytest.fixture(scope="session")
def fmnist_parts(fmnist_dir: Path) -> dict[str, TensorDataset]:
    """Disjoint real images from the 10k test file (it loads fast): train, val, BN batches."""
    data = load_fashion_mnist(fmnist_dir, train=False)
    train, val, bn = split(data, [1500, 300, 256], seed=0)
    return {"train": train, "val": val, "bn": bn}


@pytest.fixture(scope="session")
def scalable(fmnist_parts: dict[str, TensorDataset]) -> ScalableModel:
    """ResNet-8 (width 8) -> blocks -> descendants on the default ladder, briefly retrained."""
    torch.manual_seed(0)
    teacher = resnet(depth=8, width=8)
    train_teacher(teacher, fmnist_parts["train"], epochs=1, lr=0.05, batch_size=64,
                  weight_decay=5e-4, seed=0, progress=False)
    teacher.eval()
    blocked = detect_blocks(teacher, INPUT_SHAPE)
    data = collect_block_io(blocked.blocks, fmnist_parts["train"], limit=512, batch_size=128, seed=0)
    variants = {}
    for spec, block, io in zip(blocked.specs, blocked.blocks, data):
        if spec.scalable:
            descendants = make_descendants(block, spec.in_shape, DEFAULT_LADDER)
            retrain_descendants(descendants, io, RetrainConfig(epochs=1, limit=512), progress=False)
        else:
            descendants = {"0.0": block}
        variants[spec.name] = descendants
    return ScalableModel(blocked.specs, variants, INPUT_SHAPE, model_ref="resnet8")


@pytest.fixture(scope="session")
def table(scalable: ScalableModel, fmnist_parts: dict[str, TensorDataset]) -> ProfileTable:
    return profile_model(scalable, fmnist_parts["val"], **PROFILE_KW)
