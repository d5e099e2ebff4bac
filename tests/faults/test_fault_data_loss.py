"""Data the hostile tester saw lost: skipped steps, findings beyond max_records, resumed and shared logs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import gradsentry as gs
from gradsentry.logs.run_jsonl import read_jsonl
from gradsentry.sinks import JsonlSink

pytestmark = pytest.mark.faults


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)


@pytest.mark.parametrize("sync", [True, False])
def test_steps_a_guard_skipped_between_logged_steps_leave_a_trace(tmp_path: Path, sync: bool) -> None:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=not sync)
    guard = gs.NonFiniteGuard(opt, sync=sync)
    path = tmp_path / "run.jsonl"
    with gs.Monitor(model, every=5, remedy=guard, sinks=[JsonlSink(path)]) as mon:
        for step in range(11):
            x, y = _batch(step)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            if step in (2, 3):  # unlogged steps (every=5 logs 0, 5, 10)
                model[2].weight.grad[0, 0] = math.nan
            mon.step(loss=loss)
            opt.step()
            opt.zero_grad()
    assert guard.skips == 2
    run = read_jsonl(path)
    assert [r.step for r in run.records] == [0, 5, 10]
    trace = [a for a in run.records[1].actions if "skipped_unlogged" in a]
    assert len(trace) == 1 and trace[0]["skipped_unlogged"] == 2
    assert not any("skipped_unlogged" in a for r in (run.records[0], run.records[2]) for a in r.actions)
    if sync:  # the host knew which steps
        assert trace[0]["skipped_unlogged_steps"] == [2, 3]
        found = {f.kind: f for f in run.findings}
        assert found["skipped_steps"].steps == [2, 3]
        assert {f.kind: f.steps for f in gs.diagnose(run.records)}["skipped_steps"] == [2, 3]


def _verdict(findings: list) -> str:
    """Findings as text (NaN evidence compares equal)."""
    return json.dumps([f.to_dict() for f in findings], default=str)


def _nan_run(path: Path, max_records: int) -> tuple[gs.Monitor, list]:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = gs.NonFiniteGuard()
    with gs.Monitor(
        model, optimizer=opt, remedy=guard, max_records=max_records, sinks=[JsonlSink(path)]
    ) as mon:
        for step in range(200):
            x, y = _batch(step)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            if step == 50:
                model[2].weight.grad[0, 0] = math.nan
            mon.step(loss=loss)
            opt.step()
            opt.zero_grad()
        live = mon.diagnose()
    return mon, live


def test_findings_at_close_cover_the_whole_run_beyond_max_records(tmp_path: Path) -> None:
    """A NaN at step 50 of 200 with max_records=5 is in the findings written at close."""
    mon, live = _nan_run(tmp_path / "small.jsonl", max_records=5)
    assert len(mon.records) == 5
    run = read_jsonl(tmp_path / "small.jsonl")
    found = {f.kind: f for f in run.findings}
    assert found["nonfinite"].steps[0] == 50
    assert found["nonfinite"].layers[0] == "2"
    assert found["skipped_steps"].steps == [50]
    # the same verdict as a Monitor that kept every record, and as the log read back
    _, full = _nan_run(tmp_path / "full.jsonl", max_records=1000)
    summary = _verdict(full)
    assert _verdict(run.findings) == summary
    assert _verdict(live) == summary
    assert _verdict(gs.diagnose(run.records, run.header.layers, meta=run.header.meta)) == summary


def test_an_early_update_blow_up_is_kept_beyond_max_records() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    records = []
    with gs.Monitor(model, optimizer=opt, max_records=3) as mon:
        for step in range(60):
            x, y = _batch(step)
            nn.functional.mse_loss(model(x), y).backward()
            records.append(mon.step())
            if step == 2:
                model[0].weight.grad = -5000.0 * model[0].weight.detach() / 1e-3  # update 5,000x w
            opt.step()
            opt.zero_grad()
    upd = [f for f in mon.diagnose() if f.evidence.get("pattern") == "update_ratio"]
    assert upd and upd[0].evidence["first_step"] == 3
    full = [f for f in gs.diagnose(records, mon.layers) if f.evidence.get("pattern") == "update_ratio"]
    assert upd[0].evidence["max_update_ratio"] == full[0].evidence["max_update_ratio"]
    at3 = next(r for r in records if r.step == 3).layer("0").update_ratio
    assert at3 == pytest.approx(5000.0, rel=1e-4)  # SGD: dw = -lr * g = 5000 w


def _train(mon: gs.Monitor, model: nn.Module, steps: range) -> None:
    for step in steps:
        x, y = _batch(step)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        mon.step(loss=loss, step=step)
        model.zero_grad()


def test_a_resumed_run_appends_to_its_logs_and_reads_back_as_one_run(tmp_path: Path, caplog) -> None:
    from gradsentry.logs import load_series
    from gradsentry.sinks import CsvSink

    jsonl, csv_path = tmp_path / "run.jsonl", tmp_path / "run.csv"
    model = _model()
    mon = gs.Monitor(model, sinks=[JsonlSink(jsonl), CsvSink(csv_path)])
    _train(mon, model, range(10))
    mon.close(write_findings=False)
    for path in (jsonl, csv_path):  # the kill cut the last line of each file
        data = path.read_bytes()
        path.write_bytes(data[:-7])
    first_part = read_jsonl(jsonl)  # the cut last line is skipped
    assert [r.step for r in first_part.records] == list(range(9))
    # restart from the checkpoint of step 6: steps 6.. are redone
    model = _model()
    sinks = [JsonlSink(jsonl), CsvSink(csv_path)]
    with caplog.at_level("WARNING", logger="gradsentry"), gs.Monitor(model, sinks=sinks) as mon:
        _train(mon, model, range(6, 15))
        resumed = mon.records
    assert caplog.text.count("cut short") == 2
    run = read_jsonl(jsonl)
    assert [r.step for r in run.records] == list(range(15))
    assert [r.to_dict() for r in run.records[6:]] == [r.to_dict() for r in resumed]
    assert [r.to_dict() for r in run.records[:6]] == [r.to_dict() for r in first_part.records[:6]]
    lines = jsonl.read_text().splitlines()
    assert sum('"kind":"header"' in ln for ln in lines) == 2 and '"resumed":true' in lines[10]
    # the CSV keeps one header row; the redone steps' rows come later and win when read per step
    rows = csv_path.read_text().splitlines()
    assert rows[0].startswith("step,layer,") and sum(r.startswith("step,") for r in rows) == 1
    steps = [int(r.split(",")[0]) for r in rows[1:]]
    assert steps == [s for s in range(10) for _ in range(2)][:-1] + [
        s for s in range(6, 15) for _ in range(2)
    ]
    series = load_series(jsonl)
    assert series.steps == list(range(15))


def test_resume_false_replaces_the_file(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    for _ in range(2):
        model = _model()
        with gs.Monitor(model, sinks=[JsonlSink(path, resume=False)]) as mon:
            _train(mon, model, range(3))
    assert path.read_text().count('"kind":"header"') == 1


def test_two_monitors_on_one_jsonl_path_refuse_the_second_writer(tmp_path: Path) -> None:
    from gradsentry.sinks._file import LogInUseError

    path = tmp_path / "run.jsonl"
    a, b = _model(), _model()
    with gs.Monitor(a, sinks=[JsonlSink(path)]) as mon_a:
        second = gs.Monitor(b, sinks=[JsonlSink(path)])  # created while the first has not written yet
        _train(mon_a, a, range(0, 1))  # the first writer takes the file
        with pytest.raises(LogInUseError, match="being written by another gradsentry sink"):
            _train(second, b, range(0, 1))  # refused loudly at its first logged step
        second.close()
        with pytest.raises(LogInUseError, match=str(path.name)):
            JsonlSink(path)  # a sink created while the file is being written is refused at once
        for step in range(1, 4):
            _train(mon_a, a, range(step, step + 1))
    run = read_jsonl(path)  # readable, and only the first Monitor's lines
    assert [r.step for r in run.records] == [0, 1, 2, 3]
    assert [r.to_dict() for r in run.records] == [r.to_dict() for r in mon_a.records]


def test_a_resumed_run_restarting_at_step_0_warns_that_it_replaces_the_earlier_records(
    tmp_path: Path, caplog
) -> None:
    path = tmp_path / "run.jsonl"
    a = _model()
    with gs.Monitor(a, sinks=[JsonlSink(path)]) as mon:
        _train(mon, a, range(0, 5))
    with caplog.at_level("WARNING", logger="gradsentry"), gs.Monitor(a, sinks=[JsonlSink(path)]) as mon:
        _train(mon, a, range(0, 2))  # the README's loop without step=: labels restart at 0
    assert "reached step 4, but this run's first logged step is 0" in caplog.text
    assert "step=global_step" in caplog.text
