"""The top level: a small, uniform, lazily loaded set of names; the names it had before still resolve, to
the same objects, with a DeprecationWarning naming their new home."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import gradsentry as gs

SRC = Path(__file__).resolve().parents[2] / "src"

PUBLIC = {
    "Monitor",
    "NonFiniteGradientError",
    "diagnose",
    "analyze_log",
    "check_model",
    "Finding",
    "Thresholds",
    # remedies
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
    # sinks
    "CallbackSink",
    "CsvSink",
    "JsonlSink",
    "MlflowSink",
    "TensorBoardSink",
    "WandbSink",
    "read_jsonl",
    "reinit",
    "lsuv",
    "__version__",
}

HOMES = {
    "Monitor": "gradsentry.monitor",
    "NonFiniteGradientError": "gradsentry.monitor",
    "analyze_log": "gradsentry.analyze",
    "check_model": "gradsentry.check",
    "Finding": "gradsentry.records",
    "Thresholds": "gradsentry.diagnosis.thresholds",
    "read_jsonl": "gradsentry.logs.run_jsonl",
    "reinit": "gradsentry.remedies.init",
    "lsuv": "gradsentry.remedies.init",
    **dict.fromkeys(
        ("AGC", "AutoClip", "Chain", "ClipGlobalNorm", "ClipLayerNorm", "ClipValue", "Ladder"),
        "gradsentry.remedies",
    ),
    **dict.fromkeys(
        ("NonFiniteGuard", "ResetMoments", "Rollback", "SpikeSkip", "ZClip"), "gradsentry.remedies"
    ),
    **dict.fromkeys(
        ("CallbackSink", "CsvSink", "JsonlSink", "MlflowSink", "TensorBoardSink", "WandbSink"),
        "gradsentry.sinks",
    ),
}

MOVED = {
    "ActivationStats": ("gradsentry.records", "ActivationStats"),
    "LayerInfo": ("gradsentry.records", "LayerInfo"),
    "LayerStats": ("gradsentry.records", "LayerStats"),
    "Run": ("gradsentry.records", "Run"),
    "RunHeader": ("gradsentry.records", "RunHeader"),
    "StepRecord": ("gradsentry.records", "StepRecord"),
    "Remedy": ("gradsentry.records", "Advice"),
    "RemedyResult": ("gradsentry.remedies", "RemedyResult"),
    "AnalyzeThresholds": ("gradsentry.analyze", "AnalyzeThresholds"),
    "LogAnalysis": ("gradsentry.analyze", "LogAnalysis"),
    "CheckReport": ("gradsentry.check", "CheckReport"),
    "DistributedError": ("gradsentry.monitor", "DistributedError"),
    "HistogramSpec": ("gradsentry.histograms", "HistogramSpec"),
    "LabConfig": ("gradsentry.lab", "LabConfig"),
    "LabResult": ("gradsentry.lab", "LabResult"),
    "run_lab": ("gradsentry.lab", "run_lab"),
    "Series": ("gradsentry.logs", "Series"),
    "load_series": ("gradsentry.logs", "load_series"),
    "TheoryNotApplicable": ("gradsentry.theory", "TheoryNotApplicable"),
    "chi": ("gradsentry.theory", "chi"),
    "predict": ("gradsentry.theory", "predict"),
    "render_lab_report": ("gradsentry.report", "render_lab_report"),
    "render_run_report": ("gradsentry.report", "render_run_report"),
}


def test_the_public_names_are_exactly_these() -> None:
    assert set(gs.__all__) == PUBLIC
    assert len(gs.__all__) == len(PUBLIC) <= 30
    assert sorted(gs.__all__) == gs.__all__


@pytest.mark.parametrize("name", sorted(PUBLIC - {"__version__", "diagnose"}))
def test_each_public_name_resolves_to_its_home_object_without_warning(name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        value = getattr(gs, name)
    assert value is getattr(importlib.import_module(HOMES[name]), name)


def test_diagnose_is_the_function_and_version_comes_from_its_module() -> None:
    from gradsentry._version import __version__
    from gradsentry.diagnosis.core import diagnose

    assert gs.diagnose is diagnose and gs.__version__ == __version__


@pytest.mark.parametrize("name", ["lab", "report", "theory", "records"])
def test_subpackages_are_reached_as_attributes(name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        assert getattr(gs, name) is importlib.import_module(f"gradsentry.{name}")
    assert name not in gs.__all__


@pytest.mark.parametrize("name", sorted(MOVED))
def test_a_removed_name_warns_and_resolves_to_the_same_object(name: str) -> None:
    module, attribute = MOVED[name]
    new = re.escape(f"{module}.{attribute}")
    with pytest.warns(DeprecationWarning, match=rf"gradsentry\.{name} is deprecated: use {new}"):
        value = getattr(gs, name)
    assert value is getattr(importlib.import_module(module), attribute)
    with pytest.warns(DeprecationWarning):  # every access warns, not only the first
        getattr(gs, name)
    assert name not in gs.__all__ and name not in dir(gs)


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        gs.Nope  # noqa: B018


def test_moved_modules_warn_and_reexport() -> None:
    cases = {
        "gradsentry.logs.plot": ("gradsentry.report.series_plot", "plot_series"),
        "gradsentry.logs.sparkline": ("gradsentry.report.sparkline", "sparkline"),
        "gradsentry.targets": ("gradsentry.cli.targets", "load_factory"),
    }
    for old, (new, name) in cases.items():
        sys.modules.pop(old, None)
        with pytest.warns(DeprecationWarning, match=re.escape(f"{old} moved to {new}")):
            module = importlib.import_module(old)
        assert getattr(module, name) is getattr(importlib.import_module(new), name)
    from gradsentry.cli.targets import TargetError

    with pytest.warns(DeprecationWarning, match="gradsentry.cli.targets.TargetError"):
        from gradsentry.check import TargetError as old_error
    assert old_error is TargetError


def test_import_gradsentry_is_light() -> None:
    code = (
        "import json, sys, gradsentry\n"
        "gradsentry.__all__, gradsentry.__version__\n"
        "print(json.dumps(sorted({m.partition('.')[0] for m in sys.modules})))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(SRC), "PATH": ""},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert not loaded & {"torch", "numpy", "matplotlib", "jinja2", "scipy", "rich"}, loaded
