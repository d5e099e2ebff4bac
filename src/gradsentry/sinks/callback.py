"""A sink that hands each record to your own function."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gradsentry.records import Finding, RunHeader, StepRecord


class CallbackSink:
    """Call ``fn(record)`` for every logged step (and ``on_findings(findings)`` at the end of a run).

    For user code that wants the records as they come (a custom logger, a dashboard, an early stop)
    without writing a sink class. The functions run on the training thread, inside
    :meth:`gradsentry.Monitor.step`, after the record was stored; an exception they raise is caught
    by the Monitor's :class:`~gradsentry.sinks.SafeSink`, logged once, and disables this sink
    (training goes on).

    Args:
        fn: called with each :class:`~gradsentry.records.StepRecord` (plain Python values; do not
            keep a reference if you mutate it).
        on_findings: optional, called once with the run's list of
            :class:`~gradsentry.records.Finding` when the Monitor closes.
        on_open: optional, called once with the :class:`~gradsentry.records.RunHeader` before the
            first record.

    Raises:
        TypeError: ``fn`` (or a given ``on_findings``/``on_open``) is not callable.

    Example:
        >>> norms = []
        >>> sink = CallbackSink(lambda rec: norms.append(rec.global_norm))
        >>> sink.write(StepRecord(step=0, global_norm=1.5))
        >>> norms
        [1.5]
    """

    def __init__(
        self,
        fn: Callable[[StepRecord], Any],
        *,
        on_findings: Callable[[list[Finding]], Any] | None = None,
        on_open: Callable[[RunHeader], Any] | None = None,
    ) -> None:
        for name, value in (("fn", fn), ("on_findings", on_findings), ("on_open", on_open)):
            if value is not None and not callable(value):
                raise TypeError(f"CallbackSink: {name} must be callable, got {type(value).__name__}")
        if fn is None:
            raise TypeError("CallbackSink: fn must be callable, got None")
        self.fn = fn
        self.on_findings = on_findings
        self.on_open = on_open

    def open(self, header: RunHeader) -> None:
        if self.on_open is not None:
            self.on_open(header)

    def write(self, record: StepRecord) -> None:
        self.fn(record)

    def write_findings(self, findings: list[Finding]) -> None:
        if self.on_findings is not None:
            self.on_findings(findings)

    def close(self) -> None:
        """Nothing to release."""
