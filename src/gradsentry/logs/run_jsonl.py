"""Read gradsentry JSONL runs (written by :class:`gradsentry.sinks.JsonlSink`): whole, streamed, or in one
bounded pass.

A run killed at any point leaves a file whose complete lines all parse; :func:`read_jsonl` skips a
truncated last line with a warning. A run restarted from a checkpoint appends to its file: a header line
marked ``"resumed": true`` starts each resumed part (see :func:`read_jsonl` for how the parts join).
Reading streams the file line by line and never executes file content (the one codec,
:func:`gradsentry.records.loads`: plain ``json``).
"""

from __future__ import annotations

import json
import logging
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from gradsentry._io import check_path
from gradsentry.logs.errors import LogFormatError
from gradsentry.records import Finding, RecordError, Run, RunHeader, StepRecord, loads

if TYPE_CHECKING:
    from gradsentry.diagnosis.history import RunHistory
    from gradsentry.diagnosis.series_rules import RunSignals
    from gradsentry.diagnosis.thresholds import Thresholds

log = logging.getLogger("gradsentry")


EntryKind = Literal["header", "resumed", "step", "findings"]


def _bad_json(p: Path, lineno: int, exc: json.JSONDecodeError) -> LogFormatError:
    return LogFormatError(f"{p}:{lineno}: not valid JSON ({exc.msg})")


def parse_line(p: Path, lineno: int, raw: bytes, *, first: bool) -> tuple[EntryKind, Any] | None:
    """One line of a gradsentry JSONL run as ``(kind, value)`` (see :func:`iter_jsonl`); None for a blank line.

    Args:
        p: the file, for messages.
        lineno: the line's number (1-based), for messages.
        raw: the line's bytes (with or without its newline).
        first: True for the first non-blank line, which must be the header.

    Raises:
        json.JSONDecodeError: the line is not JSON (the caller tells a truncated last line from an error).
        LogFormatError: any other malformed line; the message names the file and line.
    """
    try:
        line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a byte-order mark: tolerated
    except UnicodeDecodeError as exc:
        raise LogFormatError(
            f"{p}:{lineno}: not a text file (byte {exc.start} of the line is not UTF-8); "
            "expected gradsentry JSONL"
        ) from exc
    if len(line) < 4 and not line.strip():
        return None
    try:
        obj = loads(line)
        if first:
            return "header", RunHeader.from_dict(obj)
        kind = obj.get("kind") if isinstance(obj, dict) else None
        if kind == "step":
            return "step", obj
        if kind == "findings":
            items = obj.get("findings", [])
            if not isinstance(items, list):
                raise RecordError(f"'findings' must be a list, got {type(items).__name__}")
            return "findings", [Finding.from_dict(f) for f in items]
        if kind == "header":
            if obj.get("resumed") is not True:
                raise RecordError("a second header line (two runs concatenated?)")
            return "resumed", RunHeader.from_dict(obj)
        raise RecordError(f"unknown line kind {kind!r}")
    except RecordError as exc:
        raise LogFormatError(f"{p}:{lineno}: {exc}") from exc
    except RecursionError:
        raise LogFormatError(f"{p}:{lineno}: JSON nested too deeply to be a gradsentry record") from None


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[tuple[int, EntryKind, Any]]:
    """Stream a gradsentry JSONL run: ``(line number, kind, value)`` per line, in file order.

    ``kind`` is ``"header"`` (the first line: a :class:`RunHeader`), ``"resumed"`` (the header of a
    resumed part: a :class:`RunHeader`), ``"step"`` (the line's dict, not yet a :class:`StepRecord`,
    so that a caller may skip building it) or ``"findings"`` (a list of :class:`Finding`). Memory is
    one line at a time.

    Raises:
        FileNotFoundError: the path does not exist.
        LogFormatError: not a gradsentry log (empty, binary, another JSON shape, nested too deeply, or a
            malformed line other than a truncated last line); the message names the file and line.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file")
    if p.is_dir():
        raise LogFormatError(f"{p}: is a directory, expected a gradsentry .jsonl file")
    header_seen = False
    with p.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                entry = parse_line(p, lineno, raw, first=not header_seen)
            except json.JSONDecodeError as exc:
                if not raw.endswith(b"\n") and header_seen:
                    log.warning("%s:%d: truncated last line skipped (the run was probably killed)", p, lineno)
                    return
                raise _bad_json(p, lineno, exc) from exc
            if entry is not None:
                header_seen = True
                yield lineno, entry[0], entry[1]
    if not header_seen:
        raise LogFormatError(f"{p}: empty file, expected a gradsentry JSONL header line")


def step_record(path: str | os.PathLike[str], lineno: int, obj: Any) -> StepRecord:
    """A step line's dict as a :class:`StepRecord`; a malformed one raises :class:`LogFormatError`."""
    try:
        return StepRecord.from_dict(obj)
    except RecordError as exc:
        raise LogFormatError(f"{path}:{lineno}: {exc}") from exc


def read_jsonl(path: str | os.PathLike[str]) -> Run:
    """Load a gradsentry JSONL run.

    A file with resumed parts (``JsonlSink(resume=True)`` after a restart) reads as one run: each part
    replaces what the earlier ones logged from its first step on (the steps a restart from a checkpoint
    redid), the header is the latest part's, and only the findings written after the last resume count.

    Args:
        path: a file written by :class:`JsonlSink`.

    Returns:
        The :class:`~gradsentry.records.Run`: header, step records in step order of the joined parts,
        stored findings.

    Raises:
        TypeError: ``path`` is not a str or path.
        FileNotFoundError: the path does not exist.
        LogFormatError: the file is not a gradsentry log (empty, binary, another JSON shape, or a
            malformed line other than a truncated last line); the message names the file and line.
    """
    check_path(path, "read_jsonl(path=...)")
    header: RunHeader | None = None
    records: list[StepRecord] = []
    findings: list[Finding] = []
    resumed = False
    for lineno, kind, value in iter_jsonl(path):
        if kind == "header":
            header = value
        elif kind == "resumed":
            header, findings, resumed = value, [], True
        elif kind == "step":
            rec = step_record(path, lineno, value)
            if resumed:  # the resumed part redoes the steps from its first one on
                records = [r for r in records if r.step < rec.step]
                resumed = False
            records.append(rec)
        else:
            findings = value
    assert header is not None  # iter_jsonl raises on a file without one
    return Run(header=header, records=records, findings=findings)


@dataclass
class ScannedRun:
    """A JSONL run read in one pass with bounded memory (:func:`scan_jsonl`).

    Attributes:
        header: the latest header (a resumed part's when there is one).
        history: the compact series of every step before the last ``window`` ones, and the records kept
            from them (see :class:`gradsentry.diagnosis.history.RunHistory`).
        window: the last ``window`` step records, in full.
        findings: the findings stored in the file (after its last resume).
    """

    header: RunHeader
    history: RunHistory
    window: list[StepRecord]
    findings: list[Finding]

    @property
    def records(self) -> list[StepRecord]:
        """The records kept: those the history holds, then the window (see :meth:`RunHistory.records`)."""
        return self.history.records(self.window)

    def signals(self) -> RunSignals:
        """The whole run's series (every step line of the file)."""
        return self.history.signals(self.window, self.header.meta)

    def diagnose(self, thresholds: Thresholds | None = None) -> list[Finding]:
        """The Monitor's verdict on this run: :func:`gradsentry.diagnose` over the records kept, with the
        whole run's series when older records left the window (as ``gradsentry analyze`` judges it).

        Raises:
            TypeError, ValueError: as :func:`gradsentry.diagnose`.
        """
        from gradsentry.diagnosis.core import diagnose

        signals = self.signals() if self.history.absorbed else None
        return diagnose(
            self.records,
            layers=self.header.layers,
            thresholds=thresholds,
            meta=self.header.meta,
            signals=signals,
        )


DEFAULT_WINDOW = 4096
"""Records :class:`RunScanner` keeps in full when the header does not say how many the Monitor kept."""
DEFAULT_SAMPLE = 1024
"""The history's sample size when the header does not say."""
MAX_WINDOW = 1_000_000
"""The most records a header may ask a scan to keep (a corrupt header must not exhaust memory)."""


def _history(sample: int) -> RunHistory:
    from gradsentry.diagnosis.history import RunHistory

    return RunHistory(sample_size=sample)


class RunScanner:
    """The state of a one-pass read of a JSONL run, fed one entry at a time in file order: what
    :func:`scan_jsonl` keeps, and what ``gradsentry watch`` keeps of a file that is still growing.

    Args:
        path: the file, for messages.
        window: the last ``window`` step records are kept in full; older ones go into the history. None:
            the Monitor's own ``max_records``, as its header states (``meta["records"]``), so that the
            per-layer rules judge the records the live ``Monitor.diagnose()`` judged; 4096 for a header
            without it.
        sample: the most records the history samples (see :class:`~gradsentry.diagnosis.history.RunHistory`).
            None: the Monitor's, as its header states; 1024 without it.

    Attributes:
        header: the latest header, None before the first line.
        steps: the number of step lines read (a resumed part's redone steps count again).
        resumed_at: the first step of the latest resumed part, None when the run was never resumed.
        findings: the findings line read after the latest header (written when the Monitor closed).
    """

    def __init__(
        self, path: str | os.PathLike[str], *, window: int | None = None, sample: int | None = None
    ) -> None:
        self.path = Path(path)
        self._asked = (window, sample)
        self.window = DEFAULT_WINDOW if window is None else max(0, int(window))
        self.header: RunHeader | None = None
        self.history = _history(DEFAULT_SAMPLE if sample is None else sample)
        self.steps = 0
        self.resumed_at: int | None = None
        self.findings: list[Finding] | None = None
        # (line number, step dict, its StepRecord once built): records are built only when kept
        self._live: deque[list[Any]] = deque()
        self._resumed = False

    def feed(self, lineno: int, kind: EntryKind, value: Any) -> None:
        """Take in one entry of :func:`iter_jsonl` (or of :func:`parse_line`).

        Raises:
            LogFormatError: a step line leaving the window is not a step record.
        """
        if kind == "header":
            if self.header is None and self.steps == 0:
                self._adopt(value)
            self.header = value
        elif kind == "resumed":
            self.header, self.findings, self._resumed = value, None, True
        elif kind == "step":
            self.steps += 1
            if self._resumed:  # the resumed part redoes the steps from its first one on
                first = value.get("step")
                if isinstance(first, int):
                    self._live = deque(
                        e
                        for e in self._live
                        if not (isinstance(e[1].get("step"), int) and e[1]["step"] >= first)
                    )
                    self.history.truncate_from(first)
                    self.resumed_at = first
                self._resumed = False
            self._live.append([lineno, value, None])
            if len(self._live) > self.window:
                n, obj, rec = self._live.popleft()
                try:
                    self.history.absorb_raw(obj, lambda n=n, obj=obj: rec or step_record(self.path, n, obj))  # type: ignore[misc]
                except (KeyError, TypeError, ValueError, AttributeError):
                    step_record(self.path, n, obj)  # raises LogFormatError naming the line
                    raise
        else:
            self.findings = value

    def _adopt(self, header: RunHeader) -> None:
        """Take the window and sample the Monitor kept (``meta["records"]``) where none was asked for."""
        spec = header.meta.get("records") if isinstance(header.meta, dict) else None
        if not isinstance(spec, dict):
            return
        window, sample = self._asked
        size = spec.get("max_records")
        if window is None and isinstance(size, int) and not isinstance(size, bool) and size >= 0:
            self.window = min(size, MAX_WINDOW)
        size = spec.get("sample")
        if sample is None and isinstance(size, int) and not isinstance(size, bool) and size >= 0:
            self.history = _history(min(size, MAX_WINDOW))

    def result(self) -> ScannedRun:
        """What was read so far (records in the window are built once and cached).

        Raises:
            LogFormatError: a step line is not a step record, or no header was read.
        """
        if self.header is None:
            raise LogFormatError(f"{self.path}: empty file, expected a gradsentry JSONL header line")
        for entry in self._live:
            if entry[2] is None:
                entry[2] = step_record(self.path, entry[0], entry[1])
        return ScannedRun(
            header=self.header,
            history=self.history,
            window=[e[2] for e in self._live],
            findings=list(self.findings or []),
        )


def scan_jsonl(
    path: str | os.PathLike[str], *, window: int | None = None, sample: int | None = None
) -> ScannedRun:
    """Read a gradsentry JSONL run in one pass, keeping the last ``window`` records in full and, of the
    older ones, their series points and a few records (the :class:`~gradsentry.diagnosis.history.RunHistory`
    a Monitor keeps): memory stays bounded however long the run (a 1e6-step log: ~34 MB of series).
    ``window`` and ``sample`` default to the Monitor's own (its header's ``meta["records"]``), so that
    the verdict is the one the live Monitor gave; 4096 and 1024 for a header that does not state them.
    Records leaving the window are only turned into :class:`StepRecord` objects when kept. Resumed parts
    join as in :func:`read_jsonl`. With no more than ``window`` step lines, the records are all of them.

    Raises:
        FileNotFoundError, LogFormatError: as :func:`read_jsonl`.
    """
    scanner = RunScanner(path, window=window, sample=sample)
    for lineno, kind, value in iter_jsonl(path):
        scanner.feed(lineno, kind, value)
    return scanner.result()


__all__ = [
    "EntryKind",
    "LogFormatError",
    "RunScanner",
    "ScannedRun",
    "iter_jsonl",
    "parse_line",
    "read_jsonl",
    "scan_jsonl",
    "step_record",
]
