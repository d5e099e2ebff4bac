"""JSONL sink and reader: one header line, then one line per logged step, flushed per line.

A run killed at any point leaves a file whose complete lines all parse; :func:`read_jsonl` skips a
truncated last line with a warning. A run restarted from a checkpoint appends to its file: a header line
marked ``"resumed": true`` starts each resumed part (see :func:`read_jsonl` for how the parts join).
Reading streams the file line by line and never executes file content (plain ``json``).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Literal

from gradsentry.records import Finding, RecordError, Run, RunHeader, StepRecord
from gradsentry.sinks._file import LogInUseError, open_log

log = logging.getLogger("gradsentry")


class LogFormatError(ValueError):
    """A file is not a readable gradsentry log; the message names the file and line."""


def _plain(x: Any) -> Any:
    """JSON stand-in for a value json cannot write (user metadata): a scalar's value, else its str."""
    item = getattr(x, "item", None)  # numpy / torch scalars
    if callable(item):
        try:
            value = item()
        except (TypeError, ValueError, RuntimeError):
            return str(x)
        if isinstance(value, (int, float, bool, str)):
            return value
    return str(x)


def _dumps(obj: dict[str, Any]) -> str:
    # NaN and +-inf are kept (Python's json writes NaN/Infinity literals): they are evidence.
    return json.dumps(obj, allow_nan=True, separators=(",", ":"), default=_plain)


class JsonlSink:
    """Write a run as JSON lines to ``path``.

    Args:
        path: file to write; parent folders are created.
        flush_every: flush (and ``fsync`` when ``fsync=True``) after this many lines (default 1).
        fsync: also ``os.fsync`` on flush, so a machine crash loses at most the last line.
        resume: True (default): an existing file is appended to, so a run restarted from a checkpoint
            keeps its earlier log: a last line cut short by a kill is dropped first, then a header line
            marked ``"resumed": true`` starts the new part (:func:`read_jsonl` joins the parts).
            False: an existing file is replaced.

    While open, the file is locked (``flock``): a second sink on the same path (another Monitor or
    process) fails to open with a clear error naming the file, instead of interleaving lines.

    Raises:
        OSError: on ``open`` when the file cannot be created.
        LogInUseError: on ``open`` when another sink is writing the file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        flush_every: int = 1,
        fsync: bool = False,
        resume: bool = True,
    ) -> None:
        self.path = Path(path)
        self.flush_every = max(1, int(flush_every))
        self.fsync = fsync
        self.resume = resume
        self.resumed = False
        self._fh: IO[str] | None = None
        self._pending = 0

    def open(self, header: RunHeader) -> None:
        fd, kept = open_log(self.path, resume=self.resume)
        self._fh = os.fdopen(fd, "a", encoding="utf-8")
        self.resumed = kept > 0
        first = header.to_dict()
        if self.resumed:
            first["resumed"] = True
        self._line(first, force=True)

    def _line(self, obj: dict[str, Any], force: bool = False) -> None:
        if self._fh is None:
            raise RuntimeError(f"JsonlSink({self.path}) is not open")
        self._fh.write(_dumps(obj) + "\n")
        self._pending += 1
        if force or self._pending >= self.flush_every:
            self._fh.flush()
            if self.fsync:
                os.fsync(self._fh.fileno())
            self._pending = 0

    def write(self, record: StepRecord) -> None:
        self._line(record.to_dict())

    def write_findings(self, findings: list[Finding]) -> None:
        self._line({"kind": "findings", "findings": [f.to_dict() for f in findings]}, force=True)

    def flush(self) -> None:
        """Write the buffered lines to disk now (``fsync`` too with ``fsync=True``), whatever ``flush_every``."""
        if self._fh is not None:
            self._fh.flush()
            if self.fsync:
                os.fsync(self._fh.fileno())
            self._pending = 0

    def close(self) -> None:
        if self._fh is not None:
            try:
                self._fh.flush()
            finally:
                self._fh.close()  # releases the lock
                self._fh = None


def _parse_constant(name: str) -> float:
    return {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}[name]


EntryKind = Literal["header", "resumed", "step", "findings"]


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
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a byte-order mark: tolerated
            except UnicodeDecodeError as exc:
                raise LogFormatError(
                    f"{p}:{lineno}: not a text file (byte {exc.start} of the line is not UTF-8); "
                    "expected gradsentry JSONL"
                ) from exc
            if not line.strip():
                continue
            try:
                obj = json.loads(line, parse_constant=_parse_constant)
            except json.JSONDecodeError as exc:
                if not raw.endswith(b"\n") and header_seen:
                    log.warning("%s:%d: truncated last line skipped (the run was probably killed)", p, lineno)
                    return
                raise LogFormatError(f"{p}:{lineno}: not valid JSON ({exc.msg})") from exc
            except RecursionError:
                raise LogFormatError(
                    f"{p}:{lineno}: JSON nested too deeply to be a gradsentry record"
                ) from None
            try:
                if not header_seen:
                    header_seen = True
                    yield lineno, "header", RunHeader.from_dict(obj)
                    continue
                kind = obj.get("kind") if isinstance(obj, dict) else None
                if kind == "step":
                    yield lineno, "step", obj
                elif kind == "findings":
                    items = obj.get("findings", [])
                    if not isinstance(items, list):
                        raise RecordError(f"'findings' must be a list, got {type(items).__name__}")
                    yield lineno, "findings", [Finding.from_dict(f) for f in items]
                elif kind == "header":
                    if obj.get("resumed") is not True:
                        raise RecordError("a second header line (two runs concatenated?)")
                    yield lineno, "resumed", RunHeader.from_dict(obj)
                else:
                    raise RecordError(f"unknown line kind {kind!r}")
            except RecordError as exc:
                raise LogFormatError(f"{p}:{lineno}: {exc}") from exc
            except RecursionError:
                raise LogFormatError(
                    f"{p}:{lineno}: JSON nested too deeply to be a gradsentry record"
                ) from None
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
        FileNotFoundError: the path does not exist.
        LogFormatError: the file is not a gradsentry log (empty, binary, another JSON shape, or a
            malformed line other than a truncated last line); the message names the file and line.
    """
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


__all__ = ["JsonlSink", "LogFormatError", "LogInUseError", "iter_jsonl", "read_jsonl"]
