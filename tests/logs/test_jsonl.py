"""JSONL sink and reader: round trip, killed runs, malformed files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import gradsentry as gs
from gradsentry.logs.run_jsonl import LogFormatError
from gradsentry.records import Advice, Finding, LayerStats, StepRecord


def _run(path: Path, steps: int = 5) -> gs.Monitor:
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    mon = gs.Monitor(model, sinks=[gs.JsonlSink(path)], meta={"run": "test"})
    for i in range(steps):
        model(torch.randn(6, 4)).pow(2).mean().backward()
        if i == 3:
            model[0].weight.grad[0, 0] = math.inf
        mon.step(loss=float(i))
        model.zero_grad()
    return mon


def test_round_trip_keeps_every_number_including_nonfinite(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    mon = _run(path)
    mon.close(write_findings=False)
    run = gs.read_jsonl(path)
    assert run.header.meta["run"] == "test"
    assert [x.name for x in run.header.layers] == ["0", "2"]
    assert [r.to_dict() for r in run.records] == [r.to_dict() for r in mon.records]
    assert math.isinf(run.records[3].global_norm) and run.records[3].layers[0].nonfinite == 1


def test_records_round_trip_through_dicts() -> None:
    rec = StepRecord(
        step=3,
        global_norm=math.nan,
        loss=1.5,
        layers=[LayerStats("a", 0, 10, 1.0, 0.3, 0.9, 0, 2.0, update_ratio=1e-3)],
        actions=[{"remedy": "x"}],
    )
    back = StepRecord.from_dict(json.loads(json.dumps(rec.to_dict())))
    assert back.layers == rec.layers and back.step == 3 and math.isnan(back.global_norm)
    f = Finding("vanishing", "error", [0], ["a"], {"ratio": 1e-9}, "text", [Advice("use ReLU", "x", "y")])
    assert Finding.from_dict(f.to_dict()) == f


def test_killed_run_mid_line_reads_back_all_complete_records(tmp_path: Path, caplog) -> None:
    path = tmp_path / "run.jsonl"
    mon = _run(path, steps=4)
    # no close(): the process "dies" here; every line so far was flushed
    data = path.read_bytes()
    assert data.endswith(b"\n") and data.count(b"\n") == 5  # header + 4 steps
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(data[: len(data) - 37])  # cut inside the last step line
    with caplog.at_level("WARNING", logger="gradsentry"):
        run = gs.read_jsonl(cut)
    assert [r.step for r in run.records] == [0, 1, 2]
    assert "truncated last line" in caplog.text
    mon.close()


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "empty file"),
        (b'{"a": 1}\n', "not a gradsentry header"),
        (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "not a text file"),
        (b'{"gradsentry": 99, "kind": "header"}\n', "unsupported gradsentry schema version"),
        (
            b'{"gradsentry": 1, "kind": "header", "layers": [], "meta": {}}\nnot json\n{"kind":"step"}\n',
            r"bad.jsonl:2: not valid JSON",
        ),
        (
            b'{"gradsentry": 1, "kind": "header", "layers": [], "meta": {}}\n{"kind": "step"}\n',
            r"bad.jsonl:2: step record is missing",
        ),
        (b'{"gradsentry": 1, "kind": "header", "layers": [], "meta": {}}\n[1, 2]\n', r"bad.jsonl:2: unknown"),
    ],
    ids=["empty", "other-json", "binary", "future-schema", "garbage-line", "missing-field", "array-line"],
)
def test_malformed_files_get_a_clear_error_naming_file_and_line(
    tmp_path: Path, content: bytes, match: str
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(LogFormatError, match=match):
        gs.read_jsonl(path)


def test_missing_path_and_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        gs.read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(LogFormatError, match="is a directory"):
        gs.read_jsonl(tmp_path)


def test_failing_sink_is_reported_once_and_training_continues(caplog) -> None:
    class Broken:
        calls = 0
        closed = False

        def open(self, header):
            pass

        def write(self, record):
            Broken.calls += 1
            raise OSError("No space left on device")

        def write_findings(self, findings):
            raise AssertionError("must not be called after the sink failed")

        def close(self):
            Broken.closed = True
            raise OSError("still broken")  # must not surface either

    model = nn.Linear(3, 1)
    with caplog.at_level("ERROR", logger="gradsentry"), gs.Monitor(model, sinks=[Broken()]) as mon:
        for _ in range(3):
            model(torch.randn(2, 3)).sum().backward()
            mon.step()
    assert Broken.calls == 1 and len(mon.records) == 3 and Broken.closed
    assert caplog.text.count("No space left on device") == 1
