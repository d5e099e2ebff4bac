"""A kill can cut a log at any byte: every complete record must read back, at every cut point.

For each sink's format (JSONL, CsvSink CSV, a Lightning-style metrics CSV, TensorBoard event files)
the full file is cut at every byte boundary (past its header) and read back; the records read must be
exactly those whose line (event) is complete before the cut, never an error.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import gradsentry as gs
from gradsentry.logs.csv import read_csv
from gradsentry.logs.run_jsonl import read_jsonl
from gradsentry.sinks import CsvSink, JsonlSink

pytestmark = pytest.mark.faults


def _run(sinks: list, steps: int = 6) -> list:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    with gs.Monitor(model, sinks=sinks) as mon:
        for i in range(steps):
            model(torch.randn(5, 3)).pow(2).mean().backward()
            if i == 3:
                model[0].weight.grad[0, 0] = math.nan
            mon.step(loss=0.5 / (i + 1))
            model.zero_grad()
        return mon.records


@pytest.fixture(autouse=True)
def _quiet() -> None:
    logging.getLogger("gradsentry").setLevel(logging.ERROR)  # one warning per cut point otherwise
    yield
    logging.getLogger("gradsentry").setLevel(logging.NOTSET)


def test_jsonl_cut_at_every_byte_keeps_every_complete_record(tmp_path: Path) -> None:
    full = tmp_path / "run.jsonl"
    records = _run([JsonlSink(full)])
    data = full.read_bytes()
    header_end = data.index(b"\n") + 1
    ends = [i + 1 for i, b in enumerate(data) if b == 10]  # byte offsets just after each newline
    cut = tmp_path / "cut.jsonl"
    for n in range(header_end, len(data) + 1):
        cut.write_bytes(data[:n])
        run = read_jsonl(cut)
        complete = sum(1 for e in ends if e <= n) - 1  # lines complete before the cut, less the header
        steps = min(complete, len(records))
        # a line is also complete when the cut falls right before its newline
        got = repr([r.to_dict() for r in run.records])  # repr: NaN evidence compares equal
        want = [r.to_dict() for r in records]
        assert got in (repr(want[:steps]), repr(want[: steps + 1])), n


def _csv_rows(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_csvsink_file_cut_at_every_byte_keeps_every_complete_row(tmp_path: Path) -> None:
    full = tmp_path / "run.csv"
    _run([CsvSink(full)])
    data = full.read_bytes()
    header_end = data.index(b"\n") + 1
    cut = tmp_path / "cut.csv"
    want = _csv_rows(full)
    for n in range(header_end, len(data) + 1):
        cut.write_bytes(data[:n])
        rows = cut.read_text().splitlines()
        complete = data[:n].count(b"\n")
        assert rows[:complete] == want[:complete], n


def test_metrics_csv_cut_mid_row_reads_back_every_complete_row(tmp_path: Path) -> None:
    """A CSV metrics log (Lightning CSVLogger-like) cut by a kill: the reader skips the cut row."""
    full = tmp_path / "metrics.csv"
    lines = ["step,train_loss,grad_norm"] + [f"{s},{1.0 / (s + 1)!r},{0.5 + s}" for s in range(40)]
    full.write_text("\n".join(lines) + "\n")
    data = full.read_bytes()
    header_end = data.index(b"\n") + 1
    cut = tmp_path / "cut.csv"
    failures = []
    first_row_end = data.index(b"\n", header_end) + 1
    for n in range(first_row_end, len(data) + 1):  # from one complete row on: something to read
        cut.write_bytes(data[:n])
        try:
            series = read_csv(cut)
        except Exception as exc:  # the defect: 991 of 2001 cut points were unreadable
            failures.append((n, str(exc)))
            continue
        complete = data[:n].count(b"\n") - 1
        assert series.steps[:complete] == list(range(complete)), n
        assert series.loss[:complete] == [1.0 / (s + 1) for s in range(complete)], n
        assert len(series.steps) <= complete + 1, n
    assert not failures, f"{len(failures)} cut points unreadable, e.g. {failures[:2]}"


def _tb_events(path: Path) -> list[tuple[str, int, float]]:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    out = []
    for event in EventFileLoader(str(path)).Load():
        for value in event.summary.value:
            if value.HasField("tensor") and value.metadata.plugin_data.plugin_name == "scalars":
                out.append((value.tag, event.step, repr(value.tensor.float_val[0])))
            elif value.HasField("simple_value"):
                out.append((value.tag, event.step, repr(value.simple_value)))
    return out


def test_tensorboard_file_cut_at_every_byte_reads_a_prefix_of_its_events(tmp_path: Path) -> None:
    from gradsentry.sinks import TensorBoardSink

    pytest.importorskip("tensorboard")
    _run([TensorBoardSink(tmp_path / "tb")], steps=3)
    full = next((tmp_path / "tb").glob("events.out.tfevents.*"))
    want = _tb_events(full)
    assert len(want) > 20 and any(tag.endswith("global_norm") for tag, _, _ in want)
    data = full.read_bytes()
    cut = tmp_path / "cut" / full.name
    cut.parent.mkdir()
    seen = 0
    for n in range(len(data) + 1):
        cut.write_bytes(data[:n])
        got = _tb_events(cut)
        assert got == want[: len(got)], n  # only whole events, the file's first ones
        assert len(got) >= seen, n
        seen = len(got)
    assert seen == len(want)
