"""The one JSON codec (``gradsentry.records.dumps`` / ``loads``): NaN and infinities round-trip in both
forms, and every JSON writer of gradsentry goes through it. Also the old import paths of what moved
(readers to ``gradsentry.logs``, ``Remedy`` -> ``Advice``, the advice catalogue) keep working, with a
DeprecationWarning."""

from __future__ import annotations

import importlib
import json
import math
import sys
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gradsentry import _codec
from gradsentry.records import (
    Advice,
    Finding,
    LayerInfo,
    LayerStats,
    RunHeader,
    StepRecord,
    dumps,
    loads,
)

ROOT = Path(__file__).resolve().parents[2]
NAN, INF = math.nan, math.inf
VALUES: dict[str, Any] = {
    "nan": NAN,
    "inf": INF,
    "ninf": -INF,
    "nested": [1.5, {"x": NAN, "y": [-INF]}],
    "s": "ok",
}


def _same(a: Any, b: Any) -> bool:
    """Equality where NaN equals NaN."""
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _strict_json(text: str) -> Any:
    """Parse ``text`` as strict JSON (RFC 8259): a NaN/Infinity literal raises."""

    def refuse(name: str) -> None:
        raise ValueError(f"not strict JSON: literal {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("indent", [None, 1])
def test_literal_form_round_trips_nan_and_infinities(indent: int | None) -> None:
    text = dumps(VALUES, indent=indent)
    assert "NaN" in text and "-Infinity" in text and '"NaN"' not in text
    assert _same(loads(text), VALUES)
    assert _same(loads(text.encode()), VALUES)  # bytes, as read from a file
    with pytest.raises(ValueError, match="literal NaN"):
        _strict_json(text)


@pytest.mark.parametrize("indent", [None, 1])
def test_strict_form_is_strict_json_and_round_trips(indent: int | None) -> None:
    text = dumps(VALUES, strict=True, indent=indent)
    raw = _strict_json(text)
    assert raw["nan"] == "NaN" and raw["inf"] == "Infinity" and raw["nested"][1]["y"] == ["-Infinity"]
    assert not _same(loads(text), VALUES)  # the strings stay strings unless asked
    assert _same(loads(text, nonfinite_strings=True), VALUES)


def test_layout_matches_the_json_module() -> None:
    """The two layouts the files already use: compact JSONL lines, json's own spacing elsewhere."""
    obj = {"a": [1, 2.5], "b": None}
    assert dumps(obj) == json.dumps(obj, separators=(",", ":"))
    assert dumps(obj, compact=False) == json.dumps(obj)
    assert dumps(obj, strict=True, indent=1) == json.dumps(obj, indent=1)


def test_unwritable_values_become_their_value_or_text() -> None:
    np = pytest.importorskip("numpy")
    assert loads(dumps({"a": np.float32(0.5), "b": np.int64(3), "c": object})) == {
        "a": 0.5,
        "b": 3,
        "c": str(object),
    }
    assert _strict_json(dumps({"a": np.float64("nan")}, strict=True)) == {"a": "NaN"}


# --- every writer goes through the codec -------------------------------------------------------------


@pytest.fixture
def codec_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The keyword arguments of every ``json.dumps`` made by the codec (its one way to write)."""
    calls: list[dict[str, Any]] = []

    def spy(obj: Any, **kw: Any) -> str:
        calls.append(kw)
        return json.dumps(obj, **kw)

    monkeypatch.setattr(
        _codec, "json", types.SimpleNamespace(dumps=spy, JSONDecodeError=json.JSONDecodeError)
    )
    return calls


def _run_with_nan(tmp_path: Path) -> Path:
    from gradsentry.sinks import JsonlSink

    path = tmp_path / "run.jsonl"
    sink = JsonlSink(path)
    sink.open(RunHeader(layers=[LayerInfo("fc", "Linear", 0, 4)], meta={"lr": INF}))
    layer = LayerStats("fc", 0, 4, INF, INF, INF, 1, 2.0, NAN)
    sink.write(StepRecord(step=0, global_norm=NAN, layers=[layer], loss=-INF))
    sink.write_findings([Finding("nonfinite", "error", [0], ["fc"], {"norm": NAN}, "x", [Advice("skip")])])
    sink.close()
    return path


def test_jsonl_sink_writes_through_the_codec(tmp_path: Path, codec_calls: list[dict[str, Any]]) -> None:
    from gradsentry.logs import read_jsonl

    path = _run_with_nan(tmp_path)
    assert len(codec_calls) == 3  # header, step, findings
    run = read_jsonl(path)
    assert run.header.meta["lr"] == INF
    rec = run.records[0]
    assert math.isnan(rec.global_norm) and rec.loss == -INF and rec.layers[0].grad_norm == INF
    assert math.isnan(rec.layers[0].update_ratio or 0.0)
    assert math.isnan(run.findings[0].evidence["norm"]) and run.findings[0].remedies == [Advice("skip")]


def test_mlflow_artifacts_are_written_through_the_codec(codec_calls: list[dict[str, Any]]) -> None:
    pytest.importorskip("mlflow")
    from gradsentry.sinks.mlflow import FINDINGS_ARTIFACT, MlflowSink, param_value

    texts: dict[str, str] = {}
    sink = MlflowSink()
    sink._client = types.SimpleNamespace(log_text=lambda run_id, text, where: texts.__setitem__(where, text))
    sink.run_id = "r"
    sink.write_findings([Finding("exploding", "error", [3], [], {"ratio": INF, "z": NAN})])
    sink.close()
    assert param_value([NAN, 1]) == "[NaN, 1]"
    assert len(codec_calls) == 2
    evidence = loads(texts[FINDINGS_ARTIFACT])["findings"][0]["evidence"]
    assert evidence["ratio"] == INF and math.isnan(evidence["z"])


def test_lab_results_are_written_through_the_codec(tmp_path: Path, codec_calls: list[dict[str, Any]]) -> None:
    from gradsentry.lab.results import LabResult, read_results, write_results

    path = write_results(
        LabResult(config={"lr": INF}, runs=[], data={"x": NAN, "y": [-INF]}), tmp_path / "r.json"
    )
    assert codec_calls and all(kw["allow_nan"] is False for kw in codec_calls)
    raw = _strict_json(path.read_text(encoding="utf-8"))
    assert raw["config"]["lr"] == "Infinity"
    back = read_results(path)
    assert back.config["lr"] == INF and math.isnan(back.data["x"]) and back.data["y"] == [-INF]


@pytest.mark.parametrize(
    "argv",
    [
        ["analyze", "benchmarks/verdicts/runs/jsonl-spike_mlp", "--json"],
        ["check", "tests/check_targets.py:small_mlp", "--input-shape", "64", "--json"],
    ],
    ids=["analyze", "check"],
)
def test_cli_json_is_written_through_the_codec(
    argv: list[str],
    codec_calls: list[dict[str, Any]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gradsentry.cli import main

    monkeypatch.chdir(ROOT)
    target = ROOT / argv[1].split(":")[0]
    if target.is_dir():
        argv = [argv[0], str(next(p for p in sorted(target.iterdir()) if p.name != "README.md")), *argv[2:]]
    main(argv)
    out = capsys.readouterr().out
    assert any(kw["allow_nan"] is False and kw["indent"] == 1 for kw in codec_calls)
    assert isinstance(_strict_json(out), dict)


# --- old paths -----------------------------------------------------------------------------------------


def _fresh_import(name: str) -> types.ModuleType:
    sys.modules.pop(name, None)
    return importlib.import_module(name)


OLD_NAMES: list[tuple[str, Callable[[], Any], str]] = [
    (
        "gradsentry.sinks.read_jsonl",
        lambda: importlib.import_module("gradsentry.sinks").read_jsonl,
        "read_jsonl",
    ),
    (
        "gradsentry.sinks.LogFormatError",
        lambda: importlib.import_module("gradsentry.sinks").LogFormatError,
        "LogFormatError",
    ),
    (
        "gradsentry.sinks.jsonl.read_jsonl",
        lambda: importlib.import_module("gradsentry.sinks.jsonl").read_jsonl,
        "read_jsonl",
    ),
    (
        "gradsentry.sinks.jsonl.scan_jsonl",
        lambda: importlib.import_module("gradsentry.sinks.jsonl").scan_jsonl,
        "scan_jsonl",
    ),
    (
        "gradsentry.sinks.jsonl.RunScanner",
        lambda: importlib.import_module("gradsentry.sinks.jsonl").RunScanner,
        "RunScanner",
    ),
]


@pytest.mark.parametrize(("old", "get", "name"), OLD_NAMES, ids=[o[0] for o in OLD_NAMES])
def test_moved_reader_names_warn_and_are_the_new_objects(old: str, get: Callable[[], Any], name: str) -> None:
    from gradsentry.logs import run_jsonl

    with pytest.warns(DeprecationWarning, match=f"moved to gradsentry.logs.run_jsonl.{name}"):
        value = get()
    assert value is getattr(run_jsonl, name)


def test_top_level_and_logs_names_do_not_warn() -> None:
    import gradsentry
    from gradsentry.logs import run_jsonl

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gradsentry.__dict__.pop("read_jsonl", None)  # loaded again through the lazy table
        assert gradsentry.read_jsonl is run_jsonl.read_jsonl
        from gradsentry.logs import LogFormatError, read_jsonl, scan_jsonl

        assert (read_jsonl, scan_jsonl, LogFormatError) == (
            run_jsonl.read_jsonl,
            run_jsonl.scan_jsonl,
            run_jsonl.LogFormatError,
        )


def test_old_modules_warn_and_reexport() -> None:
    from gradsentry.diagnosis import advice
    from gradsentry.logs import follow

    with pytest.warns(DeprecationWarning, match="moved to gradsentry.diagnosis.advice"):
        old = _fresh_import("gradsentry.remedies_catalog")
    assert (old.CATALOG, old.remedies_for, old.RemedyContext) == (
        advice.CATALOG,
        advice.remedies_for,
        advice.RemedyContext,
    )
    with pytest.warns(DeprecationWarning, match="moved to gradsentry.logs.follow"):
        assert _fresh_import("gradsentry.sinks.follow").JsonlFollower is follow.JsonlFollower


def test_remedy_record_is_renamed_advice() -> None:
    import gradsentry.records as records

    with pytest.warns(DeprecationWarning, match="renamed Advice"):
        assert records.Remedy is Advice
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        records.Nope  # noqa: B018
    # the files keep their field name: a finding's advice is still its "remedies" list
    f = Finding.from_dict({"kind": "vanishing", "severity": "error", "remedies": [{"action": "use ReLU"}]})
    assert f.remedies == [Advice("use ReLU")] and f.to_dict()["remedies"] == [
        {"action": "use ReLU", "api": None, "reference": None}
    ]
