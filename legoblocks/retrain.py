"""Feature distillation of descendants: each learns to reproduce its teacher block's output.

The teacher chain runs once (`collect_block_io`) and yields every block's (input, output)
pairs; then all descendants of one block train together on the same shuffled batches
(`retrain_descendants`), so the data is computed once per block, not once per descendant,
and a pipeline can ship one block's `BlockData` file to a worker and retrain that block
alone.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from legoblocks.batches import index_batches
from legoblocks.choices import ORIGINAL
from legoblocks.devices import device_of
from legoblocks.serialize import write_safetensors

_KIND_KEY = "legodnn.kind"
_KIND = "block-data"


@dataclass
class BlockData:
    """A block's input/output pairs from the frozen teacher; row i of each belongs together."""

    inputs: torch.Tensor
    outputs: torch.Tensor

    def __post_init__(self) -> None:
        if self.inputs.shape[0] != self.outputs.shape[0]:
            raise ValueError(
                f"BlockData needs as many inputs as outputs, got {self.inputs.shape[0]} "
                f"and {self.outputs.shape[0]}"
            )

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def save(self, path: str | Path) -> None:
        """One safetensors file (no pickle), so workers can load data they did not produce."""
        tensors = {"inputs": self.inputs, "outputs": self.outputs}
        write_safetensors(
            {k: t.detach().cpu().contiguous() for k, t in tensors.items()}, path, {_KIND_KEY: _KIND}
        )

    @classmethod
    def load(cls, path: str | Path) -> BlockData:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"block data file {path} does not exist")
        try:
            tensors = load_file(str(path))
        except SafetensorError as exc:  # e.g. a pickle under a .safetensors name: never unpickled
            raise ValueError(f"{path} is not a safetensors block data file: {exc}") from exc
        if set(tensors) != {"inputs", "outputs"}:
            raise ValueError(
                f"{path} is not block data: it holds tensors {sorted(tensors)}, expected inputs and outputs"
            )
        return cls(tensors["inputs"], tensors["outputs"])


@dataclass
class RetrainConfig:
    """Knobs of one block's distillation run (the Optuna stage tunes lr and epochs)."""

    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 0.0
    limit: int | None = None  # at most this many training pairs (after the held-out part)
    # Share of the pairs held out to measure loss before/after; 0 measures on the training
    # pairs instead (cheaper, but then "after" is a training loss).
    val_fraction: float = 0.1
    # At most this many pairs measure the loss before/after (None: no cap). The loss is a
    # diagnostic: a few hundred pairs measure it well, and each one costs a forward pass
    # of every descendant twice.
    val_limit: int | None = None
    seed: int = 0

    def validate(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"RetrainConfig.epochs must be >= 1, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"RetrainConfig.lr must be > 0, got {self.lr}")
        if self.batch_size < 1:
            raise ValueError(f"RetrainConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.weight_decay < 0:
            raise ValueError(f"RetrainConfig.weight_decay must be >= 0, got {self.weight_decay}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"RetrainConfig.limit must be >= 1 or None, got {self.limit}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"RetrainConfig.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.val_limit is not None and self.val_limit < 1:
            raise ValueError(f"RetrainConfig.val_limit must be >= 1 or None, got {self.val_limit}")


@dataclass
class RetrainReport:
    """Held-out feature MSE of one descendant before and after retraining."""

    loss_before: float
    loss_after: float
    seconds: float  # time spent training this descendant (its forward/backward/step)


def block_io_indices(total: int, limit: int | None, seed: int) -> torch.Tensor:
    """The dataset indices `collect_block_io` records, in its row order (a seeded choice),
    so a caller can pair its rows with the samples' labels."""
    n = total if limit is None else min(limit, total)
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]


@torch.no_grad()
def collect_block_io(
    blocks: Sequence[nn.Module],
    ds: Dataset,
    *,
    limit: int | None,
    batch_size: int,
    seed: int,
    progress: bool = False,
    num_workers: int = 0,
) -> list[BlockData]:
    """Run the frozen teacher chain once over up to `limit` samples (seeded choice), decoded
    by `num_workers` processes (`legoblocks.batches`).

    Block i's input is block i-1's output, and both BlockData objects share that tensor,
    so memory is one activation tensor per cut point. Blocks run in eval mode and get
    their previous mode back.
    """
    if not blocks:
        raise ValueError("collect_block_io needs at least one block")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    total = len(ds)  # type: ignore[arg-type]
    if total == 0:
        raise ValueError("the dataset is empty")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    index = block_io_indices(total, limit, seed)
    n = len(index)
    device = device_of(blocks)
    modes = [b.training for b in blocks]
    for b in blocks:
        b.eval()
    # One preallocated tensor per cut point, filled batch by batch: holding every batch's
    # activations and concatenating them at the end needed twice the memory and, on CPU,
    # about as long again as the forward passes themselves (page faults on fresh memory).
    acts: list[torch.Tensor] = []
    try:
        chunks = [index[i : i + batch_size] for i in range(0, n, batch_size)]
        start = 0
        for batch in tqdm(index_batches(ds, chunks, num_workers=num_workers), total=len(chunks), desc="teacher pass",
                          disable=not progress, unit="batch"):
            x = (batch[0] if isinstance(batch, (tuple, list)) else batch).to(device)
            outs = [x]
            for i, block in enumerate(blocks):
                x = block(x)
                if not isinstance(x, torch.Tensor):
                    raise TypeError(
                        f"block {i} returned a {type(x).__name__}, not a tensor: blocks must form "
                        "a chain with exactly one tensor between them"
                    )
                outs.append(x)
            if not acts:
                acts = [torch.empty((n, *t.shape[1:]), dtype=t.dtype) for t in outs]
            stop = start + len(outs[0])
            for buffer, t in zip(acts, outs):
                buffer[start:stop].copy_(t)
            start = stop
    finally:
        for b, mode in zip(blocks, modes):
            b.train(mode)
    return [BlockData(acts[i], acts[i + 1]) for i in range(len(blocks))]


@torch.no_grad()
def _mse(
    module: nn.Module, inputs: torch.Tensor, outputs: torch.Tensor, batch_size: int, device: torch.device
) -> float:
    """Mean squared error over all elements of the held-out pairs, in eval mode."""
    module.eval()
    total, count = 0.0, 0
    for i in range(0, len(inputs), batch_size):
        pred = module(inputs[i : i + batch_size].to(device))
        target = outputs[i : i + batch_size].to(device)
        total += float(nn.functional.mse_loss(pred, target, reduction="sum"))
        count += target.numel()
    return total / count


def _split(data: BlockData, cfg: RetrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, measured) pair indices: a seeded shuffle, held-out first (at most `val_limit`),
    then up to `limit` training pairs; without a held-out share the loss is measured on
    (at most `val_limit` of) the training pairs."""
    n = len(data)
    n_val = max(1, round(n * cfg.val_fraction)) if cfg.val_fraction > 0 else 0
    if cfg.val_limit is not None:
        n_val = min(n_val, cfg.val_limit)
    if n - n_val < 1:
        raise ValueError(
            f"{n} pairs are too few to hold out {cfg.val_fraction:.0%} and still train; collect more"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    val, train = perm[:n_val], perm[n_val:]
    if cfg.limit is not None:
        train = train[: cfg.limit]
    return train, (val if n_val else train[: cfg.val_limit])


def _check_shapes(descendants: dict[str, nn.Module], data: BlockData, device: torch.device) -> None:
    """Fail before training, naming the choice, when a descendant changed the block's I/O."""
    probe = data.inputs[:2].to(device)
    expected = tuple(data.outputs.shape[1:])
    with torch.no_grad():
        for choice, module in descendants.items():
            module.eval()
            got = tuple(module(probe).shape[1:])
            if got != expected:
                raise ValueError(
                    f"descendant {choice!r} maps the block input to shape {got}, expected {expected}: "
                    "descendants must keep the block's output shape"
                )


def retrain_descendants(
    descendants: dict[str, nn.Module],
    data: BlockData,
    cfg: RetrainConfig,
    progress: bool = True,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, RetrainReport]:
    """Distill every descendant of ONE block in place (MSE to the teacher output, Adam).

    `on_epoch(epoch, {choice: mean training loss})` is called after each epoch (1-based).

    All descendants see the same shuffled batches; each has its own Adam optimizer and a
    cosine-decayed LR. BatchNorm runs in train mode while training and every descendant is
    left in eval mode. Choice "0.0" (the original) is not trained; its report carries its
    held-out loss (about 0) before and after. Deterministic for a given cfg.seed.
    """
    cfg.validate()
    if not descendants:
        raise ValueError("retrain_descendants needs at least one descendant")
    device = device_of(list(descendants.values()))
    train_idx, val_idx = _split(data, cfg)
    val_in, val_out = data.inputs[val_idx], data.outputs[val_idx]
    eval_batch = max(cfg.batch_size, 256)
    _check_shapes(descendants, data, device)

    # A descendant may be a copy of a frozen teacher: make its parameters trainable again.
    trained: dict[str, nn.Module] = {}
    for choice, module in descendants.items():
        if choice == ORIGINAL:
            continue
        params = list(module.parameters())
        for p in params:
            p.requires_grad_(True)
        if params:
            trained[choice] = module

    before = {c: _mse(m, val_in, val_out, eval_batch, device) for c, m in descendants.items()}
    seconds = {c: 0.0 for c in descendants}
    if trained:
        _train(trained, data, train_idx, cfg, device, seconds, progress, on_epoch)
    reports = {}
    for choice, module in descendants.items():
        after = _mse(module, val_in, val_out, eval_batch, device) if choice in trained else before[choice]
        module.eval()
        reports[choice] = RetrainReport(loss_before=before[choice], loss_after=after, seconds=seconds[choice])
    return reports


def _train(
    modules: dict[str, nn.Module],
    data: BlockData,
    train_idx: torch.Tensor,
    cfg: RetrainConfig,
    device: torch.device,
    seconds: dict[str, float],
    progress: bool,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> None:
    steps_per_epoch = math.ceil(len(train_idx) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    optims, scheds = {}, {}
    for choice, module in modules.items():
        optims[choice] = torch.optim.Adam(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheds[choice] = torch.optim.lr_scheduler.CosineAnnealingLR(optims[choice], T_max=total_steps)
        module.train()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    # Dropout and friends draw from the global RNG: seed it for this run only.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        desc = f"retrain {len(modules)} descendants"
        with tqdm(total=total_steps, desc=desc, disable=not progress, unit="step") as bar:
            for epoch in range(cfg.epochs):
                sums = dict.fromkeys(modules, 0.0)
                steps = 0
                order = train_idx[torch.randperm(len(train_idx), generator=gen)]
                for start in range(0, len(order), cfg.batch_size):
                    batch = order[start : start + cfg.batch_size]
                    if len(batch) < 2 <= len(order):
                        continue  # a lone sample breaks BatchNorm statistics in train mode
                    x, y = data.inputs[batch].to(device), data.outputs[batch].to(device)
                    losses = {}
                    for choice, module in modules.items():
                        t0 = time.perf_counter()
                        loss = nn.functional.mse_loss(module(x), y)
                        optims[choice].zero_grad(set_to_none=True)
                        loss.backward()
                        optims[choice].step()
                        scheds[choice].step()
                        seconds[choice] += time.perf_counter() - t0
                        losses[choice] = loss.item()
                        if not math.isfinite(losses[choice]):
                            raise FloatingPointError(
                                f"retraining descendant {choice!r} diverged (loss {losses[choice]}); "
                                f"lower lr (now {cfg.lr})"
                            )
                    bar.update(1)
                    bar.set_postfix(loss=f"{sum(losses.values()) / len(losses):.4f}")
                    steps += 1
                    for choice, value in losses.items():
                        sums[choice] += value
                if on_epoch is not None and steps:
                    on_epoch(epoch + 1, {choice: total / steps for choice, total in sums.items()})
