"""Sinks: where step records go (JSONL; TensorBoard and CSV in their own modules)."""

from gradsentry.sinks.base import SafeSink, Sink
from gradsentry.sinks.csv import CsvSink
from gradsentry.sinks.jsonl import JsonlSink, LogFormatError, read_jsonl
from gradsentry.sinks.tensorboard import TensorBoardSink

__all__ = ["CsvSink", "JsonlSink", "LogFormatError", "SafeSink", "Sink", "TensorBoardSink", "read_jsonl"]
