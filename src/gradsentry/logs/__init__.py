"""Readers for other tools' training logs, all returning a :class:`Series` (see :func:`load_series`)."""

from gradsentry.logs.detect import FORMATS, load_series, sniff_format
from gradsentry.logs.series import Series
from gradsentry.sinks.jsonl import LogFormatError

__all__ = ["FORMATS", "LogFormatError", "Series", "load_series", "sniff_format"]
