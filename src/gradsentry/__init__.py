"""gradsentry: find, explain and fix vanishing and exploding gradients in PyTorch training.

Public names only; every module has one job (see README's architecture section).
"""

from gradsentry.diagnose import Thresholds, diagnose
from gradsentry.monitor import Monitor
from gradsentry.records import (
    ActivationStats,
    Finding,
    LayerInfo,
    LayerStats,
    Remedy,
    Run,
    RunHeader,
    StepRecord,
)
from gradsentry.sinks import JsonlSink, read_jsonl

__version__ = "0.1.0"

__all__ = [
    "ActivationStats",
    "Finding",
    "JsonlSink",
    "LayerInfo",
    "LayerStats",
    "Monitor",
    "Remedy",
    "Run",
    "RunHeader",
    "StepRecord",
    "Thresholds",
    "__version__",
    "diagnose",
    "read_jsonl",
]
