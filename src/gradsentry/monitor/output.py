"""Where a Monitor's records go: the bounded window in memory, the run history that keeps the
verdict whole when records leave it, and the sinks (opened with the header at the first record)."""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from gradsentry.diagnosis.history import RunHistory
from gradsentry.diagnosis.thresholds import Thresholds
from gradsentry.records import Finding, LayerInfo, RunHeader, StepRecord
from gradsentry.sinks.base import SafeSink, Sink

log = logging.getLogger("gradsentry")


class RecordStore:
    """The records of one Monitor, its run history and its sinks.

    Args:
        sinks: the sinks to write (each wrapped in a :class:`~gradsentry.sinks.base.SafeSink`).
        max_records: how many records the window keeps.
        sample_size: the most older records the history samples for the per-layer rules.
        header: makes the run header (called when the sinks open and for a diagnosis).
    """

    def __init__(
        self, sinks: Sequence[Sink], max_records: int, sample_size: int, header: Callable[[], RunHeader]
    ) -> None:
        self.sinks = [SafeSink(s) for s in sinks]
        self.max_records = max_records
        self.window: deque[StepRecord] = deque()
        self.history = RunHistory(sample_size=sample_size)
        self._header = header
        self._opened = False

    @property
    def spec(self) -> dict[str, int]:
        """``{"max_records": ..., "sample": ...}``: the window kept and the history's sample size."""
        return {"max_records": self.max_records, "sample": self.history.sample_size}

    def recent(self, n: int) -> list[StepRecord]:
        """The last ``n`` records kept, oldest first (O(n))."""
        out = list(itertools.islice(reversed(self.window), max(0, int(n))))
        out.reverse()
        return out

    def add(self, record: StepRecord) -> None:
        """Keep the record (the one it pushes out of the window goes to the history) and write it."""
        self.window.append(record)
        while len(self.window) > self.max_records:
            self.history.absorb(self.window.popleft())
        if not self.sinks:
            return
        if not self._opened:
            header = self._header()
            # the window and sample the verdict was made with: analyze reads the run back with the same,
            # so that its per-layer rules see the very records the live diagnose() saw
            header.meta.setdefault("records", self.spec)
            for s in self.sinks:
                s.open(header)
            self._opened = True
        for s in self.sinks:
            s.write(record)

    def carry_over(self, history: RunHistory, window: Sequence[StepRecord]) -> None:
        """Start from the earlier part of a resumed run, read back from its log: ``history`` (what left
        the window there) and ``window`` (its last records), before any record of this part. Nothing
        is written; the records that follow push the old ones out as the reader of the joined log does,
        so this Monitor's verdict is ``gradsentry analyze``'s on that log."""
        self.history = history
        self.window = deque(window)
        while len(self.window) > self.max_records:
            self.history.absorb(self.window.popleft())

    def flush(self) -> None:
        """Push what the sinks buffered to disk (sinks with a ``flush`` method), e.g. before raising."""
        for s in self.sinks:
            s.flush()

    def diagnose(self, layers: list[LayerInfo], thresholds: Thresholds, **overrides: Any) -> list[Finding]:
        """The findings over the whole run: the window, and the history of what left it."""
        from gradsentry.diagnose import diagnose

        live = list(self.window)
        meta = self._header().meta
        if not self.history.absorbed:
            return diagnose(live, layers=layers, thresholds=thresholds, meta=meta, **overrides)
        return diagnose(
            self.history.records(live),
            layers=layers,
            thresholds=thresholds,
            meta=meta,
            signals=self.history.signals(live, meta),
            **overrides,
        )

    def close(self, findings: Callable[[], list[Finding]] | None) -> None:
        """Write ``findings()`` (when given and anything was recorded) and close the sinks."""
        if not (self.sinks and self._opened):
            return
        if findings is not None and (self.window or self.history.absorbed):
            try:
                found = findings()
            except Exception as exc:  # diagnosis must never lose the log
                log.error("gradsentry: diagnosis failed at close (%s); the records are kept", exc)
                found = []
            for s in self.sinks:
                s.write_findings(found)
        for s in self.sinks:
            s.close()
