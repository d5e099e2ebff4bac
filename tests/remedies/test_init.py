"""He/Xavier re-init with per-layer gains, and LSUV."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from check_targets import mlp
from gradsentry.remedies.init import layers_with_activations, lsuv, reinit


def _digits(n: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    d = load_digits()
    return torch.tensor(d.data[:n] / 16.0, dtype=torch.float32), torch.tensor(d.target[:n])


def _outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    outs: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_hook(lambda _m, _i, o, n=n: outs.setdefault(n, o.detach()))
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return outs


@pytest.mark.parametrize(
    ("activation", "scheme", "gain"),
    [
        ("relu", "he", math.sqrt(2)),
        ("tanh", "xavier_gain", 5 / 3),
        ("relu", "xavier_gain", math.sqrt(2)),
        ("sigmoid", "he", 1.0),
        ("tanh", "he", 5 / 3),
    ],
)
def test_reinit_gain_follows_activation(activation: str, scheme: str, gain: float) -> None:
    torch.manual_seed(0)
    model = mlp(activation, depth=4, width=256)
    report = reinit(model, scheme)  # type: ignore[arg-type]
    assert [r.name for r in report] == ["0", "2", "4", "6", "8"]
    assert [r.gain for r in report[:-1]] == pytest.approx([gain] * 4)
    assert report[-1].nonlinearity == "linear" and report[-1].gain == 1.0
    hidden = model[2].weight.detach()
    fan_in, fan_out = hidden.shape[1], hidden.shape[0]
    expected = gain / math.sqrt(fan_in) if scheme == "he" else gain * math.sqrt(2 / (fan_in + fan_out))
    assert report[1].std == pytest.approx(expected)
    # 65536 normal draws: the sample std is within 2 % of the target
    assert float(hidden.std()) == pytest.approx(expected, rel=0.02)
    assert float(hidden.mean()) == pytest.approx(0.0, abs=0.01 * expected)
    assert all(float(m.bias.detach().abs().max()) == 0.0 for m in model if isinstance(m, nn.Linear))


def test_reinit_leaky_relu_and_norm_in_between() -> None:
    model = nn.Sequential(
        nn.Linear(8, 8), nn.BatchNorm1d(8), nn.LeakyReLU(0.2), nn.Linear(8, 4), nn.Dropout(0.1)
    )
    report = reinit(model, "he")
    assert report[0].nonlinearity == "leaky_relu"
    assert report[0].gain == pytest.approx(math.sqrt(2 / (1 + 0.2**2)))
    assert report[1].nonlinearity == "linear"


class _OutOfOrder(nn.Module):
    """Registers the activation before the layers: registration order differs from forward order."""

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.Tanh()
        self.fc1 = nn.Linear(16, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # type: ignore[no-any-return]


def test_forward_order_needs_example_input() -> None:
    model = _OutOfOrder()
    by_registration = layers_with_activations(model)
    assert [(n, a) for n, _, a in by_registration] == [("fc1", None), ("fc2", None)]
    traced = layers_with_activations(model, torch.randn(2, 16))
    assert traced[0][0] == "fc1" and isinstance(traced[0][2], nn.Tanh) and traced[1][2] is None
    assert reinit(model, "xavier_gain", example_input=torch.randn(2, 16))[0].gain == pytest.approx(5 / 3)


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "relu"])
def test_xavier_is_glorots_normalized_init_whatever_the_activation(activation: str) -> None:
    # Glorot & Bengio 2010, eq. 16: W ~ U[-sqrt(6)/sqrt(n_j + n_j+1), +sqrt(6)/sqrt(n_j + n_j+1)], no gain
    torch.manual_seed(0)
    model = mlp(activation, depth=3, width=512)
    report = reinit(model, "xavier")
    assert [r.gain for r in report] == [1.0] * 4
    for m in (m for m in model if isinstance(m, nn.Linear)):
        w = m.weight.detach().double()
        fan_out, fan_in = w.shape
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        assert float(w.abs().max()) <= bound
        assert float(w.abs().max()) > 0.99 * bound  # uniform: the draws reach the bound
        # variance 2 / (fan_in + fan_out); 4-sigma tolerance of a sample variance of n uniform draws
        n = w.numel()
        var = 2.0 / (fan_in + fan_out)
        assert float(w.var()) == pytest.approx(var, abs=4 * var * math.sqrt(0.8 / n))
        # uniform, not normal: excess kurtosis -1.2 (normal: 0)
        k = float(((w - w.mean()) ** 4).mean() / w.var() ** 2) - 3.0
        assert k == pytest.approx(-1.2, abs=0.1)


def test_xavier_reproduces_he_et_al_xavier_baseline_on_relu() -> None:
    # He et al. 2015, sec. 2.2: with n Var[w] = 1 (their "Xavier") a ReLU layer halves the forward
    # second moment, so 30 square layers shrink it by 2^-30 (~9e-10); He init keeps it (eq. 10)
    torch.manual_seed(0)
    width, depth = 512, 30
    model = nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(width, width), nn.ReLU())])
    reinit(model, "xavier")
    model = model.double()
    x = torch.randn(256, width, dtype=torch.float64)
    with torch.no_grad():
        h = model(x)
    ratio = float(h.pow(2).mean() / x.pow(2).mean()) * 2  # E[relu(z)^2] = q/2 at the last layer
    assert math.log10(ratio) == pytest.approx(math.log10(2.0**-29), abs=0.5)
    reinit(model, "he")
    with torch.no_grad():
        h = model(x)
    assert math.log10(float(h.pow(2).mean() / x.pow(2).mean())) == pytest.approx(0.0, abs=0.5)


def test_reinit_rejects_unknown_scheme() -> None:
    with pytest.raises(ValueError, match="unknown init scheme 'kaiming'"):
        reinit(mlp(depth=2), "kaiming")  # type: ignore[arg-type]


@pytest.mark.parametrize("center", [True, False])
def test_lsuv_unit_output_variance_on_sigmoid_mlp(center: bool) -> None:
    torch.manual_seed(0)
    x, y = _digits()
    model = mlp("sigmoid")
    report = lsuv(model, x, tol=0.1, center=center)
    assert report.converged and len(report.layers) == 21
    assert report.layers[0].var_start != pytest.approx(1.0, abs=0.1)  # it had something to do
    for name, out in _outputs(model, x).items():  # independent recomputation on the batch
        assert abs(float(out.double().var()) - 1.0) <= 0.1, name
        if center:
            assert float(out.double().mean(0).abs().max()) < 1e-3, name
    # the orthonormal start survives the rescaling: W W^T = c I
    w = model[2].weight.detach().double()
    gram = w @ w.T
    assert torch.allclose(
        gram, gram[0, 0] * torch.eye(64, dtype=torch.float64), atol=1e-5 * float(gram[0, 0])
    )
    # gradient profile: centering is what fixes the sigmoid MLP (see lsuv's docstring)
    nn.functional.cross_entropy(model(x), y).backward()
    rms = [float(m.weight.grad.pow(2).mean().sqrt()) for m in model if isinstance(m, nn.Linear)]
    ratio = rms[0] / rms[-1]
    assert (ratio > 1e-2) if center else (ratio < 1e-5), ratio


def test_lsuv_conv_and_iterations() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 6 * 6, 10),
    )
    x = torch.rand(32, 3, 8, 8) * 5
    report = lsuv(model, x, tol=0.05, max_iter=10)
    assert [lay.type for lay in report.layers] == ["Conv2d", "Conv2d", "Linear"]
    assert report.converged and all(1 <= lay.iterations <= 10 for lay in report.layers)
    for name, out in _outputs(model, x).items():
        assert abs(float(out.double().var()) - 1.0) <= 0.05, name


def test_lsuv_reports_non_convergence_and_bad_arguments() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.zeros(8, 4)  # zero input: zero output variance, nothing to rescale
    report = lsuv(model, x)
    assert not report.converged and report.layers[0].var_final == 0.0
    with pytest.raises(ValueError, match="need tol > 0"):
        lsuv(model, x, tol=0.0)
    with pytest.raises(ValueError, match="no Linear/Conv layer"):
        lsuv(nn.Sequential(nn.ReLU()), x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lsuv_on_half_precision_weights(dtype: torch.dtype) -> None:
    """The orthonormal start failed on fp16/bf16 weights: CPU has no half-precision QR ("geqrf_cpu")."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)).to(dtype)
    x = torch.randn(64, 16).to(dtype)
    report = lsuv(model, x, tol=0.1)
    assert report.converged and model[0].weight.dtype == dtype
    w = model[0].weight.detach().double()
    gram = w @ w.T  # still orthogonal rows, to half precision
    assert torch.allclose(
        gram, gram[0, 0] * torch.eye(16, dtype=torch.float64), atol=0.05 * float(gram[0, 0])
    )


def test_reinit_conv_uses_receptive_field_fan_in() -> None:
    model = nn.Sequential(nn.Conv2d(8, 64, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64 * 4 * 4, 10))
    report = reinit(model, "he", example_input=torch.randn(2, 8, 6, 6))
    assert [(r.type, r.nonlinearity) for r in report] == [("Conv2d", "relu"), ("Linear", "linear")]
    expected = math.sqrt(2) / math.sqrt(8 * 3 * 3)  # fan_in = in_channels x kernel area
    assert report[0].std == pytest.approx(expected)
    assert float(model[0].weight.detach().std()) == pytest.approx(expected, rel=0.03)  # 4608 draws
