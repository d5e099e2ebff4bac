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
from gradsentry.remedies import (
    AGC,
    AutoClip,
    Chain,
    ClipGlobalNorm,
    ClipLayerNorm,
    ClipValue,
    Ladder,
    NonFiniteGuard,
    RemedyResult,
    ResetMoments,
    Rollback,
    ZClip,
)
from gradsentry.sinks import CsvSink, JsonlSink, TensorBoardSink, read_jsonl

__version__ = "0.1.0"

__all__ = [
    "AGC",
    "ActivationStats",
    "AnalyzeThresholds",
    "AutoClip",
    "Chain",
    "ClipGlobalNorm",
    "ClipLayerNorm",
    "ClipValue",
    "CsvSink",
    "Finding",
    "JsonlSink",
    "Ladder",
    "LayerInfo",
    "LayerStats",
    "LogAnalysis",
    "Monitor",
    "NonFiniteGuard",
    "Remedy",
    "RemedyResult",
    "ResetMoments",
    "Rollback",
    "Run",
    "RunHeader",
    "Series",
    "StepRecord",
    "TensorBoardSink",
    "Thresholds",
    "ZClip",
    "__version__",
    "analyze_log",
    "diagnose",
    "load_series",
    "read_jsonl",
]
