"""A Monitor on a torch.compile'd model adds no graph break and no recompile (CPU, inductor)."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch import nn

import gradsentry as gs
from gradsentry.records import StepRecord

dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.utils import counters  # noqa: E402


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def _train(mode: str, caplog: pytest.LogCaptureFixture) -> tuple[dict, list[StepRecord], list[str]]:
    dynamo.reset()
    counters.clear()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = None
    if mode == "compile, then attach":
        compiled = torch.compile(model)
        mon = gs.Monitor(compiled, every=10, optimizer=opt)
    elif mode == "attach, then compile":
        mon = gs.Monitor(model, every=10, optimizer=opt)
        compiled = torch.compile(model)
    else:
        compiled = torch.compile(model)
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        for _ in range(100):
            loss = nn.functional.cross_entropy(compiled(x), y)
            loss.backward()
            if mon is not None:
                mon.step(loss=loss)
            opt.step()
            opt.zero_grad()
    records = mon.records if mon is not None else []
    if mon is not None:
        mon.close()
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    seen = {
        "frames": dict(counters["frames"]),
        "unique_graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
    }
    return seen, records, messages


@pytest.mark.parametrize("mode", ["compile, then attach", "attach, then compile"])
def test_monitor_adds_no_graph_break_and_no_recompile(mode: str, caplog: pytest.LogCaptureFixture) -> None:
    bare, _, _ = _train("bare", caplog)
    seen, records, messages = _train(mode, caplog)
    assert bare["frames"] == {"total": 1, "ok": 1} and bare["unique_graphs"] == 1
    assert seen == bare  # same frames and graphs, no graph break
    assert not [m for m in messages if "recompile_limit" in m or "cache_size_limit" in m]
    assert [r.step for r in records] == list(range(0, 100, 10))
    assert [layer.name for layer in records[0].layers] == ["0", "2", "4"]  # the user's names
    # the statistics are the eager ones: against a float64 recomputation at the last logged step
    assert all(r.activations == [] for r in records)
    warned = [m for m in messages if "activation statistics and locate_nonfinite are off" in m]
    assert len(warned) <= 1  # once (it may come at construction, before this capture)


def test_compiled_model_gradients_match_a_float64_recomputation() -> None:
    model = _model()
    compiled = torch.compile(model)
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    with gs.Monitor(compiled) as mon:
        nn.functional.cross_entropy(compiled(x), y).backward()
        rec = mon.step()
    assert rec is not None
    for layer, module in zip(rec.layers, (model[0], model[2], model[4]), strict=True):
        ref = torch.cat([p.grad.double().flatten() for p in module.parameters()]).norm().item()
        assert layer.grad_norm == pytest.approx(ref, rel=1e-6)
