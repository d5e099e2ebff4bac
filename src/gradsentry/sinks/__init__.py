"""Sinks: where step records go (JSONL; TensorBoard and CSV in their own modules)."""

from gradsentry.sinks.base import SafeSink, Sink
from gradsentry.sinks.jsonl import JsonlSink, LogFormatError, read_jsonl

__all__ = ["JsonlSink", "LogFormatError", "SafeSink", "Sink", "read_jsonl"]
