"""Old module paths kept for one release: a shim module re-exports its new home with a DeprecationWarning."""

from __future__ import annotations

import importlib
import sys
import warnings


def moved_module(old: str, new: str) -> None:
    """Make module ``old`` (being imported) an alias of ``new``, warning once at import.

    The shim's namespace takes every public name of ``new`` (its ``__all__``, or every name without a
    leading underscore), so ``from old import name`` keeps working.

    Args:
        old: the shim module's ``__name__``.
        new: the module that now holds the code.
    """
    warnings.warn(
        f"{old} moved to {new}; the old path goes in the next release", DeprecationWarning, stacklevel=3
    )
    target = importlib.import_module(new)
    names = getattr(target, "__all__", None) or [n for n in vars(target) if not n.startswith("_")]
    namespace = sys.modules[old].__dict__
    namespace.update({n: getattr(target, n) for n in names})
    namespace["__all__"] = list(names)
