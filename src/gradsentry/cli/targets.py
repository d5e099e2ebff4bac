"""Load a user's model factory from ``path/to/file.py:factory`` or ``package.module:factory``.

This imports, so runs, the user's code: that is the point (``gradsentry check TARGET``), and the CLI says so
in its help. Every failure becomes a :class:`TargetError` whose message says what went wrong and shows the
user's own exception with the file and line it came from, never a deep traceback.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn


class TargetError(Exception):
    """A ``check`` TARGET could not be loaded: not found, import failed, no such factory, not a Module."""


def load_factory(spec: str) -> Callable[..., Any]:
    """Import a model factory from ``"path/to/file.py:factory"`` or ``"package.module:factory"``.

    This imports (so runs) the user's code, by design: only pass targets you trust.

    Args:
        spec: a Python file path or an importable module name, a colon, and the factory's name (a callable
            taking no arguments and returning an ``nn.Module``; a class works too).

    Returns:
        The factory (not called).

    Raises:
        TargetError: on a malformed spec, a missing file or module, an exception while importing it (its
            message and the last traceback line are shown), or a missing attribute.
    """
    module_part, sep, attr = spec.rpartition(":")
    if not sep or not module_part or not attr or not attr.isidentifier():
        raise TargetError(
            f"TARGET must look like 'path/to/file.py:factory' or 'package.module:factory', got {spec!r}"
        )
    if module_part.endswith(".py") or "/" in module_part or "\\" in module_part:
        path = Path(module_part)
        if not path.is_file():
            raise TargetError(f"TARGET file not found (or not a file): {path}")
        mod_name = f"_gradsentry_target_{abs(hash(str(path.resolve())))}"
        loader_spec = importlib.util.spec_from_file_location(mod_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise TargetError(f"cannot import {path} as a Python module")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[mod_name] = module  # dataclasses and pickling in the user's file look themselves up here
        sys.path.insert(0, str(path.resolve().parent))  # let the file import its siblings
        try:
            with contextlib.redirect_stdout(sys.stderr):  # user prints must not corrupt --json output
                loader_spec.loader.exec_module(module)
        except BaseException as exc:  # SystemExit/KeyboardInterrupt from user code included
            sys.modules.pop(mod_name, None)
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise TargetError(f"importing {path} failed: {_describe(exc)}") from exc
        finally:
            sys.path.remove(str(path.resolve().parent))
        where = str(path)
    else:
        # As `python -m` does: a package in the current directory imports without being installed
        # (the console script's sys.path holds its own bin/ folder, not the current directory).
        cwd = str(Path.cwd())
        added = cwd not in sys.path and "" not in sys.path
        if added:
            sys.path.insert(0, cwd)
        try:
            with contextlib.redirect_stdout(sys.stderr):
                module = importlib.import_module(module_part)
        except ModuleNotFoundError as exc:
            if exc.name is not None and module_part.startswith(exc.name):
                raise TargetError(f"TARGET module not found: {module_part!r} ({exc})") from exc
            raise TargetError(f"importing {module_part} failed: {_describe(exc)}") from exc
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise TargetError(f"importing {module_part} failed: {_describe(exc)}") from exc
        finally:
            if added:
                sys.path.remove(cwd)
        where = module_part
    factory = getattr(module, attr, None)
    if factory is None:
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise TargetError(
            f"{where} has no attribute {attr!r}; callables there: {', '.join(public) or 'none'}"
        )
    if not callable(factory):
        raise TargetError(
            f"{where}:{attr} is not a callable factory (it is of type {type(factory).__name__})"
        )
    return factory  # type: ignore[no-any-return]


def _describe(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    at = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{at}"


def _required_args(factory: Callable[..., Any]) -> list[str]:
    """The names of the arguments ``factory`` cannot be called without (none when its signature is
    unknown, e.g. a builtin: calling it then tells)."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return []
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [
        name
        for name, p in sig.parameters.items()
        if p.default is inspect.Parameter.empty and p.kind not in variadic
    ]


def load_model(spec: str) -> nn.Module:
    """Import the factory named by ``spec`` (see :func:`load_factory`), call it, check it gives a Module.

    Raises:
        TargetError: as :func:`load_factory`; also when the factory takes arguments without defaults,
            calling it raises or it returns something other than an ``nn.Module``.
    """
    factory = load_factory(spec)
    required = _required_args(factory)
    if required:
        where, _, attr = spec.rpartition(":")
        raise TargetError(
            f"the factory {attr} in {where} takes required arguments ({', '.join(required)}); "
            f"give a factory whose arguments all have defaults (e.g. def make(): return {attr}(...))"
        )
    try:
        with contextlib.redirect_stdout(sys.stderr):  # user prints must not corrupt --json output
            model = factory()
    except BaseException as exc:  # SystemExit from user code included
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise TargetError(f"calling the factory {spec} failed: {_describe(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise TargetError(f"the factory {spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


__all__ = ["TargetError", "load_factory", "load_model"]
