"""Remedies run inside Monitor.step(): shared norms, records in rec.actions."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gradsentry.remedies import Chain, ClipGlobalNorm, ClipValue, NonFiniteGuard

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


def test_monitor_and_remedy_share_one_host_transfer_per_logged_step(monkeypatch) -> None:
    """The remedy's figures travel in the Monitor's single device→host copy."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    mon = Monitor(model, remedy=Chain(ClipGlobalNorm(0.01), ClipValue(1e-3)), activations=False)
    model(torch.randn(4, 8)).sum().backward()
    calls = {"n": 0}
    original = torch.Tensor.tolist

    def counting(self):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        return original(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    rec = mon.step()
    monkeypatch.setattr(torch.Tensor, "tolist", original)
    mon.close()
    assert calls["n"] == 1
    assert rec is not None and [a["remedy"] for a in rec.actions] == ["ClipGlobalNorm", "ClipValue"]
    assert rec.actions[0]["clipped"] and rec.actions[0]["norm_before"] == pytest.approx(
        rec.global_norm, rel=1e-6
    )
    assert rec.actions[0]["norm_after"] == pytest.approx(0.01, rel=1e-5)


def test_nonfinite_count_survives_a_guard_that_drops_the_gradients() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    mon = Monitor(model, remedy=NonFiniteGuard(model=model), activations=False)
    model(torch.randn(3, 4)).sum().backward()
    model[1].weight.grad[0, :2] = float("nan")
    rec = mon.step()
    mon.close()
    assert rec is not None and all(p.grad is None for p in model.parameters())
    assert rec.layer("1").nonfinite == 2 and rec.actions[0]["skipped"] is True
