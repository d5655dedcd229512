"""The uniform-pruning baseline that composed LegoDNN models must beat.

Uniform pruning is the simplest way to get a model for a FLOPs budget: remove the same
fraction of channels from every layer of the whole model (Torch-Pruning, magnitude
importance, the classifier's outputs kept), then fine-tune the pruned model end to end
against the teacher with `0.5 * CE + 0.5 * KD` (T = 4). It needs one pruning and one
fine-tune *per budget*, which is exactly the cost LegoDNN claims to save; the benchmark
(`bench/accuracy.py`) runs both side by side. The same fine-tune loop also trains the
"scratch" baseline (a narrower model from random initialisation) for a given wall time.

FLOPs are measured, never assumed from the ratio: channel counts round (16 channels at 0.2
keep 12 or 13), so the ratio that meets a FLOPs budget is found by bisection on measured
FLOPs (`torch.utils.flop_counter`, 2 FLOPs per multiply-add).
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from legoblocks.batches import epoch_batches, loader
from legoblocks.flops import count_flops

log = logging.getLogger(__name__)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _classifier_layers(model: nn.Module, example: torch.Tensor) -> list[nn.Module]:
    """Layers whose output channels are the model's outputs: pruning them would drop classes."""
    with torch.no_grad():
        out = model(example)
    if out.dim() != 2:
        raise ValueError(
            f"prune_uniform expects a classifier with [batch, classes] output, got shape {tuple(out.shape)}"
        )
    classes = out.shape[1]
    layers = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == classes]
    if not layers:
        layers = [
            m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd) and m.out_channels == classes
        ]
    if not layers:
        raise ValueError(
            f"prune_uniform: found no Linear or Conv layer with {classes} outputs to protect; "
            "the model's classifier must be a Linear or Conv layer"
        )
    return layers[-1:]


def prune_uniform(
    model: nn.Module, ratio: float, example_input_shape: tuple[int, ...]
) -> nn.Module:
    """A pruned deep copy of `model`: every prunable layer loses `ratio` of its channels.

    The copy's parameters get `requires_grad=True` (Torch-Pruning silently prunes nothing on
    frozen parameters) and it is traced in eval mode (so BatchNorm statistics do not move).
    Raises if pruning removed nothing although `ratio > 0`.
    """
    import torch_pruning as tp

    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"prune_uniform: ratio must be in [0, 1), got {ratio}")
    pruned = copy.deepcopy(model).eval()
    for p in pruned.parameters():
        p.requires_grad_(True)
    if ratio == 0.0:
        return pruned
    device = next((p.device for p in pruned.parameters()), torch.device("cpu"))
    example = torch.zeros((1, *example_input_shape), device=device)
    before = count_params(pruned)
    pruner = tp.pruner.MetaPruner(
        pruned,
        example,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio,
        global_pruning=False,
        ignored_layers=_classifier_layers(pruned, example),
    )
    pruner.step()
    after = count_params(pruned)
    if after >= before:
        raise RuntimeError(
            f"prune_uniform: pruning at ratio {ratio} removed no parameters ({before} before and "
            "after); the model has no prunable layers Torch-Pruning can trace"
        )
    return pruned.eval()


@dataclass
class UniformChoice:
    ratio: float
    flops: int
    flops_frac: float  # of the unpruned model's FLOPs
    model: nn.Module


def prune_to_flops(
    model: nn.Module,
    target_fraction: float,
    example_input_shape: tuple[int, ...],
    *,
    iterations: int = 12,
) -> UniformChoice:
    """The least-pruned uniform model whose measured FLOPs are at most `target_fraction` of
    `model`'s: bisection on the ratio (FLOPs fall monotonically, in steps, as it grows)."""
    if not 0.0 < target_fraction <= 1.0:
        raise ValueError(f"prune_to_flops: target_fraction must be in (0, 1], got {target_fraction}")
    full = count_flops(model, example_input_shape)
    if target_fraction >= 1.0:
        return UniformChoice(0.0, full, 1.0, prune_uniform(model, 0.0, example_input_shape))
    # Torch-Pruning will not empty a layer, so on narrow layers a ratio near 1 stops pruning
    # them and FLOPs rise again: start from the most aggressive ratio of a coarse descending
    # grid that fits, and bisect below it where FLOPs fall monotonically.
    best, best_flops, hi, fractions = None, 0, 0.0, []
    for hi in (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1):
        best = prune_uniform(model, hi, example_input_shape)
        best_flops = count_flops(best, example_input_shape)
        fractions.append(round(best_flops / full, 3))
        if best_flops <= target_fraction * full:
            break
    else:
        raise ValueError(
            f"prune_to_flops: no ratio in 0.9..0.1 reaches {target_fraction} of the FLOPs (got "
            f"{fractions}); the layers are too narrow to prune further - raise the budget"
        )
    lo = 0.0  # lo: too many FLOPs; hi: fits
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        candidate = prune_uniform(model, mid, example_input_shape)
        flops = count_flops(candidate, example_input_shape)
        if flops <= target_fraction * full:
            hi, best, best_flops = mid, candidate, flops
        else:
            lo = mid
    return UniformChoice(hi, best_flops, best_flops / full, best)


@dataclass
class FinetuneReport:
    steps: int
    epochs: float  # passes over the training set (fractional under a wall-time budget)
    seconds: float
    final_loss: float  # mean loss over the last 50 steps


def distill_loss(
    logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 4.0,
    ce_weight: float = 0.5,
    kd_weight: float = 0.5,
) -> torch.Tensor:
    """`ce_weight * CE + kd_weight * T^2 * KL(softmax(t/T) || softmax(s/T))` (Hinton)."""
    t = temperature
    kd = F.kl_div(
        F.log_softmax(logits / t, dim=1), F.softmax(teacher_logits / t, dim=1), reduction="batchmean"
    ) * (t * t)
    return ce_weight * F.cross_entropy(logits, labels) + kd_weight * kd


def finetune(
    model: nn.Module,
    teacher: nn.Module,
    train_ds: Dataset,
    *,
    epochs: float | None = None,
    wall_time_s: float | None = None,
    lr: float = 0.01,
    optimizer: str = "sgd",
    batch_size: int = 128,
    weight_decay: float = 5e-4,
    temperature: float = 4.0,
    ce_weight: float = 0.5,
    kd_weight: float = 0.5,
    seed: int = 0,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    num_workers: int = 0,
    trainable: Sequence[nn.Module] | None = None,
) -> FinetuneReport:
    """Train `model` in place against the frozen `teacher` for `epochs` or `wall_time_s`.

    Exactly one budget is given: `epochs` (may be fractional) for a reproducible amount of
    work, `wall_time_s` for "the same time as another method". The learning rate follows a
    cosine from `lr` to 0 over the budget (steps, or elapsed time). The teacher stays in eval
    mode and receives no gradients. `optimizer` is "sgd" (Nesterov momentum 0.9) or "adam".
    `trainable` (submodules of `model`; default: all of it) limits training to those modules:
    the rest of `model` is frozen and stays in eval mode, so its BatchNorm statistics do not
    move either, as for the shared original blocks of LegoDNN's joint stage.
    """
    if (epochs is None) == (wall_time_s is None):
        raise ValueError("finetune: give exactly one of epochs or wall_time_s")
    if epochs is not None and epochs <= 0 or wall_time_s is not None and wall_time_s <= 0:
        raise ValueError(f"finetune: the budget must be > 0 (epochs={epochs}, wall_time_s={wall_time_s})")
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"finetune: optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    batches = loader(train_ds, batch_size, shuffle=True, seed=seed, drop_last=True, num_workers=num_workers)
    if len(batches) == 0:
        raise ValueError(
            f"finetune: the training set ({len(train_ds)} samples) is smaller than batch_size {batch_size}"  # type: ignore[arg-type]
        )
    parts = [model] if trainable is None else list(trainable)
    params = list({id(p): p for part in parts for p in part.parameters()}.values())
    if not params:
        raise ValueError("finetune: nothing to train (the trainable modules hold no parameters)")
    if trainable is not None:
        for p in model.parameters():
            p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay
        )
    else:
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    total_steps = None if epochs is None else max(1, round(epochs * len(batches)))
    teacher_was_training = teacher.training
    teacher.eval()
    model.eval()
    for part in parts:
        part.train()
    recent: list[float] = []
    step = 0
    start = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, desc="finetune", unit="step")
    try:
        for epoch in itertools.count():
            for x, y in epoch_batches(batches, epoch):
                elapsed = time.perf_counter() - start
                if total_steps is not None:
                    if step >= total_steps:
                        break
                    frac = step / total_steps
                else:
                    if elapsed >= wall_time_s:  # type: ignore[operator]
                        break
                    frac = elapsed / wall_time_s  # type: ignore[operator]
                for group in opt.param_groups:
                    group["lr"] = 0.5 * lr * (1.0 + math.cos(math.pi * frac))
                x, y = x.to(device), y.to(device)
                with torch.no_grad():
                    teacher_logits = teacher(x)
                loss = distill_loss(
                    model(x), teacher_logits, y,
                    temperature=temperature, ce_weight=ce_weight, kd_weight=kd_weight,
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise FloatingPointError(f"finetune diverged at step {step} (loss {value}); lower lr (now {lr})")
                recent = (recent + [value])[-50:]
                step += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{value:.4f}")
                if on_step is not None:
                    on_step(step, value)
            else:
                continue  # the epoch ended inside the budget: start another
            break
    finally:
        if bar is not None:
            bar.close()
        teacher.train(teacher_was_training)
    model.eval()
    return FinetuneReport(
        steps=step,
        epochs=step / len(batches),
        seconds=time.perf_counter() - start,
        final_loss=sum(recent) / len(recent) if recent else math.nan,
    )
