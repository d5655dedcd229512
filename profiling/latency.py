"""Block latency on the host that runs the profiler, with the hardware it was measured on.

Latency depends on the machine, the thread count and the batch size, so every figure is
measured at a fixed thread count (set for the measurement and restored afterwards) and
carries a fingerprint of the host. The device side measures its own latencies; the
fingerprint tells anyone reading a table which machine a latency column belongs to.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from legoblocks.devices import device_of
from profiling.host import cpu_model


def fingerprint(threads: int | None = None) -> dict:
    """Identify the measuring host: CPU model, logical cores, torch version, threads, arch.

    `threads` is the intra-op thread count the measurement uses (default: torch's current
    setting). `id` is a short hash of everything else, so two columns with the same id
    were measured under the same conditions.
    """
    info = {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count() or 0,
        "torch_version": torch.__version__,
        "threads": int(threads if threads is not None else torch.get_num_threads()),
        "machine": platform.machine() or "unknown",
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    digest = hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()
    info["id"] = digest[:12]
    return info


@dataclass(frozen=True)
class LatencyStats:
    """Spread of one module's forward latency over `repeats` timed runs (milliseconds).

    cv is the coefficient of variation (standard deviation / mean) of the repeats: a
    quick measure of how noisy the host was while measuring.
    """

    median_ms: float
    p10_ms: float
    p90_ms: float
    cv: float
    repeats: int
    batch_size: int
    threads: int

    def to_dict(self) -> dict:
        return asdict(self)


def _check(batch_size: int, warmup: int, repeats: int, threads: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads} (use 1 for stable per-block figures)")


def _stats(samples_ms: Sequence[float], batch_size: int, threads: int) -> LatencyStats:
    arr = np.asarray(samples_ms, dtype=np.float64)
    mean = float(arr.mean())
    return LatencyStats(
        median_ms=float(np.median(arr)),
        p10_ms=float(np.percentile(arr, 10)),
        p90_ms=float(np.percentile(arr, 90)),
        cv=float(arr.std() / mean) if mean > 0 else 0.0,
        repeats=len(arr),
        batch_size=batch_size,
        threads=threads,
    )


def _time_forward(module: nn.Module, x: torch.Tensor, warmup: int, repeats: int) -> list[float]:
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    samples = []
    with torch.inference_mode():
        for _ in range(warmup):
            module(x)
        sync()
        for _ in range(repeats):
            start = time.perf_counter_ns()
            module(x)
            sync()
            samples.append((time.perf_counter_ns() - start) / 1e6)
    return samples


def measure_latency(
    module: nn.Module,
    in_shape: Sequence[int],
    *,
    batch_size: int = 1,
    warmup: int = 5,
    repeats: int = 30,
    threads: int = 1,
) -> LatencyStats:
    """Time `module`'s forward pass on a random input of shape (batch_size, *in_shape).

    Runs `warmup` untimed passes first (allocator and kernel selection settle), then
    `repeats` timed ones, in eval mode under inference_mode. torch's intra-op thread count
    is set to `threads` for the measurement and restored afterwards, as is every submodule's mode.
    """
    _check(batch_size, warmup, repeats, threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, *(int(d) for d in in_shape), generator=gen).to(device_of(module))
    previous_threads = torch.get_num_threads()
    # Each submodule's own mode: a container made in train mode may hold eval-mode blocks
    # (a BlockSwitcher's nn.Sequential), and module.train(True) would flip their BatchNorm.
    modes = [(m, m.training) for m in module.modules()]
    torch.set_num_threads(threads)
    module.eval()
    try:
        samples = _time_forward(module, x, warmup, repeats)
    finally:
        torch.set_num_threads(previous_threads)
        for m, training in modes:
            m.training = training
    return _stats(samples, batch_size, threads)


@dataclass(frozen=True)
class ChainLatency:
    """Whole-chain latency against the sum of its blocks' latencies (medians, ms).

    The optimizer adds block latencies; `ratio` = whole / sum says how far that sum is
    from the real chain (below 1 when blocks share warm caches, above when they do not).
    """

    whole: LatencyStats
    blocks: list[LatencyStats]
    sum_of_blocks_ms: float
    ratio: float

    def to_dict(self) -> dict:
        return {
            "whole": self.whole.to_dict(),
            "blocks": [b.to_dict() for b in self.blocks],
            "sum_of_blocks_ms": self.sum_of_blocks_ms,
            "ratio": self.ratio,
        }


def measure_chain_latency(
    blocks: Sequence[nn.Module],
    in_shape: Sequence[int],
    *,
    batch_size: int = 1,
    warmup: int = 5,
    repeats: int = 30,
    threads: int = 1,
) -> ChainLatency:
    """Latency of `nn.Sequential(*blocks)` and of each block alone, same settings.

    Each block is timed on an input of the shape the previous block produces.
    """
    if not blocks:
        raise ValueError("blocks is empty: nothing to time")
    chain = nn.Sequential(*blocks)
    whole = measure_latency(
        chain, in_shape, batch_size=batch_size, warmup=warmup, repeats=repeats, threads=threads
    )
    per_block = []
    shape = tuple(int(d) for d in in_shape)
    for block in blocks:
        per_block.append(
            measure_latency(
                block, shape, batch_size=batch_size, warmup=warmup, repeats=repeats, threads=threads
            )
        )
        was_training = block.training
        block.eval()
        with torch.inference_mode():
            out = block(torch.zeros(1, *shape, device=device_of(block)))
        block.train(was_training)
        shape = tuple(out.shape[1:])
    total = sum(b.median_ms for b in per_block)
    return ChainLatency(
        whole=whole,
        blocks=per_block,
        sum_of_blocks_ms=total,
        ratio=whole.median_ms / total if total > 0 else float("nan"),
    )
