"""Skipping a step on the device (remedies/skipstep.py) through NonFiniteGuard(sync=False).

For every torch.optim family: a skipped step leaves weights and optimizer state bit for bit as they
were, an unskipped step equals the plain optimizer's step bit for bit, and neither the guard nor the
hooks add a host copy (aten._local_scalar_dense, .tolist, .numpy) to what the optimizer does alone.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gradsentry.remedies import Chain, ClipGlobalNorm, DeviceSkip, NonFiniteGuard, SpikeSkip, device_skip
from host_syncs import HostSyncs

OPTIMIZERS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adamw-foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=True),
    "adamw-forloop": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=False),
    "adamw-amsgrad": lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=True),
    "adamw-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
    "adam-fused": lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, weight_decay=0.1),
    "sgd-nesterov-fused": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True, fused=True),
    "adagrad-fused": lambda ps: torch.optim.Adagrad(ps, lr=1e-2, fused=True),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-2),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.5, centered=True),
    "adamax": lambda ps: torch.optim.Adamax(ps, lr=1e-2),
    "nadam": lambda ps: torch.optim.NAdam(ps, lr=1e-2, weight_decay=0.01),
    "radam": lambda ps: torch.optim.RAdam(ps, lr=1e-2),
    "adadelta": lambda ps: torch.optim.Adadelta(ps),
}
FUSED = {"adamw-fused", "adam-fused", "sgd-nesterov-fused", "adagrad-fused"}


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def _backward(model, seed, nan=False):
    g = torch.Generator().manual_seed(seed)
    loss = model(torch.randn(16, 4, generator=g)).pow(2).mean()
    loss.backward()
    if nan:
        model[2].weight.grad[0, 0] = float("nan")
    return loss


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _syncs_of_bare_step(name, model, opt):
    """Host copies the optimizer makes on its own for one step (non-capturable Adam reads its CPU step
    counter with .item(): a host read, not a device sync on a GPU)."""
    ref = _model()
    ref.load_state_dict(model.state_dict())
    ref_opt = OPTIMIZERS[name](ref.parameters())
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict may share tensors
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        q.grad = None if p.grad is None else p.grad.clone()
    with HostSyncs() as s:
        ref_opt.step()
    return s.count, ref, ref_opt


@pytest.mark.parametrize("name", list(OPTIMIZERS), ids=list(OPTIMIZERS))
def test_device_skip_is_bitwise_and_sync_free(name):
    model = _model()
    opt = OPTIMIZERS[name](model.parameters())
    guard = NonFiniteGuard(opt, sync=False, model=model)
    assert device_skip(opt).mode == ("found_inf" if name in FUSED else "restore")
    for step in range(3):  # build optimizer state first (the first step takes the host path)
        opt.zero_grad()
        _backward(model, step)
        guard(model.parameters())
        opt.step()
    weights, state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    # a bad step: nothing changes, and no host copy beyond the optimizer's own
    opt.zero_grad()
    _backward(model, 10, nan=True)
    bare, _, _ = _syncs_of_bare_step(name, model, opt)
    with HostSyncs() as s:
        res = guard(model.parameters())
        assert s.count == 0  # the guard itself: none
        opt.step()
    assert s.count == bare, s.calls
    assert _same(weights, model.state_dict()) and _same(state, opt.state_dict())
    assert device_skip(opt).last_way == device_skip(opt).mode
    assert not hasattr(opt, "found_inf")  # the flag never outlives its step
    d = res.to_dict()
    assert d["skipped"] is True and d["layers"] == ["2"] and d["by"] == device_skip(opt).mode
    assert guard.skips == 1
    # a good step equals the plain optimizer's step, bit for bit
    opt.zero_grad()
    _backward(model, 11)
    bare, ref, ref_opt = _syncs_of_bare_step(name, model, opt)
    with HostSyncs() as s:
        res = guard(model.parameters())
        opt.step()
    assert s.count == bare and res.skip is False
    assert _same(ref.state_dict(), model.state_dict()) and _same(ref_opt.state_dict(), opt.state_dict())
    assert not _same(weights, model.state_dict())


@pytest.mark.parametrize("name", ["adamw-foreach", "sgd-nesterov-fused", "adamw-fused"])
def test_first_step_takes_the_one_host_sync(name):
    """No optimizer state yet: the step would create it, which no device flag can undo (and fused SGD
    would keep an uninitialised momentum buffer), so the flag is read on the host once."""
    model = _model()
    opt = OPTIMIZERS[name](model.parameters())
    guard = NonFiniteGuard(opt, sync=False)
    weights = copy.deepcopy(model.state_dict())
    _backward(model, 0, nan=True)
    guard(model.parameters())
    with HostSyncs() as s:
        opt.step()
    assert s.count == 1 and device_skip(opt).last_way == "host" and device_skip(opt).host_syncs == 1
    assert _same(weights, model.state_dict()) and len(opt.state) == 0
    # the next good step is the plain optimizer's first step
    opt.zero_grad()
    _backward(model, 1)
    ref = _model()
    ref_opt = OPTIMIZERS[name](ref.parameters())
    _backward(ref, 1)
    guard(model.parameters())
    opt.step()
    ref_opt.step()
    assert _same(ref.state_dict(), model.state_dict()) and _same(ref_opt.state_dict(), opt.state_dict())


def test_flags_of_a_chain_combine_and_a_stale_flag_is_replaced():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    guard = NonFiniteGuard(opt, sync=False)
    spike = SpikeSkip(opt, window=2, watch="loss")
    fix = Chain(guard, spike, ClipGlobalNorm(1.0))
    _backward(model, 0)
    fix(model.parameters(), loss=1.0)
    opt.step()  # the host path (no state yet), not skipped
    for step, loss in enumerate([1.0, 1.1, 1.0]):
        opt.zero_grad()
        _backward(model, step + 1)
        fix(model.parameters(), loss=loss)
        opt.step()
    weights = copy.deepcopy(model.state_dict())
    opt.zero_grad()
    _backward(model, 9)
    res = fix(model.parameters(), loss=50.0)  # only the spike remedy fires
    opt.step()
    assert [d["skipped"] for d in res.to_dicts()] == [False, True, False]
    assert _same(weights, model.state_dict())
    # the caller skipped calling step() after a flagged call: the next call replaces the stale flag
    opt.zero_grad()
    _backward(model, 10, nan=True)
    assert fix(model.parameters(), loss=1.0).skip
    opt.zero_grad()
    _backward(model, 11)
    assert not fix(model.parameters(), loss=1.0).skip
    opt.step()
    assert not _same(weights, model.state_dict())


def test_grad_scaler_flag_is_combined_with_ours():
    """GradScaler sets optimizer.found_inf before a fused step; a spike skip must still skip, the
    scaler keeps its scale (no overflow) and deletes its own attribute afterwards."""
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    spike = SpikeSkip(opt, window=3, watch="loss")
    for step in range(5):
        opt.zero_grad()
        loss = model(torch.randn(8, 4, generator=torch.Generator().manual_seed(step))).pow(2).mean()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        value = 100.0 if step == 4 else 1.0 + 0.01 * step
        weights = copy.deepcopy(model.state_dict())
        res = spike(model.parameters(), loss=value)
        scaler.step(opt)
        scaler.update()
        assert not hasattr(opt, "found_inf") and not hasattr(opt, "grad_scale")
    assert res.skip and _same(weights, model.state_dict()) and scaler.get_scale() == 2.0**8


def test_device_skip_repr_and_one_per_optimizer():
    opt = torch.optim.SGD(_model().parameters(), lr=0.1)
    assert device_skip(opt) is device_skip(opt)
    assert isinstance(device_skip(opt), DeviceSkip) and "restore" in repr(device_skip(opt))
