"""Big logs: ``analyze`` reads a gradsentry JSONL in one bounded pass, and log commands start without
PyTorch. The 1e6-step timing is benchmarks/big_log.py (RESULTS.md); here the same mechanism on small files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gradsentry as gs
from gradsentry.analyze import analyze_log
from gradsentry.diagnosis import signals as sg
from gradsentry.diagnosis.thresholds import Thresholds
from gradsentry.logs import load_series
from gradsentry.logs.run_jsonl import scan_jsonl

pytestmark = pytest.mark.faults

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from big_log import write_log  # noqa: E402

SRC = str(Path(gs.__file__).resolve().parents[1])


def _verdict(findings: list) -> list:
    return [(f.kind, f.severity, f.steps[:3], f.layers[:3]) for f in findings]


def test_analyze_of_a_run_longer_than_the_window_gives_the_full_verdict(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    write_log(path, 12_000)
    scanned = scan_jsonl(path, window=1000, sample=200)
    assert len(scanned.window) == 1000 and scanned.history.absorbed == 11_000
    assert len(scanned.records) <= 1000 + 200 + 4  # bounded: window, sample, pinned
    run = gs.read_jsonl(path)
    full = gs.diagnose(run.records, run.header.layers, meta=run.header.meta)
    result = analyze_log(path)  # default window 4,096 < 12,000 steps
    assert _verdict(result.findings) == _verdict(full)
    nonfinite = next(f for f in result.findings if f.kind == "nonfinite")
    assert nonfinite.steps[0] == 4000 and nonfinite.layers == ["4", "2", "0"]
    series = load_series(path)  # the readers' path: the same series point for point
    assert result.series.steps == series.steps and result.series.lr == series.lr
    assert json.dumps(result.series.grad_norm) == json.dumps(series.grad_norm)
    assert result.series.fields == series.fields and result.series.notes == series.notes


def test_a_resumed_run_is_joined_the_same_by_the_scan_and_the_reader(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    write_log(path, 3000)
    lines = path.read_text().splitlines(keepends=True)
    header = json.loads(lines[0]) | {"resumed": True}
    redo = [json.loads(ln) for ln in lines[2001:2101]]  # steps 2000..2099 redone
    for rec in redo:
        rec["loss"] = 9.0
    with path.open("a") as fh:
        fh.write(json.dumps(header) + "\n" + "".join(json.dumps(r) + "\n" for r in redo))
    scanned = scan_jsonl(path, window=500, sample=50)
    run = gs.read_jsonl(path)
    assert [r.step for r in run.records] == list(range(2100))
    sig = scanned.signals()
    assert sig.steps.tolist() == list(range(2100))
    assert sig.loss[2000:].tolist() == [9.0] * 100 and sig.loss[:2000].tolist() == [
        r.loss for r in run.records[:2000]
    ]


def test_windowed_medians_in_chunks_equal_the_whole_computation(monkeypatch) -> None:
    rng = np.random.default_rng(0)
    x = np.log(1 + rng.random(5000))
    t = Thresholds()
    whole = sg.robust_z(x, t)
    monkeypatch.setattr(sg, "_ROWS", 7)
    chunked = sg.robust_z(x, t)
    for a, b in zip(whole, chunked, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(
        sg.rolling_median(x, 21), np.array([np.median(x[max(0, i - 10) : i + 11]) for i in range(x.size)])
    )


def test_log_commands_do_not_import_pytorch(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    write_log(path, 50)
    code = (
        "import sys; from gradsentry.cli import main; rc = main(['analyze', sys.argv[1], '--json']); "
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', rc)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": SRC},
        timeout=120,
    )
    assert out.stdout.strip().splitlines()[-1] == "NO-TORCH 1", out.stderr[-2000:]


def test_the_cli_variant_list_is_the_labs() -> None:
    from gradsentry.cli.lab import VARIANT_NAMES
    from gradsentry.lab.experiments import DEFAULT_VARIANTS

    assert VARIANT_NAMES == DEFAULT_VARIANTS


def test_every_public_name_resolves_to_its_home_object() -> None:
    import importlib

    for name in gs.__all__:
        value = getattr(gs, name)
        if name in ("__version__", "theory", "diagnose", "Thresholds"):
            continue
        assert value is getattr(importlib.import_module(gs._HOME[name]), name), name
    assert callable(gs.diagnose) and gs.diagnose.__module__ == "gradsentry.diagnosis.core"


def test_report_of_a_run_longer_than_the_window_counts_every_step(tmp_path: Path, capsys) -> None:
    from gradsentry.cli import main

    path = tmp_path / "run.jsonl"
    write_log(path, 12_000)
    assert main(["report", str(path), "--out", str(tmp_path / "r.html")]) == 0
    html = (tmp_path / "r.html").read_text()
    assert "12000 (steps 0–11999)" in html
    assert ">1</span>, first at step 4000" in html
    assert "the plots show" in html
