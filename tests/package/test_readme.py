"""The README's quick start runs as written."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import gradsentry as gs

README = Path(__file__).resolve().parents[2] / "README.md"


def test_quick_start_runs_and_diagnoses_the_deep_sigmoid_net(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S)
    assert code is not None
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"print": lambda *a, **k: None}
    exec(compile(code.group(1), str(README), "exec"), namespace)
    mon = namespace["mon"]
    assert isinstance(mon, gs.Monitor) and len(mon.records) == 10
    run = gs.read_jsonl(tmp_path / "run.jsonl")
    assert [r.step for r in run.records] == list(range(0, 100, 10))
    assert "vanishing" in {f.kind for f in mon.diagnose()}


def test_notebook_example_runs_on_the_quick_start_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("pandas")
    import matplotlib

    matplotlib.use("Agg")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    notebook = next(b for b in blocks if "to_dataframe()" in b)
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], str(README), "exec"), {"print": lambda *a, **k: None})
    namespace: dict[str, object] = {}
    exec(compile(notebook, str(README), "exec"), namespace)
    df = namespace["df"]
    assert len(df) == 10 * 10 and "<pre" in namespace["run"]._repr_html_()  # type: ignore[attr-defined]


def test_trackers_snippet_runs_offline_and_every_tracker_gets_the_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb")
    mlflow = pytest.importorskip("mlflow")
    text = README.read_text().split("### Trackers", 1)[1]
    code = re.search(r"```python\n(.*?)```", text, re.S)
    assert code is not None
    monkeypatch.chdir(tmp_path)
    for var in ("WANDB_MODE", "MLFLOW_ALLOW_FILE_STORE", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)  # the snippet sets what it needs
    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    namespace: dict[str, object] = {}
    try:
        exec(compile(code.group(1), str(README), "exec"), namespace)
    finally:
        os.environ.pop("WANDB_MODE", None)  # set by the snippet itself, not by monkeypatch
        os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)
    mon = namespace["mon"]
    assert isinstance(mon, gs.Monitor) and len(namespace["worst"]) == len(mon.records) == 10  # type: ignore[arg-type]
    assert all(r.histograms is not None for r in mon.records)
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.MlflowClient(tracking_uri=str(tmp_path / "mlruns"))
    (run,) = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    history = client.get_metric_history(run.info.run_id, "gradsentry/global_norm")
    assert [m.step for m in history] == [r.step for r in mon.records]
