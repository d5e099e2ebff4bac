"""Wrong numbers the hostile tester found, each checked against an independent computation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradsentry as gs

pytestmark = pytest.mark.faults


def test_update_ratio_divides_by_the_weights_before_the_update() -> None:
    """An SGD update 2,500x the weights reads ~2500 (it read 1.0: divided by the weights after it)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4, bias=False))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    w = model[0].weight
    with gs.Monitor(model, optimizer=opt, activations=False) as mon:
        for _ in range(2):
            model(torch.randn(2, 4)).sum().backward()
            mon.step()
            before = w.detach().double().clone()
            w.grad = -2500.0 * w.detach().clone()  # SGD(lr=1): w <- w + 2500 w
            opt.step()
            opt.zero_grad()
            after = w.detach().double().clone()
        model(torch.randn(2, 4)).sum().backward()
        rec = mon.step()
    assert rec is not None
    want = ((after - before).norm() / before.norm()).item()
    assert want == pytest.approx(2500.0, rel=1e-6)
    assert rec.layers[0].update_ratio == pytest.approx(want, rel=1e-5)
    findings = mon.diagnose()
    upd = [f for f in findings if f.evidence.get("pattern") == "update_ratio"]
    assert upd and upd[0].evidence["max_update_ratio"] == pytest.approx(want, rel=1e-5)
