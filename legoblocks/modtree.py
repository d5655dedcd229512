"""Put a module, parameter or buffer at a dotted path of a module tree, making the containers on the way."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["install"]


def install(root: nn.Module, path: str, value: nn.Module | torch.Tensor, kind: str | None = None) -> None:
    """Register `value` at `path` (e.g. `"features.3.conv"`) below `root`.

    Args:
        root: the tree; missing containers on the path become empty `nn.Module`s.
        path: dotted attribute path.
        value: a module or a tensor.
        kind: "module", "parameter" or "buffer"; None infers it (an `nn.Parameter` is a
            parameter, another tensor a buffer). A tensor registered as "parameter" is
            wrapped in `nn.Parameter`.
    """
    *parents, last = path.split(".")
    owner = root
    for part in parents:
        child = owner._modules.get(part)
        if child is None:
            child = nn.Module()
            owner.add_module(part, child)
        owner = child
    if kind is None:
        kind = "module" if isinstance(value, nn.Module) else "parameter" if isinstance(value, nn.Parameter) else "buffer"
    if kind == "module":
        owner.add_module(last, value)  # type: ignore[arg-type]
    elif kind == "parameter":
        owner.register_parameter(last, value if isinstance(value, nn.Parameter) else nn.Parameter(value))
    else:
        owner.register_buffer(last, value)  # type: ignore[arg-type]
