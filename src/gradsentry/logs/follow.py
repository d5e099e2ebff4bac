"""Follow a gradsentry JSONL run while it is being written (``gradsentry watch``).

Each :meth:`JsonlFollower.poll` reads only the bytes appended since the previous one, parses the complete
lines among them and feeds them to the same :class:`~gradsentry.logs.run_jsonl.RunScanner` that
:func:`~gradsentry.logs.run_jsonl.scan_jsonl` uses (a bounded window of records in full, the older ones as
their series points): memory stays bounded however long the run. A last line without its newline (the
writer is in the middle of it) is left for the next poll. Nothing in the file is executed (plain ``json``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from gradsentry.logs.run_jsonl import LogFormatError, RunScanner, ScannedRun, _bad_json, parse_line
from gradsentry.records import Finding

__all__ = ["JsonlFollower"]

CHUNK_BYTES = 16 << 20
"""The most bytes one :meth:`JsonlFollower.poll` parses (more when a single line is longer): a large
existing file is read over a few polls, so a live view refreshes while it catches up."""


class JsonlFollower:
    """Read a growing gradsentry JSONL run incrementally, and judge it cheaply.

    Args:
        path: the ``.jsonl`` file (it may not exist yet).
        window: the last ``window`` step records kept in full (older ones keep their series point and
            the few records the verdict needs; see :class:`~gradsentry.diagnosis.history.RunHistory`).
        sample: the most older records kept as a uniform sample for the per-layer rules.
        max_share: the most of the wall time the re-diagnosis may take: after a diagnosis that took
            ``t`` seconds, the next one waits ``t / max_share`` seconds (0.2: at most ~20 % of a core).

    Attributes:
        scanner: what was read so far (header, steps, history, findings line).
        offset: bytes of the file consumed (up to the end of the last complete line read).
        restarts: how many times the file was found replaced or truncated and read again from its start.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, window: int = 1024, sample: int = 256, max_share: float = 0.2
    ) -> None:
        if not 0 < max_share <= 1:
            raise ValueError(f"max_share must be in (0, 1], got {max_share}")
        self.path = Path(path)
        self.window = window
        self.sample = sample
        self.max_share = max_share
        self.restarts = 0
        self._reset()
        self._findings: list[Finding] = []
        self._judged_steps = -1
        self._next_diagnosis = 0.0

    def _reset(self) -> None:
        self.scanner = RunScanner(self.path, window=self.window, sample=self.sample)
        self.offset = 0
        self._lineno = 0
        self._ident: tuple[int, int] | None = None
        self._judged_steps = -1

    def poll(self) -> int:
        """Read the complete lines appended since the previous poll.

        A file replaced (another inode) or shorter than what was read is read again from its start (a
        new run written with ``JsonlSink(resume=False)``).

        Returns:
            The number of lines read (header, step, findings lines).

        Raises:
            FileNotFoundError: the file does not exist (yet).
            LogFormatError: the path is a directory, or a complete line is not a gradsentry record (the
                message names the file and line).
        """
        st = os.stat(self.path)
        if not os.path.isfile(self.path):
            raise LogFormatError(f"{self.path}: not a regular file, expected a gradsentry .jsonl file")
        ident = (st.st_dev, st.st_ino)
        if self._ident is not None and (ident != self._ident or st.st_size < self.offset):
            self.restarts += 1
            self._reset()
        self._ident = ident
        if st.st_size <= self.offset:
            return 0
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            data = fh.read(CHUNK_BYTES)
            while b"\n" not in data and len(data) < st.st_size - self.offset:  # one line longer than a chunk
                more = fh.read(CHUNK_BYTES)
                if not more:
                    break
                data += more
        end = data.rfind(b"\n")
        if end < 0:  # only a line still being written
            return 0
        read = 0
        for raw in data[: end + 1].split(b"\n")[:-1]:
            self._lineno += 1
            try:
                entry = parse_line(self.path, self._lineno, raw, first=self.scanner.header is None)
            except json.JSONDecodeError as exc:
                raise _bad_json(self.path, self._lineno, exc) from exc
            if entry is not None:
                self.scanner.feed(self._lineno, *entry)
                read += 1
        self.offset += end + 1
        return read

    @property
    def started(self) -> bool:
        """True once the header line was read."""
        return self.scanner.header is not None

    @property
    def finished(self) -> bool:
        """True when the run's Monitor closed: a findings line follows the latest header."""
        return self.scanner.findings is not None

    def run(self) -> ScannedRun | None:
        """What was read so far, or None before the header line."""
        return self.scanner.result() if self.started else None

    def findings(self) -> list[Finding]:
        """The run's findings so far, as a Monitor (or ``gradsentry analyze``) would judge these records.

        Re-diagnosed only when new step records arrived since the last diagnosis and the time budget
        (``max_share``) allows; otherwise the previous findings are returned.

        Raises:
            LogFormatError: a step line is not a step record.
        """
        scanned = self.run()
        if scanned is None:
            return []
        now = time.perf_counter()
        if self.scanner.steps != self._judged_steps and now >= self._next_diagnosis:
            self._findings = scanned.diagnose()
            spent = time.perf_counter() - now
            self._judged_steps = self.scanner.steps
            self._next_diagnosis = now + spent / self.max_share
        return self._findings
