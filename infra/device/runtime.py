"""What a device runtime does, and how to pick one: torch (`runtime_torch`) or ONNX Runtime
(`runtime_onnx`).

A runtime turns a verified descendant into a runnable block, chains blocks into a model,
times blocks and models, and runs a batch. Everything else on the device (verifying, caching,
solving, switching, watching) is the same for both, so it lives outside the runtimes and
talks to them only through `Runtime`. Neither runtime module is imported until chosen: the
ONNX path never imports torch.
"""

from __future__ import annotations

import importlib.util
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from infra.errors import RuntimeUnavailableError
from infra.manifest import BlockEntry, DescendantEntry, FileEntry

RUNTIMES = ("torch", "onnxruntime")


@dataclass(frozen=True)
class DeviceLatencySettings:
    """How descendants and models are timed on the device.

    threads: intra-op threads of the runtime while timing and running; batch_size: the
    timed batch; device: the torch device ("cpu" or "cuda"; ONNX Runtime runs on "cpu").
    Threads, batch size, device and runtime change what a latency *is*; warmup and repeats
    only its precision.
    """

    threads: int = 1
    warmup: int = 5
    repeats: int = 30
    batch_size: int = 1
    device: str = "cpu"


@dataclass(frozen=True)
class TimingStats:
    """The spread of one timed forward pass over `repeats` runs (milliseconds)."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    cv: float


class BlockFiles(Protocol):
    """Verified descendant files for a runtime (the session's object source)."""

    def cached(self, entry: FileEntry) -> bool:
        """Whether the file is in the device cache (it is re-hashed when used)."""

    def path(self, entry: FileEntry) -> Path:
        """A local path holding exactly the signed bytes (downloaded when missing and online)."""

    def read(self, entry: FileEntry) -> bytes:
        """The signed bytes, hash-checked as read."""

    def header(self, entry: DescendantEntry) -> bytes:
        """The verified safetensors header of a descendant (a range read of the store)."""

    def scratch(self, name: str) -> Path:
        """A scratch path for files made from verified bytes (removed after timing)."""


class Runtime(ABC):
    """One way to run blocks on this device (see module docstring)."""

    name: str

    def __init__(self, settings: DeviceLatencySettings) -> None:
        self.settings = settings

    @abstractmethod
    def fingerprint(self) -> dict[str, Any]:
        """The hardware and software that latencies belong to; `id` is a short hash of it."""

    @abstractmethod
    def needs(self, d: DescendantEntry) -> list[FileEntry]:
        """The bundle files this runtime must have to run descendant `d`."""

    @abstractmethod
    def load(self, block: BlockEntry, d: DescendantEntry, files: BlockFiles) -> tuple[Any, int]:
        """A runnable block with its real weights, and the bytes of weights it loaded."""

    @abstractmethod
    def load_for_timing(self, block: BlockEntry, d: DescendantEntry, files: BlockFiles) -> tuple[Any, str]:
        """A block to time and where it came from: "file" (real weights), else a zero-weight
        skeleton ("header" or "graph") when the weights are not on the device yet."""

    @abstractmethod
    def chain(self, blocks: Sequence[Any]) -> Any:
        """A model that runs `blocks` in order; `model[i] = block` replaces one in place."""

    @abstractmethod
    def time(self, model: Any, in_shape: Sequence[int]) -> TimingStats:
        """Time `model` (a block or a chain) on a random batch of `in_shape` inputs."""

    @abstractmethod
    def infer(self, model: Any, x: Any) -> Any:
        """Run a float32 NumPy batch through `model`; returns a NumPy array."""


def time_callable(run: Callable[[], object], warmup: int, repeats: int) -> TimingStats:
    """Median and spread of `run()`'s wall time, after `warmup` untimed calls."""
    import numpy as np

    for _ in range(warmup):
        run()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        run()
        samples.append((time.perf_counter_ns() - start) / 1e6)
    arr = np.asarray(samples, dtype=np.float64)
    mean = float(arr.mean())
    return TimingStats(float(np.median(arr)), float(np.percentile(arr, 10)), float(np.percentile(arr, 90)),
                       float(arr.std() / mean) if mean > 0 else 0.0)


def default_runtime() -> str:
    """torch where it is installed (the bundles' own format), else ONNX Runtime."""
    return "torch" if importlib.util.find_spec("torch") is not None else "onnxruntime"


def make_runtime(name: str | None, settings: DeviceLatencySettings) -> Runtime:
    """The runtime called `name` (None: `default_runtime()`), checked to work here."""
    name = name or default_runtime()
    if settings.threads < 1 or settings.repeats < 1 or settings.warmup < 0 or settings.batch_size < 1:
        raise ValueError(f"timing settings must have threads, repeats and batch size >= 1 and warmup >= 0: {settings}")
    if name == "torch":
        if importlib.util.find_spec("torch") is None:
            raise RuntimeUnavailableError(
                "--runtime torch: PyTorch is not installed on this device; use --runtime onnxruntime (the light "
                "device install) or install legodnn-at-scale[pipeline]"
            )
        from infra.device.runtime_torch import TorchRuntime

        return TorchRuntime(settings)
    if name == "onnxruntime":
        if importlib.util.find_spec("onnxruntime") is None:
            raise RuntimeUnavailableError("--runtime onnxruntime: onnxruntime is not installed; pip install onnxruntime")
        from infra.device.runtime_onnx import OnnxRuntime

        return OnnxRuntime(settings)
    raise ValueError(f"unknown runtime {name!r}; use one of {', '.join(RUNTIMES)}")
