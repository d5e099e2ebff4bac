"""Fixed-threshold clippers against torch's own functions and float64 recomputations."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gradsentry.remedies import (
    AGC,
    ClipGlobalNorm,
    ClipLayerNorm,
    ClipValue,
    NonFiniteGradientError,
    RemedyResult,
)


def _params(shapes, seed=0, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    ps = []
    for shape in shapes:
        p = nn.Parameter(torch.randn(shape, generator=g, dtype=dtype))
        p.grad = (torch.randn(shape, generator=g) * scale).to(dtype)
        ps.append(p)
    return ps


def _clone(ps):
    out = []
    for p in ps:
        q = nn.Parameter(p.detach().clone())
        q.grad = None if p.grad is None else p.grad.clone()
        out.append(q)
    return out


SHAPES = [(8, 4), (8,), (3, 2, 3, 3), (5,)]


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf], ids=["l2", "l1", "inf"])
@pytest.mark.parametrize("max_norm", [0.5, 1e6], ids=["clips", "no-op"])
def test_clip_global_norm_equals_torch_bit_for_bit(norm_type, max_norm):
    ps = _params(SHAPES, scale=3.0)
    ref = _clone(ps)
    res = ClipGlobalNorm(max_norm, norm_type=norm_type)(ps)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm, norm_type=norm_type, foreach=True)
    assert torch.equal(res.norm_before, ref_norm)
    for p, q in zip(ps, ref, strict=True):
        assert torch.equal(p.grad, q.grad)
    assert res.to_dict()["clipped"] == (max_norm < float(ref_norm))


def test_clip_global_norm_uses_given_norms_and_float64_oracle():
    ps = _params(SHAPES, scale=3.0)
    flat = torch.cat([p.grad.double().reshape(-1) for p in ps])
    expected = flat.norm().item()
    norms = torch.stack([p.grad.norm() for p in ps])
    res = ClipGlobalNorm(1.0)(ps, norms=norms)
    assert float(res.norm_before) == pytest.approx(expected, rel=1e-6)
    after = torch.cat([p.grad.double().reshape(-1) for p in ps]).norm().item()
    assert after == pytest.approx(1.0 * expected / (expected + 1e-6), rel=1e-6)
    assert res.to_dict()["norm_after"] == pytest.approx(after, rel=1e-6)
    # next_norms lets the next remedy in a chain skip its norm pass.
    torch.testing.assert_close(
        res.next_norms(norms), torch.stack([p.grad.norm() for p in ps]), rtol=1e-5, atol=1e-7
    )


def test_clip_global_norm_edge_cases():
    zero = _params([(4, 4), (4,)])
    for p in zero:
        p.grad.zero_()
    res = ClipGlobalNorm(1.0)(zero)
    assert float(res.norm_before) == 0.0 and not res.to_dict()["clipped"]
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in zero)  # no 0/0
    # None gradients are ignored, as in torch.
    ps = _params([(4, 4), (4,), (3,)], scale=10.0)
    ps[1].grad = None
    ref = _clone(ps)
    ClipGlobalNorm(1.0)(ps)
    torch.nn.utils.clip_grad_norm_(ref, 1.0)
    assert (
        ps[1].grad is None and torch.equal(ps[0].grad, ref[0].grad) and torch.equal(ps[2].grad, ref[2].grad)
    )
    # No gradient at all.
    empty = ClipGlobalNorm(1.0)([nn.Parameter(torch.ones(2))])
    assert empty.to_dict()["norm_before"] == 0.0 and not empty.skip
    # A single huge layer dominates: everything is scaled by the same factor.
    ps = _params([(4, 4), (4,)])
    ps[0].grad.mul_(1e20)
    before = [p.grad.double().clone() for p in ps]
    res = ClipGlobalNorm(1.0)(ps)
    coef = 1.0 / (float(res.norm_before) + 1e-6)
    for p, b in zip(ps, before, strict=True):
        torch.testing.assert_close(p.grad.double(), (b * coef).to(p.dtype).double(), rtol=1e-6, atol=0)


def test_clip_global_norm_mixed_dtypes_float64_oracle():
    ps = _params([(6, 5), (6,)], scale=2.0) + _params([(7, 3)], seed=1, dtype=torch.float16, scale=2.0)
    ps += _params([(4, 4)], seed=2, dtype=torch.bfloat16, scale=2.0)
    before = [p.grad.double().clone() for p in ps]
    expected = torch.cat([b.reshape(-1) for b in before]).norm().item()
    res = ClipGlobalNorm(1.0)(ps)
    assert float(res.norm_before) == pytest.approx(expected, rel=1e-5)
    coef = 1.0 / (expected + 1e-6)
    for p, b in zip(ps, before, strict=True):
        tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[p.dtype]
        torch.testing.assert_close(p.grad.double(), b * coef, rtol=tol, atol=1e-6)
        assert p.grad.dtype == p.dtype


def test_fp16_norm_above_fp16_range_does_not_overflow():
    p = nn.Parameter(torch.zeros(4, dtype=torch.float16))
    p.grad = torch.full((4,), 60000.0, dtype=torch.float16)  # ||g|| = 120000 > 65504
    res = ClipGlobalNorm(1.0)([p])
    assert float(res.norm_before) == pytest.approx(120000.0, rel=1e-3)
    assert torch.isfinite(p.grad).all() and p.grad.float().norm().item() == pytest.approx(1.0, rel=2e-3)


def test_clip_global_norm_nonfinite_options():
    ps = _params([(3, 3)])
    ps[0].grad[0, 0] = float("nan")
    with pytest.raises(NonFiniteGradientError, match=r"global gradient norm .* is nan"):
        ClipGlobalNorm(1.0, error_if_nonfinite=True)(ps)
    res = ClipGlobalNorm(1.0, skip_nonfinite=True)(ps)
    assert res.skip and ps[0].grad is None and res.to_dict()["remedy"] == "ClipGlobalNorm"
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        ClipGlobalNorm(0.0)
    with pytest.raises(ValueError, match="not both"):
        ClipGlobalNorm(1.0, error_if_nonfinite=True, skip_nonfinite=True)
    with pytest.raises(TypeError, match=r"pass model\.parameters"):
        ClipGlobalNorm(1.0)([nn.Linear(2, 2)])


def test_clip_value_equals_torch():
    ps = _params(SHAPES, scale=3.0) + _params([(5, 5)], seed=3, dtype=torch.float16, scale=3.0)
    ref = _clone(ps)
    res = ClipValue(0.7)(ps)
    torch.nn.utils.clip_grad_value_(ref, 0.7)
    for p, q in zip(ps, ref, strict=True):
        assert torch.equal(p.grad, q.grad)
    assert res.to_dict()["clipped"]
    assert not ClipValue(100.0)(ps).to_dict()["clipped"]
    with pytest.raises(ValueError, match="limit must be > 0"):
        ClipValue(-1)


def test_clip_layer_norm_groups_by_module_float64_oracle():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    model[2].weight.grad.mul_(100.0)
    layers = {"0": [model[0].weight, model[0].bias], "2": [model[2].weight, model[2].bias]}
    before = {k: [p.grad.double().clone() for p in v] for k, v in layers.items()}
    res = ClipLayerNorm(1.0, layers=model)(model.parameters())
    for name, grads in before.items():
        n = torch.cat([b.reshape(-1) for b in grads]).norm().item()
        coef = min(1.0 / (n + 1e-6), 1.0)
        for p, b in zip(layers[name], grads, strict=True):
            torch.testing.assert_close(p.grad.double(), b * coef, rtol=1e-6, atol=1e-9)
    d = res.to_dict()
    assert d["layers"] == ["0", "2"] or d["layers"] == ["2"] or d["layers"] == ["0"]
    n0 = torch.cat([b.reshape(-1) for b in before["0"]]).norm().item()
    assert ("0" in d["layers"]) == (n0 > 1.0) and "2" in d["layers"]


def test_clip_layer_norm_mapping_and_per_tensor_default():
    ps = _params([(4, 4), (4,)], scale=5.0)
    before = [p.grad.double().clone() for p in ps]
    res = ClipLayerNorm(1.0)(ps)  # no model: one group per tensor
    for p, b in zip(ps, before, strict=True):
        torch.testing.assert_close(p.grad.double(), b / (b.norm() + 1e-6), rtol=1e-6, atol=1e-9)
    assert res.to_dict()["layers"] == ["param[0]", "param[1]"]
    with pytest.raises(ValueError, match="listed in two layers"):
        ClipLayerNorm(1.0, layers={"a": [ps[0]], "b": [ps[0]]})
    with pytest.raises(TypeError, match="layers must be a module"):
        ClipLayerNorm(1.0, layers=[ps[0]])  # type: ignore[arg-type]


def _agc_oracle(p, g, clip, eps):
    """Brock et al. 2021, eq. 3, with the NFNet reference's units: output rows of a weight, the whole
    tensor for a bias, a gain or a scalar (float64)."""
    w, g = p.double(), g.double()
    if w.ndim <= 1:
        wn, gn = w.norm(), g.norm()
    else:
        dims = tuple(range(1, w.ndim))
        wn, gn = w.pow(2).sum(dim=dims, keepdim=True).sqrt(), g.pow(2).sum(dim=dims, keepdim=True).sqrt()
    mx = wn.clamp_min(eps) * clip
    return torch.where(gn > mx, g * mx / gn, g)


def test_agc_equals_float64_oracle_and_excludes_classifier():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 5), nn.Linear(5, 2))
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    with torch.no_grad():
        model[0].bias.zero_()  # zero-initialised unit: eps floor matters
    expected = {id(p): _agc_oracle(p.detach(), p.grad, 0.05, 1e-3) for p in model.parameters()}
    kept = [p.grad.clone() for p in model[3].parameters()]
    res = AGC(0.05, exclude=model[3], model=model)(model.parameters())
    for p in list(model[0].parameters()) + list(model[2].parameters()):
        torch.testing.assert_close(p.grad.double(), expected[id(p)], rtol=1e-5, atol=1e-9)
    for p, k in zip(model[3].parameters(), kept, strict=True):
        assert torch.equal(p.grad, k)
    assert res.to_dict()["clipped"]
    assert set(res.to_dict()["layers"]) <= {"0", "2"} and res.to_dict()["layers"]  # never the classifier


def _timm_style_agc(parameters, clip_factor=0.01, eps=1e-3):
    """An independent transcription of timm's ``adaptive_clip_grad`` (timm/utils/agc.py), element by
    element in Python floats: unit = output row for ndim > 1, the whole tensor for ndim <= 1."""
    out = []
    for p in parameters:
        w = p.detach().double().reshape(p.shape[0], -1) if p.ndim > 1 else p.detach().double().reshape(1, -1)
        g = p.grad.double().reshape(w.shape)
        rows = []
        for wr, gr in zip(w.tolist(), g.tolist(), strict=True):
            wn = math.sqrt(math.fsum(v * v for v in wr))
            gn = math.sqrt(math.fsum(v * v for v in gr))
            max_norm = max(wn, eps) * clip_factor
            scale = max_norm / max(gn, 1e-6) if gn > max_norm else 1.0
            rows.append([v * scale for v in gr])
        out.append(torch.tensor(rows, dtype=torch.float64).reshape(p.shape))
    return out


def test_agc_clips_a_bias_vector_as_one_unit_like_the_reference():
    # a normalizer-free block: Conv (4-D), its bias (1-D), a Linear and its bias, a scalar gain
    torch.manual_seed(0)
    conv, lin = nn.Conv2d(3, 8, 3), nn.Linear(16, 4)
    gain = nn.Parameter(torch.tensor(0.5))
    params = [conv.weight, conv.bias, lin.weight, lin.bias, gain]
    g = torch.Generator().manual_seed(1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 0.05
    expected = _timm_style_agc(params, clip_factor=0.02)
    elementwise_bias = lin.bias.grad.double() * torch.minimum(
        torch.ones(()), 0.02 * lin.bias.detach().double().abs().clamp_min(1e-3) / lin.bias.grad.double().abs()
    )
    AGC(0.02)(params)
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad.double(), e, rtol=1e-5, atol=1e-9)
    # the whole bias vector is scaled by one factor: its direction is kept
    b_before = expected[3] / expected[3].norm()
    torch.testing.assert_close(
        lin.bias.grad.double() / lin.bias.grad.double().norm(), b_before, rtol=1e-5, atol=0
    )
    # the old per-entry rule gives a different gradient (it changes the bias gradient's direction)
    assert float((lin.bias.grad.double() - elementwise_bias).norm() / elementwise_bias.norm()) > 0.1
    # every unit ends within the bound
    assert float(lin.bias.grad.norm()) <= 0.02 * float(lin.bias.detach().norm()) * (1 + 1e-6)


def test_agc_all_zero_grads_and_none():
    ps = _params([(3, 3), (3,)])
    for p in ps:
        p.grad.zero_()
    ps.append(nn.Parameter(torch.ones(2)))
    AGC()(ps)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in ps[:2]) and ps[2].grad is None
    with pytest.raises(TypeError, match="exclude takes modules or parameters"):
        AGC(exclude=["fc"])  # type: ignore[list-item]


def test_result_to_dict_is_plain_data():
    ps = _params(SHAPES, scale=3.0)
    d = ClipGlobalNorm(0.1)(ps).to_dict()
    assert set(d) >= {"remedy", "norm_before", "norm_after", "clipped", "skipped", "threshold", "layers"}
    assert all(isinstance(d[k], float) for k in ("norm_before", "norm_after", "threshold"))
    assert d["clipped"] is True and d["skipped"] is False
    assert RemedyResult("X", norm_before=float("nan")).to_dict()["norm_before"] != 0.0


# ---- hypothesis properties ------------------------------------------------------------------
_shape = st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple)
_case = st.tuples(
    st.lists(_shape, min_size=1, max_size=4),
    st.integers(0, 2**16),
    st.floats(1e-3, 1e3),
    st.floats(1e-4, 10.0),
)


@settings(max_examples=50, deadline=None)
@given(_case)
def test_property_global_norm_bounded_and_direction_kept(case):
    shapes, seed, scale, max_norm = case
    ps = _params(shapes, seed=seed, scale=scale)
    before = [p.grad.double().clone() for p in ps]
    ClipGlobalNorm(max_norm)(ps)
    after = torch.cat([p.grad.double().reshape(-1) for p in ps]).norm().item()
    assert after <= max_norm * (1 + 1e-6)
    for p, b in zip(ps, before, strict=True):
        assert torch.isfinite(p.grad).all()
        c = float((p.grad.double() * b).sum() / (b.norm() ** 2)) if b.norm() > 0 else 1.0
        torch.testing.assert_close(p.grad.double(), b * c, rtol=1e-5, atol=1e-12)  # same direction
        assert 0.0 < c <= 1.0 + 1e-6


@settings(max_examples=50, deadline=None)
@given(_case)
def test_property_agc_unit_ratio_bounded(case):
    shapes, seed, scale, clip = case
    clip = min(clip, 1.0)
    ps = _params(shapes, seed=seed, scale=scale)
    AGC(clip, eps=1e-3)(ps)
    for p in ps:
        w, g = p.detach().double(), p.grad.double()
        if w.ndim <= 1:
            ratio = g.norm() / w.norm().clamp_min(1e-3)
        else:
            dims = tuple(range(1, w.ndim))
            ratio = g.pow(2).sum(dim=dims).sqrt() / w.pow(2).sum(dim=dims).sqrt().clamp_min(1e-3)
        assert (ratio <= clip * (1 + 1e-6)).all()


@settings(max_examples=50, deadline=None)
@given(_case)
def test_property_no_clipper_creates_nan(case):
    shapes, seed, scale, limit = case
    from gradsentry.remedies import AutoClip, NonFiniteGuard, ZClip

    remedies = [ClipGlobalNorm(limit), ClipValue(limit), ClipLayerNorm(limit), AGC(min(limit, 1.0))]
    remedies += [AutoClip(history=3), ZClip(warmup_steps=2), NonFiniteGuard()]
    for remedy in remedies:
        for rep in range(4):  # adaptive clippers get past their warm-up
            ps = _params(shapes, seed=seed + rep, scale=scale * (1 + 10 * rep))
            ps[0].grad.zero_()
            res = remedy(ps)
            assert not res.skip
            assert all(torch.isfinite(p.grad).all() for p in ps)


def test_clippers_never_copy_to_host(monkeypatch):
    """No .item()/.tolist()/bool()/float() on a tensor during a call: nothing forces a device sync."""
    from gradsentry.remedies import AutoClip, ZClip

    remedies = [
        ClipGlobalNorm(1.0),
        ClipValue(0.1),
        ClipLayerNorm(1.0),
        AGC(),
        AutoClip(history=8),
        ZClip(warmup_steps=2),
    ]
    calls: list[str] = []
    for meth in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy"):
        orig = getattr(torch.Tensor, meth)

        def spy(self, *a, _orig=orig, _m=meth, **k):
            calls.append(_m)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, meth, spy)
    for step in range(4):
        for remedy in remedies:
            ps = _params(SHAPES, seed=step, scale=3.0)
            remedy(ps, norms=torch.stack([p.grad.norm() for p in ps]) if step % 2 else None)
    monkeypatch.undo()
    assert calls == []


def test_layer_norm_and_agc_mixed_dtypes_float64_oracle():
    ps = _params([(4, 3)], scale=5.0) + _params([(4, 3)], seed=1, dtype=torch.float16, scale=5.0)
    ps += _params([(5,)], seed=2, dtype=torch.bfloat16, scale=5.0)
    before = [(p.detach().double().clone(), p.grad.double().clone()) for p in ps]
    ClipLayerNorm(1.0)(ps)
    for p, (_, b) in zip(ps, before, strict=True):
        tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[p.dtype]
        torch.testing.assert_close(p.grad.double(), b / (b.norm() + 1e-6), rtol=tol, atol=1e-6)
        assert p.grad.dtype == p.dtype
    for p, (_, b) in zip(ps, before, strict=True):
        p.grad = b.to(p.dtype)
    AGC(0.02)(ps)
    for p, (w, b) in zip(ps, before, strict=True):
        tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[p.dtype]
        expected = _agc_oracle(w, b.to(p.dtype).double(), 0.02, 1e-3)
        torch.testing.assert_close(p.grad.double(), expected, rtol=tol, atol=1e-6)
