"""The README's quick start runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import gradsentry as gs

README = Path(__file__).resolve().parents[1] / "README.md"


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
