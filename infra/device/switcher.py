"""A running model whose blocks are swapped one at a time, for any device runtime.

`optimizer.RuntimeScaler` drives it through `.block_names`, `.selection` and
`.switch(selection)`; the model itself (`.model`) is whatever the runtime chains blocks
into (an `nn.Sequential`, an `OnnxChain`), and keeps serving between switches.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SwitchReport:
    """One switch: (block, old, new) per changed block, the weight bytes loaded, and how long it took."""

    changed: list[tuple[str, str, str]]
    bytes_loaded: int
    seconds: float


class Switcher:
    """One live model; a new selection replaces only the blocks whose choice changed.

    `load(block, choice)` returns (runnable block, weight bytes it loaded); `chain(blocks)`
    builds the model, which must support `model[i] = block`.
    """

    def __init__(self, load: Callable[[str, str], tuple[Any, int]], chain: Callable[[list[Any]], Any],
                 block_names: Sequence[str], initial: Sequence[str]) -> None:
        self.load = load
        self.block_names = list(block_names)
        self.selection = self._check(initial)
        self.model = chain([load(b, c)[0] for b, c in zip(self.block_names, self.selection)])

    def _check(self, selection: Sequence[str]) -> list[str]:
        selection = list(selection)
        if len(selection) != len(self.block_names):
            raise ValueError(f"selection has {len(selection)} choices for {len(self.block_names)} blocks")
        return selection

    def switch(self, selection: Sequence[str]) -> SwitchReport:
        """Move to `selection`. Every new block loads before any is swapped in, so a failing
        load (a download, a refused file) leaves the live model and `selection` as they were."""
        start = time.perf_counter()
        new = self._check(selection)
        todo = [(i, b, old, c) for i, (b, old, c) in enumerate(zip(self.block_names, self.selection, new)) if old != c]
        loaded = [(i, self.load(b, c)) for i, b, _, c in todo]
        for i, (block, _) in loaded:
            self.model[i] = block
        self.selection = new
        return SwitchReport(changed=[(b, old, c) for _, b, old, c in todo],
                            bytes_loaded=sum(n for _, (_, n) in loaded), seconds=time.perf_counter() - start)
