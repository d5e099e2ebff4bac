"""Names of a package imported on first use (PEP 562), for ``gradsentry`` and ``gradsentry.logs``."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_names(package: str, home: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module ``__getattr__`` and ``__dir__`` of ``package``, loading each name from its home module.

    Args:
        package: the package's ``__name__`` (it is in ``sys.modules`` while its ``__init__`` runs).
        home: public name -> the module that defines it; a name whose home is ``package.name`` is that
            submodule itself.

    Returns:
        ``(__getattr__, __dir__)`` to bind at the package's top level. A name, once loaded, is stored in
        the package's namespace, so later lookups skip ``__getattr__``.

    Raises:
        AttributeError: (from ``__getattr__``) a name not in ``home``.
    """
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str) -> Any:
        where = home.get(name)
        if where is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(where)
        value = module if where == f"{package}.{name}" else getattr(module, name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *home})

    return __getattr__, __dir__
