"""Feature distillation: teacher pass, block data files, retraining descendants."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from legoblocks.retrain import (
    BlockData,
    RetrainConfig,
    RetrainReport,
    _split,
    block_io_indices,
    collect_block_io,
    retrain_descendants,
)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def block_io(trained_tiny_resnet: nn.Sequential, fmnist_small) -> list[BlockData]:
    return collect_block_io(list(trained_tiny_resnet), fmnist_small[0], limit=512, batch_size=128, seed=0)


def test_collect_block_io_chains_the_frozen_teacher(trained_tiny_resnet: nn.Sequential, block_io, fmnist_small) -> None:
    blocks = list(trained_tiny_resnet)
    assert len(block_io) == 4 and all(len(d) == 512 for d in block_io)
    assert block_io[0].inputs.shape == (512, 1, 28, 28)
    assert block_io[1].inputs.shape == (512, 8, 14, 14) and block_io[3].outputs.shape == (512, 10)
    for prev, nxt in zip(block_io, block_io[1:]):
        assert prev.outputs is nxt.inputs  # shared, not copied
    with torch.no_grad():
        for block, data in zip(blocks, block_io):
            # First and last batch: every batch lands at its own rows of the preallocated tensors.
            for rows in (slice(0, 32), slice(-40, None)):
                assert torch.allclose(block(data.inputs[rows]), data.outputs[rows], atol=1e-5)
        logits = trained_tiny_resnet(block_io[0].inputs[:32])
    assert torch.allclose(logits, block_io[3].outputs[:32], atol=1e-5)
    # The inputs are real samples from the dataset, picked by the seed: block_io_indices
    # names which, row by row (how a caller pairs them with labels).
    images = fmnist_small[0].tensors[0]
    index = block_io_indices(len(images), 512, seed=0)
    assert torch.equal(block_io[0].inputs, images[index])


def test_collect_block_io_restores_modes_and_seeds_the_choice(trained_tiny_resnet: nn.Sequential, fmnist_small) -> None:
    blocks = [copy.deepcopy(b) for b in trained_tiny_resnet]
    blocks[1].train()
    running = blocks[1].bn1.running_mean.clone()
    a = collect_block_io(blocks, fmnist_small[0], limit=20, batch_size=8, seed=5)
    b = collect_block_io(blocks, fmnist_small[0], limit=20, batch_size=8, seed=5)
    c = collect_block_io(blocks, fmnist_small[0], limit=20, batch_size=8, seed=6)
    assert blocks[1].training and not blocks[2].training
    assert torch.equal(blocks[1].bn1.running_mean, running)  # teacher ran in eval mode
    assert torch.equal(a[0].inputs, b[0].inputs) and not torch.equal(a[0].inputs, c[0].inputs)
    assert len(collect_block_io(blocks, fmnist_small[0], limit=None, batch_size=256, seed=0)[0]) == len(fmnist_small[0])
    with pytest.raises(ValueError, match="at least one block"):
        collect_block_io([], fmnist_small[0], limit=1, batch_size=1, seed=0)


def test_block_data_file_round_trip(block_io, tmp_path: Path) -> None:
    data = block_io[1]
    path = tmp_path / "sub" / "layer1.safetensors"
    data.save(path)
    back = BlockData.load(path)
    assert torch.equal(back.inputs, data.inputs) and torch.equal(back.outputs, data.outputs)
    with pytest.raises(ValueError, match="as many inputs as outputs"):
        BlockData(torch.zeros(3, 2), torch.zeros(4, 2))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        BlockData.load(tmp_path / "missing.safetensors")
    torch.save({"inputs": data.inputs[:2]}, tmp_path / "pickle.safetensors")
    with pytest.raises(ValueError, match="not a safetensors block data file"):
        BlockData.load(tmp_path / "pickle.safetensors")
    assert sorted(p.name for p in path.parent.iterdir()) == ["layer1.safetensors"]  # no temp files


def _params(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def test_retraining_lowers_held_out_mse_of_every_descendant(
    trained_tiny_resnet: nn.Sequential, block_io, make_hand_descendants
) -> None:
    """On real Fashion-MNIST features, distillation improves each descendant."""
    block = trained_tiny_resnet[1]
    descendants = make_hand_descendants(block)
    for p in descendants["0.5"].parameters():
        p.requires_grad_(False)  # as if copied from a frozen teacher
    original = _params(descendants["0.0"])
    cfg = RetrainConfig(epochs=3, lr=3e-3, batch_size=32, val_fraction=0.2, seed=0)
    reports = retrain_descendants(descendants, block_io[1], cfg, progress=False)
    assert set(reports) == {"0.0", "0.5", "0.75"}
    assert all(isinstance(r, RetrainReport) for r in reports.values())
    for choice in ("0.5", "0.75"):
        r = reports[choice]
        assert r.loss_after < 0.8 * r.loss_before, (choice, r)
        assert r.seconds > 0
    # The original is not trained and reproduces the teacher on held-out pairs.
    r0 = reports["0.0"]
    assert r0.loss_before == r0.loss_after < 1e-10 and r0.seconds == 0
    assert all(torch.equal(a, b) for a, b in zip(original, descendants["0.0"].parameters()))
    # Thinner blocks start worse and the trained ones are left in eval mode.
    assert reports["0.75"].loss_before > reports["0.5"].loss_before
    assert not any(m.training for d in descendants.values() for m in d.modules())


def test_retraining_is_deterministic_and_limit_bounds_the_work(
    trained_tiny_resnet: nn.Sequential, block_io, make_hand_descendants
) -> None:
    block = trained_tiny_resnet[2]
    cfg = RetrainConfig(epochs=1, lr=1e-3, batch_size=16, limit=64, seed=3)
    runs = []
    for _ in range(2):
        desc = make_hand_descendants(block)
        reports = retrain_descendants(desc, block_io[2], cfg, progress=False)
        runs.append((reports["0.5"].loss_after, _params(desc["0.5"])))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    desc = make_hand_descendants(block)
    other = retrain_descendants(desc, block_io[2], RetrainConfig(epochs=1, lr=1e-3, batch_size=16, limit=64, seed=4), progress=False)
    assert other["0.5"].loss_after != runs[0][0]


def test_bad_config_and_shape_changes_are_named(block_io, residual_block_cls) -> None:
    data = block_io[1]
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\)"):
        retrain_descendants({"0.2": residual_block_cls()}, data, RetrainConfig(val_fraction=1.0), progress=False)
    with pytest.raises(ValueError, match="lr must be > 0"):
        retrain_descendants({"0.2": residual_block_cls()}, data, RetrainConfig(lr=0), progress=False)
    wrong = nn.Conv2d(8, 4, 1)
    with pytest.raises(ValueError, match=r"descendant '0.4' maps the block input to shape \(4, 14, 14\), expected \(8, 14, 14\)"):
        retrain_descendants({"0.4": wrong}, data, RetrainConfig(), progress=False)
    tiny = BlockData(data.inputs[:1], data.outputs[:1])
    with pytest.raises(ValueError, match="too few"):
        retrain_descendants({"0.2": residual_block_cls()}, tiny, RetrainConfig(), progress=False)


def test_collect_accepts_plain_datasets(trained_tiny_resnet: nn.Sequential, fmnist_small) -> None:
    """Any Dataset yielding (x, y) works, not only TensorDatasets."""
    x, y = fmnist_small[0].tensors

    class Plain(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 10

        def __getitem__(self, i: int):
            return x[i], y[i]

    plain = collect_block_io(list(trained_tiny_resnet), Plain(), limit=None, batch_size=4, seed=0)
    tensor = collect_block_io(list(trained_tiny_resnet), TensorDataset(x[:10], y[:10]), limit=None, batch_size=4, seed=0)
    assert torch.equal(plain[3].outputs, tensor[3].outputs)


def test_descend_then_file_round_trip_then_retrain(trained_tiny_resnet: nn.Sequential, block_io, tmp_path: Path) -> None:
    """The pipeline's path: Torch-Pruning descendants -> safe files -> retrain, all improve."""
    from legoblocks.descend import make_descendants
    from legoblocks.serialize import load_module, save_module

    made = make_descendants(trained_tiny_resnet[1], (8, 14, 14), (0.0, 0.25, 0.5))
    assert set(made) == {"0.0", "0.25", "0.5"}
    for choice, module in made.items():
        save_module(module, tmp_path / f"{choice}.safetensors")
    loaded = {c: load_module(tmp_path / f"{c}.safetensors") for c in made}
    reports = retrain_descendants(loaded, block_io[1], RetrainConfig(epochs=2, lr=3e-3, batch_size=32, seed=1), progress=False)
    assert reports["0.0"].loss_after < 1e-10
    for choice in ("0.25", "0.5"):
        assert reports[choice].loss_after < reports[choice].loss_before, (choice, reports[choice])
        with torch.no_grad():  # the retrained module, not a copy, was updated in place
            x = block_io[1].inputs[:8]
            assert not torch.equal(loaded[choice](x), made[choice](x))


def test_val_limit_caps_the_measured_pairs_and_trains_on_the_rest(block_io) -> None:
    data = block_io[1]  # 512 pairs
    train, held = _split(data, RetrainConfig(val_fraction=0.5, val_limit=10, seed=2))
    assert len(held) == 10 and len(train) == 502
    assert not set(held.tolist()) & set(train.tolist())
    # Without a held-out share the loss is measured on (at most val_limit) training pairs.
    train, measured = _split(data, RetrainConfig(val_fraction=0.0, val_limit=10, seed=2))
    assert len(train) == 512 and torch.equal(measured, train[:10])
    with pytest.raises(ValueError, match="val_limit must be >= 1"):
        RetrainConfig(val_limit=0).validate()


def test_zero_val_fraction_reports_on_the_training_pairs(trained_tiny_resnet: nn.Sequential, block_io, make_hand_descendants) -> None:
    desc = make_hand_descendants(trained_tiny_resnet[1])
    reports = retrain_descendants(desc, block_io[1], RetrainConfig(val_fraction=0.0, limit=128, batch_size=32), progress=False)
    assert reports["0.5"].loss_after < reports["0.5"].loss_before
