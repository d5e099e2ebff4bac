"""Ladder escalation scripted step by step, with every counter checked."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gradsentry.remedies import ClipGlobalNorm, Ladder, ResetMoments, Rollback


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return model, opt


def _step(model, opt, ladder, step, bad):
    opt.zero_grad()
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g)
    loss = (model(x) - y).pow(2).mean()
    loss.backward()
    if bad:
        model[2].weight.grad[0, 1] = float("nan")
    res = ladder(model.parameters(), loss=loss)
    opt.step()
    return res


# (bad?, expected rungs of this step, counts after the step, consecutive after the step)
SCRIPT = [
    (False, ["ClipGlobalNorm"], {"clip": 1, "skip": 0, "reset_moments": 0, "rollback": 0}, 0),
    (False, ["ClipGlobalNorm"], {"clip": 2, "skip": 0, "reset_moments": 0, "rollback": 0}, 0),
    (True, ["skip"], {"clip": 2, "skip": 1, "reset_moments": 0, "rollback": 0}, 1),
    (True, ["skip", "reset_moments"], {"clip": 2, "skip": 2, "reset_moments": 1, "rollback": 0}, 2),
    (True, ["reset_moments", "rollback"], {"clip": 2, "skip": 2, "reset_moments": 2, "rollback": 1}, 0),
    (False, ["ClipGlobalNorm"], {"clip": 3, "skip": 2, "reset_moments": 2, "rollback": 1}, 0),
    (True, ["skip"], {"clip": 3, "skip": 3, "reset_moments": 2, "rollback": 1}, 1),
    (False, ["ClipGlobalNorm"], {"clip": 4, "skip": 3, "reset_moments": 2, "rollback": 1}, 0),
]


def test_ladder_escalation_sequence():
    model, opt = _setup()
    rb = Rollback(model, opt, every=2, max_retries=5)
    ladder = Ladder(
        ClipGlobalNorm(0.5),
        reset=ResetMoments(opt),
        rollback=rb,
        reset_after=2,
        rollback_after=3,
        model=model,
    )
    snapshot0 = None
    for step, (bad, rungs, counts, consecutive) in enumerate(SCRIPT):
        if step == 0:
            snapshot0 = copy.deepcopy(model.state_dict())
        weights = copy.deepcopy(model.state_dict())
        res = _step(model, opt, ladder, step, bad)
        actions = res.to_dicts()
        got = [a.get("rung", a["remedy"]) for a in actions]
        assert got == rungs, f"step {step}"
        assert ladder.counts == counts, f"step {step}"
        assert ladder.consecutive == consecutive, f"step {step}"
        assert res.skip == bad
        if bad and "rollback" not in rungs:  # skipped: weights untouched
            assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
        for a in actions:
            if a.get("rung") in ("skip", "reset_moments", "rollback"):
                assert a["layers"] == ["2"] and a["step"] == step
        if "rollback" in rungs:
            rollback = next(a for a in actions if a.get("rung") == "rollback")
            assert rollback["restored_step"] == 0 and rollback["lr"] == [5e-3]
            assert all(torch.equal(snapshot0[k], v) for k, v in model.state_dict().items())
        if "reset_moments" in rungs:
            assert model[2].weight not in opt.state
    assert [a["rung"] for a in ladder.log] == [
        "skip",
        "skip",
        "reset_moments",
        "reset_moments",
        "rollback",
        "skip",
    ]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_ladder_loss_spike_goes_straight_to_rollback():
    model, opt = _setup()
    rb = Rollback(model, opt, every=1, min_history=3, loss_factor=4.0)
    ladder = Ladder(None, rollback=rb)
    for step in range(4):
        _step(model, opt, ladder, step, bad=False)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    res = ladder(model.parameters(), loss=1e6)
    (a,) = res.to_dicts()
    assert a["rung"] == "rollback" and a["reason"] == "loss_spike" and res.skip
    assert ladder.counts["rollback"] == 1 and ladder.counts["clip"] == 0
    with pytest.raises(ValueError, match="reset_after and rollback_after must be >= 1"):
        Ladder(reset_after=0)


def test_ladder_without_optional_rungs_only_skips():
    model, opt = _setup()
    ladder = Ladder()
    res = _step(model, opt, ladder, 0, bad=True)
    assert res.skip and ladder.counts == {"clip": 0, "skip": 1, "reset_moments": 0, "rollback": 0}
    res = _step(model, opt, ladder, 1, bad=False)
    assert not res.skip and res.to_dicts() == []
