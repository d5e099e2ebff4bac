"""Sinks: where step records go (JSONL; TensorBoard, CSV, W&B, MLflow and callbacks in their own modules).

Sinks only write; reading lives in :mod:`gradsentry.logs` (``read_jsonl`` and ``LogFormatError`` are in
:mod:`gradsentry.logs.run_jsonl`; their old names here still work for one release, with a
DeprecationWarning). ``WandbSink`` and ``MlflowSink`` are loaded on first use (module ``__getattr__``), so
importing this package imports neither ``wandb`` nor ``mlflow``.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

from gradsentry.sinks.base import SafeSink, Sink
from gradsentry.sinks.callback import CallbackSink
from gradsentry.sinks.csv import CsvSink
from gradsentry.sinks.jsonl import JsonlSink
from gradsentry.sinks.tensorboard import TensorBoardSink

if TYPE_CHECKING:
    from gradsentry.logs.run_jsonl import LogFormatError, read_jsonl
    from gradsentry.sinks.mlflow import MlflowSink
    from gradsentry.sinks.wandb import WandbSink

_LAZY = {"WandbSink": "gradsentry.sinks.wandb", "MlflowSink": "gradsentry.sinks.mlflow"}
_MOVED = {"read_jsonl": "gradsentry.logs.run_jsonl", "LogFormatError": "gradsentry.logs.run_jsonl"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _MOVED:
        warnings.warn(
            f"gradsentry.sinks.{name} moved to {_MOVED[name]}.{name} (also gradsentry.logs.{name}; sinks "
            "write, logs read); the old path goes in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CallbackSink",
    "CsvSink",
    "JsonlSink",
    "LogFormatError",
    "MlflowSink",
    "SafeSink",
    "Sink",
    "TensorBoardSink",
    "WandbSink",
    "read_jsonl",
]
