"""SpikeSkip: the rule against a float64 numpy reference, warm-up, spikes kept out of the window,
no host copy, state_dict, composition with clipping and the Monitor's records."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from gradsentry.remedies import Chain, ClipGlobalNorm, SpikeSkip
from host_syncs import HostSyncs


def _reference(losses, norms, *, k, window, warmup, min_std):
    """Independent float64 transcription of the documented rule: x > mean + k*max(std_ddof0, min_std)
    over the last `window` values of the steps not skipped, once `warmup` of them are in; NaN/inf
    skips; a skipped step's values enter neither window."""
    wins: tuple[list[float], list[float]] = ([], [])
    out = []
    for x_pair in zip(losses, norms, strict=True):
        skip, thresholds = False, []
        for x, win in zip(x_pair, wins, strict=True):
            a = np.array(win[-window:], dtype=np.float64)
            thr = a.mean() + k * max(a.std(), min_std) if len(a) >= warmup else math.inf
            thresholds.append(thr)
            if not np.isfinite(x) or x > thr:
                skip = True
        if not skip:
            for x, win in zip(x_pair, wins, strict=True):
                win.append(x)
        out.append((skip, thresholds))
    last = [np.array(w[-window:], dtype=np.float64) for w in wins]
    return out, [(a.mean(), a.std(), len(a)) for a in last]


def _series(n=90, seed=0):
    rng = np.random.default_rng(seed)
    losses = 3.0 * np.exp(-np.arange(n) / 60) + 0.05 * rng.standard_normal(n)
    norms = 1.0 + 0.1 * rng.standard_normal(n)
    losses[5] = 40.0  # during the warm-up: must not fire
    norms[30] = 9.0
    losses[31] = 9.0
    norms[50] = float("nan")
    norms[51:54] = [4.0, 4.0, 4.0]  # consecutive spikes: the band must not widen after the first
    losses[min(70, n - 1)] = float("inf")
    return losses, norms


@pytest.mark.parametrize(("window", "warmup", "k"), [(16, 16, 3.0), (10, 4, 2.5)])
def test_decisions_and_statistics_equal_float64_reference(window, warmup, k):
    losses, norms = _series()
    spike = SpikeSkip(k=k, window=window, warmup=warmup)
    p = nn.Parameter(torch.zeros(3))
    p.grad = torch.ones(3)
    got = []
    for loss, norm in zip(losses, norms, strict=True):
        res = spike([p], norms=torch.tensor([norm], dtype=torch.float64), loss=float(loss))
        d = res.to_dict()
        got.append((d["skipped"], [d["loss_threshold"], d["threshold"]]))
    want, stats = _reference(losses, norms, k=k, window=window, warmup=warmup, min_std=1e-6)
    assert [g[0] for g in got] == [w[0] for w in want]
    assert (
        got[5][0] == (warmup <= 5)
        and got[30][0]
        and got[31][0]
        and got[50][0]
        and all(g[0] for g in got[51:54])
    )
    for (_, g_thr), (_, w_thr) in zip(got, want, strict=True):
        np.testing.assert_allclose(g_thr, w_thr, rtol=1e-12)  # both float64: rounding-level agreement
    seen = spike.statistics()
    for name, (mean, std, n) in zip(("loss", "norm"), stats, strict=True):
        assert seen[name][2] == n
        np.testing.assert_allclose(seen[name][:2], (mean, std), rtol=1e-12, atol=1e-15)
    assert spike.skips == sum(w[0] for w in want)


def test_warmup_and_validation():
    spike = SpikeSkip(window=4, watch="loss")
    p = nn.Parameter(torch.zeros(2))
    p.grad = torch.ones(2)
    values = (1.0, 1.1, 50.0, 0.9, 1.0, 1000.0, 1.05, 1000.0)  # 50 comes during the warm-up: kept
    assert [spike([p], loss=v).skip for v in values] == [False] * 5 + [True, False, True]
    assert spike.statistics()["loss"][2] == 4 and spike.skips == 2
    for bad in ({"window": 1}, {"warmup": 1}, {"window": 4, "warmup": 5}, {"k": 0}, {"watch": "lr"}):
        with pytest.raises(ValueError):
            SpikeSkip(**bad)  # type: ignore[arg-type]
    assert SpikeSkip(watch="loss")([p]).skipped is False  # nothing to watch without a loss


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def _backward(model, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    loss = model(torch.randn(16, 4, generator=g) * scale).pow(2).mean()
    loss.backward()
    return loss


@pytest.mark.parametrize("fused", [False, True])
def test_skips_on_device_without_host_copy_and_composes_with_clipping(fused):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=fused)
    fix = Chain(SpikeSkip(opt, window=8), ClipGlobalNorm(0.5))
    for step in range(10):
        opt.zero_grad()
        loss = _backward(model, step)
        fix(model.parameters(), loss=loss)
        opt.step()
    ref = _model()
    ref.load_state_dict(model.state_dict())
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1, fused=fused)
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    weights, state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    loss = _backward(model, 99, scale=100.0)  # a spike of both loss and norm
    with HostSyncs() as s:
        res = fix(model.parameters(), loss=loss)
    assert s.count == 0
    opt.step()
    assert res.skip and torch.is_tensor(res.children[0].skipped)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert state["state"][0]["exp_avg"].equal(opt.state_dict()["state"][0]["exp_avg"])
    actions = res.to_dicts()
    assert [a["remedy"] for a in actions] == ["SpikeSkip", "ClipGlobalNorm"]
    assert actions[0]["skipped"] and actions[0]["norm_before"] > actions[0]["threshold"]
    assert actions[0]["by"] == ("found_inf" if fused else "restore")
    # a good step equals clip_grad_norm_ + the plain optimizer
    opt.zero_grad()
    good = _backward(model, 100)
    _backward(ref, 100)
    assert not fix(model.parameters(), loss=good).skip
    opt.step()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
    ref_opt.step()
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)


def test_state_dict_round_trip_continues_identically():
    losses, norms = _series(60, seed=3)
    a, b = SpikeSkip(window=12, k=3.0), SpikeSkip(window=12, k=3.0)
    p = nn.Parameter(torch.zeros(1))
    p.grad = torch.ones(1)

    def call(s, i):
        return s([p], norms=torch.tensor([norms[i]], dtype=torch.float64), loss=float(losses[i])).to_dict()

    for i in range(35):
        call(a, i)
    state = a.state_dict()
    assert len(state["norm"]) == 12 and state["skips"] == a.skips
    b.load_state_dict(state)
    for i in range(35, 60):
        assert repr(call(a, i)) == repr(call(b, i))  # bit for bit (NaN included)
    assert a.state_dict() == b.state_dict()
    with pytest.raises(ValueError, match="not a SpikeSkip state dict"):
        b.load_state_dict({"loss": []})


def test_in_monitor_records():
    Monitor = pytest.importorskip("gradsentry.monitor").Monitor
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    with Monitor(model, every=1, remedy=SpikeSkip(opt, window=4, watch="loss"), activations=False) as mon:
        for step, value in enumerate([1.0, 1.1, 0.9, 1.0, 1.05, 30.0]):
            opt.zero_grad()
            _backward(model, step)
            rec = mon.step(loss=value)
            opt.step()
    assert rec is not None
    (action,) = rec.actions
    assert action["remedy"] == "SpikeSkip" and action["skipped"] is True and action["loss"] == 30.0


def test_monitor_counts_a_device_skipped_unlogged_step_once():
    """A chain's device flag ORs its children's: a skipped unlogged step is counted once, not once per
    flag in the tree (monitor/remedy_link.py)."""
    from gradsentry.remedies import NonFiniteGuard

    Monitor = pytest.importorskip("gradsentry.monitor").Monitor
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    fix = Chain(NonFiniteGuard(opt, sync=False), SpikeSkip(opt, window=4, watch="loss"), ClipGlobalNorm(1.0))
    with Monitor(model, every=10, remedy=fix, activations=False) as mon:
        for step in range(11):
            opt.zero_grad()
            _backward(model, step)
            if step in (3, 7):
                model[0].weight.grad[0, 0] = float("nan")
            mon.step(loss=1.0)
            opt.step()
    rec = mon.records[-1]
    assert rec.step == 10
    (note,) = [a for a in rec.actions if "skipped_unlogged" in a]
    assert note["skipped_unlogged"] == 2
