"""The torch device runtime: blocks are the bundle's safetensors modules, a model an
`nn.Sequential`, for boards that have PyTorch (and for CUDA devices: `--torch-device cuda`).

Block files load through `legoblocks.serialize.load_module` (safetensors + a declarative
module spec built from an allow-list; nothing is ever unpickled). A descendant whose weights
are not on the device yet is timed from its verified safetensors header padded with zeros
(`infra.skeleton`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from infra.device.runtime import BlockFiles, Runtime, TimingStats
from infra.errors import BundleVerificationError
from infra.manifest import BlockEntry, DescendantEntry, FileEntry
from infra.skeleton import write_skeleton


class TorchRuntime(Runtime):
    """Blocks as torch modules on `settings.device` (see module docstring)."""

    name = "torch"

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        try:
            kind = torch.device(settings.device).type
        except RuntimeError:
            raise ValueError(f"unknown torch device {settings.device!r}; use cpu or cuda") from None
        if kind == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"torch device {settings.device!r} requested but CUDA is not available; use --torch-device cpu"
            )

    def fingerprint(self) -> dict[str, Any]:
        from profiling.latency import fingerprint

        return fingerprint(threads=self.settings.threads)

    def needs(self, d: DescendantEntry) -> list[FileEntry]:
        return [d.safetensors]

    def _module(self, path: Any, d: DescendantEntry) -> nn.Module:
        from legoblocks.serialize import load_module

        try:
            return load_module(path).to(self.settings.device).eval()
        except ValueError as e:  # UnsafeFileError included: a header that is not a safe module
            raise BundleVerificationError(f"{d.file}: does not load as a safe module ({e}); refusing it") from None

    def load(self, block: BlockEntry, d: DescendantEntry, files: BlockFiles) -> tuple[Any, int]:
        module = self._module(files.path(d.safetensors), d)
        tensors = [*module.parameters(), *module.buffers()]
        return module, sum(t.numel() * t.element_size() for t in tensors)

    def load_for_timing(self, block: BlockEntry, d: DescendantEntry, files: BlockFiles) -> tuple[Any, str]:
        if files.cached(d.safetensors):
            return self._module(files.path(d.safetensors), d), "file"
        skeleton = write_skeleton(files.header(d), d.bytes, files.scratch(f"skeleton-{d.sha256}"))
        return self._module(skeleton, d), "header"

    def chain(self, blocks: Sequence[Any]) -> nn.Sequential:
        return nn.Sequential(*blocks)

    def time(self, model: Any, in_shape: Sequence[int]) -> TimingStats:
        from profiling.latency import measure_latency

        s = self.settings
        stats = measure_latency(model, in_shape, batch_size=s.batch_size, warmup=s.warmup, repeats=s.repeats,
                                threads=s.threads)
        return TimingStats(stats.median_ms, stats.p10_ms, stats.p90_ms, stats.cv)

    def infer(self, model: Any, x: Any) -> Any:
        with torch.inference_mode():
            return model(torch.from_numpy(x).to(self.settings.device)).cpu().numpy()
