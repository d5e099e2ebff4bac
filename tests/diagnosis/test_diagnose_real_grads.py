"""Diagnosis on real PyTorch gradients, recorded by hand in float64 (no Monitor), on small MLPs.

These check the premises behind the default thresholds: a deep sigmoid MLP at PyTorch's default init has a
first/last gradient RMS ratio far below 1e-6, a He-initialised deep ReLU MLP stays near O(0.1..1), and a
1e4-scaled loss at one step is one spike.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from gradsentry.diagnose import diagnose
from gradsentry.records import LayerStats, StepRecord

WIDTH = 32


def mlp(depth: int, act: type[nn.Module]) -> nn.Sequential:
    mods: list[nn.Module] = []
    for _ in range(depth - 1):
        mods += [nn.Linear(WIDTH, WIDTH), act()]
    mods.append(nn.Linear(WIDTH, 1))
    return nn.Sequential(*mods)


def he_init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)


def train_records(
    model: nn.Sequential,
    steps: int,
    make_opt: Callable[[nn.Module], torch.optim.Optimizer],
    scale_at: int | None = None,
) -> list[StepRecord]:
    """Train on random regression data; record per-layer gradient norms in float64 before each step."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, WIDTH, generator=gen), torch.randn(256, 1, generator=gen)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    opt = make_opt(model)
    out = []
    for s in range(steps):
        idx = torch.randint(0, 256, (32,), generator=gen)
        loss = nn.functional.mse_loss(model(x[idx]), y[idx])
        if s == scale_at:
            loss = loss * 1e4
        opt.zero_grad()
        loss.backward()
        layers = []
        for depth, lin in enumerate(linears):
            g = torch.cat(
                [p.grad.detach().double().flatten() for p in lin.parameters() if p.grad is not None]
            )
            norm = float(g.norm())
            layers.append(
                LayerStats(
                    f"{depth}",
                    depth,
                    g.numel(),
                    norm,
                    norm / math.sqrt(g.numel()),
                    float(g.abs().max()),
                    0,
                    1.0,
                )
            )
        total = math.sqrt(sum(la.grad_norm**2 for la in layers))
        out.append(StepRecord(step=s, global_norm=total, layers=layers, loss=float(loss.detach())))
        opt.step()
    return out


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=1e-2)


def adam(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=1e-3)


def test_deep_sigmoid_mlp_at_default_init_is_vanishing() -> None:
    torch.manual_seed(0)
    recs = train_records(mlp(20, nn.Sigmoid), 4, sgd)
    (f,) = diagnose(recs)
    assert (f.kind, f.severity) == ("vanishing", "error")
    ratio = recs[0].layers[0].grad_rms / recs[0].layers[-1].grad_rms
    assert ratio < 1e-6
    assert f.evidence["first_last_rms_ratio_first_step"] == pytest.approx(ratio, rel=1e-12)
    assert f.layers[0] in {"0", "1", "2"}


def test_deep_relu_mlp_with_he_init_is_healthy() -> None:
    torch.manual_seed(0)
    model = mlp(20, nn.ReLU)
    he_init(model)
    recs = train_records(model, 15, lambda m: torch.optim.SGD(m.parameters(), lr=1e-3))
    ratios = [r.layers[0].grad_rms / r.layers[-1].grad_rms for r in recs]
    assert min(ratios) > 1e-2  # premise: far from the 1e-3 limit
    assert diagnose(recs) == []


def test_healthy_3_layer_mlp_is_silent() -> None:
    torch.manual_seed(0)
    assert diagnose(train_records(mlp(3, nn.ReLU), 60, sgd)) == []


def test_loss_scaled_1e4_at_one_step_with_adam_is_one_spike() -> None:
    # Adam normalises the update, so the run continues normally after the scaled step (with SGD the 1e4x
    # gradient is applied and the run diverges to NaN within a few steps, which diagnose also reports).
    torch.manual_seed(0)
    recs = train_records(mlp(3, nn.ReLU), 60, adam, scale_at=40)
    (f,) = diagnose(recs)
    assert (f.kind, f.severity, f.steps) == ("exploding", "warning", [40])  # the loss recovered
    assert f.evidence["first_ratio"] > 1e3
