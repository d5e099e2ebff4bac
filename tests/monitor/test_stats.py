"""stats.sq_norms against float64 recomputations, on tensors large enough that float32 sequential
accumulation (torch's CPU norm) would be off by far more than the tolerance."""

from __future__ import annotations

import math

import pytest
import torch

from gradsentry import stats


def _heavy_tailed(n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 1e-3
    x[::7] *= 50.0  # a few large entries, as in real gradients
    return x.to(dtype)


def _ref(t: torch.Tensor) -> float:
    return t.double().pow(2).sum().item()


@pytest.mark.parametrize(
    "make",
    [
        lambda: _heavy_tailed(3_000_000, 0),  # chunked dots
        lambda: _heavy_tailed(200_000, 1),  # one dot
        lambda: _heavy_tailed(50_000, 2),  # the fused small-tensor call
        lambda: _heavy_tailed(600_000, 3, torch.bfloat16),  # upcast chunks
        lambda: (_heavy_tailed(400_000, 4) * 3e4).to(torch.float16),  # squares overflow fp16
        lambda: _heavy_tailed(2_000_000, 5).reshape(1000, 2000).t(),  # transposed: memory order
        lambda: _heavy_tailed(2_000_000, 6).reshape(2000, 1000)[:, :700],  # gaps: copied
        lambda: _heavy_tailed(500_000, 7).reshape(5, 10, 100, 100).to(memory_format=torch.channels_last),
        lambda: _heavy_tailed(300_000, 8, torch.float64),
        lambda: _heavy_tailed(4_000_000, 9)[::2],  # a strided 1-D view: copied chunk by chunk
        lambda: _heavy_tailed(4_000_000, 10).reshape(2000, 2000)[:, ::2],  # flattens to a strided view
        # uniformly initialised bf16 weights: coarse values bias float32 rounding (shorter chunks)
        lambda: (
            torch.empty(4096, 4096)
            .uniform_(-1 / 64, 1 / 64, generator=torch.Generator().manual_seed(0))
            .bfloat16()
        ),
    ],
)
def test_sq_norms_match_float64_to_1e6_on_any_size(make) -> None:
    t = make()
    got = stats.sq_norms([t, torch.ones(3)])
    assert got.dtype == torch.float64
    assert math.sqrt(got[0].item()) == pytest.approx(math.sqrt(_ref(t)), rel=1e-6)
    assert got[1].item() == pytest.approx(3.0, rel=1e-6)


def test_sq_norms_of_many_mixed_tensors_keep_their_order() -> None:
    sizes = [10, 300_000, 0, 70_000, 5, 1_500_000, 65_536]
    ts = [_heavy_tailed(n, i) * (i + 1) for i, n in enumerate(sizes)]
    got = stats.sq_norms(ts).tolist()
    for g, t in zip(got, ts, strict=True):
        assert g == pytest.approx(_ref(t), rel=2e-6, abs=0.0)


def test_sq_norms_are_within_2e7_whatever_the_size_dtype_layout_and_thread_count() -> None:
    """Every CPU path (small tensors, rows, row tails, upcast chunks, strided views) against float64,
    at 1 thread and at the default count: float32 dot products and torch's CPU norm accumulate
    differently per SIMD width and thread count (MKL's dot on AVX512: 3e-6 on 256K entries)."""
    sizes = [1, 255, 256, 257, 8192, 8193, 8192 + 256, 200_000, 2 * 65_536 + 7, 3_000_000]
    ts: list[torch.Tensor] = []
    for i, n in enumerate(sizes):
        ts += [_heavy_tailed(n, i), _heavy_tailed(n, i, torch.bfloat16), _heavy_tailed(n, i, torch.float16)]
        ts += [_heavy_tailed(n, i, torch.float64), _heavy_tailed(2 * n, i)[::2]]
    ts.append(torch.nn.Parameter(_heavy_tailed(1_000_000, 99).reshape(1000, 1000)))  # requires grad
    refs = [_ref(t.detach()) for t in ts]
    default = torch.get_num_threads()
    try:
        for threads in sorted({1, default}):
            torch.set_num_threads(threads)
            got = stats.sq_norms(ts)
            assert not got.requires_grad
            for g, r, t in zip(got.tolist(), refs, ts, strict=True):
                assert g == pytest.approx(r, rel=2e-7, abs=0.0), (threads, tuple(t.shape), t.dtype)
    finally:
        torch.set_num_threads(default)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("n", [100, 200_000, 700_000])
def test_sq_norms_propagate_nan_and_inf(n: int, bad: float) -> None:
    t = torch.randn(n)
    t[n // 2] = bad
    got = stats.sq_norms([torch.randn(4), t])
    assert math.isfinite(got[0].item())
    assert not math.isfinite(got[1].item())
    if math.isnan(bad):
        assert math.isnan(got[1].item())


def test_sq_norms_empty_list_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="at least one tensor"):
        stats.sq_norms([])
