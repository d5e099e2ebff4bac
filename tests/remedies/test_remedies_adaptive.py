"""AutoClip and ZClip against plain-Python reference implementations of the papers' rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from gradsentry.remedies import AutoClip, ClipGlobalNorm, ZClip


def _param(norm: float, n: int = 4) -> nn.Parameter:
    p = nn.Parameter(torch.zeros(n))
    p.grad = torch.full((n,), norm / math.sqrt(n))  # global L2 norm == norm
    return p


def _norms(seed: int, steps: int) -> list[float]:
    rng = np.random.default_rng(seed)
    xs = list(rng.lognormal(0.0, 0.3, size=steps))
    for i in (30, 31, 45, 70):  # spikes
        if i < steps:
            xs[i] *= 25.0
    return [float(x) for x in xs]


def _clipped_norm(p: nn.Parameter) -> float:
    return p.grad.double().norm().item()


def test_autoclip_matches_numpy_percentile_then_ring_buffer():
    ac = AutoClip(percentile=10, history=20)
    seen: list[float] = []
    for x in _norms(1, 60):
        p = _param(x)
        res = ac([p])
        seen.append(x)
        thr = float(np.percentile(np.array(seen[-20:]), 10))
        assert float(res.threshold) == pytest.approx(thr, rel=1e-6)
        expected = x * min(thr / (x + 1e-6), 1.0)
        assert _clipped_norm(p) == pytest.approx(expected, rel=1e-5)
    # bounded memory: the buffer never grows past `history`
    assert ac.buffer is not None and ac.buffer.numel() == 20 and ac.count == 60


def test_autoclip_ignores_nonfinite_and_state_round_trip():
    ac = AutoClip(percentile=50, history=5)
    for x in (1.0, 2.0, 3.0):
        ac([_param(x)])
    bad = _param(1.0)
    bad.grad[0] = float("nan")
    res = ac([bad])
    assert math.isnan(res.to_dict()["norm_before"]) and not res.to_dict()["clipped"]
    assert float(res.threshold) == pytest.approx(2.0)  # the NaN did not enter the statistics
    state = ac.state_dict()
    other = AutoClip(percentile=50, history=5)
    other.load_state_dict(state)
    assert other.state_dict()["history"][:3] == [1.0, 2.0, 3.0]
    r1, r2 = ac([_param(10.0)]), other([_param(10.0)])
    assert float(r1.threshold) == float(r2.threshold)
    with pytest.raises(ValueError, match="percentile must be in"):
        AutoClip(percentile=120)
    with pytest.raises(ValueError, match="not an AutoClip state dict"):
        other.load_state_dict({"count": 1})


class _RefZClip:
    """Plain-float transcription of the ZClip rule (Kumar et al. 2025, zscore + adaptive_scaling), with
    the reference implementation's warm-up: the raw norms fill the buffer, the gradient is clipped to
    ``max_grad_norm`` (default 1.0) until the statistics exist."""

    def __init__(self, alpha=0.97, z=2.5, warmup=25, eps=1e-6, max_grad_norm=1.0):
        self.alpha, self.z_thresh, self.warmup, self.eps = alpha, z, warmup, eps
        self.max_grad_norm = max_grad_norm
        self.buf: list[float] = []
        self.mean = self.var = None

    def step(self, g: float) -> float:
        """Returns the clipped global norm."""
        if self.mean is None:
            self.buf.append(g)
            if len(self.buf) >= self.warmup:
                self.mean = sum(self.buf) / len(self.buf)
                self.var = sum((x - self.mean) ** 2 for x in self.buf) / len(self.buf)
            cap = self.max_grad_norm
            return g * cap / (g + 1e-6) if cap is not None and g > cap else g
        std = self.var**0.5
        z = (g - self.mean) / (std + self.eps)
        clip = None
        if z > self.z_thresh:
            clip = self.mean + self.z_thresh * std / (z / self.z_thresh)
        out = g * clip / (g + 1e-6) if clip is not None and g > clip else g
        x = clip if clip is not None else g
        self.mean = self.alpha * self.mean + (1 - self.alpha) * x
        self.var = self.alpha * self.var + (1 - self.alpha) * (x - self.mean) ** 2
        return out


def test_zclip_matches_reference_rule_step_by_step():
    z, ref = ZClip(warmup_steps=25), _RefZClip()
    spikes = warm_clipped = 0
    for i, x in enumerate(_norms(2, 80)):
        p = _param(x)
        res = z([p])
        expected = ref.step(x)
        assert _clipped_norm(p) == pytest.approx(expected, rel=1e-5)
        d = res.to_dict()
        if i < 25:  # warm-up: clipped to 1.0 whenever the norm is above it
            assert d["clipped"] is (x > 1.0) and not d["spike"]
            warm_clipped += d["clipped"]
        else:  # after warm-up no cap: clipping happens exactly on spikes
            assert d["spike"] is d["clipped"]
            spikes += d["clipped"]
    assert warm_clipped >= 5  # log-normal(0, 0.3) norms: about half are above 1
    assert spikes >= 3  # the injected spikes at 30, 31, 45, 70 (31 may be absorbed)
    assert z.state_dict()["mean"] == pytest.approx(ref.mean, rel=1e-5)
    assert z.state_dict()["var"] == pytest.approx(ref.var, rel=1e-4)


def test_zclip_without_warmup_cap_matches_the_purely_adaptive_rule():
    z, ref = ZClip(warmup_steps=10, max_grad_norm=None), _RefZClip(warmup=10, max_grad_norm=None)
    for x in _norms(4, 40):
        p = _param(x * 7.0)
        z([p])
        assert _clipped_norm(p) == pytest.approx(ref.step(x * 7.0), rel=1e-5)


def test_zclip_cap_after_warmup_is_a_ceiling():
    z = ZClip(warmup_steps=3, max_grad_norm=2.0, cap_after_warmup=True)
    for x in (1.0, 1.1, 0.9, 3.0, 3.1, 3.0):  # 3.0 is a spike at first, then just above the ceiling
        p = _param(x)
        z([p])
        assert _clipped_norm(p) <= 2.0 * (1 + 1e-6)
    free = ZClip(warmup_steps=3, max_grad_norm=2.0)
    for x in (1.0, 1.1, 0.9):
        free([_param(x)])
    p = _param(2.5)  # z = (2.5 - 1) / 0.08 ~ 18: a spike, clipped adaptively (not to the cap)
    free([p])
    assert _clipped_norm(p) < 2.0


class _TanhRNN(nn.Module):
    """A vanilla tanh RNN (Pascanu et al. 2013) on the adding problem, recurrent weights with spectral
    radius ~2 (std 2/sqrt(h)): the regime where the gradient explodes."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.rnn = nn.RNN(2, hidden, nonlinearity="tanh", batch_first=True)
        self.out = nn.Linear(hidden, 1)
        with torch.no_grad():
            self.rnn.weight_hh_l0.normal_(0.0, 2.0 / math.sqrt(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.rnn(x)[0][:, -1])  # type: ignore[no-any-return]


def _adding_batch(gen: torch.Generator, n: int = 32, length: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Hochreiter & Schmidhuber's adding problem: sum the two marked values of a random sequence."""
    values = torch.rand(n, length, generator=gen)
    marks = torch.zeros(n, length)
    rows = torch.arange(n)
    marks[rows, torch.randint(0, length // 2, (n,), generator=gen)] = 1.0
    marks[rows, torch.randint(length // 2, length, (n,), generator=gen)] = 1.0
    return torch.stack([values, marks], -1), (values * marks).sum(1, keepdim=True)


def _first_nonfinite_step(remedy, steps: int = 40, lr: float = 0.2, seed: int = 0) -> int | None:
    torch.manual_seed(seed)
    net = _TanhRNN()
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x, y = _adding_batch(gen)
        loss = nn.functional.mse_loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        if not math.isfinite(float(loss.detach())) or not all(
            torch.isfinite(p.grad).all() for p in net.parameters()
        ):
            return step
        if remedy is not None:
            remedy(net.parameters())
        opt.step()
    return None


@pytest.mark.parametrize("seed", [0, 1])
def test_zclip_defaults_protect_the_warmup_of_pascanus_tanh_rnn(seed: int) -> None:
    # unclipped (and with the old uncapped warm-up) the run overflows inside ZClip's 25 warm-up steps
    bad = _first_nonfinite_step(None, seed=seed)
    assert bad is not None and bad < 25
    assert _first_nonfinite_step(ZClip(max_grad_norm=None), seed=seed) == bad
    # ZClip() caps the warm-up at 1.0 like the reference, and global-norm clipping (Pascanu et al.)
    # keeps it finite
    assert _first_nonfinite_step(ZClip(), seed=seed) is None
    assert _first_nonfinite_step(ClipGlobalNorm(1.0), seed=seed) is None


def test_zclip_state_round_trip_is_exact():
    z = ZClip(warmup_steps=5)
    for x in _norms(3, 12):
        z([_param(x)])
    state = z.state_dict()
    assert all(isinstance(state[k], float) for k in ("mean", "var")) and state["count"] == 12
    z2 = ZClip(warmup_steps=5)
    z2.load_state_dict(state)
    assert z2.state_dict() == state
    for x in (1.0, 40.0, 1.2):
        p1, p2 = _param(x), _param(x)
        z([p1]), z2([p2])
        assert torch.equal(p1.grad, p2.grad)
    assert z.state_dict() == z2.state_dict()
    # mid-warm-up state too
    w = ZClip(warmup_steps=5)
    w([_param(1.0)]), w([_param(2.0)])
    w2 = ZClip(warmup_steps=5)
    w2.load_state_dict(w.state_dict())
    for x in (3.0, 4.0, 5.0, 50.0):
        w([_param(x)]), w2([_param(x)])
    assert w.state_dict() == w2.state_dict() and w.initialized
    with pytest.raises(ValueError, match="not a ZClip state dict"):
        w2.load_state_dict({"mean": 1.0})


def test_zclip_nonfinite_and_cap_and_options():
    z = ZClip(warmup_steps=3, max_grad_norm=2.0)
    p = _param(5.0)
    z([p])  # warm-up clips to the cap
    assert _clipped_norm(p) == pytest.approx(2.0 * 5.0 / (5.0 + 1e-6), rel=1e-6)
    for x in (1.0, 1.1):
        z([_param(x)])
    before = z.state_dict()
    bad = _param(1.0)
    bad.grad[1] = float("inf")
    res = z([bad])
    assert not res.to_dict()["clipped"] and z.state_dict()["mean"] == before["mean"]
    mean_mode = ZClip(warmup_steps=3, clip_option="mean")
    for x in (1.0, 1.1, 0.9):
        mean_mode([_param(x)])
    p = _param(50.0)
    mean_mode([p])
    assert _clipped_norm(p) == pytest.approx(1.0 * 50.0 / (50.0 + 1e-6), rel=1e-5)
    with pytest.raises(ValueError, match="alpha must be in"):
        ZClip(alpha=1.5)
    with pytest.raises(ValueError, match="mode must be"):
        ZClip(mode="other")  # type: ignore[arg-type]


def test_adaptive_clippers_never_create_nan_on_zero_grads():
    for remedy in (AutoClip(history=4), ZClip(warmup_steps=2)):
        for _ in range(6):
            p = _param(0.0)
            remedy([p])
            assert torch.isfinite(p.grad).all() and torch.equal(p.grad, torch.zeros(4))
