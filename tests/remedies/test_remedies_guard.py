"""NonFiniteGuard and ResetMoments: skipped steps leave weights and optimizer state bit-identical."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gradsentry.remedies import Chain, ClipGlobalNorm, NonFiniteGuard, ResetMoments


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def _backward(model, seed, nan=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 4, generator=g)
    loss = model(x).pow(2).mean()
    loss.backward()
    if nan:
        model[2].weight.grad[0, 0] = float("nan")
    return loss


def _same_state(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b, strict=True))
    return a == b


OPTIMIZERS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, weight_decay=0.1),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS), ids=list(OPTIMIZERS))
def test_guard_skip_leaves_weights_and_state_bit_identical(name):
    model = _model()
    opt = OPTIMIZERS[name](model.parameters())
    guard = NonFiniteGuard(model=model)
    for step in range(3):  # build optimizer state first
        _backward(model, step)
        assert not guard(model.parameters()).skip
        opt.step()
        opt.zero_grad()
    weights, state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _backward(model, 10, nan=True)
    res = guard(model.parameters())
    assert res.skip and all(p.grad is None for p in model.parameters())
    opt.step()  # the caller may still call step(): it is a no-op
    assert _same_state(weights, model.state_dict()) and _same_state(state, opt.state_dict())
    d = res.to_dict()
    assert d["layers"] == ["2"] and d["skipped"] is True and guard.skips == 1
    _backward(model, 11)
    assert not guard(model.parameters()).skip and guard.consecutive == 0
    opt.step()
    assert not _same_state(weights, model.state_dict())  # training goes on


def test_guard_without_guard_nan_poisons_weights():
    """The failure the guard prevents: clip_grad_norm_ passes a NaN norm through to every weight."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _backward(model, 0, nan=True)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    assert all(torch.isnan(p).all() for p in model.parameters())


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_sync_free_guard_with_fused_optimizer(kind, monkeypatch):
    model = _model()
    if kind == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, fused=True)
    guard = NonFiniteGuard(opt, sync=False)
    _backward(model, 0)
    guard(model.parameters())
    opt.step()
    opt.zero_grad()
    weights, state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _backward(model, 1, nan=True)
    calls = []
    for meth in ("item", "tolist", "__bool__"):
        orig = getattr(torch.Tensor, meth)

        def spy(self, *a, _orig=orig, _m=meth, **k):
            calls.append(_m)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, meth, spy)
    res = guard(model.parameters())
    opt.step()
    monkeypatch.undo()
    assert calls == []  # no device->host copy on the step
    assert res.skip  # reading the flag afterwards is fine
    assert _same_state(weights, model.state_dict()) and _same_state(state, opt.state_dict())
    opt.zero_grad()
    _backward(model, 2)
    guard(model.parameters())
    opt.step()
    assert not _same_state(weights, model.state_dict()) and guard.skips == 1


def test_sync_free_needs_the_optimizer():
    with pytest.raises(ValueError, match="sync=False needs the optimizer"):
        NonFiniteGuard(sync=False)
    with pytest.raises(ValueError, match="backoff_after needs optimizer"):
        NonFiniteGuard(backoff_after=2)


def test_guard_lr_backoff_after_consecutive_skips():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.4)
    guard = NonFiniteGuard(opt, backoff_after=2, lr_factor=0.5)
    lrs = []
    for step, nan in enumerate([True, True, False, True, True, True, True]):
        opt.zero_grad()
        _backward(model, step, nan=nan)
        res = guard(model.parameters())
        assert res.skip == nan
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == [0.4, 0.2, 0.2, 0.2, 0.1, 0.1, 0.05]
    assert guard.skips == 6 and guard.backoffs == 3 and guard.consecutive == 4


def test_guard_beside_grad_scaler_does_not_double_count():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    guard = NonFiniteGuard(opt, scaler=scaler)
    skipped_by_scaler = 0
    for step, nan in enumerate([False, True, False]):
        opt.zero_grad()
        g = torch.Generator().manual_seed(step)
        loss = model(torch.randn(8, 4, generator=g)).pow(2).mean()
        scaler.scale(loss).backward()
        if nan:
            model[0].weight.grad[0, 0] = float("inf")
        scaler.unscale_(opt)
        res = guard(model.parameters())
        assert res.skip == nan
        assert all(p.grad is not None for p in model.parameters())  # the scaler must still see the inf
        scale = scaler.get_scale()
        weights = copy.deepcopy(model.state_dict())
        scaler.step(opt)
        scaler.update()
        if nan:
            skipped_by_scaler += 1
            assert scaler.get_scale() == scale / 2  # the scaler saw the overflow and backed off
            assert _same_state(weights, model.state_dict())
            assert res.to_dict()["by"] == "GradScaler"
    assert guard.scaler_skips == skipped_by_scaler == 1
    assert guard.skips == 0  # not counted twice
    assert guard.state_dict() == {"skips": 0, "scaler_skips": 1, "consecutive": 0, "backoffs": 0}


def test_guard_skips_on_nonfinite_loss_and_chain_stops():
    model = _model()
    _backward(model, 0)
    clip = ClipGlobalNorm(1e-3)
    before = [p.grad.clone() for p in model.parameters()]
    res = Chain(NonFiniteGuard(), clip)(model.parameters(), loss=torch.tensor(float("nan")))
    assert res.skip and len(res.children) == 1  # the clipper never ran
    assert all(p.grad is None for p in model.parameters())
    for p, b in zip(model.parameters(), before, strict=True):
        p.grad = b
    res = Chain(NonFiniteGuard(), clip)(model.parameters(), loss=1.0)
    assert not res.skip and [c.name for c in res.children] == ["NonFiniteGuard", "ClipGlobalNorm"]
    assert [d["remedy"] for d in res.to_dicts()] == ["NonFiniteGuard", "ClipGlobalNorm"]
    assert sum(p.grad.double().pow(2).sum() for p in model.parameters()).sqrt().item() <= 1e-3 * (1 + 1e-6)


@pytest.mark.parametrize("name", ["adamw", "sgd-momentum"])
def test_reset_moments_only_affected_params(name):
    model = _model()
    opt = OPTIMIZERS[name](model.parameters())
    for step in range(2):
        opt.zero_grad()
        _backward(model, step)
        opt.step()
    opt.zero_grad()
    _backward(model, 5, nan=True)
    other = {id(p): copy.deepcopy(opt.state[p]) for p in model.parameters()}
    rm = ResetMoments(opt, model=model)
    res = rm(model.parameters())
    hit = model[2].weight
    assert hit not in opt.state or len(opt.state[hit]) == 0
    for p in model.parameters():
        if p is not hit:
            assert _same_state(other[id(p)], opt.state[p])
    d = res.to_dict()
    assert d["layers"] == ["2"] and d["reset"] == 1 and rm.resets == 1
    # Next finite step: the reset parameter restarts like a fresh one.
    fresh = copy.deepcopy(hit.detach())
    opt.zero_grad()
    _backward(model, 6)
    g = hit.grad.clone()
    opt.step()
    if name == "adamw":  # first Adam step moves each entry by lr·sign(g) (plus decay)
        expected = fresh * (1 - 1e-2 * 0.1) - 1e-2 * g / (g.abs() + 1e-8)
    else:  # SGD momentum restarts from the gradient: buf = g + wd·w
        expected = fresh - 1e-2 * (g + 0.1 * fresh)
    torch.testing.assert_close(hit.detach(), expected, rtol=1e-5, atol=1e-6)


def test_reset_moments_spike_threshold():
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    _backward(model, 0)
    opt.step()
    model[0].weight.grad.mul_(1e6)
    res = ResetMoments(opt, max_norm=1e3, model=model)(model.parameters())
    assert res.to_dict()["layers"] == ["0"] and model[0].weight not in opt.state


def test_guard_protects_bf16_training():
    model = _model().to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard = NonFiniteGuard()
    x = torch.randn(4, 4, dtype=torch.bfloat16)
    model(x).float().pow(2).mean().backward()
    guard(model.parameters())
    opt.step()
    weights, state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    model(x).float().pow(2).mean().backward()
    model[0].bias.grad[2] = float("-inf")
    assert guard(model.parameters()).skip
    opt.step()
    assert _same_state(weights, model.state_dict()) and _same_state(state, opt.state_dict())


def test_remedies_satisfy_protocol_and_guard_names_without_model():
    from gradsentry.remedies import AGC, AutoClip, ClipLayerNorm, ClipValue, Ladder, Remedy, Rollback, ZClip

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    remedies = [
        ClipGlobalNorm(1.0),
        ClipValue(1.0),
        ClipLayerNorm(1.0),
        AGC(),
        AutoClip(),
        ZClip(),
        Chain(),
        NonFiniteGuard(),
        ResetMoments(opt),
        Rollback(model, opt),
        Ladder(),
    ]
    assert all(isinstance(r, Remedy) for r in remedies)
    _backward(model, 0, nan=True)
    res = NonFiniteGuard()(model.parameters())
    assert res.to_dict()["layers"] == ["param[2]"]  # index among the parameters that have a gradient
