"""Optional dependencies: one place that turns a missing one into a one-line error naming the pip command.

The core needs only PyTorch and NumPy (and rich and typer for the command line). The reports need
matplotlib and jinja2 (``gradsentry[report]``), the lab also needs scikit-learn (``gradsentry[lab]``),
reading or writing TensorBoard files needs tensorboard (``gradsentry[tensorboard]``), the W&B and MLflow
sinks need ``gradsentry[wandb]`` and ``gradsentry[mlflow]``. Every import of
one of them sits inside :func:`requires_extra`::

    with requires_extra("report", "the HTML report"):
        import jinja2

and :func:`require` checks a whole extra up front (the lab, before it trains for a minute).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

EXTRAS: dict[str, tuple[str, ...]] = {
    "report": ("matplotlib", "jinja2"),
    "lab": ("sklearn", "matplotlib", "jinja2"),
    "tensorboard": ("tensorboard",),
    "wandb": ("wandb",),
    "mlflow": ("mlflow",),
}
"""Each extra of ``pyproject.toml`` that :func:`requires_extra` names, with the modules it provides
(a test keeps this table equal to ``pyproject.toml``)."""

DISTRIBUTIONS = {"sklearn": "scikit-learn", "mlflow": "mlflow-skinny"}
"""Import names whose pip distribution has another name."""


class MissingExtraError(ModuleNotFoundError):
    """An optional dependency is not installed. ``str(err)`` is one line naming the pip command, e.g.
    ``the lab needs scikit-learn: pip install 'gradsentry[lab]'``.

    Attributes:
        extra: the extra that installs it (``report``, ``lab``, ``tensorboard``).
        distribution: the missing pip distribution (``scikit-learn``), ``name`` the missing module.
    """

    def __init__(self, feature: str, distribution: str, extra: str, name: str | None) -> None:
        super().__init__(f"{feature} needs {distribution}: pip install 'gradsentry[{extra}]'", name=name)
        self.extra = extra
        self.distribution = distribution


@contextmanager
def requires_extra(extra: str, feature: str) -> Iterator[None]:
    """Run the imports of the ``with`` block; a module they cannot find raises :class:`MissingExtraError`.

    Args:
        extra: the extra that installs the block's modules; one of :data:`EXTRAS`.
        feature: what needs them, the subject of the message (``"the lab"``, ``"plotting"``).

    Raises:
        MissingExtraError: a ``ModuleNotFoundError`` in the block (caused by the original one): one line,
            ``{feature} needs {distribution}: pip install 'gradsentry[{extra}]'``.
        ValueError: ``extra`` is not one of :data:`EXTRAS` (a programming error).
    """
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; valid: {', '.join(EXTRAS)}")
    try:
        yield
    except ModuleNotFoundError as exc:
        if isinstance(exc, MissingExtraError):
            raise
        top = (exc.name or "").partition(".")[0] or "a module"
        raise MissingExtraError(feature, DISTRIBUTIONS.get(top, top), extra, exc.name) from exc


def require(extra: str, feature: str) -> None:
    """Import every module of ``extra`` now (``import matplotlib``, ...), to fail before long work starts.

    Raises:
        MissingExtraError: one of them is not installed (see :func:`requires_extra`).
    """
    with requires_extra(extra, feature):
        for module in EXTRAS[extra]:
            importlib.import_module(module)


def import_extra(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module`` (part of ``extra``) and return it, e.g. ``import_extra("wandb", "wandb", "WandbSink")``.

    Raises:
        MissingExtraError: it is not installed (see :func:`requires_extra`).
    """
    with requires_extra(extra, feature):
        return importlib.import_module(module)
