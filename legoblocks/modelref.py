"""Turn a user's model reference (zoo name, `file.py:factory`, `pkg.module:factory`) into a model.

Users bring their own networks, so a reference is the one string every CLI and pipeline
stage accepts. Each way it can go wrong gets its own message that says what was tried and
what to write instead, because this is the first thing a new user types.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

_FORMS = "a zoo name ({zoo}), path/to/file.py:factory or package.module:factory"
_FACTORY_OPTIONS = ("in_channels", "num_classes", "input_size")
_LISTED_KEYS = 5


class ModelRefError(ValueError):
    """A model reference or its checkpoint cannot be turned into a model; says why."""


def load_model(
    ref: str,
    checkpoint: str | Path | None = None,
    *,
    in_channels: int = 1,
    num_classes: int = 10,
    input_size: int = 28,
) -> nn.Module:
    """Build the model `ref` names and, when given, load a state-dict checkpoint into it.

    A factory receives `in_channels`, `num_classes` and `input_size` only for the ones it
    declares as parameters, so `def build(): ...` and `def build(num_classes=10): ...` both work.
    """
    options = {"in_channels": in_channels, "num_classes": num_classes, "input_size": input_size}
    if not isinstance(ref, str) or not ref.strip():
        raise ModelRefError(f"empty model reference {ref!r}: give {_forms()}")
    ref = ref.strip()
    if ":" not in ref:
        model = _build_zoo(ref, options)
    else:
        model = _call_factory(resolve_factory(ref), options, ref)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model


def load_checkpoint(model: nn.Module, checkpoint: str | Path) -> nn.Module:
    """Load a state dict saved with `torch.save(model.state_dict())`, weights only, strictly."""
    path = Path(checkpoint)
    if not path.is_file():
        raise ModelRefError(f"checkpoint {path} does not exist (or is not a file)")
    try:
        loaded = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - any failure here means "not a plain state dict"
        raise ModelRefError(
            f"checkpoint {path} is not a weights-only state dict ({type(exc).__name__}: {exc}); "
            "save it with torch.save(model.state_dict(), path)"
        ) from exc
    state = _unwrap_state_dict(loaded, path)
    _check_keys(model, state, path)
    model.load_state_dict(state, strict=True)
    return model


def _forms() -> str:
    return _FORMS.format(zoo=", ".join(_zoo_names()) or "see legoblocks.zoo.ZOO")


def _zoo_names() -> list[str]:
    # Imported lazily: the zoo is optional for file/module references and heavy to import.
    try:
        from legoblocks.zoo import ZOO
    except ImportError:
        return []
    return sorted(ZOO)


def _build_zoo(name: str, options: dict[str, int]) -> nn.Module:
    from legoblocks.zoo import ZOO, build_zoo_model

    if name not in ZOO:
        raise ModelRefError(
            f"unknown model reference {name!r}: it has no ':' so it must be a zoo name, one of "
            f"{', '.join(sorted(ZOO))}; for your own model give path/to/file.py:factory or "
            "package.module:factory"
        )
    return build_zoo_model(name, **options)


def resolve_factory(ref: str) -> Any:
    """The object `package.module:name` or `path/to/file.py:name` refers to (a file is imported
    under a unique module name); ModelRefError says what is wrong with the reference."""
    source, _, attr = ref.strip().rpartition(":")
    if not source or not attr:
        raise ModelRefError(f"malformed reference {ref!r}: both sides of ':' must be non-empty; write "
                            "package.module:factory or path/to/file.py:factory")
    module = _import_file(source) if _looks_like_file(source) else _import_module(source)
    return _resolve_attr(module, attr, ref)


def call_with_accepted(factory: Callable[..., Any], options: dict[str, Any]) -> Any:
    """`factory(**options)` with only the options it declares as parameters."""
    return factory(**_accepted_options(factory, options))


def _looks_like_file(source: str) -> bool:
    return source.endswith(".py") or "/" in source or "\\" in source


def _import_file(source: str) -> ModuleType:
    path = Path(source).expanduser()
    if not path.is_file():
        raise ModelRefError(f"model file {source} not found (resolved to {path.resolve()})")
    if path.suffix != ".py":
        raise ModelRefError(f"model file {source} is not a .py file")
    # A unique, stable module name per file: dataclasses and pickling-free introspection
    # inside the user's file look their module up in sys.modules.
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    name = f"legodnn_user_{path.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelRefError(f"model file {source} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise ModelRefError(
            f"importing model file {source} failed: {type(exc).__name__}: {exc}"
        ) from exc
    return module


def _import_module(source: str) -> ModuleType:
    try:
        return importlib.import_module(source)
    except ModuleNotFoundError as exc:
        raise ModelRefError(
            f"module {source!r} is not importable ({exc}); install it or add its folder to "
            "PYTHONPATH, or give a file path such as path/to/file.py:factory"
        ) from exc
    except Exception as exc:
        raise ModelRefError(f"importing module {source!r} failed: {type(exc).__name__}: {exc}") from exc


def _resolve_attr(module: ModuleType, attr: str, ref: str) -> Any:
    obj: Any = module
    for part in attr.split("."):
        if not part or not hasattr(obj, part):
            candidates = [
                n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
            ]
            raise ModelRefError(
                f"{ref!r}: {module.__name__.removeprefix('legodnn_user_')} has no attribute "
                f"{attr!r}; callables it defines: {', '.join(sorted(candidates)[:10]) or 'none'}"
            )
        obj = getattr(obj, part)
    return obj


def _call_factory(factory: Any, options: dict[str, int], ref: str) -> nn.Module:
    if not callable(factory):
        raise ModelRefError(
            f"{ref!r} names a {type(factory).__name__}, not a callable factory returning an nn.Module"
        )
    kwargs = _accepted_options(factory, options)
    try:
        model = factory(**kwargs)
    except Exception as exc:
        raise ModelRefError(
            f"factory {ref!r} raised {type(exc).__name__}: {exc} (called with {kwargs or 'no arguments'})"
        ) from exc
    if not isinstance(model, nn.Module):
        raise ModelRefError(
            f"factory {ref!r} returned a {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def _accepted_options(factory: Callable[..., Any], options: dict[str, int]) -> dict[str, int]:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return {}
    named = {
        n for n, p in params.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    return {k: v for k, v in options.items() if k in named}


def _unwrap_state_dict(loaded: Any, path: Path) -> Mapping[str, torch.Tensor]:
    # Training scripts often wrap the weights as {"state_dict": ...} or {"model": ...}.
    if isinstance(loaded, Mapping) and not any(isinstance(v, torch.Tensor) for v in loaded.values()):
        for key in ("state_dict", "model"):
            if isinstance(loaded.get(key), Mapping):
                loaded = loaded[key]
                break
    if not isinstance(loaded, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise ModelRefError(
            f"checkpoint {path} holds a {type(loaded).__name__}, not a state dict of "
            "name -> tensor; save it with torch.save(model.state_dict(), path)"
        )
    return loaded


def _check_keys(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:_LISTED_KEYS])})")
    if unexpected:
        problems.append(
            f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:_LISTED_KEYS])})"
        )
    if wrong_shape:
        problems.append(
            f"{len(wrong_shape)} keys with other shapes (checkpoint vs model: "
            f"{'; '.join(wrong_shape[:_LISTED_KEYS])})"
        )
    if problems:
        raise ModelRefError(
            f"checkpoint {path} does not match the model: {'; '.join(problems)}. "
            "Was it saved from the same model reference and options (in_channels, num_classes)?"
        )
