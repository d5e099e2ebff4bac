"""Rare layers of a logged step need a second read of their raw gradients: a non-finite norm (count
the NaN/inf entries) or a float32 square that may have underflowed or overflowed (recompute it in
float64). One more transfer, only on the steps that hold such a layer; under a deferred copy only
while the step's gradients are still alive and unchanged."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gradsentry import _dist, stats
from gradsentry.monitor.layers import LayerIndex

if TYPE_CHECKING:
    from gradsentry.monitor.measure import InFlight


def raw_grads(flight: InFlight) -> dict[int, Tensor] | None:
    """The step's raw gradients by parameter id; None when a deferred step's gradients were freed or
    written since (the record then keeps what its packet holds)."""
    grads: list[Tensor] = []
    for item in flight.grads:
        if isinstance(item, Tensor):
            grads.append(item)
            continue
        ref, version = item
        t = ref()
        if t is None or t._version != version:
            return None
        grads.append(t)
    return dict(zip(map(id, flight.params), grads, strict=True))


def layer_totals(
    index: LayerIndex,
    ctx: _dist.DistContext | None,
    flight: InFlight,
    layers: list[int],
    per_grad: Callable[[Tensor], Tensor],
    op: str | None = None,
) -> list[float | None]:
    """``sum(per_grad(g))`` over the raw gradients (this rank's counted parts, sparse ones as their
    entries) of each of these layers, summed over ranks when sharded; one more transfer. None per
    layer when the gradients are gone (deferred copy).

    Only called on the rare layers a logged step flags, which are the same on every rank (they are
    decided from reduced figures), so a sharded total is one more all-reduce.
    """
    raw = raw_grads(flight)
    if raw is None:
        return [None] * len(layers)
    device = index.all_params()[0][0].device
    dt = stats.reduce_dtype(device)
    totals = []
    for i in layers:
        ps = [p for p in index.layers[i].params if raw.get(id(p)) is not None]
        keep = ctx.counted(ps) if ctx is not None else [True] * len(ps)
        grads = [stats.entries(_dist.local(raw[id(p)])).detach() for p, k in zip(ps, keep, strict=True) if k]
        zero = torch.zeros((), dtype=dt, device=device)
        totals.append(sum((per_grad(g).to(device, dt) for g in grads), zero))
    total = torch.stack(totals)
    if ctx is not None and ctx.sharded:
        total = ctx.all_reduce_(total, "sum")
    elif ctx is not None and op is not None:
        total = ctx.all_reduce_(total, op)
    return list(total.cpu().tolist())


def exact_sq(
    index: LayerIndex, ctx: _dist.DistContext | None, flight: InFlight, layers: list[int]
) -> list[float | None]:
    """Squared gradient norms of these layers from float64 squares (None where the gradients are gone)."""
    return layer_totals(
        index, ctx, flight, layers, lambda g: g.to(stats.reduce_dtype(g.device)).square().sum()
    )


def count_nonfinite(
    index: LayerIndex,
    ctx: _dist.DistContext | None,
    flight: InFlight,
    layers: list[int],
    across_replicas: bool,
) -> dict[int, int]:
    """Count NaN/inf gradient entries of these layers (called for layers whose norm is not finite).

    ``across_replicas``: replicated copies differ (a NaN on one rank only); the counts are then the
    largest over ranks (one more ``all_reduce(MAX)``, on every rank alike: the decision comes from
    reduced figures), so that every rank records the same count. 1 (at least one) per layer when a
    deferred step's gradients are gone.
    """
    op = "max" if across_replicas else None
    counts = layer_totals(index, ctx, flight, layers, lambda g: (~torch.isfinite(g)).sum(), op)
    return {i: 1 if c is None else int(c) for i, c in zip(layers, counts, strict=True)}
