"""FLOPs of a module, counted by PyTorch's own counter: the one place the project counts them.

`torch.utils.flop_counter.FlopCounterMode` counts 2 FLOPs per multiply-add of convolutions,
matrix products and attention, at batch 1, in eval mode (the module's own train/eval state
and every submodule's are restored afterwards, so counting never changes a model).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from legoblocks.devices import device_of


@contextmanager
def flops_counted() -> Iterator[Callable[[], int]]:
    """Count the FLOPs of everything run inside the block.

    Returns:
        (as the context value) a function giving the running total so far, so a caller can
        attribute FLOPs to steps (e.g. per graph node) by differences.
    """
    with FlopCounterMode(display=False) as counter:
        yield lambda: int(counter.get_total_flops())


def count_flops(module: nn.Module, in_shape: Sequence[int]) -> int:
    """FLOPs of one forward pass of `module` on a zero input of shape `(1, *in_shape)`.

    Args:
        module: any module that takes one tensor.
        in_shape: the input shape without the batch dimension, e.g. `(3, 64, 64)`.

    Returns:
        FLOPs as an int (2 per multiply-add).
    """
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        x = torch.zeros((1, *(int(d) for d in in_shape)), device=device_of(module))
        with torch.no_grad(), flops_counted() as total:
            module(x)
        return total()
    finally:
        for m, mode in modes.items():
            m.training = mode
