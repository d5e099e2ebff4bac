"""Unit-wise adaptive gradient clipping (AGC), with the unit norms batched over same-shape tensors."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gradsentry import _dist, stats
from gradsentry.remedies.base import (
    RemedyResult,
    check_positive,
    grads_of,
    names_for,
    param_names,
    total_norm,
)

__all__ = ["AGC", "AGC_SHARD_MSG", "unitwise_norm"]

_EPS = 1e-6  # floor of a unit's gradient norm in the division (timm's clamp(min=1e-6))
_LOW_PRECISION = (torch.float16, torch.bfloat16)

AGC_SHARD_MSG = (
    "AGC clips whole units (rows along dim 0); a DTensor sharded along another dimension splits them. "
    "Shard parameters along dim 0 (FSDP2's default) or use ClipGlobalNorm/ClipLayerNorm."
)


def _excluded_ids(exclude: nn.Module | Iterable[Tensor | nn.Module]) -> set[int]:
    items: Iterable[Tensor | nn.Module] = [exclude] if isinstance(exclude, nn.Module) else exclude
    ids: set[int] = set()
    for item in items:
        if isinstance(item, nn.Module):
            ids.update(id(p) for p in item.parameters())
        elif isinstance(item, Tensor):
            ids.add(id(item))
        else:
            raise TypeError(f"exclude takes modules or parameters, got {type(item).__name__}")
    return ids


def unitwise_norm(x: Tensor) -> Tensor:
    """Unit-wise L2 norm in float32, broadcastable against ``x``.

    A unit is one output row of a weight: for ``x`` of shape [O, ...] (Linear [O, I], Conv [O, I, kH,
    kW]) the norm is taken over every dimension but the first, giving shape [O, 1, ...]. Scalars and
    1-D tensors (biases, norm gains) are one unit each: their norm is the norm of the whole tensor (0-d),
    as in the NFNet reference code (``unitwise_norm``: ``axis=None`` for vectors; Brock et al. 2021,
    arXiv:2102.06171) and timm (``timm.utils.agc.unitwise_norm``: ``x.norm()`` for ``ndim <= 1``).

    Args:
        x: a parameter or gradient of any shape, any float dtype (fp16/bf16 are upcast).

    Returns:
        float32 ``[O, 1, ..., 1]`` for ``x.ndim >= 2``, a 0-d tensor otherwise; same units as ``x``.
    """
    kwargs = {"dtype": torch.float32} if x.dtype in _LOW_PRECISION else {}
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x, **kwargs).float()
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.ndim)), keepdim=True, **kwargs).float()


@dataclass
class _Plan:
    """How one list of parameters is clipped: cached per (parameters, shapes, dtypes, devices)."""

    vectors: list[int]  # 0-d/1-D tensors: one unit each
    groups: list[list[int]]  # >= 2-D tensors of one (shape, dtype, device), stacked together
    excluded: list[int]
    order: Tensor  # affected = cat([excluded, vectors, groups...])[order]


def _plan(ps: list[Tensor], grads: list[Tensor], exclude: set[int]) -> _Plan:
    vectors, excluded = [], []
    by_kind: dict[tuple[torch.Size, torch.dtype, torch.device], list[int]] = {}
    for i, (p, g) in enumerate(zip(ps, grads, strict=True)):
        if id(p) in exclude:
            excluded.append(i)
        elif g.ndim <= 1:
            vectors.append(i)
        else:
            by_kind.setdefault((g.shape, g.dtype, g.device), []).append(i)
    groups = list(by_kind.values())
    flat = excluded + vectors + [i for grp in groups for i in grp]
    order = torch.empty(len(flat), dtype=torch.int64)
    order[torch.tensor(flat, dtype=torch.int64)] = torch.arange(len(flat))
    return _Plan(vectors, groups, excluded, order.to(grads[0].device))


class AGC:
    """Unit-wise adaptive gradient clipping (AGC).

    For every unit i of every parameter W with gradient G (eq. 3 of Brock et al.):
    ``G_i ← λ · max(‖W_i‖, ε) / ‖G_i‖ · G_i`` if ``‖G_i‖ / max(‖W_i‖, ε) > λ``, else unchanged.
    A unit is an output row of a weight with two or more dimensions (Linear [O, I], Conv [O, I, k...]) and
    the *whole* tensor for a bias or norm gain (1-D) or a scalar, as in the NFNet reference code and
    timm's ``adaptive_clip_grad``; norms are Frobenius norms over the unit (see :func:`unitwise_norm`),
    computed in float32 (``‖G_i‖`` floored at 1e-6 in the division, as timm).
    Brock et al. do not clip the final classifier layer: pass it as ``exclude`` (e.g.
    ``AGC(exclude=model.fc)``). No host sync (``torch.where``-style scaling).

    Batched (``batched=True``, the default for gradients on an accelerator): the parameters are grouped
    once by (shape, dtype, device) (cached for the same parameter list); each group's weights and
    gradients are stacked, ``[G, O, ...]``, their unit norms taken in one reduction each, the gradients
    scaled in one multiplication and copied back with one ``torch._foreach_copy_``; 1-D tensors get one
    ``_foreach_norm``. A transformer's dozens of same-shape matrices then cost a handful of kernel
    launches instead of several per tensor, at the price of a stacked copy of one group's weights and
    gradients at a time (memory and bandwidth). On CPU, where a kernel launch costs little and the
    copies dominate (measured 1.8x slower on a 6.3M-parameter MLP, ``benchmarks/RESULTS.md``), the
    default is one tensor at a time. Both give the same result up to float32 rounding of the
    reductions (tested against a float64 reference and timm's formula). FSDP2-sharded (DTensor)
    gradients always go one tensor at a time.

    Args:
        clip_factor: λ, the largest allowed ratio ‖G_i‖ / max(‖W_i‖, ε) (dimensionless, > 0; the paper
            uses 0.01 for large batches).
        eps: ε, floor of the weight norm so that zero-initialised units can still move (units of the
            weights, > 0).
        exclude: a module or an iterable of modules/parameters left untouched.
        model: used only to name the clipped layers in the record (else ``param[i]``).
        batched: True to batch the unit norms over same-shape tensors, False for one tensor at a time,
            None (default) to batch when the gradients are not on the CPU.

    Raises:
        ValueError: ``clip_factor`` or ``eps`` not positive; at a call, a DTensor not sharded along
            dim 0.
        TypeError: ``exclude`` holds something other than modules or tensors.

    References:
        Brock et al., "High-Performance Large-Scale Image Recognition Without Normalization", 2021,
        arXiv:2102.06171.
    """

    def __init__(
        self,
        clip_factor: float = 0.01,
        eps: float = 1e-3,
        exclude: nn.Module | Iterable[Tensor | nn.Module] = (),
        model: nn.Module | None = None,
        batched: bool | None = None,
    ) -> None:
        self.batched = batched
        self.clip_factor = check_positive("clip_factor", clip_factor)
        self.eps = check_positive("eps", eps)
        self._exclude = _excluded_ids(exclude)
        self._names = param_names(model) if model is not None else None
        self._plans: dict[tuple[object, ...], _Plan] = {}

    def __repr__(self) -> str:
        return f"AGC(clip_factor={self.clip_factor}, eps={self.eps}, batched={self.batched})"

    def _factor(self, w_norm: Tensor, g_norm: Tensor) -> tuple[Tensor, Tensor]:
        """The scale of each unit and whether it is clipped (same shape as the norms)."""
        max_norm = w_norm.clamp_min(self.eps) * self.clip_factor
        trigger = g_norm > max_norm
        return torch.where(trigger, max_norm / g_norm.clamp_min(_EPS), 1.0), trigger

    @torch.no_grad()
    def __call__(
        self, params: Iterable[Tensor], *, norms: Tensor | None = None, loss: Tensor | float | None = None
    ) -> RemedyResult:
        ps, grads = grads_of(params)
        if not grads:
            return RemedyResult("AGC", threshold=self.clip_factor)
        sharded = any(_dist.is_dtensor(g) for g in grads)  # FSDP2: each rank clips its whole rows
        batched = self.batched if self.batched is not None else grads[0].device.type != "cpu"
        if batched and not sharded:
            affected = self._batched(ps, grads)
        else:
            affected = self._per_tensor(ps, grads, sharded)
        return RemedyResult(
            "AGC",
            norm_before=total_norm(norms) if norms is not None else None,
            clipped=affected.any(),
            threshold=self.clip_factor,
            affected=affected,
            names=names_for(ps, self._names, layer=True),
        )

    def _batched(self, ps: list[Tensor], grads: list[Tensor]) -> Tensor:
        key = tuple((id(p), g.shape, g.dtype, g.device) for p, g in zip(ps, grads, strict=True))
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= 8:  # parameter lists change rarely; keep a few
                self._plans.clear()
            plan = self._plans[key] = _plan(ps, grads, self._exclude)
        device = grads[0].device
        parts: list[Tensor] = []
        if plan.excluded:
            parts.append(torch.zeros(len(plan.excluded), dtype=torch.bool, device=device))
        if plan.vectors:  # one unit per tensor: the norms of all of them in one fused call
            k = len(plan.vectors)
            vec_grads = [grads[i] for i in plan.vectors]
            norms_v = stats.foreach_norms([ps[i].detach() for i in plan.vectors] + vec_grads)
            factor, trigger = self._factor(norms_v[:k], norms_v[k:])
            for (dev, _), idx in _by_device_dtype(vec_grads).items():
                torch._foreach_mul_([vec_grads[j] for j in idx], [factor[j].to(dev) for j in idx])
            parts.append(trigger.to(device))
        for grp in plan.groups:
            g_list = [grads[i] for i in grp]
            g_stack = torch.stack(g_list)  # [G, O, ...]
            w_stack = torch.stack([ps[i].detach() for i in grp])
            dims = tuple(range(2, g_stack.ndim))
            kwargs = {"dtype": torch.float32} if g_stack.dtype in _LOW_PRECISION else {}
            w_norm = torch.linalg.vector_norm(w_stack, dim=dims, keepdim=True, **kwargs).float()
            g_norm = torch.linalg.vector_norm(g_stack, dim=dims, keepdim=True, **kwargs).float()
            del w_stack
            factor, trigger = self._factor(w_norm, g_norm)
            torch._foreach_copy_(g_list, list(g_stack.mul_(factor).unbind(0)))  # fp16/bf16: math in fp32
            parts.append(trigger.reshape(len(grp), -1).any(1).to(device))
        return torch.cat(parts)[plan.order]

    def _per_tensor(self, ps: list[Tensor], grads: list[Tensor], sharded: bool = False) -> Tensor:
        """One tensor at a time (DTensor shards: each rank clips the whole rows it holds)."""
        vectors = [
            i
            for i, (p, g) in enumerate(zip(ps, grads, strict=True))
            if id(p) not in self._exclude and g.ndim <= 1
        ]
        vec_norms: dict[int, tuple[Tensor, Tensor]] = {}
        if vectors:  # a bias is one unit: the norm of the whole vector, over every rank's shard
            both = [ps[i].detach() for i in vectors] + [grads[i] for i in vectors]
            norms_v = (
                _dist.global_per_tensor_norms(both)
                if sharded
                else stats.foreach_norms([_dist.local(t) for t in both])
            )
            k = len(vectors)
            vec_norms = {i: (norms_v[j], norms_v[k + j]) for j, i in enumerate(vectors)}
        flags: list[Tensor] = []
        for i, (p, g) in enumerate(zip(ps, grads, strict=True)):
            if id(p) in self._exclude:
                flags.append(torch.zeros((), dtype=torch.bool, device=_dist.local(g).device))
                continue
            if not (_dist.whole_rows(p) and _dist.whole_rows(g)):
                raise ValueError(AGC_SHARD_MSG)
            if i in vec_norms:
                w_norm, g_norm = (t.to(_dist.local(g).device) for t in vec_norms[i])
            else:
                w_norm, g_norm = unitwise_norm(_dist.local(p.detach())), unitwise_norm(_dist.local(g))
            factor, trigger = self._factor(w_norm, g_norm)
            _dist.local(g).mul_(factor)
            flags.append(trigger.any())
        affected = torch.stack([f.to(flags[0].device) for f in flags])
        return _dist.any_rank(affected) if sharded else affected  # the same record on every rank


def _by_device_dtype(tensors: list[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    out: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        out.setdefault((t.device, t.dtype), []).append(i)
    return out
