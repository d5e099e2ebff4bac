"""Opening a log file for a sink: one writer per file (an advisory lock), append on resume, no torn tail.

A run restarted from a checkpoint appends to its log instead of replacing it; before appending, a last
line cut short by a kill (no newline at the end) is dropped, since it is unreadable anyway and the new
lines would otherwise be glued to it. Two sinks writing one file interleave their lines and make it
unreadable: an exclusive ``flock`` (released when the file is closed or the process dies) refuses the
second one with a clear error. Where ``fcntl`` does not exist (Windows) or the file system refuses
locks, files are opened without one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("gradsentry")

_CHUNK = 1 << 16

try:  # POSIX only
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class LogInUseError(RuntimeError):
    """Another sink (another Monitor, or another process) is writing the same log file."""


def _lock(fd: int, path: Path) -> None:
    if fcntl is None:  # pragma: no cover - Windows
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise LogInUseError(
            f"{path} is being written by another gradsentry sink (another Monitor or process holds its "
            "lock); two writers would interleave their lines and make it unreadable, so this one does "
            "not write: give each run its own file"
        ) from None
    except OSError as exc:  # a file system without locks (some network mounts)
        log.debug("gradsentry: no lock on %s (%s)", path, exc)


def probe_lock(path: Path) -> None:
    """Refuse now, when a sink is created, a file that another sink is already writing.

    Raises:
        LogInUseError: another sink (this process or another) holds the file's lock.
    """
    if fcntl is None or not path.is_file():  # pragma: no cover - Windows
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # unreadable here: open() will say why
    try:
        _lock(fd, path)
    finally:
        os.close(fd)  # closing drops the probe's own lock


def read_at(fd: int, size: int, offset: int) -> bytes:
    """``size`` bytes at ``offset`` (``os.pread`` where it exists, else a seek and a read)."""
    if hasattr(os, "pread"):
        return os.pread(fd, size, offset)
    os.lseek(fd, offset, os.SEEK_SET)  # pragma: no cover - Windows
    return os.read(fd, size)  # pragma: no cover


def complete_prefix(fd: int, size: int) -> int:
    """Length of the file up to and including its last newline (0 when it holds none)."""
    end = size
    while end > 0:
        start = max(0, end - _CHUNK)
        chunk = read_at(fd, end - start, start)
        at = chunk.rfind(b"\n")
        if at >= 0:
            return start + at + 1
        end = start
    return 0


def first_line(fd: int, size: int) -> tuple[bytes, bool]:
    """The file's first line without its newline (at most 64 KiB of it) and whether it is complete."""
    head = read_at(fd, min(size, _CHUNK), 0)
    at = head.find(b"\n")
    return (head, False) if at < 0 else (head[:at], True)


def open_log(
    path: Path,
    *,
    resume: bool,
    ours: Callable[[bytes, bool], bool] | None = None,
    what: str = "log",
    replace_hint: str = "resume=False",
) -> tuple[int, int]:
    """Open ``path`` for appending, locked; returns ``(fd, bytes kept)``.

    With ``resume``, an existing file is kept up to its last complete line (a cut tail is dropped, with
    a warning); without, it is emptied. The file is only changed once the lock is held, and, with
    ``ours``, only once its first line is recognised as this sink's own.

    Args:
        path: the log file.
        resume: append to an existing file (True) or empty it (False).
        ours: ``ours(first_line, complete)``: whether an existing file's first line (``complete`` False
            when the file holds no newline: a header cut by a kill) is one this sink writes. Another
            file is left exactly as it is and refused: appending to (or dropping the "cut" tail of) a
            CSV, a binary file or another tool's log would damage it.
        what: the format's name for the error message (``"gradsentry JSONL run"``).
        replace_hint: how to replace the file instead, for the error message.

    Raises:
        LogInUseError: another sink holds the file's lock.
        ValueError: with ``resume`` and ``ours``, the existing file is not this sink's (left untouched).
        OSError: the file cannot be created or opened.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        _lock(fd, path)
        size = os.fstat(fd).st_size
        if resume and size and ours is not None:
            line, complete = first_line(fd, size)
            if not ours(line, complete):
                raise ValueError(
                    f"{path} exists and is not a {what} (it starts with "
                    f"{line[:60].decode('utf-8', 'replace')!r}); not appending to it: choose another file, "
                    f"or {replace_hint} to replace it"
                )
        keep = complete_prefix(fd, size) if resume and size else 0
        if keep < size:
            if resume:
                log.warning(
                    "gradsentry: %s ended in a line cut short (%d bytes, a killed run?); it is dropped "
                    "before the resumed run appends",
                    path,
                    size - keep,
                )
            os.ftruncate(fd, keep)
        return fd, keep
    except BaseException:
        os.close(fd)
        raise
