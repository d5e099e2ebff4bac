"""gradsentry: find, explain and fix vanishing and exploding gradients in PyTorch training.

Public names only; every module has one job (see README's architecture section).
"""

from gradsentry.analyze import AnalyzeThresholds, LogAnalysis, analyze_log
from gradsentry.diagnose import Thresholds, diagnose
from gradsentry.logs import Series, load_series
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
    "AnalyzeThresholds",
    "Finding",
    "JsonlSink",
    "LayerInfo",
    "LayerStats",
    "LogAnalysis",
    "Monitor",
    "Remedy",
    "Run",
    "RunHeader",
    "Series",
    "StepRecord",
    "Thresholds",
    "__version__",
    "analyze_log",
    "diagnose",
    "load_series",
    "read_jsonl",
]
