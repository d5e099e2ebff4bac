"""The error every log reader raises on a file it cannot read."""

from __future__ import annotations

__all__ = ["LogFormatError"]


class LogFormatError(ValueError):
    """A file is not a readable log (a gradsentry JSONL run, or another tool's log); the message names the
    file and line."""
