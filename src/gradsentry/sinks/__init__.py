"""Sinks: where step records go (JSONL; TensorBoard, CSV, W&B, MLflow and callbacks in their own modules).

``WandbSink`` and ``MlflowSink`` are loaded on first use (module ``__getattr__``), so importing this
package imports neither ``wandb`` nor ``mlflow``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from gradsentry.sinks.base import SafeSink, Sink
from gradsentry.sinks.callback import CallbackSink
from gradsentry.sinks.csv import CsvSink
from gradsentry.sinks.jsonl import JsonlSink, LogFormatError, read_jsonl
from gradsentry.sinks.tensorboard import TensorBoardSink

if TYPE_CHECKING:
    from gradsentry.sinks.mlflow import MlflowSink
    from gradsentry.sinks.wandb import WandbSink

_LAZY = {"WandbSink": "gradsentry.sinks.wandb", "MlflowSink": "gradsentry.sinks.mlflow"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
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
