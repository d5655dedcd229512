"""The uniform-pruning baseline: Torch-Pruning at one ratio, FLOPs-targeted, KD fine-tune."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from legoblocks.data import split
from legoblocks.train import evaluate, train_teacher
from legoblocks.uniform import count_flops, count_params, finetune, prune_to_flops, prune_uniform

SHAPE = (1, 28, 28)


def _cnn(width: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, width * 2, 3, padding=1), nn.BatchNorm2d(width * 2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width * 2, width * 2, 3, padding=1), nn.BatchNorm2d(width * 2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width * 2, 10),
    )


def test_prune_uniform_shrinks_every_layer_but_keeps_the_classes() -> None:
    model = _cnn()
    for p in model.parameters():
        p.requires_grad_(False)  # a frozen teacher: the pitfall that makes Torch-Pruning a no-op
    before = {k: v.clone() for k, v in model.state_dict().items()}

    pruned = prune_uniform(model, 0.5, SHAPE)

    assert count_params(pruned) < count_params(model) * 0.4
    assert [m.out_channels for m in pruned.modules() if isinstance(m, nn.Conv2d)] == [8, 16, 16]
    assert pruned[-1].out_features == 10
    assert pruned(torch.zeros(2, *SHAPE)).shape == (2, 10)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "original touched"
    assert count_flops(pruned, SHAPE) < count_flops(model, SHAPE) * 0.35
    with pytest.raises(ValueError, match="ratio"):
        prune_uniform(model, 1.0, SHAPE)


def test_prune_to_flops_meets_the_budget_with_the_least_pruning() -> None:
    model = _cnn()
    full = count_flops(model, SHAPE)
    choice = prune_to_flops(model, 0.5, SHAPE)
    assert choice.flops == count_flops(choice.model, SHAPE)
    assert choice.flops <= 0.5 * full
    assert choice.flops_frac > 0.4, "bisection stopped far below the budget"
    looser = prune_uniform(model, max(0.0, choice.ratio - 0.05), SHAPE)
    assert count_flops(looser, SHAPE) > choice.flops


def test_finetune_recovers_a_pruned_model_and_leaves_the_teacher(fmnist_test_split) -> None:
    train, held = split(fmnist_test_split, [1500, 500], seed=2)
    teacher = _cnn(8)
    train_teacher(teacher, train, epochs=2, lr=0.05, batch_size=64, weight_decay=0.0, seed=0, progress=False)
    teacher.eval()
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    pruned = prune_uniform(teacher, 0.6, SHAPE)
    acc_pruned = evaluate(pruned, held)

    steps: list[float] = []
    report = finetune(pruned, teacher, train, epochs=2, lr=0.02, batch_size=64, seed=0,
                      progress=False, on_step=lambda i, loss: steps.append(loss))

    assert report.steps == len(steps) == 2 * (1500 // 64)
    assert all(torch.equal(teacher_state[k], v) for k, v in teacher.state_dict().items())
    assert not teacher.training
    assert evaluate(pruned, held) > acc_pruned
    timed = finetune(prune_uniform(teacher, 0.6, SHAPE), teacher, train, wall_time_s=0.5,
                     batch_size=64, progress=False)
    assert timed.steps >= 1 and timed.seconds >= 0.5
    with pytest.raises(ValueError, match="exactly one"):
        finetune(pruned, teacher, train, progress=False)


def test_finetune_trains_only_the_trainable_modules(fmnist_test_split) -> None:
    """The frozen rest keeps its weights and its BatchNorm statistics (it stays in eval mode)."""
    train, _ = split(fmnist_test_split, [600, 100], seed=3)
    teacher, student = _cnn(8).eval(), _cnn(8)
    middle = student[4:7]  # the second conv, its BatchNorm and ReLU
    frozen = {k: v.clone() for k, v in student.state_dict().items() if not k.startswith(("4.", "5."))}
    trained = {k: v.clone() for k, v in student.state_dict().items() if k.startswith(("4.", "5."))}

    report = finetune(student, teacher, train, epochs=1, lr=0.05, batch_size=64, progress=False, trainable=[middle])

    assert report.steps == 600 // 64
    after = student.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # BatchNorm buffers included
    assert all(not torch.equal(after[k], v) for k, v in trained.items() if after[k].is_floating_point())
    with pytest.raises(ValueError, match="nothing to train"):
        finetune(student, teacher, train, epochs=1, progress=False, trainable=[student[2]])  # a ReLU
