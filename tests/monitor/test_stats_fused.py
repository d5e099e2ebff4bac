"""The fused statistics (issue 13 item 3, issue 15 item 7): one ``_foreach`` op per statistic on the
accelerator path (taken here on CPU with ``stats.fused_path``), equal to an independent float64
per-tensor computation; NaN/inf propagate; the ops of a logged step do not grow with the layers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradsentry as gs
from gradsentry import _fused, stats
from gradsentry.remedies import per_tensor_norms
from host_syncs import OpCounter

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
#: float32 accumulation of a few thousand entries; the reference sees the same (rounded) values.
RTOL = 1e-5


def _ops(fn) -> int:  # type: ignore[no-untyped-def]
    with OpCounter() as ops:
        fn()
    return ops.count


def _tensors(dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = [(7,), (33, 17), (3, 4, 5), (20_000,), (1,)]
    return [(torch.randn(s, generator=g) * 3).to(dtype) for s in shapes]


def _ref_l2(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([t.double().square().sum().sqrt() for t in ts])


def _ref_max(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([t.double().abs().max() for t in ts])


@pytest.mark.parametrize("fused", [True, False], ids=["accelerator-path", "cpu-path"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_norms_and_max_equal_float64_reference(dtype: torch.dtype, fused: bool) -> None:
    ts = _tensors(dtype)
    groups = _fused.Groups.of(ts)
    with stats.fused_path(fused):
        for kw in ({}, {"groups": groups}):
            l2 = stats.foreach_norms(ts, **kw)
            sq = stats.sq_norms(ts, **kw)
            mx = stats.foreach_max_abs(ts, **kw)
            assert l2.dtype == mx.dtype == torch.float32
            torch.testing.assert_close(l2.double(), _ref_l2(ts), rtol=RTOL, atol=0)
            torch.testing.assert_close(sq.double(), _ref_l2(ts).square(), rtol=2 * RTOL, atol=0)
            torch.testing.assert_close(mx.double(), _ref_max(ts), rtol=0, atol=0)  # max is exact


def test_fp16_norms_accumulate_in_float32() -> None:
    """300 is an fp16 value whose square (9e4) is beyond fp16's range (65504)."""
    t = torch.full((1000,), 300.0, dtype=torch.float16)
    for fused in (True, False):
        with stats.fused_path(fused):
            assert stats.foreach_norms([t]).item() == pytest.approx(300 * math.sqrt(1000), rel=1e-6)
            assert stats.sq_norms([t]).item() == pytest.approx(9e4 * 1000, rel=1e-6)
            assert stats.foreach_max_abs([t]).item() == 300.0
    assert per_tensor_norms([t]).item() == pytest.approx(300 * math.sqrt(1000), rel=1e-6)


def test_mixed_dtypes_keep_their_order_and_promote() -> None:
    ts = [
        torch.tensor([3.0, 4.0]),
        torch.tensor([1.0, -2.0], dtype=torch.float64),
        torch.tensor([6.0, 8.0], dtype=torch.bfloat16),
        torch.tensor([-5.0]),
    ]
    groups = _fused.Groups.of(ts)
    assert [g.dtype for g in groups.groups] == [torch.float32, torch.float64, torch.bfloat16]
    want = _ref_l2(ts)
    for kw in ({}, {"groups": groups}):
        out = stats.foreach_norms(ts, **kw)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=0)
        promoted = stats.foreach_norms(ts, promote=True, **kw)
        assert promoted.dtype == torch.float64
        torch.testing.assert_close(promoted, want, rtol=1e-6, atol=0)
        with stats.fused_path():
            torch.testing.assert_close(stats.foreach_max_abs(ts, **kw).double(), _ref_max(ts))


def test_per_tensor_norms_is_the_one_helper_and_matches_clip_grad_norm() -> None:
    """per_tensor_norms wraps stats.foreach_norms: bit-identical to torch's norms for fp32/fp64."""
    for dtype in (torch.float32, torch.float64):
        ts = [t.to(dtype) for t in _tensors(torch.float32)]
        for p in (1.0, 2.0, math.inf):
            want = torch.stack([torch.linalg.vector_norm(t, p) for t in ts])
            got = per_tensor_norms(ts, p)
            assert got.dtype == dtype
            assert torch.equal(got, torch.stack(torch._foreach_norm(ts, p)))
            torch.testing.assert_close(got, want)
    assert per_tensor_norms([]).numel() == 0


@pytest.mark.parametrize("fused", [True, False], ids=["accelerator-path", "cpu-path"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_entries_propagate(bad: float, fused: bool) -> None:
    ts = _tensors(torch.float32)
    ts[1][2, 3] = bad
    ts[3][-1] = bad
    with stats.fused_path(fused):
        l2 = stats.foreach_norms(ts)
        sq = stats.sq_norms(ts)
        mx = stats.foreach_max_abs(ts)
    for out in (l2, sq, mx):
        assert math.isfinite(out[0]) and math.isfinite(out[2]) and math.isfinite(out[4])
        if math.isnan(bad):
            assert out[1].isnan() and out[3].isnan()
        else:
            assert out[1] == math.inf and out[3] == math.inf


def _relu_mlp(depth: int, width: int = 16) -> nn.Sequential:
    mods: list[nn.Module] = []
    for _ in range(depth):
        mods += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*mods)


def _logged_record(model: nn.Module, fused: bool, dtype: torch.dtype = torch.float32) -> gs.StepRecord:
    """One logged step with the gradients set by hand (seeded, moderate: no rare-layer pass)."""
    torch.manual_seed(0)
    x = torch.randn(8, 16, dtype=dtype)
    with stats.fused_path(fused), gs.Monitor(model, every=1, sync="blocking") as mon:
        model(x).float().sum().backward()
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            if p.grad is not None:
                p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        record = mon.step()
    assert record is not None
    return record


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_monitor_record_equals_float64_per_layer_with_frozen_and_missing_grads(dtype: torch.dtype) -> None:
    records = {}
    for fused in (True, False):
        torch.manual_seed(0)
        model = _relu_mlp(4).to(dtype)
        model[2].weight.requires_grad_(False)  # frozen: no gradient
        model[2].bias.requires_grad_(False)
        records[fused] = _logged_record(model, fused, dtype)
        grads = {id(p): p.grad for p in model.parameters() if p.requires_grad}
        for stat, layer in zip(
            records[fused].layers, [m for m in model if isinstance(m, nn.Linear)], strict=True
        ):
            ps = [p for p in layer.parameters() if id(p) in grads]
            assert stat.has_grad == bool(ps)
            if not ps:
                assert stat.grad_norm == 0.0 and stat.numel == 0
                continue
            want = math.sqrt(sum(grads[id(p)].double().square().sum().item() for p in ps))
            assert stat.grad_norm == pytest.approx(want, rel=RTOL)
            assert stat.grad_max_abs == max(grads[id(p)].double().abs().max().item() for p in ps)
            w = math.sqrt(sum(p.detach().double().square().sum().item() for p in layer.parameters()))
            assert stat.weight_norm == pytest.approx(w, rel=RTOL)
    a, b = records[True], records[False]
    assert a.global_norm == pytest.approx(b.global_norm, rel=RTOL)
    for sa, sb in zip(a.activations, b.activations, strict=True):
        assert sa.pre_mean == pytest.approx(sb.pre_mean, rel=1e-5, abs=1e-6)
        assert sa.pre_std == pytest.approx(sb.pre_std, rel=1e-5)
        assert sa.dead_frac == sb.dead_frac


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_monitor_non_finite_layers_read_the_same_on_both_paths(bad: float) -> None:
    out = {}
    for fused in (True, False):
        torch.manual_seed(0)
        model = _relu_mlp(3)
        x = torch.randn(8, 16)
        with stats.fused_path(fused), gs.Monitor(model, every=1, sync="blocking") as mon:
            model(x).sum().backward()
            model[2].weight.grad[0, 0] = bad
            model[4].bias.grad = None  # a missing gradient beside the bad one
            rec = mon.step()
        assert rec is not None
        out[fused] = [(s.nonfinite, math.isnan(s.grad_norm), math.isinf(s.grad_norm)) for s in rec.layers]
    assert out[True] == out[False]
    assert out[True][1] == (1, math.isnan(bad), math.isinf(bad))


def test_activation_stats_equal_the_per_unit_definition() -> None:
    g = torch.Generator().manual_seed(0)
    cases = [
        ("ReLU", torch.randn(32, 10, generator=g) - 1.5),
        ("ReLU", torch.randn(4, 3, 5, 5, generator=g) - 2.0),
        ("LeakyReLU", torch.randn(4, 6, 8, generator=g) - 2.0),
        ("ReLU", torch.randn(50, generator=g)),
        ("Sigmoid", torch.randn(16, 8, generator=g) * 6),
        ("Tanh", torch.randn(16, 8, generator=g) * 3),
    ]
    for kind, x in cases:
        x = x.clone()
        x.view(-1)[0] = math.nan if kind == "ReLU" and x.dim() == 2 else x.view(-1)[0]
        got = stats.activation_stats(kind, x, None)
        xd = x.double()
        assert got[0].item() == pytest.approx(xd.mean().item(), rel=1e-5, nan_ok=True)
        assert got[1].item() == pytest.approx(xd.std().item(), rel=1e-5, nan_ok=True)
        if kind == "Sigmoid":
            assert got[2].item() == pytest.approx((xd.abs() > math.log(99)).double().mean().item())
        elif kind == "Tanh":
            assert got[2].item() == pytest.approx((xd.tanh().abs() > 0.99).double().mean().item())
        else:
            assert math.isnan(got[2])
        if kind in stats.RELU_FAMILY:
            if x.dim() == 3:
                units = xd.reshape(-1, x.shape[-1])
            elif x.dim() >= 2:
                units = xd.transpose(0, 1).reshape(x.shape[1], -1).T
            else:
                units = xd.reshape(1, -1)
            assert got[3].item() == pytest.approx((units <= 0).all(dim=0).double().mean().item())


#: ATen ops per activation module call on a logged forward (mean, std, amax, le, mean, stack).
OPS_PER_SITE = 6


@pytest.mark.parametrize("optimizer", [False, True], ids=["no-optimizer", "update-ratio"])
def test_logged_step_ops_do_not_grow_with_the_layers(optimizer: bool) -> None:
    """On the accelerator path, Monitor.step() and the update-ratio hook launch a fixed number of
    ops whatever the number of layers (here 3 against 24 Linear layers: equal), and each activation
    site's forward hook at most OPS_PER_SITE. A per-parameter op brought back fails this."""

    def counts(depth: int) -> tuple[int, int, int]:
        torch.manual_seed(0)
        model = _relu_mlp(depth)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, foreach=True)  # one launch per step
        x = torch.randn(8, 16)
        kw = {"optimizer": opt} if optimizer else {}
        bare = _ops(lambda: model(x))
        with stats.fused_path(), gs.Monitor(model, every=1, sync="blocking", **kw) as mon:
            for _ in range(3):  # the first logged steps fix the order and fill the caches
                opt.zero_grad(set_to_none=True)
                model(x).sum().backward()
                for p in model.parameters():
                    p.grad = torch.randn_like(p)  # no rare-layer pass (vanishing gradients)
                mon.step()
                opt.step()
            opt.zero_grad(set_to_none=True)
            loss: list[torch.Tensor] = []
            fwd = _ops(lambda: loss.append(model(x).sum()))
            loss[0].backward()
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            step = _ops(mon.step)
            upd = _ops(opt.step)
        return step, fwd - bare, upd

    small, big = counts(3), counts(24)
    assert big[0] == small[0], f"Monitor.step() ops grow with the layers: {small[0]} -> {big[0]}"
    assert big[2] == small[2], f"update-ratio ops grow with the layers: {small[2]} -> {big[2]}"
    per_site = (big[1] - small[1]) / (24 - 3)
    assert per_site <= OPS_PER_SITE, f"forward hooks: {per_site} ops per activation site"


def test_groups_are_built_once_per_gradient_set(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = _relu_mlp(3)
    built = []
    real = _fused.Groups.of.__func__  # type: ignore[attr-defined]

    def spy(cls: type[_fused.Groups], tensors: list[torch.Tensor]) -> _fused.Groups:
        built.append(len(tensors))
        return real(cls, tensors)  # type: ignore[no-any-return]

    monkeypatch.setattr(_fused.Groups, "of", classmethod(spy))
    x = torch.randn(8, 16)
    with gs.Monitor(model, every=1, sync="blocking") as mon:
        for step in range(4):
            model.zero_grad(set_to_none=True)
            model(x).sum().backward()
            if step >= 2:
                model[0].bias.grad = None  # a new gradient set: grouped once more
            mon.step()
    # parameters once, the full gradient set once, the set without model[0].bias once
    assert built == [6, 6, 5]
