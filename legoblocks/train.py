"""Teacher training and evaluation.

The teacher is the model every descendant is distilled from, so it is trained once,
reproducibly (seeded shuffling and initial state), and checkpointed atomically: a pipeline
stage that dies mid-write must never leave a truncated checkpoint that a resumed run trusts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from legoblocks.batches import epoch_batches, loader
from legoblocks.devices import device_of

# Images per evaluation batch. Small on purpose: glibc malloc serves every allocation above
# its mmap threshold (32 MiB at most by default) with fresh pages that the kernel faults in
# and zeroes, op after op. At 512 a 28x28 MobileNetV2's 96-channel activations are 154 MB, at
# 64 they are 19 MB (with `pipelines.allocator` for units: docs/benchmarks/allocator.md).
EVAL_BATCH_SIZE = 64


@dataclass
class TrainReport:
    """What a training run did: enough to log to MLflow and to sanity-check the teacher."""

    epochs: int
    final_loss: float  # mean cross-entropy over the last epoch
    train_accuracy: float  # accuracy over the last epoch, measured in train mode on the fly
    seconds: float


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")


def train_teacher(
    model: nn.Module,
    train_ds: Dataset,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float,
    seed: int,
    checkpoint: str | Path | None = None,
    progress: bool = True,
    on_epoch: Callable[[int, float], None] | None = None,
    num_workers: int = 0,
) -> TrainReport:
    """Train `model` in place with SGD (momentum 0.9, Nesterov) under a cosine LR schedule.

    `on_epoch(epoch, mean_loss)` is called after each epoch (1-based), e.g. for live progress;
    `num_workers` processes decode batches (`legoblocks.batches`).

    The LR decays per step over all epochs to zero, which trains small CNNs well in few
    epochs without tuning a step schedule. The checkpoint, when asked for, is the final
    `state_dict()` written atomically as safetensors (`save_state_dict`).
    """
    _check_positive(epochs=epochs, lr=lr, batch_size=batch_size)
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if len(train_ds) == 0:  # type: ignore[arg-type]
        raise ValueError("train_ds is empty: nothing to train on")
    device = device_of(model)
    batches = loader(train_ds, batch_size, shuffle=True, seed=seed, num_workers=num_workers)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay
    )
    total_steps = epochs * len(batches)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
    )
    loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    was_training = model.training
    model.train()
    final_loss, accuracy = math.nan, math.nan
    # Dropout draws from the global RNG: seed it for this run only and restore it after.
    with (
        torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
        tqdm(total=total_steps, desc="train teacher", disable=not progress, unit="step") as bar,
    ):
        torch.manual_seed(seed)
        for epoch in range(epochs):
            loss_sum, correct, seen = 0.0, 0, 0
            for x, y in epoch_batches(batches, epoch):
                x, y = x.to(device), y.to(device)
                logits = model(x)
                loss = loss_fn(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                loss_sum += loss.item() * len(y)
                correct += int((logits.argmax(1) == y).sum())
                seen += len(y)
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
            final_loss, accuracy = loss_sum / seen, correct / seen
            if on_epoch is not None:
                on_epoch(epoch + 1, final_loss)
            if not math.isfinite(final_loss):
                raise FloatingPointError(
                    f"training diverged in epoch {epoch + 1} (loss {final_loss}); lower lr (now {lr})"
                )
    model.train(was_training)
    if checkpoint is not None:
        save_state_dict(model, checkpoint)
    return TrainReport(
        epochs=epochs,
        final_loss=final_loss,
        train_accuracy=accuracy,
        seconds=time.perf_counter() - start,
    )


def save_state_dict(model: nn.Module, path: str | Path) -> None:
    """`model.state_dict()` as a safetensors file (no pickle), written atomically."""
    from legoblocks.serialize import write_safetensors

    write_safetensors({k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}, path)


def load_state_dict_file(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a `save_state_dict` file into `model` (strict: every key must match)."""
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path)), strict=True)
    return model


@torch.no_grad()
def correct(model: nn.Module, ds: Dataset, batch_size: int = EVAL_BATCH_SIZE, *, num_workers: int = 0) -> torch.Tensor:
    """Whether the model's top-1 class is right, one bool per sample in `ds`'s order, in eval
    mode; the model's previous mode is restored. Two models' vectors on the same samples give
    a paired comparison (`profiling.serving.paired_difference`)."""
    _check_positive(batch_size=batch_size)
    if len(ds) == 0:  # type: ignore[arg-type]
        raise ValueError("evaluation dataset is empty")
    device = device_of(model)
    was_training = model.training
    model.eval()
    try:
        hits = [(model(x.to(device)).argmax(1) == y.to(device)).cpu()
                for x, y in loader(ds, batch_size, num_workers=num_workers)]
    finally:
        model.train(was_training)
    return torch.cat(hits)


def evaluate(model: nn.Module, ds: Dataset, batch_size: int = EVAL_BATCH_SIZE, *, num_workers: int = 0) -> float:
    """Top-1 accuracy in [0, 1], in eval mode; the model's previous mode is restored."""
    hits = correct(model, ds, batch_size, num_workers=num_workers)
    return int(hits.sum()) / len(hits)
