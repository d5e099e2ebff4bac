"""Fixed-threshold gradient clippers: global norm, value and per-layer norm (AGC lives in
:mod:`gradsentry.remedies.agc` and is re-exported here).

Every clipper acts in place on ``p.grad``, never copies a value to the host, and returns a
:class:`~gradsentry.remedies.RemedyResult` whose tensors are read lazily.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from gradsentry.remedies.agc import AGC
from gradsentry.remedies.base import (
    RemedyResult,
    check_positive,
    grads_of,
    group_by_device_dtype,
    param_names,
    per_tensor_norms,
    scale_grads_,
    total_norm,
)

if TYPE_CHECKING:
    from gradsentry.remedies.guard import NonFiniteGuard

__all__ = ["AGC", "ClipGlobalNorm", "ClipLayerNorm", "ClipValue", "NonFiniteGradientError"]

_EPS = 1e-6  # the same guard against division by zero as torch.nn.utils.clip_grad_norm_


class NonFiniteGradientError(RuntimeError):
    """The global gradient norm is NaN or infinite and the clipper was asked to raise."""


def _l2_norms(grads: list[Tensor], norms: Tensor | None) -> Tensor:
    return norms if norms is not None else per_tensor_norms(grads, 2.0)


class ClipGlobalNorm:
    """Rescale all gradients together so that their global p-norm is at most ``max_norm``.

    The result equals ``torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)`` (foreach path):
    gradients are multiplied by ``min(max_norm / (total + 1e-6), 1)`` unconditionally, so no host sync
    happens. For float32/float64 gradients it is bit-identical; fp16/bf16 per-tensor norms are
    accumulated and returned in float32 (torch returns them in the gradient's dtype, where a norm above
    65504 overflows to inf in fp16).

    Args:
        max_norm: largest allowed global norm, same units as the gradient (> 0).
        norm_type: p of the p-norm (``math.inf`` for max-abs). The Monitor's shared per-tensor norms
            are L2 norms, so they are reused only when ``norm_type == 2``.
        error_if_nonfinite: raise :class:`NonFiniteGradientError` when the global norm is NaN/inf
            (costs one host sync per step, as in torch).
        skip_nonfinite: on a NaN/inf global norm, skip the step as :class:`NonFiniteGuard` does
            (gradients set to None, ``result.skip`` True) instead of scaling every gradient by NaN;
            costs one host sync per step.

    Raises:
        ValueError: ``max_norm`` not a positive number, or both non-finite options set.

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(2)); p.grad = torch.tensor([3.0, 4.0])
        >>> r = ClipGlobalNorm(1.0)([p]); round(float(r.norm_before), 4), p.grad.norm().item() <= 1.0
        (5.0, True)

    References:
        Pascanu et al., "On the difficulty of training recurrent neural networks", 2013,
        arXiv:1211.5063.
    """

    def __init__(
        self,
        max_norm: float,
        norm_type: float = 2.0,
        error_if_nonfinite: bool = False,
        skip_nonfinite: bool = False,
    ) -> None:
        self.max_norm = check_positive("max_norm", max_norm)
        self.norm_type = float(norm_type)
        if error_if_nonfinite and skip_nonfinite:
            raise ValueError("choose one of error_if_nonfinite=True and skip_nonfinite=True, not both")
        self.error_if_nonfinite = error_if_nonfinite
        self.skip_nonfinite = skip_nonfinite
        self._guard: NonFiniteGuard | None = None

    def __repr__(self) -> str:
        return f"ClipGlobalNorm(max_norm={self.max_norm}, norm_type={self.norm_type})"

    @torch.no_grad()
    def __call__(
        self, params: Iterable[Tensor], *, norms: Tensor | None = None, loss: Tensor | float | None = None
    ) -> RemedyResult:
        ps, grads = grads_of(params)
        if not grads:
            return RemedyResult("ClipGlobalNorm", norm_before=0.0, norm_after=0.0, threshold=self.max_norm)
        if norms is None or self.norm_type != 2.0:
            norms = per_tensor_norms(grads, self.norm_type)
        total = total_norm(norms, self.norm_type)
        if self.error_if_nonfinite and not bool(torch.isfinite(total)):
            raise NonFiniteGradientError(
                f"the global gradient norm (order {self.norm_type}) is {float(total)}, so it cannot be "
                "clipped; skip the step with NonFiniteGuard or pass skip_nonfinite=True"
            )
        if self.skip_nonfinite:
            if self._guard is None:
                from gradsentry.remedies.guard import NonFiniteGuard

                self._guard = NonFiniteGuard()
            guarded = self._guard(ps, norms=norms if self.norm_type == 2.0 else None)
            if guarded.skip:
                guarded.name = "ClipGlobalNorm"
                guarded.threshold = self.max_norm
                return guarded
        coef = torch.clamp(self.max_norm / (total + _EPS), max=1.0)
        scale_grads_(grads, coef)
        return RemedyResult(
            "ClipGlobalNorm",
            norm_before=total,
            clipped=None,
            threshold=self.max_norm,
            scale=coef,
        )


class ClipValue:
    """Clamp every gradient entry to ``[-limit, limit]`` (same result as ``clip_grad_value_``).

    Args:
        limit: largest allowed absolute gradient entry, same units as the gradient (> 0).

    Raises:
        ValueError: if ``limit`` is not a positive number.
    """

    def __init__(self, limit: float) -> None:
        self.limit = check_positive("limit", limit)

    def __repr__(self) -> str:
        return f"ClipValue(limit={self.limit})"

    @torch.no_grad()
    def __call__(
        self, params: Iterable[Tensor], *, norms: Tensor | None = None, loss: Tensor | float | None = None
    ) -> RemedyResult:
        _ps, grads = grads_of(params)
        if not grads:
            return RemedyResult("ClipValue", threshold=self.limit)
        max_abs = per_tensor_norms(grads, math.inf)
        before = total_norm(norms) if norms is not None else None
        for _, idx in group_by_device_dtype(grads).items():
            group = [grads[i] for i in idx]
            torch._foreach_clamp_min_(group, -self.limit)
            torch._foreach_clamp_max_(group, self.limit)
        return RemedyResult(
            "ClipValue",
            norm_before=before,
            clipped=(max_abs > self.limit).any(),
            threshold=self.limit,
            extra={"max_abs_before": max_abs.max()},
        )


def _layer_groups(
    layers: nn.Module | Mapping[str, Iterable[Tensor]] | None,
) -> tuple[dict[int, int], list[str]]:
    if layers is None:
        return {}, []
    if isinstance(layers, nn.Module):
        owners = param_names(layers)
        order: dict[str, int] = {}
        group_of: dict[int, int] = {}
        for pid, (layer, _) in owners.items():
            group_of[pid] = order.setdefault(layer or "<root>", len(order))
        return group_of, list(order)
    if not isinstance(layers, Mapping):
        raise TypeError(
            f"layers must be a module, a mapping name -> parameters or None, got {type(layers).__name__}"
        )
    group_of = {}
    names = []
    for gi, (name, ps) in enumerate(layers.items()):
        names.append(str(name))
        for p in ps:
            if id(p) in group_of:
                raise ValueError(f"parameter listed in two layers: {names[group_of[id(p)]]!r} and {name!r}")
            group_of[id(p)] = gi
    return group_of, names


class ClipLayerNorm:
    """Clip each layer's gradient L2 norm to ``max_norm`` separately.

    A layer is a module that owns parameters directly (its weight and bias are clipped together).
    Pass the model as ``layers`` to group that way, or a mapping ``{name: parameters}`` for your own
    groups. Without either (``layers=None``) every parameter tensor is its own group, because a bare
    list of tensors carries no module structure. Parameters missing from the mapping are clipped alone.

    Args:
        max_norm: largest allowed per-layer L2 norm, same units as the gradient (> 0).
        layers: the model, a mapping of layer name to parameters, or None (one group per tensor).

    Raises:
        ValueError: ``max_norm`` not positive, or a parameter listed under two names.
        TypeError: ``layers`` of another type.
    """

    def __init__(
        self, max_norm: float, layers: nn.Module | Mapping[str, Iterable[Tensor]] | None = None
    ) -> None:
        self.max_norm = check_positive("max_norm", max_norm)
        self._group_of, self._group_names = _layer_groups(layers)
        self._cache: tuple[tuple[int, ...], Tensor, list[str]] | None = None

    def __repr__(self) -> str:
        return f"ClipLayerNorm(max_norm={self.max_norm})"

    def _index(self, ps: list[Tensor], device: torch.device) -> tuple[Tensor, list[str]]:
        key = tuple(id(p) for p in ps)
        if self._cache is not None and self._cache[0] == key and self._cache[1].device == device:
            return self._cache[1], self._cache[2]
        local: dict[int, int] = {}
        names: list[str] = []
        idx: list[int] = []
        for i, p in enumerate(ps):
            g = self._group_of.get(id(p))
            gkey = g if g is not None else -1 - i
            if gkey not in local:
                local[gkey] = len(names)
                names.append(self._group_names[g] if g is not None else f"param[{i}]")
            idx.append(local[gkey])
        index = torch.tensor(idx, device=device)
        self._cache = (key, index, names)
        return index, names

    @torch.no_grad()
    def __call__(
        self, params: Iterable[Tensor], *, norms: Tensor | None = None, loss: Tensor | float | None = None
    ) -> RemedyResult:
        ps, grads = grads_of(params)
        if not grads:
            return RemedyResult("ClipLayerNorm", threshold=self.max_norm)
        norms = _l2_norms(grads, norms)
        index, names = self._index(ps, norms.device)
        sq = torch.zeros(len(names), dtype=norms.dtype, device=norms.device).index_add_(
            0, index, norms * norms
        )
        layer_norm = sq.sqrt()
        coef = torch.clamp(self.max_norm / (layer_norm + _EPS), max=1.0)
        per_tensor = coef[index]
        scale_grads_(grads, per_tensor.unbind())
        affected = coef < 1.0
        return RemedyResult(
            "ClipLayerNorm",
            norm_before=total_norm(norms),
            norm_after=total_norm(norms * per_tensor),
            clipped=affected.any(),
            threshold=self.max_norm,
            affected=affected,
            names=names,
            norms_after=norms * per_tensor,
        )
