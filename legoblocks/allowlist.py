"""What a safe module file may name: allowed layer types and allowed functions.

`legoblocks.serialize` rebuilds modules from these tables only. Layers: a fixed table of
`torch.nn` classes with the constructor arguments to copy (or derive from the weights,
which Torch-Pruning edits in place). Functions: the `torch`, `torch.nn.functional` and
`torch.Tensor` callables PyTorch lists as overridable, a few tensor factories, fixed
`operator` functions, `builtins.getattr` (public Tensor attributes only, checked by the
loader), and the non-mutating `torch.ops.aten` overloads of allowed `torch` /
`torch.nn.functional` functions - the same computations as torch.export spells them.
Nothing named in a file is ever imported.
"""

from __future__ import annotations

import functools
import operator
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LEAVES", "LEAF_TYPES", "function_table", "function_names", "tensor_methods", "tensor_attributes"]


# --------------------------------------------------------------------------- leaf modules


def _conv_args(m: nn.Module) -> dict[str, Any]:
    w = m.weight
    transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
    in_ch, out_ch = (w.shape[0], w.shape[1] * m.groups) if transposed else (w.shape[1] * m.groups, w.shape[0])
    args = {
        "in_channels": int(in_ch),
        "out_channels": int(out_ch),
        "kernel_size": tuple(int(k) for k in w.shape[2:]),
        "bias": m.bias is not None,
    }
    if transposed:
        args["output_padding"] = m.output_padding
    return args


def _linear_args(m: nn.Module) -> dict[str, Any]:
    return {"in_features": int(m.weight.shape[1]), "out_features": int(m.weight.shape[0]), "bias": m.bias is not None}


def _norm_features(m: nn.Module, attr: str) -> dict[str, Any]:
    # Pruning shrinks the affine weights and running stats; they define the real width.
    for name in ("weight", "running_mean"):
        t = getattr(m, name, None)
        if isinstance(t, torch.Tensor):
            return {attr: int(t.shape[0])}
    return {attr: int(getattr(m, attr))}


def _layer_norm_args(m: nn.Module) -> dict[str, Any]:
    shape = tuple(m.weight.shape) if m.weight is not None else tuple(m.normalized_shape)
    return {"normalized_shape": shape, "bias": getattr(m, "bias", None) is not None}


def _prelu_args(m: nn.Module) -> dict[str, Any]:
    return {"num_parameters": int(m.weight.numel())}


@dataclass(frozen=True)
class _Leaf:
    """How to rebuild one allowed layer: attributes copied as-is plus ones derived from weights."""

    cls: type[nn.Module]
    fields: tuple[str, ...] = ()
    derived: Callable[[nn.Module], dict[str, Any]] | None = None
    derived_keys: tuple[str, ...] = field(default=())

    def kwargs(self, m: nn.Module) -> dict[str, Any]:
        out = {name: getattr(m, name) for name in self.fields}
        if self.derived is not None:
            out.update(self.derived(m))
        return out

    def keys(self) -> set[str]:
        return set(self.fields) | set(self.derived_keys)


_CONV = ("stride", "padding", "dilation", "groups", "padding_mode")
_CONV_KEYS = ("in_channels", "out_channels", "kernel_size", "bias")
_BN = ("eps", "momentum", "affine", "track_running_stats")
_MAXPOOL = ("kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode")
_INPLACE = ("inplace",)


def _leaf_table() -> dict[str, _Leaf]:
    leaves = [
        _Leaf(nn.Conv1d, _CONV, _conv_args, _CONV_KEYS),
        _Leaf(nn.Conv2d, _CONV, _conv_args, _CONV_KEYS),
        _Leaf(nn.ConvTranspose2d, _CONV, _conv_args, _CONV_KEYS + ("output_padding",)),
        _Leaf(nn.Linear, (), _linear_args, ("in_features", "out_features", "bias")),
        _Leaf(nn.BatchNorm1d, _BN, lambda m: _norm_features(m, "num_features"), ("num_features",)),
        _Leaf(nn.BatchNorm2d, _BN, lambda m: _norm_features(m, "num_features"), ("num_features",)),
        _Leaf(nn.InstanceNorm2d, _BN, lambda m: _norm_features(m, "num_features"), ("num_features",)),
        _Leaf(
            nn.GroupNorm, ("num_groups", "eps", "affine"),
            lambda m: _norm_features(m, "num_channels"), ("num_channels",),
        ),
        _Leaf(nn.LayerNorm, ("eps", "elementwise_affine"), _layer_norm_args, ("normalized_shape", "bias")),
        _Leaf(nn.ReLU, _INPLACE),
        _Leaf(nn.ReLU6, _INPLACE),
        _Leaf(nn.LeakyReLU, ("negative_slope", "inplace")),
        _Leaf(nn.ELU, ("alpha", "inplace")),
        _Leaf(nn.Hardtanh, ("min_val", "max_val", "inplace")),
        _Leaf(nn.PReLU, (), _prelu_args, ("num_parameters",)),
        _Leaf(nn.SiLU, _INPLACE),
        _Leaf(nn.Mish, _INPLACE),
        _Leaf(nn.GELU, ("approximate",)),
        _Leaf(nn.Hardswish, _INPLACE),
        _Leaf(nn.Hardsigmoid, _INPLACE),
        _Leaf(nn.Sigmoid),
        _Leaf(nn.Tanh),
        _Leaf(nn.Softmax, ("dim",)),
        _Leaf(nn.LogSoftmax, ("dim",)),
        _Leaf(nn.MaxPool1d, _MAXPOOL),
        _Leaf(nn.MaxPool2d, _MAXPOOL),
        _Leaf(nn.AvgPool1d, ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")),
        _Leaf(
            nn.AvgPool2d,
            ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
        ),
        _Leaf(nn.AdaptiveAvgPool1d, ("output_size",)),
        _Leaf(nn.AdaptiveAvgPool2d, ("output_size",)),
        _Leaf(nn.AdaptiveMaxPool2d, ("output_size", "return_indices")),
        _Leaf(nn.Flatten, ("start_dim", "end_dim")),
        _Leaf(nn.Unflatten, ("dim", "unflattened_size")),
        _Leaf(nn.Dropout, ("p", "inplace")),
        _Leaf(nn.Dropout2d, ("p", "inplace")),
        _Leaf(nn.Identity),
        _Leaf(nn.Upsample, ("size", "scale_factor", "mode", "align_corners", "recompute_scale_factor")),
        _Leaf(nn.ZeroPad2d, ("padding",)),
        _Leaf(nn.PixelShuffle, ("upscale_factor",)),
        _Leaf(nn.ChannelShuffle, ("groups",)),
        _Leaf(nn.PixelUnshuffle, ("downscale_factor",)),
        _Leaf(nn.Conv3d, _CONV, _conv_args, _CONV_KEYS),
        _Leaf(nn.BatchNorm3d, _BN, lambda m: _norm_features(m, "num_features"), ("num_features",)),
        _Leaf(nn.SELU, _INPLACE),
        _Leaf(nn.CELU, ("alpha", "inplace")),
        _Leaf(nn.Softplus, ("beta", "threshold")),
        _Leaf(nn.Softsign),
        _Leaf(nn.GLU, ("dim",)),
        _Leaf(nn.Softmax2d),
        _Leaf(nn.Dropout1d, ("p", "inplace")),
        _Leaf(nn.Dropout3d, ("p", "inplace")),
        _Leaf(nn.AlphaDropout, ("p", "inplace")),
        _Leaf(nn.ConstantPad2d, ("padding", "value")),
        _Leaf(nn.ReflectionPad2d, ("padding",)),
        _Leaf(nn.ReplicationPad2d, ("padding",)),
    ]
    return {leaf.cls.__name__: leaf for leaf in leaves}


LEAVES: Mapping[str, _Leaf] = types.MappingProxyType(_leaf_table())
LEAF_TYPES: Mapping[type, str] = types.MappingProxyType({leaf.cls: name for name, leaf in LEAVES.items()})

# --------------------------------------------------------------------------- functions

_OPERATORS = (
    "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "neg", "pos", "abs",
    "getitem", "iadd", "isub", "imul", "itruediv", "ifloordiv", "eq", "ne", "lt", "le", "gt",
    "ge", "and_", "or_", "xor", "invert", "not_", "lshift", "rshift", "contains", "truth",
)
# Tensor factories are not `__torch_function__`-overridable but appear in traced shape code.
_TORCH_FACTORIES = (
    "zeros", "ones", "full", "empty", "arange", "linspace", "eye", "tensor", "scalar_tensor",
)
# Public Tensor methods that take callables; no file needs them, so they are not offered.
_TENSOR_METHODS_DENIED = frozenset(
    {"register_hook", "register_post_accumulate_grad_hook", "apply_", "map_", "map2_"}
)


@functools.cache
def function_table() -> dict[str, Callable[..., Any]]:
    """Qualified name -> callable for every function a spec may name (computed once)."""
    overridable = torch.overrides.get_overridable_functions()
    table: dict[str, Callable[..., Any]] = {}
    torch_fns = set(overridable[torch])
    for name in dir(torch):
        obj = getattr(torch, name, None)
        if not name.startswith("_") and (_member(obj, torch_fns) or name in _TORCH_FACTORIES):
            table[f"torch.{name}"] = obj
    functional = set(overridable[F]) | torch_fns
    for name in dir(F):
        obj = getattr(F, name, None)
        if name.startswith("_") or not isinstance(obj, (types.FunctionType, types.BuiltinFunctionType)):
            continue
        if _member(obj, functional) or getattr(obj, "__module__", "") == "torch.nn.functional":
            table[f"torch.nn.functional.{name}"] = obj
    for name in tensor_methods():
        table[f"torch.Tensor.{name}"] = getattr(torch.Tensor, name)
    for name in _OPERATORS:
        table[f"operator.{name}"] = getattr(operator, name)
    table["builtins.getattr"] = getattr
    table.update(_aten_table(table))
    return table


def _aten_table(allowed: Mapping[str, Any]) -> dict[str, Callable[..., Any]]:
    """`torch.ops.aten.<op>.<overload>` for each aten op that an allowed `torch.<op>` or
    `torch.nn.functional.<op>` binds to, without mutable arguments: the same computation,
    as graphs captured by torch.export spell it."""
    table: dict[str, Callable[..., Any]] = {}
    ops = {name.rsplit(".", 1)[1] for name in allowed if name.startswith(("torch.nn.functional.", "torch."))
           and name.count(".") in (1, 3) and not name.startswith("torch.Tensor.")}
    for qualified in sorted(torch._C._dispatch_get_all_op_names()):
        namespace, _, rest = qualified.partition("::")
        op, _, overload = rest.partition(".")
        if namespace != "aten" or op not in ops:
            continue
        fn = getattr(getattr(torch.ops.aten, op), overload or "default")
        if not fn._schema.is_mutable:
            table[f"torch.ops.aten.{op}.{overload or 'default'}"] = fn
    return table


def _member(obj: Any, group: set[Any]) -> bool:
    try:
        return obj in group
    except TypeError:  # unhashable attributes are data, never functions
        return False


@functools.cache
def tensor_methods() -> frozenset[str]:
    methods = set(torch.overrides.get_overridable_functions()[torch.Tensor])
    return frozenset(
        name for name in dir(torch.Tensor)
        if not name.startswith("_")
        and name not in _TENSOR_METHODS_DENIED
        and _member(getattr(torch.Tensor, name, None), methods)
    )


@functools.cache
def function_names() -> dict[Any, str]:
    names: dict[Any, str] = {}
    for name, fn in function_table().items():
        try:
            names.setdefault(fn, name)
        except TypeError:  # unhashable callables cannot be graph targets anyway
            continue
    return names


@functools.cache
def tensor_attributes() -> frozenset[str]:
    # `x.shape`, `x.dtype`, ... trace to getattr(x, name); only public Tensor attributes pass.
    return frozenset(n for n in dir(torch.Tensor) if not n.startswith("_"))
