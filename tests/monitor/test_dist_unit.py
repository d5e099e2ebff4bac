"""gradsentry._dist without other processes: argument errors, one-rank groups, the reduction packer."""

from __future__ import annotations

import datetime
import math
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from torch import nn

import gradsentry as gs
from gradsentry import _dist


@pytest.fixture
def one_rank_group(tmp_path: object) -> Iterator[None]:
    """A gloo process group of world size 1 in this process (destroyed afterwards)."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=5))
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_not_distributed_gives_no_context_and_process_group_without_init_is_an_error() -> None:
    params = list(nn.Linear(2, 2).parameters())
    assert _dist.resolve(None, params) is None
    with pytest.raises(
        ValueError, match=r"process_group was given but torch\.distributed is not initialised"
    ):
        _dist.resolve(None, params, process_group=object())
    with pytest.raises(ValueError, match="dist_timeout must be a positive number of seconds, got 0"):
        gs.Monitor(nn.Linear(2, 2), dist_timeout=0)


def test_one_rank_group_is_not_distributed_and_the_monitor_makes_no_collective(one_rank_group: None) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    with gs.Monitor(model, sharded=True) as mon:
        assert mon._dist is None and mon.rank == 0
        model(torch.randn(5, 3)).sum().backward()
        rec = mon.step()
    assert rec is not None
    want = math.sqrt(sum(p.grad.double().square().sum().item() for p in model.parameters()))
    assert rec.global_norm == pytest.approx(want, rel=1e-6)


def test_reduce_parts_sums_means_and_maxes_with_two_collectives(one_rank_group: None) -> None:
    # A one-rank group runs the real all_reduce code path (the two-rank values are checked in
    # test_distributed.py); here the bookkeeping: order, shapes, the mean divided by world_size.
    ctx = _dist.DistContext(group=None, rank=0, world_size=1, sharded=True)
    calls = []
    original = dist.all_reduce

    def counting(t: torch.Tensor, op: object = dist.ReduceOp.SUM, *a: object, **k: object) -> object:
        calls.append(op)
        return original(t, op, *a, **k)

    dist.all_reduce = counting  # type: ignore[assignment]
    try:
        a, b, c, d = torch.arange(3.0), torch.ones(2, 2), torch.tensor([5.0]), torch.tensor([7.0, 8.0])
        out = _dist.reduce_parts(ctx, [(a, "sum"), (b, "max"), (c, "mean"), (d, None)])
    finally:
        dist.all_reduce = original
    assert calls == [dist.ReduceOp.SUM, dist.ReduceOp.MAX]
    for got, want in zip(out, (a, b, c, d), strict=True):
        assert torch.equal(got, want)
    assert _dist.reduce_parts(None, [(a, "sum")])[0] is a


def test_dtensor_helpers_leave_plain_tensors_alone() -> None:
    g = torch.tensor([3.0, -4.0])
    assert _dist.local(g) is g and not _dist.is_dtensor(g)
    torch.testing.assert_close(_dist.global_per_tensor_norms([g]), torch.tensor([5.0]))
    torch.testing.assert_close(_dist.global_per_tensor_norms([g], math.inf), torch.tensor([4.0]))
    assert float(_dist.global_sq_norm([g])) == 25.0
    assert bool(_dist.any_rank(torch.tensor(True))) is True
