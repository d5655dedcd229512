"""Where a module's tensors live: the one helper every package asks."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def device_of(*modules: nn.Module | Iterable[nn.Module]) -> torch.device:
    """The device of the first parameter (else buffer) of `modules`; CPU when they hold none."""
    flat = [m for item in modules for m in ([item] if isinstance(item, nn.Module) else item)]
    for module in flat:
        for tensor in module.parameters():
            return tensor.device
    for module in flat:
        for tensor in module.buffers():
            return tensor.device
    return torch.device("cpu")
