"""JSONL sink: one header line, then one line per logged step, flushed per line.

A run killed at any point leaves a file whose complete lines all parse (the reader,
:func:`gradsentry.logs.run_jsonl.read_jsonl`, skips a truncated last line with a warning). A run restarted
from a checkpoint appends to its file: a header line marked ``"resumed": true`` starts each resumed part.
Every line is written by the one codec, :func:`gradsentry.records.dumps` (NaN/inf as JSON literals).

The reading code that lived here (``read_jsonl``, ``scan_jsonl``, ``iter_jsonl``, ``parse_line``,
``RunScanner``, ``ScannedRun``, ``LogFormatError``) moved to :mod:`gradsentry.logs.run_jsonl`; the old
names still work here for one release, with a DeprecationWarning.
"""

from __future__ import annotations

import importlib
import logging
import os
import warnings
from pathlib import Path
from typing import IO, Any

from gradsentry.records import Finding, RunHeader, StepRecord, dumps, loads
from gradsentry.sinks._file import LogInUseError, open_log, probe_lock

log = logging.getLogger("gradsentry")


class JsonlSink:
    """Write a run as JSON lines to ``path``.

    Args:
        path: file to write; parent folders are created.
        flush_every: flush (and ``fsync`` when ``fsync=True``) after this many lines (default 1).
        fsync: also ``os.fsync`` on flush, so a machine crash loses at most the last line.
        resume: True (default): an existing file is appended to, so a run restarted from a checkpoint
            keeps its earlier log: a last line cut short by a kill is dropped first, then a header line
            marked ``"resumed": true`` starts the new part (:func:`gradsentry.logs.run_jsonl.read_jsonl` joins the parts).
            False: an existing file is replaced.

    While open, the file is locked (``flock``): a second sink on the same path (another Monitor or
    process) fails to open with a clear error naming the file, instead of interleaving lines.

    Raises:
        OSError: on ``open`` when the file cannot be created.
        LogInUseError: on ``open`` when another sink is writing the file.
        ValueError: on ``open`` with ``resume=True`` when the existing file is not a gradsentry JSONL run
            (its first line is not a gradsentry header): it is left as it is.
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
        probe_lock(self.path)  # another sink writing it: refused here, not at the first step
        self.flush_every = max(1, int(flush_every))
        self.fsync = fsync
        self.resume = resume
        self.resumed = False
        self._fh: IO[str] | None = None
        self._pending = 0
        self._last_step: int | None = None  # the resumed log's last step, until the first write

    def open(self, header: RunHeader) -> None:
        fd, kept = open_log(
            self.path,
            resume=self.resume,
            ours=_is_jsonl_header,
            what="gradsentry JSONL run",
            replace_hint="JsonlSink(path, resume=False)",
        )
        self._fh = os.fdopen(fd, "a", encoding="utf-8")
        self.resumed = kept > 0
        first = header.to_dict()
        if self.resumed:
            first["resumed"] = True
            self._last_step = _last_step(self.path, kept)
        self._line(first, force=True)

    def _line(self, obj: dict[str, Any], force: bool = False) -> None:
        if self._fh is None:
            raise RuntimeError(f"JsonlSink({self.path}) is not open")
        self._fh.write(dumps(obj) + "\n")
        self._pending += 1
        if force or self._pending >= self.flush_every:
            self._fh.flush()
            if self.fsync:
                os.fsync(self._fh.fileno())
            self._pending = 0

    def write(self, record: StepRecord) -> None:
        last, self._last_step = self._last_step, None
        if last is not None and record.step <= last and record.step == 0:
            log.warning(
                "gradsentry: %s resumes a log that reached step %d, but this run's first logged step is 0: "
                "its records will replace the earlier ones from step 0 on. When resuming from a checkpoint, "
                "pass the trainer's global step: Monitor.step(loss, step=global_step)",
                self.path,
                last,
            )
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


_HEADER_START = b'{"gradsentry":'


def _is_jsonl_header(line: bytes, complete: bool) -> bool:
    """Whether a file's first line is a gradsentry header line (or, cut by a kill, the start of one)."""
    return line.startswith(_HEADER_START) or (not complete and _HEADER_START.startswith(line))


def _last_step(path: Path, size: int) -> int | None:
    """The step of the last complete step line within the first ``size`` bytes of ``path``, if any."""
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, size - (1 << 16)))
            tail = fh.read(min(size, 1 << 16)).splitlines()
    except OSError:
        return None
    for raw in reversed(tail):
        try:
            obj = loads(raw)
        except (ValueError, RecursionError):
            continue
        if isinstance(obj, dict) and obj.get("kind") == "step" and isinstance(obj.get("step"), int):
            return int(obj["step"])
    return None


_MOVED = frozenset(
    {
        "LogFormatError",
        "RunScanner",
        "ScannedRun",
        "iter_jsonl",
        "parse_line",
        "read_jsonl",
        "scan_jsonl",
        "step_record",
    }
)


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        warnings.warn(
            f"gradsentry.sinks.jsonl.{name} moved to gradsentry.logs.run_jsonl.{name} (sinks write, logs read); "
            "the old path goes in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module("gradsentry.logs.run_jsonl"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["JsonlSink", "LogInUseError"]
