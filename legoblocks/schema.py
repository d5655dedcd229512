"""Validating JSON formats into typed records, with the field path in every error.

Every format the project reads from files or the network (the profile table, the optimizer's
problem, the bundle manifest, the pipeline config) is checked the same way: `convert` hands
the parsed JSON to `msgspec` with the format's typed record (a dataclass or `msgspec.Struct`,
constraints as `Annotated[..., Meta(...)]`), and a mismatch becomes the caller's error type
with a path such as `models[1].blocks[3].choices[0].latency_ms` and what was expected. Checks
that span fields (unique names, ids that must exist) stay in the format's own module and
raise through `fail` with the same path style. Pure Python: the device side uses it too.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta

T = TypeVar("T")

ErrorFactory = Callable[[str, str], Exception]
"""Makes the caller's exception from (field path, message)."""

NonNegative = Annotated[float, Meta(ge=0.0)]
Positive = Annotated[float, Meta(gt=0.0)]
NonNegativeInt = Annotated[int, Meta(ge=0)]
PositiveInt = Annotated[int, Meta(ge=1)]
Finite = Annotated[float, Meta(ge=-1.7976931348623157e308, le=1.7976931348623157e308)]
"""A float that is not NaN or infinite (NaN fails every comparison)."""
Sha256 = Annotated[str, Meta(pattern="^[0-9a-f]{64}$")]

_AT = re.compile(r"^(?P<msg>.*?) - at `\$(?P<path>[^`]*)`$", re.S)
_TYPES = {"float": "a number", "int": "an integer", "str": "a string", "bool": "true or false",
          "array": "a list", "object": "a mapping", "null": "null"}


class SchemaError(ValueError):
    """A value does not fit its format; `path` names the field (`models[0].name`)."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


def _readable(message: str) -> str:
    """msgspec's "Expected `float` >= 0.0, got `str`" in the project's words."""
    if "-1.7976931348623157e+308" in message or "1.7976931348623157e+308" in message:
        return "expected a finite number"

    def name(match: re.Match[str]) -> str:
        word = match.group(1)
        return _TYPES.get(word, f"'{word}'")

    text = re.sub(r"got `bool`", "got a boolean", message)
    text = re.sub(r"`([^`]+)`", lambda m: " or ".join(name(re.match(r"(.*)", part.strip())) for part in m.group(1).split("|")), text)
    for old, new in (("Expected ", "expected "), ("Object missing required field ", "missing required field "),
                     ("Object contains unknown field ", "unknown field ")):
        text = text.replace(old, new)
    return text


_STEP = re.compile(r"\.?([^.\[\]]+)|\[(\d+)\]")
_MISSING = object()


def _value_at(raw: Any, where: str) -> Any:
    node = raw
    for match in _STEP.finditer(where):
        key, index = match.group(1), match.group(2)
        try:
            node = node[int(index)] if index is not None else node[key]
        except (KeyError, IndexError, TypeError):
            return _MISSING
    return node


def _type_at(type_: Any, where: str) -> Any:
    """The annotation of the field at `where` inside `type_` (None when it cannot be told)."""
    import dataclasses
    import typing

    node = type_
    for match in _STEP.finditer(where):
        key, index = match.group(1), match.group(2)
        origin = typing.get_origin(node)
        if origin is Annotated:
            node = typing.get_args(node)[0]
            origin = typing.get_origin(node)
        if index is not None:
            args = typing.get_args(node)
            node = args[0] if origin in (list, tuple) and args else None
        elif dataclasses.is_dataclass(node) or (isinstance(node, type) and issubclass(node, msgspec.Struct)):
            node = typing.get_type_hints(node, include_extras=True).get(key)
        elif origin is dict:
            node = typing.get_args(node)[1] if typing.get_args(node) else None
        else:
            return None
        if node is None:
            return None
    return node


def _enum_message(message: str, type_: Any, where: str) -> str:
    """msgspec's "Invalid enum value 'x'" as "expected one of 'a', 'b'"."""
    import typing

    if not message.startswith("Invalid enum value"):
        return message
    node = _type_at(type_, where)
    if typing.get_origin(node) is Literal:
        return "expected one of " + ", ".join(repr(v) for v in typing.get_args(node))
    return message


def _with_value(message: str, raw: Any, where: str) -> str:
    """Name the offending value itself ("got 'fast'") where it is a short scalar."""
    value = _value_at(raw, where)
    if value is _MISSING or not isinstance(value, (str, int, float, bool)) or len(repr(value)) > 60:
        return message
    shown = "NaN" if isinstance(value, float) and math.isnan(value) else repr(value)
    head, sep, _ = message.rpartition(", got ")
    return f"{head}, got {shown}" if sep else f"{message}, got {shown}"


def join(path: str, key: str | int) -> str:
    """`join("models", 1) == "models[1]"`, `join("models[1]", "name") == "models[1].name"`."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def convert(raw: Any, type_: type[T], *, error: ErrorFactory = SchemaError, path: str = "") -> T:
    """`raw` (parsed JSON) as a `type_` record, or `error(path, message)` naming the field.

    Args:
        raw: the value to check, as `json.loads` returns it.
        type_: a dataclass, `msgspec.Struct` or other type msgspec understands.
        error: builds the exception raised on a mismatch from (path, message).
        path: the field path of `raw` itself, prefixed to every reported path.

    Returns:
        The typed record. Strict: no string-to-number coercion; ints are accepted as floats.
    """
    try:
        return msgspec.convert(raw, type=type_, strict=True)
    except msgspec.ValidationError as exc:
        text = str(exc)
        match = _AT.match(text)
        where, message = (match.group("path"), match.group("msg")) if match else ("", text)
        where = where.lstrip(".")
        full = f"{path}{'.' if path and where and not where.startswith('[') else ''}{where}"
        message = _enum_message(message, type_, where)
        raise error(full, _with_value(_readable(message), raw, where)) from None


def fail(path: str, message: str, error: ErrorFactory = SchemaError) -> Exception:
    """The error for a cross-field check, in the same path style (raise the result)."""
    return error(path, message)


def finite(value: float) -> bool:
    return math.isfinite(value)
