"""The deferred copy (``Monitor(sync="deferred")``) against the blocking one, on CPU through the same
code path: completion is driven by an event-like object injected as the Monitor's event factory."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradsentry as gs
from zoo import mlp


class Gate:
    """An event that passes only when opened (``synchronize`` opens it, as a wait would)."""

    def __init__(self) -> None:
        self.open = False
        self.waits = 0

    def query(self) -> bool:
        return self.open

    def synchronize(self) -> None:
        self.waits += 1
        self.open = True


def _run(sync: str, steps: int = 12, *, nan_at: int | None = None, clip: bool = True, **kw) -> list[dict]:
    torch.manual_seed(0)
    model = mlp(5, 24, nn.Tanh)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    data = [(torch.randn(16, 16), torch.randint(0, 4, (16,))) for _ in range(steps)]
    remedy = gs.ClipGlobalNorm(0.5) if clip else None
    with gs.Monitor(model, optimizer=opt, sync=sync, remedy=remedy, **kw) as mon:
        for i, (x, y) in enumerate(data):
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            if i == nan_at:
                model[2].weight.grad[0, :3] = math.nan
            mon.step(loss=loss)
            opt.step()
            opt.zero_grad()
    out = []
    for rec in mon.records:
        d = rec.to_dict()
        d.pop("overhead")
        out.append(d)
    return out


@pytest.mark.parametrize("every", [1, 3], ids=["every1", "every3"])
def test_deferred_records_equal_the_blocking_ones_on_the_same_seeded_run(every: int) -> None:
    blocking = _run("blocking", every=every, histogram_bins=4)
    deferred = _run("deferred", every=every, histogram_bins=4)
    assert len(blocking) == (12 + every - 1) // every
    assert deferred == blocking  # exact: the same numbers through the same packet
    assert all(d["actions"] for d in deferred)  # the remedy's figures travelled in the packet
    assert any(layer["update_ratio"] for layer in deferred[-1]["layers"])


def test_records_complete_in_order_only_when_the_event_has_passed(tmp_path) -> None:
    model = mlp(3, 8, nn.ReLU)
    gates: list[Gate] = []
    path = tmp_path / "run.jsonl"
    mon = gs.Monitor(model, sync="deferred", sinks=[gs.JsonlSink(path)])
    mon._event = lambda device: gates.append(Gate()) or gates[-1]
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    for _ in range(3):
        nn.functional.cross_entropy(model(x), y).backward()
        assert mon.step() is None  # deferred: the record comes later
        model.zero_grad()
    assert len(gates) == 3 and len(mon._store.window) == 0  # nothing passed yet: nothing completed
    gates[1].open = True  # a later copy done, the first not: order is kept, so nothing completes
    nn.functional.cross_entropy(model(x), y).backward()
    mon.step()
    assert len(mon._store.window) == 0
    gates[0].open = True
    nn.functional.cross_entropy(model(x), y).backward()
    mon.step()
    assert [r.step for r in mon._store.window] == [0, 1]  # both passed: completed at this step()
    assert [r.step for r in mon.records] == [0, 1, 2, 3, 4]  # records waits for the rest, in order
    assert gates[2].waits == 1 and gates[0].waits == 0
    mon.close()
    assert [r.step for r in gs.read_jsonl(path).records] == [0, 1, 2, 3, 4]


def test_nothing_is_lost_when_training_raises(tmp_path) -> None:
    model = mlp(3, 8, nn.ReLU)
    path = tmp_path / "run.jsonl"
    gates: list[Gate] = []
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    mon = gs.Monitor(model, sync="deferred", sinks=[gs.JsonlSink(path)])
    mon._event = lambda device: gates.append(Gate()) or gates[-1]
    with pytest.raises(RuntimeError, match="data loader died"), mon:
        for step in range(4):
            nn.functional.cross_entropy(model(x), y).backward()
            mon.step()
            model.zero_grad()
            if step == 3:
                raise RuntimeError("data loader died")
    assert [r.step for r in gs.read_jsonl(path).records] == [0, 1, 2, 3]


def test_deferred_nan_is_recorded_and_raised_at_the_next_call() -> None:
    blocking = _run("blocking", 5, nan_at=4, clip=False)
    deferred = _run("deferred", 5, nan_at=4, clip=False)
    assert deferred[:4] == blocking[:4]
    b, d = blocking[4], deferred[4]
    assert math.isnan(d["global_norm"]) and math.isnan(b["global_norm"])
    assert {layer["name"]: layer["nonfinite"] for layer in b["layers"]} == {
        "0": 0,
        "2": 3,
        "4": 0,
        "6": 0,
        "8": 0,
    }
    # the gradients were freed by zero_grad() before the record completed: "at least one" is recorded
    assert {layer["name"]: layer["nonfinite"] for layer in d["layers"]} == {
        "0": 0,
        "2": 1,
        "4": 0,
        "6": 0,
        "8": 0,
    }
    for key in ("layers", "global_norm"):
        b.pop(key), d.pop(key)
    assert d == b

    torch.manual_seed(0)
    model = mlp(3, 8, nn.ReLU)
    mon = gs.Monitor(model, sync="deferred", on_nonfinite="raise")
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    nn.functional.cross_entropy(model(x), y).backward()
    model[0].weight.grad[0, 0] = math.inf
    assert mon.step() is None  # the copy is on its way
    with pytest.raises(gs.NonFiniteGradientError) as info:
        mon.step()  # completes step 0's record first
    assert info.value.step == 0
    mon.close()


def test_sync_argument_is_checked() -> None:
    with pytest.raises(ValueError, match="sync must be 'auto', 'blocking' or 'deferred', got 'later'"):
        gs.Monitor(nn.Linear(2, 2), sync="later")  # type: ignore[arg-type]


def test_auto_is_blocking_on_cpu() -> None:
    model = nn.Linear(4, 2)
    with gs.Monitor(model) as mon:
        model(torch.randn(3, 4)).sum().backward()
        assert mon.step() is not None
