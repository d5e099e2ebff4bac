"""gradsentry: find, explain and fix vanishing and exploding gradients in PyTorch training.

Public names only; every module has one job (see README's architecture section). Names are imported
on first use (PEP 562), so that ``gradsentry analyze`` and ``gradsentry report``, which read logs, start
without importing PyTorch (about 200 MB and 1.5 s less).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Bound now: this function shares its name with its submodule, which would otherwise replace it as the
# package attribute when first imported (gradsentry.diagnose imports no PyTorch).
from gradsentry.diagnose import Thresholds, diagnose

if TYPE_CHECKING:
    from gradsentry import theory
    from gradsentry._dist import DistributedError
    from gradsentry.analyze import AnalyzeThresholds, LogAnalysis, analyze_log
    from gradsentry.check import CheckReport, check_model
    from gradsentry.histograms import HistogramSpec
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
    from gradsentry.sinks import (
        CallbackSink,
        CsvSink,
        JsonlSink,
        MlflowSink,
        TensorBoardSink,
        WandbSink,
        read_jsonl,
    )
    from gradsentry.theory import TheoryNotApplicable, chi, predict

_HOME: dict[str, str] = {
    "theory": "gradsentry.theory",
    "DistributedError": "gradsentry._dist",
    "AnalyzeThresholds": "gradsentry.analyze",
    "LogAnalysis": "gradsentry.analyze",
    "analyze_log": "gradsentry.analyze",
    "CheckReport": "gradsentry.check",
    "check_model": "gradsentry.check",
    "LabConfig": "gradsentry.lab",
    "LabResult": "gradsentry.lab",
    "run_lab": "gradsentry.lab",
    "Series": "gradsentry.logs",
    "load_series": "gradsentry.logs",
    "HistogramSpec": "gradsentry.histograms",
    "Monitor": "gradsentry.monitor",
    "NonFiniteGradientError": "gradsentry.monitor",
    **dict.fromkeys(
        ("ActivationStats", "Finding", "LayerInfo", "LayerStats", "Remedy", "Run", "RunHeader", "StepRecord"),
        "gradsentry.records",
    ),
    **dict.fromkeys(
        (
            "AGC",
            "AutoClip",
            "Chain",
            "ClipGlobalNorm",
            "ClipLayerNorm",
            "ClipValue",
            "Ladder",
            "NonFiniteGuard",
            "RemedyResult",
            "ResetMoments",
            "Rollback",
            "ZClip",
        ),
        "gradsentry.remedies",
    ),
    "lsuv": "gradsentry.remedies.init",
    "reinit": "gradsentry.remedies.init",
    "render_lab_report": "gradsentry.report",
    "render_run_report": "gradsentry.report",
    **dict.fromkeys(
        ("CallbackSink", "CsvSink", "JsonlSink", "MlflowSink", "TensorBoardSink", "WandbSink", "read_jsonl"),
        "gradsentry.sinks",
    ),
    "TheoryNotApplicable": "gradsentry.theory",
    "chi": "gradsentry.theory",
    "predict": "gradsentry.theory",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'gradsentry' has no attribute {name!r}")
    module = importlib.import_module(home)
    value = module if name == "theory" else getattr(module, name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME})


__version__ = "0.1.0"

__all__ = [
    "AGC",
    "ActivationStats",
    "AnalyzeThresholds",
    "AutoClip",
    "CallbackSink",
    "Chain",
    "CheckReport",
    "ClipGlobalNorm",
    "ClipLayerNorm",
    "ClipValue",
    "CsvSink",
    "DistributedError",
    "Finding",
    "HistogramSpec",
    "JsonlSink",
    "LabConfig",
    "LabResult",
    "Ladder",
    "LayerInfo",
    "LayerStats",
    "LogAnalysis",
    "MlflowSink",
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
    "WandbSink",
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
