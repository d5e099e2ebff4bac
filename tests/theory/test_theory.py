"""Mean-field theory: closed forms, numerical integration, and prediction against measurement."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate
from scipy.special import expit
from sklearn.datasets import load_digits
from torch import nn

from check_targets import mlp
from gradsentry import theory


def _gauss_quad(f, q: float) -> float:
    """E[f(sqrt(q) z)], z ~ N(0, 1), by adaptive quadrature (independent of Gauss-Hermite)."""
    s = math.sqrt(q)
    val, _ = integrate.quad(
        lambda z: f(s * z) * math.exp(-z * z / 2) / math.sqrt(2 * math.pi),
        -40,
        40,
        points=[0.0],
        limit=400,
        epsabs=1e-14,
        epsrel=1e-12,
    )
    return val


def _sig(x: float) -> float:
    return float(expit(x))


@pytest.mark.parametrize("sigma_w2", [0.5, 1 / 3, 2.0, 3.0])
@pytest.mark.parametrize("sigma_b2", [0.0, 0.05])
def test_chi_relu_closed_form(sigma_w2: float, sigma_b2: float) -> None:
    assert theory.chi(nn.ReLU(), sigma_w2, sigma_b2) == pytest.approx(sigma_w2 / 2, rel=1e-12)
    assert theory.chi(torch.relu, sigma_w2, q=0.7) == pytest.approx(sigma_w2 / 2, rel=1e-12)
    # leaky ReLU: E[phi'^2] = (1 + a^2) / 2
    assert theory.chi(nn.LeakyReLU(0.1), sigma_w2, q=1.0) == pytest.approx(sigma_w2 * 1.01 / 2, rel=1e-12)


def test_relu_fixed_point_closed_form() -> None:
    # q = sigma_w^2 q / 2 + sigma_b^2  =>  q* = sigma_b^2 / (1 - sigma_w^2 / 2)
    assert theory.fixed_point(nn.ReLU(), 1 / 3, 1 / 192) == pytest.approx((1 / 192) / (1 - 1 / 6), rel=1e-9)
    assert theory.fixed_point(nn.ReLU(), 3.0, 0.1) == math.inf


def test_relu_generic_quadrature_agrees_with_closed_form() -> None:
    # A lambda is not recognised as ReLU, so this goes through Gauss-Hermite + autograd.
    _, m2, d2 = theory.moments(lambda x: torch.clamp(x, min=0), 1.7)
    assert m2 == pytest.approx(1.7 / 2, rel=1e-9)
    assert d2 == pytest.approx(0.5, abs=1e-12)


def test_tanh_at_sigma_w2_one_is_critical() -> None:
    # sigma_w^2 = 1, sigma_b = 0: q* = 0 and chi = phi'(0)^2 = 1 (the edge of chaos for tanh).
    assert theory.fixed_point(nn.Tanh(), 1.0, 0.0) == 0.0
    assert theory.chi(nn.Tanh(), 1.0, 0.0) == pytest.approx(1.0, abs=1e-12)
    assert theory.depth_scale(theory.chi(nn.Tanh(), 1.0)) > 1e10


@pytest.mark.parametrize("q", [0.01, 0.5, 1.0, 4.0, 25.0, 400.0])
def test_tanh_and_sigmoid_moments_against_scipy(q: float) -> None:
    sech2 = lambda x: 1 - math.tanh(x) ** 2  # noqa: E731
    mean, m2, d2 = theory.moments(torch.tanh, q)
    assert mean == pytest.approx(0.0, abs=1e-12)
    assert m2 == pytest.approx(_gauss_quad(lambda x: math.tanh(x) ** 2, q), rel=1e-9)
    assert d2 == pytest.approx(_gauss_quad(lambda x: sech2(x) ** 2, q), rel=1e-9)
    assert theory.chi(nn.Tanh(), 1.0, q=q) == pytest.approx(_gauss_quad(lambda x: sech2(x) ** 2, q), rel=1e-9)
    # sigmoid: non-zero mean 1/2; the second moment (not the variance) feeds the next layer
    mean, m2, d2 = theory.moments(nn.Sigmoid(), q)
    assert mean == pytest.approx(0.5, abs=1e-12)
    assert m2 == pytest.approx(_gauss_quad(lambda x: _sig(x) ** 2, q), rel=1e-9)
    d = lambda x: _sig(x) * (1 - _sig(x))  # noqa: E731
    assert d2 == pytest.approx(_gauss_quad(lambda x: d(x) ** 2, q), rel=1e-9)
    # numpy callables go through central differences
    _, m2n, d2n = theory.moments(np.tanh, q)
    assert m2n == pytest.approx(_gauss_quad(lambda x: math.tanh(x) ** 2, q), rel=1e-9)
    assert d2n == pytest.approx(_gauss_quad(lambda x: sech2(x) ** 2, q), rel=1e-6)
    # a kinked activation through the generic path (panel edge at 0): hardtanh, E[phi'^2] = P(|h| < 1)
    _, _, d2h = theory.moments(nn.Hardtanh(), q)
    assert d2h == pytest.approx(math.erf(1 / math.sqrt(2 * q)), rel=1e-9)


@pytest.mark.parametrize("q", [0.01, 0.5, 1.0])
def test_gauss_hermite_rule_for_smooth_activations(q: float) -> None:
    sech2 = lambda x: 1 - math.tanh(x) ** 2  # noqa: E731
    _, m2, d2 = theory.moments(torch.tanh, q, hermite_nodes=200)
    assert m2 == pytest.approx(_gauss_quad(lambda x: math.tanh(x) ** 2, q), rel=1e-10)
    assert d2 == pytest.approx(_gauss_quad(lambda x: sech2(x) ** 2, q), rel=1e-10)
    _, m2, _ = theory.moments(torch.sigmoid, q, hermite_nodes=200)
    assert m2 == pytest.approx(_gauss_quad(lambda x: _sig(x) ** 2, q), rel=1e-10)


def test_sigmoid_fixed_point_and_chi() -> None:
    sw2, sb2 = 1 / 3, 1 / 192
    q_star = theory.fixed_point(nn.Sigmoid(), sw2, sb2)
    # independent check: q* solves q = sigma_w^2 E[sigmoid^2] + sigma_b^2 (scipy quadrature)
    assert q_star == pytest.approx(sw2 * _gauss_quad(lambda x: _sig(x) ** 2, q_star) + sb2, rel=1e-8)
    expected_chi = sw2 * _gauss_quad(lambda x: (_sig(x) * (1 - _sig(x))) ** 2, q_star)
    assert theory.chi(nn.Sigmoid(), sw2, sb2) == pytest.approx(expected_chi, rel=1e-8)
    # PyTorch's default init with sigmoid is deep in the vanishing phase: chi ~ sigma_w^2 / 16
    assert expected_chi < 0.025


@pytest.mark.parametrize(
    ("sigma_w2", "sigma_b2", "q0"), [(0.04, 0.0, 1.0), (0.04, 0.0, 1e-4), (1.5, 0.0, 1.0), (1.0, 1e-3, 1.0)]
)
def test_fixed_point_solves_the_map(sigma_w2: float, sigma_b2: float, q0: float) -> None:
    for phi, f in ((nn.Sigmoid(), lambda x: _sig(x) ** 2), (nn.Tanh(), lambda x: math.tanh(x) ** 2)):
        q = theory.fixed_point(phi, sigma_w2, sigma_b2, q0=q0)
        if q == 0.0:  # collapse: only for tanh without bias and sigma_w^2 <= 1
            assert isinstance(phi, nn.Tanh) and sigma_b2 == 0 and sigma_w2 <= 1
            continue
        assert q == pytest.approx(sigma_w2 * _gauss_quad(f, q) + sigma_b2, rel=1e-7, abs=1e-12)


def test_depth_scale() -> None:
    assert theory.depth_scale(math.exp(-0.5)) == pytest.approx(2.0)
    assert theory.depth_scale(math.e) == pytest.approx(-1.0)
    assert theory.depth_scale(1.0) == math.inf
    assert theory.depth_scale(0.0) == 0.0


def test_moments_rejects_bad_q() -> None:
    with pytest.raises(ValueError, match="q must be a finite second moment"):
        theory.moments(torch.tanh, -1.0)


def test_predict_forward_second_moments_match_measurement_conv() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 64, 3),
        nn.Tanh(),
        nn.Conv2d(64, 64, 3, bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 10),
    )
    x = torch.randn(256, 3, 8, 8)
    pred = theory.predict(model, example_input=x)
    assert [lp.type for lp in pred.layers] == ["Conv2d", "Conv2d", "Linear"]
    assert pred.input_second_moment == pytest.approx(float(x.pow(2).mean()), rel=1e-6)
    assert pred.layers[0].fan_in == 27 and pred.layers[1].fan_in == 576 and pred.layers[1].sigma_b2 == 0.0
    h1 = model[0](x)
    h2 = model[2](model[1](h1))
    h3 = model[5](model[4](model[3](h2)))
    h1, h2, h3 = h1.detach(), h2.detach(), h3.detach()
    for lp, h in zip(pred.layers, (h1, h2, h3), strict=True):
        assert lp.q == pytest.approx(float(h.pow(2).mean()), rel=0.15)


def test_predict_not_applicable() -> None:
    class Gated(nn.Module):  # a product of two tensors: outside the rules
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.gate = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) * torch.sigmoid(self.gate(x))

    with pytest.raises(theory.TheoryNotApplicable, match="product of two tensors"):
        theory.predict(Gated())
    with pytest.raises(theory.TheoryNotApplicable, match=r"MultiheadAttention.*attention mixes positions"):
        theory.predict(nn.Sequential(nn.Linear(4, 4), nn.MultiheadAttention(4, 1)))
    with pytest.raises(theory.TheoryNotApplicable, match=r"recurrent cell shares its weights"):
        theory.predict(nn.Sequential(nn.Linear(4, 4), nn.RNNCell(4, 4)))
    with pytest.raises(theory.TheoryNotApplicable, match=r"no Linear/Conv layer"):
        theory.predict(nn.Sequential(nn.Flatten()))
    # a plain chain traced with an example input is accepted, whatever its class
    chain = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True)), nn.Linear(4, 2))
    assert len(theory.predict(chain, example_input=torch.randn(2, 4)).layers) == 2


VARIANTS = [
    ("sigmoid", "default"),
    ("tanh", "default"),
    ("relu", "default"),
    ("relu", "he"),
    ("tanh", "xavier"),
]


def _measure(activation: str, init: str, seed: int, x: torch.Tensor, y: torch.Tensor):
    torch.manual_seed(seed)
    model = mlp(activation, init)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    pre: list[torch.Tensor] = []

    def keep(_m: nn.Module, _i: tuple, out: torch.Tensor) -> None:
        out.retain_grad()
        pre.append(out)

    handles = [lin.register_forward_hook(keep) for lin in linears]
    nn.functional.cross_entropy(model(x), y).backward()
    for h in handles:
        h.remove()
    delta = [float(p.grad.double().pow(2).mean().sqrt()) for p in pre]
    wgrad = [float(lin.weight.grad.double().pow(2).mean().sqrt()) for lin in linears]
    pred = theory.predict(model, input_second_moment=float(x.double().pow(2).mean()))
    first, last = 0, len(linears) - 2  # first and last hidden layers
    return (
        math.log10(delta[first] / delta[last]),
        math.log10(pred.backward_ratio(first, last)),
        math.log10(wgrad[first] / wgrad[last]),
        math.log10(pred.layers[first].weight_grad_rms / pred.layers[last].weight_grad_rms),
    )


@pytest.mark.parametrize(("activation", "init"), VARIANTS)
def test_prediction_matches_measured_backward_signal(activation: str, init: str) -> None:
    digits = load_digits()
    x = torch.tensor(digits.data[:64] / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target[:64])
    runs = np.array([_measure(activation, init, seed, x, y) for seed in range(5)])
    meas, pred, wmeas, wpred = runs.mean(axis=0)  # means of log10 = log10 of geometric means
    # backward signal dL/dh: the bound (measured: <= 0.16 decades on every variant)
    assert abs(pred - meas) <= 0.5, (activation, init, pred, meas)
    # weight gradients also carry the activations' norms and the sample correlations (measured <= 0.32)
    assert abs(wpred - wmeas) <= 0.5, (activation, init, wpred, wmeas)
