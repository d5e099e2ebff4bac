"""All-or-nothing construction: the hooks a Monitor set on the model and the optimizer are removed
again when a later construction step raises, so a failed ``Monitor(...)`` leaves them as they were."""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import TracebackType

log = logging.getLogger("gradsentry")


class UndoOnError:
    """A ``with`` block that runs the removers given to :meth:`add` (newest first) when it is left by
    an exception, which then propagates unchanged; on success it does nothing.

    A remover that itself raises is logged at DEBUG and skipped, so that the others still run and the
    original exception is the one the caller sees.
    """

    def __init__(self) -> None:
        self._removers: list[Callable[[], None]] = []

    def add(self, remover: Callable[[], None]) -> None:
        """Remember ``remover`` (an idempotent callable removing hooks already set) for a failure."""
        self._removers.append(remover)

    def __enter__(self) -> UndoOnError:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            return
        for remover in reversed(self._removers):
            try:
                remover()
            except Exception:  # keep undoing; the caller sees the original error
                log.debug("gradsentry: removing a hook after a failed construction failed", exc_info=True)
        self._removers.clear()
