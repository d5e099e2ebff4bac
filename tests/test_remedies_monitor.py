"""Remedies run inside Monitor.step(): shared norms, records in rec.actions."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gradsentry.remedies import Chain, ClipGlobalNorm, NonFiniteGuard

Monitor = pytest.importorskip("gradsentry.monitor").Monitor


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def test_monitor_clips_with_shared_norms_like_clip_grad_norm():
    model = _model()
    ref = copy.deepcopy(model)
    x = torch.randn(16, 4) * 10
    for m in (model, ref):
        m(x).pow(2).sum().backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
    with Monitor(model, every=1, remedy=ClipGlobalNorm(0.5), activations=False) as mon:
        rec = mon.step(loss=1.0)
    assert rec is not None
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)
    (action,) = rec.actions
    assert action["remedy"] == "ClipGlobalNorm" and action["clipped"] is True
    assert action["norm_before"] == pytest.approx(rec.global_norm, rel=1e-6)  # pre-clip figures


def test_monitor_with_guard_skips_and_names_layer():
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with Monitor(
        model, every=1, remedy=Chain(NonFiniteGuard(model=model), ClipGlobalNorm(1.0)), activations=False
    ) as mon:
        model(torch.randn(8, 4)).pow(2).mean().backward()
        model[0].weight.grad[1, 1] = float("nan")
        weights = copy.deepcopy(model.state_dict())
        rec = mon.step()
        opt.step()
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert (
        rec is not None and rec.actions[0]["remedy"] == "NonFiniteGuard" and rec.actions[0]["layers"] == ["0"]
    )
