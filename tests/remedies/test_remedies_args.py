"""Remedies handed the wrong object fail at construction with a TypeError naming it (not later, deep
inside: "cannot create weak reference to 'str' object", "'str' object has no attribute 'state'")."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradsentry as gs
from gradsentry.remedies import SpikeSkip


def _opt() -> torch.optim.Optimizer:
    return torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: gs.NonFiniteGuard("adam"),
            r"NonFiniteGuard\(optimizer=\.\.\.\) expects a torch.optim.Optimizer, got str",
        ),
        (lambda: gs.NonFiniteGuard("adam", sync=False), r"NonFiniteGuard\(optimizer=\.\.\.\) expects"),
        (
            lambda: SpikeSkip("adam"),
            r"SpikeSkip\(optimizer=\.\.\.\) expects a torch.optim.Optimizer, got str",
        ),
        (lambda: gs.ResetMoments("adam"), r"ResetMoments expects a torch.optim.Optimizer, got str"),
        (lambda: gs.Rollback(nn.Linear(2, 2), "adam", every=1), r"Rollback expects a torch.optim.Optimizer"),
        (
            lambda: gs.Rollback("model", _opt(), every=1),
            r"Rollback expects the model \(an nn.Module\), got str",
        ),
        (lambda: gs.Ladder(clip="clip"), r"Ladder\(clip=\.\.\.\) expects a remedy \(a callable\), got str"),
        (lambda: gs.Ladder(reset=gs.ClipGlobalNorm(1.0)), r"Ladder\(reset=\.\.\.\) expects a ResetMoments"),
        (lambda: gs.Monitor(nn.Linear(2, 2), remedy=3), r"Monitor\(remedy=\.\.\.\) expects a remedy"),
    ],
)
def test_wrong_objects_are_named_at_construction(make, message) -> None:
    with pytest.raises(TypeError, match=message):
        make()


def test_the_right_objects_still_pass() -> None:
    opt = _opt()
    model = nn.Linear(2, 2)
    gs.NonFiniteGuard()
    gs.NonFiniteGuard(opt, sync=False)
    SpikeSkip(None)
    gs.Ladder(gs.ClipGlobalNorm(1.0), reset=gs.ResetMoments(opt), rollback=gs.Rollback(model, opt, every=1))
