"""Reduction of gradient statistics across the ranks of a ``torch.distributed`` process group.

Two cases (torch.distributed does the communication; this module only decides what to reduce):

* **replicated** gradients (DDP): after ``backward()`` every rank holds the same averaged gradient,
  so norms need no collective at all.
* **sharded** gradients (FSDP2 ``fully_shard``: parameters and gradients are ``DTensor`` shards, or
  plain tensors that the user declares disjoint with ``sharded=True``): each rank computes squared
  norms of its local shard, and one ``all_reduce(SUM)`` of all of them (stacked) gives the squared
  norms of the whole gradient; one ``all_reduce(MAX)`` carries max |g| and non-finite indicators.

A ``DTensor`` replicated along a mesh dimension (e.g. HSDP's ``(Replicate(), Shard(0))``) is counted
once: only the ranks at coordinate 0 of its replicated mesh dimensions contribute.
"""

from __future__ import annotations

import datetime
import functools
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gradsentry import stats

log = logging.getLogger("gradsentry")

COLLECTIVE_FAILED_MSG = (
    "gradsentry: the all-reduce ({op}) of gradient statistics over {world} ranks failed{timeout}: {exc}. "
    "A rank has probably died, hung, or skipped a logged Monitor.step() (or a remedy call): every rank "
    "must call them the same number of times, with the same `every`."
)


FSDP1_MSG = (
    "gradsentry: FSDP1 (FullyShardedDataParallel) is not supported: each rank holds a flat shard of "
    "each FSDP unit's parameters, so per-layer statistics cannot be formed. Use FSDP2 "
    "(torch.distributed.fsdp.fully_shard), or pass sharded=True to get each FSDP unit's norm and the "
    "global norm (with use_orig_params=False; remedies then see only local shards)."
)


class DistributedError(RuntimeError):
    """A collective of gradsentry failed or timed out (a rank died, hung or left the training loop)."""


@functools.cache
def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed tensors
        return None
    return DTensor


def is_dtensor(t: object) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (e.g. an FSDP2 parameter or gradient)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def local(t: Tensor) -> Tensor:
    """The rank-local part of ``t``: ``t.to_local()`` for a DTensor (a view: in-place ops act on
    the DTensor), ``t`` itself otherwise."""
    return t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined, no-any-return]


def _is_sharded_dtensor(t: Tensor) -> bool:
    if not is_dtensor(t):
        return False
    placements = t.placements  # type: ignore[attr-defined]
    if any(p.is_partial() for p in placements):
        raise ValueError(
            "gradsentry: a DTensor gradient has a Partial placement (not yet reduced across ranks); "
            "take statistics after the gradient reduction (after backward() of FSDP2)"
        )
    return any(p.is_shard() for p in placements)


def _is_fsdp1(model: nn.Module | None) -> bool:
    fsdp = sys.modules.get("torch.distributed.fsdp")  # loaded if FSDP1 is in use; never imported here
    cls = getattr(fsdp, "FullyShardedDataParallel", None)
    return model is not None and cls is not None and any(isinstance(m, cls) for m in model.modules())


def _counted_here(t: Tensor, has_dtensor: bool, rank: int) -> bool:
    """Whether this rank's copy of ``t`` enters a SUM over ranks (each element counted once)."""
    if is_dtensor(t):
        coord = t.device_mesh.get_coordinate()  # type: ignore[attr-defined]
        if coord is None:  # this rank is not in the tensor's mesh
            return False
        placements = t.placements  # type: ignore[attr-defined]
        return all(c == 0 for c, p in zip(coord, placements, strict=True) if p.is_replicate())
    return not has_dtensor or rank == 0  # plain tensors beside DTensors are replicated


@dataclass(frozen=True)
class DistContext:
    """How gradient statistics are reduced across ranks.

    Attributes:
        group: the process group (None: the default group).
        rank: this process's rank in ``group``.
        world_size: number of ranks in ``group`` (> 1).
        sharded: True when each rank holds a different part of the gradient (statistics are
            all-reduced), False when gradients are replicated (no collective for them).
        timeout: seconds to wait for a collective before raising :class:`DistributedError`; None
            waits for the process group's own timeout (``init_process_group(timeout=...)``).
    """

    group: Any
    rank: int
    world_size: int
    sharded: bool
    timeout: float | None = None

    def all_reduce_(self, t: Tensor, op: str) -> Tensor:
        """In-place ``all_reduce`` of ``t`` with ``op`` ("sum" or "max"); returns ``t``.

        Raises:
            DistributedError: the collective failed (a peer exited) or did not finish within
                ``timeout`` seconds.
        """
        rop = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
        try:
            if self.timeout is None:
                dist.all_reduce(t, op=rop, group=self.group)
            else:
                work = dist.all_reduce(t, op=rop, group=self.group, async_op=True)
                work.wait(timeout=datetime.timedelta(seconds=self.timeout))  # type: ignore[union-attr]
        except Exception as exc:
            when = f" (timeout {self.timeout:g} s)" if self.timeout is not None else ""
            raise DistributedError(
                COLLECTIVE_FAILED_MSG.format(
                    op=op.upper(), world=self.world_size, timeout=when, exc=str(exc).strip().rstrip(".!")
                )
            ) from exc
        return t

    def counted(self, tensors: Sequence[Tensor]) -> list[bool]:
        """Whether each tensor's local part enters a SUM over ranks (all True when replicated)."""
        if not self.sharded:
            return [True] * len(tensors)
        has_dt = any(is_dtensor(t) for t in tensors)
        return [_counted_here(t, has_dt, self.rank) for t in tensors]


def sq_norms(
    ctx: DistContext | None, tensors: Sequence[Tensor], like: Sequence[Tensor] | None = None
) -> Tensor:
    """Squared L2 norms of the rank-local parts of ``tensors``, weighted so that a SUM over the ranks
    of ``ctx`` counts every element once (plain squared norms when ``ctx`` is None).

    Args:
        ctx: the context, or None.
        tensors: N tensors (DTensors or plain; plain ones are taken as this rank's part).
        like: N tensors whose placements apply to ``tensors`` (e.g. the DTensor parameters of plain
            local snapshots); defaults to ``tensors``.

    Returns:
        ``[N]`` in :func:`gradsentry.stats.reduce_dtype` precision (units: tensor squared), on the
        first tensor's device, not yet reduced.
    """
    sq = stats.sq_norms([local(t) for t in tensors])
    if ctx is None:
        return sq
    keep = ctx.counted(tensors if like is None else like)
    if not all(keep):  # multiply (not mask) so that NaN on any copy still propagates
        sq = sq * torch.tensor(keep, dtype=sq.dtype, device=sq.device)
    return sq


def resolve(
    model: nn.Module | None,
    tensors: Sequence[Tensor],
    *,
    process_group: Any = None,
    sharded: bool | None = None,
    timeout: float | None = None,
) -> DistContext | None:
    """Decide how to reduce statistics of ``tensors`` (a model's parameters) across ranks.

    Args:
        model: the module being watched (a ``DistributedDataParallel`` wrapper means replicated).
        tensors: its parameters.
        process_group: the group to reduce over; None uses the group of the DTensors' device mesh
            when there are DTensors, else the default group.
        sharded: None detects (DTensor parameters with a ``Shard`` placement: sharded; otherwise
            replicated), True says each rank's plain tensors are different parts of the model,
            False says the gradients are replicated (DDP) so no collective is needed.
        timeout: see :class:`DistContext`.

    Returns:
        None when not running distributed (no initialised process group, or one rank), else the
        context.

    Raises:
        ValueError: ``process_group`` given without an initialised ``torch.distributed``,
            ``sharded=False`` with sharded DTensor parameters, an FSDP1 model without ``sharded=True``,
            or a bad ``timeout``.
    """
    if timeout is not None and not timeout > 0:
        raise ValueError(f"dist_timeout must be a positive number of seconds, got {timeout!r}")
    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise ValueError(
                "a process_group was given but torch.distributed is not initialised; "
                "call torch.distributed.init_process_group(...) first"
            )
        return None
    if process_group is None:
        process_group = _mesh_group(tensors)
    world = dist.get_world_size(process_group)
    if world <= 1:
        return None
    has_shards = any(_is_sharded_dtensor(t) for t in tensors)
    if sharded is False and has_shards:
        raise ValueError(
            "sharded=False, but the model has DTensor parameters sharded across ranks (FSDP2); "
            "leave sharded=None to detect it"
        )
    if sharded is None and _is_fsdp1(model):
        raise ValueError(FSDP1_MSG)
    if sharded is None:
        sharded = has_shards
        is_ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        if not sharded and not is_ddp and not any(is_dtensor(t) for t in tensors):
            log.info(
                "gradsentry: torch.distributed is initialised with %d ranks and the model is neither "
                "DistributedDataParallel nor FSDP2-sharded; assuming replicated gradients (pass "
                "sharded=True if each rank holds a different part of the model)",
                world,
            )
    return DistContext(
        group=process_group,
        rank=dist.get_rank(process_group),
        world_size=world,
        sharded=bool(sharded),
        timeout=timeout,
    )


def _mesh_group(tensors: Sequence[Tensor]) -> Any:
    """The process group spanning the device mesh of the first DTensor (None: the default group).

    Raises:
        ValueError: a multi-dimensional mesh that covers only part of the world (pass the group).
    """
    mesh = next((t.device_mesh for t in tensors if is_dtensor(t)), None)  # type: ignore[attr-defined]
    if mesh is None or mesh.size() == dist.get_world_size():
        return None
    if mesh.ndim == 1:
        return mesh.get_group()
    raise ValueError(
        f"the DTensors live on a {mesh.ndim}-D device mesh of {mesh.size()} of the "
        f"{dist.get_world_size()} ranks; pass process_group= (a group spanning exactly those ranks)"
    )


def context_for(grads: Sequence[Tensor], group: Any = None) -> DistContext | None:
    """The context a remedy uses for ``grads``: sharded when some are sharded DTensors.

    None when not running distributed; replicated (no collectives for norms) otherwise.
    """
    return resolve(None, grads, process_group=group, sharded=None) if _initialized(group) else None


def _initialized(group: Any) -> bool:
    return group is not None or (dist.is_available() and dist.is_initialized())


def world_size(group: Any = None) -> int:
    """Number of ranks in ``group`` (1 when ``torch.distributed`` is not initialised)."""
    return dist.get_world_size(group) if _initialized(group) else 1


def global_per_tensor_norms(grads: Sequence[Tensor], norm_type: float = 2.0, group: Any = None) -> Tensor:
    """p-norm of every whole gradient tensor, whatever part of it this rank holds.

    Sharded DTensors (FSDP2): one ``all_reduce`` of the stacked local values (SUM of ``norm**p``, or
    MAX for ``p = inf``). Replicated or non-distributed gradients: no collective.

    Args:
        grads: N gradient tensors (plain tensors or DTensors).
        norm_type: p (> 0), or ``math.inf`` for max |g|.
        group: process group (None: the default group).

    Returns:
        float32 ``[N]`` on the first gradient's device, same units as the gradient; a NaN/inf on any
        rank's shard gives NaN/inf on every rank.

    Raises:
        DistributedError: the collective failed or timed out.
    """
    ctx = context_for(grads, group)
    local_norms = stats.foreach_norms([local(g) for g in grads], norm_type)
    if ctx is None or not ctx.sharded:
        return local_norms
    x = local_norms.to(stats.reduce_dtype(local_norms.device))
    if math.isinf(norm_type):
        return ctx.all_reduce_(x.nan_to_num(nan=math.inf), "max").float()  # MAX may drop NaN: keep inf
    keep = torch.tensor(ctx.counted(grads), dtype=x.dtype, device=x.device)
    return ctx.all_reduce_(x.pow(norm_type) * keep, "sum").pow(1.0 / norm_type).float()


def global_sq_norm(grads: Sequence[Tensor], group: Any = None) -> Tensor:
    """Squared global L2 norm of ``grads`` (0-d, float64 on CPU/CUDA), reduced over ranks if sharded.

    Raises:
        DistributedError: the collective failed or timed out.
    """
    if not grads:
        return torch.zeros((), dtype=torch.float64)
    ctx = context_for(grads, group)
    if ctx is None or not ctx.sharded:
        return stats.sq_norms([local(g) for g in grads]).sum()
    return ctx.all_reduce_(sq_norms(ctx, grads).sum().reshape(1), "sum")[0]


def whole_rows(t: Tensor) -> bool:
    """True when this rank's part of ``t`` holds whole rows (units along dim 0): a plain tensor, or a
    DTensor placed only as ``Replicate()`` or ``Shard(0)`` (FSDP2's layout)."""
    if not is_dtensor(t):
        return True
    return all(p.is_replicate() or (p.is_shard() and p.dim == 0) for p in t.placements)  # type: ignore[attr-defined]


def is_multi_rank(group: Any = None) -> bool:
    """True inside an initialised process group of more than one rank."""
    return _initialized(group) and dist.get_world_size(group) > 1


def any_rank(flag: Tensor, group: Any = None) -> Tensor:
    """``flag`` (bool tensor of any shape) OR-ed over all ranks with one ``all_reduce(MAX)``, so that a
    decision such as skipping a step is identical everywhere; returned as is when not distributed.

    Raises:
        DistributedError: the collective failed or timed out.
    """
    if not _initialized(group) or dist.get_world_size(group) <= 1:
        return flag
    ctx = DistContext(group, dist.get_rank(group), dist.get_world_size(group), sharded=False)
    return ctx.all_reduce_(flag.reshape(-1).to(torch.float32), "max").reshape(flag.shape) > 0


def agree(loss: Tensor, flags: Tensor, group: Any = None) -> tuple[Tensor, Tensor]:
    """The mean of a 0-d ``loss`` and the OR of boolean ``flags`` over all ranks, with one
    ``all_reduce(SUM)``, so that decisions taken from them (skip, roll back) are the same on every
    rank; returned unchanged when not distributed. A NaN/inf loss on any rank gives NaN/inf.

    Args:
        loss: 0-d loss of this rank (any float dtype; NaN when there is none).
        flags: bool tensor of any shape (e.g. ``[N]`` per-tensor non-finite flags), same on all ranks.

    Returns:
        ``(mean loss as float64 0-d, OR-ed flags of the same shape)`` on ``flags``'s device.

    Raises:
        DistributedError: the collective failed or timed out.
    """
    if not _initialized(group) or dist.get_world_size(group) <= 1:
        return loss, flags
    ctx = DistContext(group, dist.get_rank(group), dist.get_world_size(group), sharded=False)
    buf = torch.cat(
        [loss.detach().reshape(1).to(flags.device, torch.float64), flags.reshape(-1).to(torch.float64)]
    )
    ctx.all_reduce_(buf, "sum")
    return buf[0] / ctx.world_size, (buf[1:] > 0).reshape(flags.shape)


def reduce_parts(ctx: DistContext | None, parts: Sequence[tuple[Tensor, str | None]]) -> list[Tensor]:
    """Reduce many small statistics tensors over ranks with at most two collectives.

    Args:
        ctx: the context (None: nothing is reduced).
        parts: ``(tensor, op)`` pairs, all on one device and of one dtype; ``op`` is "sum" (each rank
            holds a part: squared norms, histogram counts), "mean" (each rank measured its own batch:
            loss, activation statistics; summed then divided by the world size), "max" (max |g|,
            non-finite indicators) or None (not reduced: identical on every rank already).

    Returns:
        The tensors in the same order and shapes: "sum" and "mean" parts reduced by one
        ``all_reduce(SUM)`` of their concatenation, "max" parts by one ``all_reduce(MAX)``.

    Raises:
        DistributedError: a collective failed or timed out.
    """
    out = [t for t, _ in parts]
    if ctx is None:
        return out
    for coll, ops in (("sum", ("sum", "mean")), ("max", ("max",))):
        idx = [i for i, (_, op) in enumerate(parts) if op in ops]
        if not idx:
            continue
        flat = torch.cat([parts[i][0].reshape(-1) for i in idx])
        ctx.all_reduce_(flat, coll)
        for i, piece in zip(idx, flat.split([parts[i][0].numel() for i in idx]), strict=True):
            out[i] = (piece / ctx.world_size if parts[i][1] == "mean" else piece).reshape(parts[i][0].shape)
    return out
