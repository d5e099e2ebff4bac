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
