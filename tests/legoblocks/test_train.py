"""Teacher training and evaluation on a small real Fashion-MNIST subset."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import TensorDataset

from legoblocks.train import TrainReport, correct, evaluate, save_state_dict, train_teacher

pytestmark = pytest.mark.usefixtures("single_thread")


def _tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.1),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128, 10),
    )


def test_training_learns_and_checkpoints(
    fmnist_small: tuple[TensorDataset, TensorDataset], tmp_path: Path
) -> None:
    train, held_out = fmnist_small
    torch.manual_seed(0)
    model = _tiny_cnn()
    before = evaluate(model, held_out)
    ckpt = tmp_path / "ckpt" / "teacher.safetensors"
    report = train_teacher(
        model, train, epochs=3, lr=0.05, batch_size=64, weight_decay=5e-4, seed=0, checkpoint=ckpt, progress=False
    )
    assert isinstance(report, TrainReport) and report.epochs == 3 and report.seconds > 0
    assert 0 < report.final_loss < 2.0 and report.train_accuracy > 0.4
    after = evaluate(model, held_out)
    assert after > 0.5 and after > before + 0.2  # 10 classes: chance is 0.1
    state = load_file(str(ckpt))
    assert set(state) == set(model.state_dict())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert [p.name for p in ckpt.parent.iterdir()] == ["teacher.safetensors"]  # no temp file left behind


def test_training_is_deterministic_for_a_seed(fmnist_small: tuple[TensorDataset, TensorDataset]) -> None:
    data = TensorDataset(*(t[:128] for t in fmnist_small[0].tensors))
    states = []
    for seed in (1, 1, 2):
        torch.manual_seed(0)
        model = _tiny_cnn()
        train_teacher(model, data, epochs=1, lr=0.05, batch_size=32, weight_decay=0.0, seed=seed, progress=False)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])


def test_global_rng_is_left_alone(fmnist_small: tuple[TensorDataset, TensorDataset]) -> None:
    data = TensorDataset(*(t[:64] for t in fmnist_small[0].tensors))
    model = _tiny_cnn()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_teacher(model, data, epochs=1, lr=0.01, batch_size=32, weight_decay=0.0, seed=9, progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_evaluate_restores_mode_and_does_not_touch_bn(fmnist_small: tuple[TensorDataset, TensorDataset]) -> None:
    model = _tiny_cnn().train()
    stats = model[1].running_mean.clone()
    acc = evaluate(model, fmnist_small[1], batch_size=100)
    assert 0.0 <= acc <= 1.0
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(model[1].running_mean, stats)
    model.eval()
    evaluate(model, fmnist_small[1])
    assert not model.training


def test_correct_is_per_sample_in_order_and_evaluate_is_its_mean(
    fmnist_small: tuple[TensorDataset, TensorDataset]
) -> None:
    torch.manual_seed(0)
    model = _tiny_cnn().eval()
    data = fmnist_small[1]
    hits = correct(model, data, batch_size=7)  # batches that do not divide the split
    with torch.no_grad():
        expected = model(data.tensors[0]).argmax(1) == data.tensors[1]
    assert hits.dtype == torch.bool and torch.equal(hits, expected)
    assert evaluate(model, data, batch_size=7) == int(expected.sum()) / len(expected)


def test_bad_arguments_are_named(fmnist_small: tuple[TensorDataset, TensorDataset]) -> None:
    train = fmnist_small[0]
    with pytest.raises(ValueError, match="epochs must be > 0"):
        train_teacher(_tiny_cnn(), train, epochs=0, lr=0.1, batch_size=8, weight_decay=0.0, seed=0, progress=False)
    with pytest.raises(ValueError, match="train_ds is empty"):
        empty = TensorDataset(torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.long))
        train_teacher(_tiny_cnn(), empty, epochs=1, lr=0.1, batch_size=8, weight_decay=0.0, seed=0, progress=False)
    with pytest.raises(ValueError, match="evaluation dataset is empty"):
        evaluate(_tiny_cnn(), TensorDataset(torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.long)))


def test_save_state_dict_replaces_atomically(tmp_path: Path) -> None:
    model = _tiny_cnn()
    target = tmp_path / "w.safetensors"
    target.write_bytes(b"old")
    save_state_dict(model, target)
    assert torch.equal(load_file(str(target))["6.bias"], model[6].bias)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]
