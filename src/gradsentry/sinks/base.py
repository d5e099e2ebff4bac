"""The sink protocol and the failure policy shared by every sink."""

from __future__ import annotations

import importlib
import logging
from types import ModuleType
from typing import Protocol, runtime_checkable

from gradsentry.records import Finding, RunHeader, StepRecord
from gradsentry.sinks._file import LogInUseError

log = logging.getLogger("gradsentry")


def import_optional(module: str, sink: str, extra: str) -> ModuleType:
    """Import the optional package a sink needs; raises ImportError naming ``pip install 'gradsentry[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{sink} needs {module}: pip install 'gradsentry[{extra}]'") from exc


@runtime_checkable
class Sink(Protocol):
    """Where records go. ``open`` gets the header once, ``write`` one record per logged step."""

    def open(self, header: RunHeader) -> None: ...

    def write(self, record: StepRecord) -> None: ...

    def write_findings(self, findings: list[Finding]) -> None: ...

    def close(self) -> None: ...


class SafeSink:
    """Wraps a sink so that a failure (disk full, closed file) is reported once and training goes on.

    After the first exception the wrapped sink is disabled; the error is logged with the sink's name
    and kept in :attr:`error`.
    """

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.error: BaseException | None = None

    def _call(self, method: str, *args: object) -> None:
        if self.error is not None:
            return
        try:
            getattr(self.sink, method)(*args)
        except LogInUseError:
            raise  # a second writer on one file: refused loudly, never a silently missing log
        except Exception as exc:
            self.error = exc
            log.error(
                "gradsentry: sink %s failed in %s (%s); it is disabled, training continues",
                type(self.sink).__name__,
                method,
                exc,
            )

    def open(self, header: RunHeader) -> None:
        self._call("open", header)

    def write(self, record: StepRecord) -> None:
        self._call("write", record)

    def write_findings(self, findings: list[Finding]) -> None:
        self._call("write_findings", findings)

    def flush(self) -> None:
        """Flush the sink if it has a ``flush`` method (optional: not part of :class:`Sink`)."""
        if callable(getattr(self.sink, "flush", None)):
            self._call("flush")

    def close(self) -> None:
        """Close the sink; after an earlier failure still try, so files and threads are released."""
        if self.error is None:
            self._call("close")
            return
        try:
            self.sink.close()
        except Exception as exc:
            log.debug("gradsentry: closing failed sink %s: %s", type(self.sink).__name__, exc)
