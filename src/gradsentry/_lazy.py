"""Names of a package imported on first use (PEP 562), for ``gradsentry`` and ``gradsentry.logs``."""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any


def lazy_names(
    package: str, home: Mapping[str, str], moved: Mapping[str, str] | None = None
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module ``__getattr__`` and ``__dir__`` of ``package``, loading each name from its home module.

    Args:
        package: the package's ``__name__`` (it is in ``sys.modules`` while its ``__init__`` runs).
        home: public name -> the module that defines it; a name whose home is ``package.name`` is that
            submodule itself.
        moved: old public name -> its new home as ``module.attribute`` (e.g. ``gradsentry.records.Advice``):
            the old name still resolves, to the same object, with a DeprecationWarning naming the new home
            on every access (it is not stored in the namespace, so the warning is not lost).

    Returns:
        ``(__getattr__, __dir__)`` to bind at the package's top level. A name of ``home``, once loaded, is
        stored in the package's namespace, so later lookups skip ``__getattr__``. ``__dir__`` lists the
        names of ``home`` only.

    Raises:
        AttributeError: (from ``__getattr__``) a name in neither ``home`` nor ``moved``.
    """
    namespace = sys.modules[package].__dict__
    old_names = dict(moved or {})

    def __getattr__(name: str) -> Any:
        where = home.get(name)
        if where is None:
            new = old_names.get(name)
            if new is None:
                raise AttributeError(f"module {package!r} has no attribute {name!r}")
            module_name, _, attribute = new.rpartition(".")
            warnings.warn(
                f"{package}.{name} is deprecated: use {new}; the old name goes in the next release",
                DeprecationWarning,
                stacklevel=2,
            )
            return getattr(importlib.import_module(module_name), attribute)
        module = importlib.import_module(where)
        value = module if where == f"{package}.{name}" else getattr(module, name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *home})

    return __getattr__, __dir__
