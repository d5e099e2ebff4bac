"""Data the hostile tester saw lost: skipped steps, findings beyond max_records, resumed and shared logs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import gradsentry as gs
from gradsentry.sinks import JsonlSink, read_jsonl

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
