"""AGC batched over same-shape tensors: equal to a float64 per-tensor reference and timm's formula,
fewer ATen calls than one tensor at a time, no host copy, the grouping cached."""

from __future__ import annotations

import pytest
import torch
from test_remedies_clip import _timm_style_agc
from torch import nn

from gradsentry.remedies import AGC
from host_syncs import HostSyncs, OpCounter


def _model(dtype=torch.float32):
    """Six same-shape Linear layers (one group), a conv, two LayerNorms (vectors) and a head."""
    torch.manual_seed(0)
    body = [m for _ in range(6) for m in (nn.Linear(16, 16), nn.LayerNorm(16))]
    model = nn.Sequential(nn.Conv1d(16, 16, 1), *body, nn.Linear(16, 3)).to(dtype)
    g = torch.Generator().manual_seed(1)
    for i, p in enumerate(model.parameters()):
        # mixed sizes: some units clip, some do not
        p.grad = (torch.randn(p.shape, generator=g) * (0.002 if i % 3 else 0.05)).to(dtype)
    with torch.no_grad():
        model[1].weight[0].zero_()  # a zero weight row: the eps floor decides
    return model


def _reference(params, clip, eps):
    """float64 per tensor, as eq. 3 of Brock et al.: unit = output row (ndim >= 2) or whole tensor."""
    out = []
    for p in params:
        w, g = p.detach().double(), p.grad.double()
        dims = tuple(range(1, w.ndim)) if w.ndim > 1 else tuple(range(w.ndim))
        wn = torch.linalg.vector_norm(w, dim=dims, keepdim=True).clamp_min(eps) * clip
        gn = torch.linalg.vector_norm(g, dim=dims, keepdim=True)
        out.append(torch.where(gn > wn, g * wn / gn.clamp_min(1e-6), g))
    return out


def test_batched_equals_float64_reference_and_timm():
    model = _model()
    params = list(model.parameters())
    before = [p.grad.clone() for p in params]
    want = _reference(params, 0.01, 1e-3)
    timm = _timm_style_agc(params, clip_factor=0.01)
    agc = AGC(0.01, model=model, batched=True)
    res = agc(params)
    for p, w, t in zip(params, want, timm, strict=True):
        torch.testing.assert_close(p.grad.double(), w, rtol=2e-6, atol=1e-12)  # float32 reductions
        torch.testing.assert_close(p.grad.double(), t, rtol=2e-6, atol=1e-12)
    clipped = [
        name.rsplit(".", 1)[0]
        for (name, _), w, b in zip(model.named_parameters(), want, before, strict=True)
        if not torch.equal(w, b.double())
    ]
    assert clipped and len(clipped) < len(params)  # the data clips some units, not all
    assert res.to_dict()["layers"] == list(dict.fromkeys(clipped))
    (plan,) = agc._plans.values()
    assert [len(g) for g in plan.groups] == [1, 6, 1]  # conv, the six 16x16 Linear weights, the head


def test_batched_equals_per_tensor_path_and_flags_match():
    model_a, model_b = _model(), _model()
    pa, pb = list(model_a.parameters()), list(model_b.parameters())
    agc = AGC(0.01, exclude=model_a[-1], batched=True)
    got = agc(pa).affected
    want = AGC(0.01, exclude=model_b[-1])._per_tensor(pb, [p.grad for p in pb])
    assert got is not None and torch.equal(got, want) and bool(want.any()) and not bool(want.all())
    for a, b in zip(pa, pb, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)
    fresh = _model()[-1]
    assert torch.equal(pa[-1].grad, fresh.bias.grad) and torch.equal(pa[-2].grad, fresh.weight.grad)


def test_bf16_gradients_agree_with_per_tensor_path():
    model_a, model_b = _model(torch.bfloat16), _model(torch.bfloat16)
    pa, pb = list(model_a.parameters()), list(model_b.parameters())
    AGC(0.01, batched=True)(pa)
    AGC(0.01)._per_tensor(pb, [p.grad for p in pb])
    for a, b in zip(pa, pb, strict=True):
        assert a.grad.dtype == torch.bfloat16
        torch.testing.assert_close(a.grad.float(), b.grad.float(), rtol=8e-3, atol=0)  # one bf16 ulp


def test_fewer_ops_no_host_copy_and_cached_plan():
    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(12)])
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    agc = AGC(0.01, batched=True)
    agc(params)
    with OpCounter() as batched, HostSyncs() as syncs:
        agc(params)
    with OpCounter() as single:
        agc._per_tensor(params, [p.grad for p in params])
    assert syncs.count == 0
    assert batched.count * 4 < single.count, (batched.count, single.count)
    assert len(agc._plans) == 1


@pytest.mark.parametrize("n_layers", [1, 3])
def test_plan_follows_a_new_parameter_list(n_layers):
    agc = AGC(0.5, batched=True)
    lins = [nn.Linear(4, 4) for _ in range(n_layers)]
    for lin in lins:
        for p in lin.parameters():
            p.grad = torch.ones_like(p)
    agc([lins[0].weight])
    agc([p for lin in lins for p in lin.parameters()])
    assert len(agc._plans) == 2


def test_default_is_per_tensor_on_cpu():
    lin = nn.Linear(4, 4)
    for p in lin.parameters():
        p.grad = torch.ones_like(p)
    agc = AGC(0.5)
    agc(lin.parameters())
    assert agc._plans == {} and "batched=None" in repr(agc)
