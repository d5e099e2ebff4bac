"""JSONL sink and reader: one header line, then one line per logged step, flushed per line.

A run killed at any point leaves a file whose complete lines all parse; :func:`read_jsonl` skips a
truncated last line with a warning. Reading never executes file content (plain ``json``).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import IO, Any

from gradsentry.records import Finding, RecordError, Run, RunHeader, StepRecord

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
        path: file to write; parent folders are created. An existing file is replaced.
        flush_every: flush (and ``fsync`` when ``fsync=True``) after this many lines (default 1).
        fsync: also ``os.fsync`` on flush, so a machine crash loses at most the last line.

    Raises:
        OSError: on ``open`` when the file cannot be created.
    """

    def __init__(self, path: str | os.PathLike[str], *, flush_every: int = 1, fsync: bool = False) -> None:
        self.path = Path(path)
        self.flush_every = max(1, int(flush_every))
        self.fsync = fsync
        self._fh: IO[str] | None = None
        self._pending = 0

    def open(self, header: RunHeader) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("w", encoding="utf-8")
        self._line(header.to_dict(), force=True)

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
            self._fh.flush()
            self._fh.close()
            self._fh = None


def _parse_constant(name: str) -> float:
    return {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}[name]


def read_jsonl(path: str | os.PathLike[str]) -> Run:
    """Load a gradsentry JSONL run.

    Args:
        path: a file written by :class:`JsonlSink`.

    Returns:
        The :class:`~gradsentry.records.Run`: header, step records in file order, stored findings.

    Raises:
        FileNotFoundError: the path does not exist.
        LogFormatError: the file is not a gradsentry log (empty, binary, another JSON shape, or a
            malformed line other than a truncated last line); the message names the file and line.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file")
    if p.is_dir():
        raise LogFormatError(f"{p}: is a directory, expected a gradsentry .jsonl file")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # tolerate a byte-order mark (some editors add one)
    except UnicodeDecodeError as exc:
        raise LogFormatError(
            f"{p}: not a text file (byte {exc.start} is not UTF-8); expected gradsentry JSONL"
        ) from exc
    lines = text.split("\n")
    complete_end = text.endswith("\n")
    header: RunHeader | None = None
    records: list[StepRecord] = []
    findings: list[Finding] = []
    nonempty = [(i, ln) for i, ln in enumerate(lines, start=1) if ln.strip()]
    if not nonempty:
        raise LogFormatError(f"{p}: empty file, expected a gradsentry JSONL header line")
    last_no = nonempty[-1][0]
    for lineno, line in nonempty:
        try:
            obj = json.loads(line, parse_constant=_parse_constant)
        except json.JSONDecodeError as exc:
            if lineno == last_no and not complete_end and header is not None:
                log.warning("%s:%d: truncated last line skipped (the run was probably killed)", p, lineno)
                break
            raise LogFormatError(f"{p}:{lineno}: not valid JSON ({exc.msg})") from exc
        try:
            if header is None:
                header = RunHeader.from_dict(obj)
                continue
            kind = obj.get("kind") if isinstance(obj, dict) else None
            if kind == "step":
                records.append(StepRecord.from_dict(obj))
            elif kind == "findings":
                items = obj.get("findings", [])
                if not isinstance(items, list):
                    raise RecordError(f"'findings' must be a list, got {type(items).__name__}")
                findings = [Finding.from_dict(f) for f in items]
            elif kind == "header":
                raise RecordError("a second header line (two runs concatenated?)")
            else:
                raise RecordError(f"unknown line kind {kind!r}")
        except RecordError as exc:
            raise LogFormatError(f"{p}:{lineno}: {exc}") from exc
    assert header is not None  # nonempty guarantees the loop ran
    return Run(header=header, records=records, findings=findings)
