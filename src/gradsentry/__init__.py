"""gradsentry: find, explain and fix vanishing and exploding gradients in PyTorch training.

Public names only; every module has one job (see README's architecture section).
"""

from gradsentry import theory
from gradsentry._dist import DistributedError
from gradsentry.analyze import AnalyzeThresholds, LogAnalysis, analyze_log
from gradsentry.check import CheckReport, check_model
from gradsentry.diagnose import Thresholds, diagnose
from gradsentry.lab import LabConfig, LabResult, run_lab
from gradsentry.logs import Series, load_series
from gradsentry.monitor import Monitor, NonFiniteGradientError
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
from gradsentry.remedies.init import lsuv, reinit
from gradsentry.report import render_lab_report, render_run_report
from gradsentry.sinks import CsvSink, JsonlSink, TensorBoardSink, read_jsonl
from gradsentry.theory import TheoryNotApplicable, chi, predict

__version__ = "0.1.0"

__all__ = [
    "AGC",
    "ActivationStats",
    "AnalyzeThresholds",
    "AutoClip",
    "Chain",
    "CheckReport",
    "ClipGlobalNorm",
    "ClipLayerNorm",
    "ClipValue",
    "CsvSink",
    "DistributedError",
    "Finding",
    "JsonlSink",
    "LabConfig",
    "LabResult",
    "Ladder",
    "LayerInfo",
    "LayerStats",
    "LogAnalysis",
    "Monitor",
    "NonFiniteGradientError",
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
    "TheoryNotApplicable",
    "Thresholds",
    "ZClip",
    "__version__",
    "analyze_log",
    "check_model",
    "chi",
    "diagnose",
    "load_series",
    "lsuv",
    "predict",
    "read_jsonl",
    "reinit",
    "render_lab_report",
    "render_run_report",
    "run_lab",
    "theory",
]
