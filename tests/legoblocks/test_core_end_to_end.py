"""The core on real data: teacher -> detect -> descend -> retrain -> compose -> save/load.

A ResNet-20 (width 8) trained for one epoch on 3,000 real Fashion-MNIST images is small
enough for 2 shared CPU cores and good enough that pruning visibly hurts it and feature
distillation visibly repairs it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from legoblocks.compose import ScalableModel
from legoblocks.data import split
from legoblocks.detect import detect_blocks, verify_chain
from legoblocks.retrain import RetrainConfig, RetrainReport, collect_block_io, retrain_descendants
from legoblocks.train import evaluate, train_teacher
from legoblocks.zoo import build_zoo_model

SHAPE = (1, 28, 28)


@dataclass
class CoreRun:
    teacher: nn.Module
    scalable: ScalableModel
    held_out: TensorDataset
    reports: dict[str, dict[str, RetrainReport]]
    all_at_04: list[str]
    acc_teacher: float
    acc_before: float
    acc_after: float


@pytest.fixture(scope="module")
def core_run(fmnist_test_split: TensorDataset) -> CoreRun:
    train, held_out = split(fmnist_test_split, [3000, 1000], seed=1)
    torch.manual_seed(0)
    teacher = build_zoo_model("resnet20", width=8)
    train_teacher(teacher, train, epochs=1, lr=0.1, batch_size=64, weight_decay=5e-4, seed=0, progress=False)
    teacher.eval()

    blocked = detect_blocks(teacher, SHAPE)
    verify_chain(teacher, blocked)
    scalable = ScalableModel.from_blocked(blocked, model_ref="resnet20")
    all_at_04 = scalable.normalize_selection(
        {s.name: ("0.4" if s.scalable else "0.0") for s in scalable.specs})
    acc_before = evaluate(scalable.compose(all_at_04), held_out)

    # Measured: with 800 training pairs every block's MSE fell, yet the all-0.4 composition got
    # worse (0.23 -> 0.15 accuracy) because the blocks' errors compound (DESIGN.md 3b); with
    # 1,600 pairs at lr 1e-2 it goes 0.23 -> 0.52, a margin this test can rely on.
    originals = [scalable.variant(name, "0.0") for name in scalable.block_names]
    data = collect_block_io(originals, train, limit=2000, batch_size=250, seed=0)
    cfg = RetrainConfig(epochs=1, lr=1e-2, batch_size=64, val_fraction=0.2, seed=0)
    reports = {
        spec.name: retrain_descendants(scalable.variants[spec.name], block_data, cfg, progress=False)
        for spec, block_data in zip(scalable.specs, data) if spec.scalable
    }
    return CoreRun(
        teacher=teacher, scalable=scalable, held_out=held_out, reports=reports, all_at_04=all_at_04,
        acc_teacher=evaluate(teacher, held_out), acc_before=acc_before,
        acc_after=evaluate(scalable.compose(all_at_04), held_out),
    )


def test_every_descendants_held_out_feature_mse_falls(core_run: CoreRun) -> None:
    assert len(core_run.reports) == 9
    for block, reports in core_run.reports.items():
        assert set(reports) == {"0.0", "0.2", "0.4", "0.6", "0.8"}
        for choice, report in reports.items():
            if choice == "0.0":
                assert report.loss_after == report.loss_before < 1e-10  # the original is the teacher
            else:
                assert report.loss_after < report.loss_before, f"{block}@{choice}: {report}"


def test_composed_model_at_04_is_more_accurate_after_retraining(core_run: CoreRun) -> None:
    assert core_run.acc_teacher > 0.5  # the teacher learned something: the comparison means something
    assert core_run.acc_after > core_run.acc_before, (core_run.acc_before, core_run.acc_after)
    # Retraining touched only descendants: the original selection is still the teacher.
    x = torch.stack([core_run.held_out[i][0] for i in range(8)])
    with torch.no_grad():
        assert torch.allclose(core_run.scalable.compose(core_run.scalable.original_selection())(x),
                              core_run.teacher(x), atol=1e-5)


def test_save_load_round_trip_gives_identical_outputs(core_run: CoreRun, tmp_path: Path) -> None:
    loaded = ScalableModel.load(core_run.scalable.save(tmp_path / "scalable"))
    x = torch.stack([core_run.held_out[i][0] for i in range(32)])
    sm = core_run.scalable
    gen = torch.Generator().manual_seed(0)
    random_sel = [c[int(torch.randint(len(c), (1,), generator=gen))] for c in map(sm.choices, sm.block_names)]
    with torch.no_grad():
        for sel in (core_run.all_at_04, sm.smallest_selection(), random_sel):
            assert torch.equal(sm.compose(sel)(x), loaded.compose(sel)(x))
    # The loaded blocks are real modules: they train and switch like the originals.
    assert copy.deepcopy(loaded.variant("layer2.1", "0.4")).train() is not None
