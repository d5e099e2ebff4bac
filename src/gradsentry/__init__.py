"""gradsentry: find, explain and fix vanishing and exploding gradients in PyTorch training.

Public names only; every module has one job (see README's architecture section). Names are imported
on first use (PEP 562): ``import gradsentry`` imports neither PyTorch nor NumPy, so that ``gradsentry
--help`` answers at once and ``gradsentry analyze`` and ``gradsentry report``, which read logs, start
without importing PyTorch (about 200 MB and 1.5 s less).
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

from gradsentry._lazy import lazy_names
from gradsentry._version import __version__

if TYPE_CHECKING:
    from gradsentry import theory
    from gradsentry._dist import DistributedError
    from gradsentry.analyze import AnalyzeThresholds, LogAnalysis, analyze_log
    from gradsentry.check import CheckReport, check_model
    from gradsentry.diagnose import Thresholds, diagnose
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
    "diagnose": "gradsentry.diagnosis.core",
    "Thresholds": "gradsentry.diagnosis.thresholds",
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


__getattr__, __dir__ = lazy_names(__name__, _HOME)


class _Package(types.ModuleType):
    """This package's module type: ``gradsentry.diagnose`` stays the function.

    The function shares its name with the submodule ``gradsentry.diagnose``, and the import system binds
    a submodule as an attribute of its package when it is first imported (``setattr(package, name,
    module)``), which would replace the function. A property on the module's type wins over that binding.
    """

    @property
    def diagnose(self) -> Any:
        return __getattr__("diagnose")

    @diagnose.setter
    def diagnose(self, value: Any) -> None:
        if not isinstance(value, types.ModuleType):  # the submodule's binding is ignored
            raise AttributeError("gradsentry.diagnose is read-only: patch gradsentry.diagnosis.core.diagnose")


sys.modules[__name__].__class__ = _Package


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
