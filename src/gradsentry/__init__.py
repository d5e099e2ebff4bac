"""gradsentry: find, explain and fix vanishing and exploding gradients in PyTorch training.

Public names only; every module has one job (see README's architecture section). Names are imported
on first use (PEP 562): ``import gradsentry`` imports neither PyTorch nor NumPy, so that ``gradsentry
--help`` answers at once and ``gradsentry analyze`` and ``gradsentry report``, which read logs, start
without importing PyTorch (about 200 MB and 1.5 s less).

The top level is small and uniform (``__all__``): the Monitor and its error, the three entry points
(:func:`diagnose`, :func:`analyze_log`, :func:`check_model`), :class:`Finding` and :class:`Thresholds`, the
remedies, the sinks, :func:`read_jsonl`, :func:`reinit` and :func:`lsuv`. The rest is reached through its
subpackage: ``gradsentry.records`` (the data), ``gradsentry.lab``, ``gradsentry.report``,
``gradsentry.theory``, ``gradsentry.logs``. The names the top level exported before (``gradsentry.Run``,
``gradsentry.Remedy``, ...) still resolve for one release, with a DeprecationWarning naming their new home.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

from gradsentry._lazy import lazy_names
from gradsentry._version import __version__

if TYPE_CHECKING:
    from gradsentry.analyze import analyze_log
    from gradsentry.check import check_model
    from gradsentry.diagnosis.core import diagnose
    from gradsentry.diagnosis.thresholds import Thresholds
    from gradsentry.logs.run_jsonl import read_jsonl
    from gradsentry.monitor import Monitor, NonFiniteGradientError
    from gradsentry.records import Finding
    from gradsentry.remedies import (
        AGC,
        AutoClip,
        Chain,
        ClipGlobalNorm,
        ClipLayerNorm,
        ClipValue,
        Ladder,
        NonFiniteGuard,
        ResetMoments,
        Rollback,
        SpikeSkip,
        ZClip,
    )
    from gradsentry.remedies.init import lsuv, reinit
    from gradsentry.sinks import CallbackSink, CsvSink, JsonlSink, TensorBoardSink
    from gradsentry.sinks.mlflow import MlflowSink
    from gradsentry.sinks.wandb import WandbSink

_REMEDIES = (
    "AGC",
    "AutoClip",
    "Chain",
    "ClipGlobalNorm",
    "ClipLayerNorm",
    "ClipValue",
    "Ladder",
    "NonFiniteGuard",
    "ResetMoments",
    "Rollback",
    "SpikeSkip",
    "ZClip",
)
_SINKS = ("CallbackSink", "CsvSink", "JsonlSink", "MlflowSink", "TensorBoardSink", "WandbSink")

_HOME: dict[str, str] = {
    "Monitor": "gradsentry.monitor",
    "NonFiniteGradientError": "gradsentry.monitor",
    "diagnose": "gradsentry.diagnosis.core",
    "Thresholds": "gradsentry.diagnosis.thresholds",
    "analyze_log": "gradsentry.analyze",
    "check_model": "gradsentry.check",
    "Finding": "gradsentry.records",
    **dict.fromkeys(_REMEDIES, "gradsentry.remedies"),
    "reinit": "gradsentry.remedies.init",
    "lsuv": "gradsentry.remedies.init",
    **dict.fromkeys(_SINKS, "gradsentry.sinks"),
    "read_jsonl": "gradsentry.logs.run_jsonl",
    # subpackages reached as attributes (``gradsentry.lab.run_lab``), not star-exported
    **{name: f"gradsentry.{name}" for name in ("lab", "report", "theory", "records")},
}
"""Public name -> the module that defines it (a subpackage's own name: the subpackage)."""

_MOVED: dict[str, str] = {
    "ActivationStats": "gradsentry.records.ActivationStats",
    "LayerInfo": "gradsentry.records.LayerInfo",
    "LayerStats": "gradsentry.records.LayerStats",
    "Run": "gradsentry.records.Run",
    "RunHeader": "gradsentry.records.RunHeader",
    "StepRecord": "gradsentry.records.StepRecord",
    "Remedy": "gradsentry.records.Advice",
    "RemedyResult": "gradsentry.remedies.RemedyResult",
    "AnalyzeThresholds": "gradsentry.analyze.AnalyzeThresholds",
    "LogAnalysis": "gradsentry.analyze.LogAnalysis",
    "CheckReport": "gradsentry.check.CheckReport",
    "DistributedError": "gradsentry.monitor.DistributedError",
    "HistogramSpec": "gradsentry.histograms.HistogramSpec",
    "LabConfig": "gradsentry.lab.LabConfig",
    "LabResult": "gradsentry.lab.LabResult",
    "run_lab": "gradsentry.lab.run_lab",
    "Series": "gradsentry.logs.Series",
    "load_series": "gradsentry.logs.load_series",
    "TheoryNotApplicable": "gradsentry.theory.TheoryNotApplicable",
    "chi": "gradsentry.theory.chi",
    "predict": "gradsentry.theory.predict",
    "render_lab_report": "gradsentry.report.render_lab_report",
    "render_run_report": "gradsentry.report.render_run_report",
}
"""Names the top level exported before 0.2, each -> its home now: they resolve, with a DeprecationWarning,
for one release."""


__getattr__, __dir__ = lazy_names(__name__, _HOME, _MOVED)


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
    "AutoClip",
    "CallbackSink",
    "Chain",
    "ClipGlobalNorm",
    "ClipLayerNorm",
    "ClipValue",
    "CsvSink",
    "Finding",
    "JsonlSink",
    "Ladder",
    "MlflowSink",
    "Monitor",
    "NonFiniteGradientError",
    "NonFiniteGuard",
    "ResetMoments",
    "Rollback",
    "SpikeSkip",
    "TensorBoardSink",
    "Thresholds",
    "WandbSink",
    "ZClip",
    "__version__",
    "analyze_log",
    "check_model",
    "diagnose",
    "lsuv",
    "read_jsonl",
    "reinit",
]
