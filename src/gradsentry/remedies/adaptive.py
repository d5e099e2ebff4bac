"""Adaptive global-norm clippers whose threshold follows the run: AutoClip and ZClip.

Both keep their state on the gradients' device, so a step never copies a value to the host;
``state_dict()`` (which does copy) returns plain Python numbers for checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from gradsentry.remedies.base import (
    RemedyResult,
    check_positive,
    grads_of,
    per_tensor_norms,
    scale_grads_,
    total_norm,
)

__all__ = ["AutoClip", "ZClip"]

_EPS = 1e-6


def _scale(norm: Tensor, threshold: Tensor, active: Tensor) -> Tensor:
    """``min(threshold / (norm + 1e-6), 1)`` where ``active``, else 1 (no NaN for a non-finite norm)."""
    coef = torch.clamp(threshold / (norm + _EPS), max=1.0)
    return torch.where(active & torch.isfinite(coef), coef, torch.ones_like(coef))


class AutoClip:
    """Clip the global L2 norm to the p-th percentile of the norms seen so far (AutoClip).

    Each call appends the current global norm to a ring buffer of the last ``history`` norms (kept on
    the device; a non-finite norm is stored as NaN and ignored), takes the ``percentile``-th percentile
    of the buffer (linear interpolation, as ``numpy.percentile``) and clips as ``clip_grad_norm_``
    would with that threshold. Memory is O(history); no host sync. The original keeps the whole
    history, so both agree exactly while fewer than ``history`` steps have run.

    Args:
        percentile: p in [0, 100]; the paper recommends 10.
        history: number of recent norms kept (>= 1).

    Raises:
        ValueError: ``percentile`` outside [0, 100] or ``history`` < 1.

    References:
        Seetharaman et al., "AutoClip: Adaptive Gradient Clipping for Source Separation Networks",
        2020, arXiv:2007.14469.
    """

    def __init__(self, percentile: float = 10.0, history: int = 1000) -> None:
        if not 0.0 <= float(percentile) <= 100.0:
            raise ValueError(f"percentile must be in [0, 100], got {percentile!r}")
        if int(history) < 1:
            raise ValueError(f"history must be >= 1, got {history!r}")
        self.percentile = float(percentile)
        self.history = int(history)
        self.count = 0
        self._buf: Tensor | None = None

    def __repr__(self) -> str:
        return f"AutoClip(percentile={self.percentile}, history={self.history})"

    @torch.no_grad()
    def __call__(
        self, params: Iterable[Tensor], *, norms: Tensor | None = None, loss: Tensor | float | None = None
    ) -> RemedyResult:
        _ps, grads = grads_of(params)
        if not grads:
            return RemedyResult("AutoClip")
        total = total_norm(norms if norms is not None else per_tensor_norms(grads))
        if self._buf is None or self._buf.device != total.device:
            self._buf = torch.full((self.history,), float("nan"), dtype=torch.float64, device=total.device)
        finite = torch.isfinite(total)
        self._buf[self.count % self.history] = torch.where(finite, total.to(torch.float64), float("nan"))
        self.count += 1
        filled = self._buf[: min(self.count, self.history)]
        threshold = torch.nanquantile(filled, self.percentile / 100.0).to(total.dtype)
        coef = _scale(total, threshold, torch.isfinite(threshold))
        scale_grads_(grads, coef)
        return RemedyResult(
            "AutoClip",
            norm_before=total,
            clipped=None,
            threshold=threshold,
            scale=coef,
        )

    @property
    def buffer(self) -> Tensor | None:
        """The device ring buffer of recent global norms (shape [history], float64, NaN = empty)."""
        return self._buf

    def state_dict(self) -> dict[str, Any]:
        """``{"count": int, "history": [float, ...]}`` (the stored norms, oldest first)."""
        if self._buf is None:
            return {"count": self.count, "history": []}
        n = min(self.count, self.history)
        start = self.count % self.history if self.count > self.history else 0
        order = torch.roll(self._buf, -start)[:n] if self.count > self.history else self._buf[:n]
        return {"count": self.count, "history": order.tolist()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (the buffer is rebuilt on the CPU and moves on the next call)."""
        try:
            count, hist = int(state["count"]), [float(x) for x in state["history"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not an AutoClip state dict (need 'count' and 'history'): {exc}") from exc
        hist = hist[-self.history :]
        self._buf = torch.full((self.history,), float("nan"), dtype=torch.float64)
        self._buf[: len(hist)] = torch.tensor(hist, dtype=torch.float64)
        self.count = len(hist) if count >= len(hist) else count


class ZClip:
    """Z-score spike clipping of the global L2 norm with EMA statistics (ZClip).

    For ``warmup_steps`` calls the global norms are collected and the gradient is clipped to
    ``max_grad_norm`` (1.0 by default, as in the reference implementation: without it the warm-up steps
    are unprotected, and a vanilla tanh RNN, Pascanu et al.'s case, reaches NaN inside them); then the mean μ and variance σ² are initialised from them and updated each step with
    ``μ ← αμ + (1-α)x``, ``σ² ← ασ² + (1-α)(x-μ)²`` (new μ). With ``z = (g - μ)/(σ + eps)`` and
    ``z > z_thresh``, the norm g is clipped to ``μ + z_thresh·σ / (z / z_thresh)`` times
    ``clip_factor`` (``clip_option="adaptive_scaling"``) or to μ (``"mean"``); ``mode="percentile"``
    clips to ``μ + z_thresh·σ`` whenever g exceeds it. The EMA is then fed the clipped value (or
    skipped on a spike when ``skip_update_on_spike``). Non-finite norms never enter the statistics and
    are left for :class:`NonFiniteGuard`. State lives in float64 device tensors: no host sync per step.

    Args:
        alpha: EMA smoothing factor in (0, 1).
        z_thresh: z-score threshold (> 0).
        warmup_steps: number of calls used to initialise the statistics (>= 1).
        max_grad_norm: the global-norm cap during warm-up (same units as the gradient; the reference
            implementation's default 1.0). None: no clipping at all during warm-up.
        cap_after_warmup: also keep ``max_grad_norm`` as a ceiling on top of the adaptive threshold after
            warm-up (a gradsentry addition; the reference caps during warm-up only). A z-score follows a
            *sustained* explosion (the EMA adapts to it), so only a fixed ceiling bounds every step then.
        eps: added to σ in the z-score.
        mode: ``"zscore"`` or ``"percentile"``.
        clip_option: ``"adaptive_scaling"`` or ``"mean"`` (z-score mode only).
        clip_factor: multiplier of the adaptive threshold (> 0).
        skip_update_on_spike: do not update the EMA on a spike step.

    Raises:
        ValueError: any argument out of range or an unknown option.

    References:
        Kumar et al., "ZClip: Adaptive Spike Mitigation for LLM Pre-Training", 2025, arXiv:2504.02507.
    """

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup_steps: int = 25,
        *,
        max_grad_norm: float | None = 1.0,
        cap_after_warmup: bool = False,
        eps: float = 1e-6,
        mode: Literal["zscore", "percentile"] = "zscore",
        clip_option: Literal["adaptive_scaling", "mean"] = "adaptive_scaling",
        clip_factor: float = 1.0,
        skip_update_on_spike: bool = False,
    ) -> None:
        if not 0.0 < float(alpha) < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
        if int(warmup_steps) < 1:
            raise ValueError(f"warmup_steps must be >= 1, got {warmup_steps!r}")
        if mode not in ("zscore", "percentile"):
            raise ValueError(f"mode must be 'zscore' or 'percentile', got {mode!r}")
        if clip_option not in ("adaptive_scaling", "mean"):
            raise ValueError(f"clip_option must be 'adaptive_scaling' or 'mean', got {clip_option!r}")
        self.alpha = float(alpha)
        self.z_thresh = check_positive("z_thresh", z_thresh)
        self.warmup_steps = int(warmup_steps)
        self.max_grad_norm = None if max_grad_norm is None else check_positive("max_grad_norm", max_grad_norm)
        self.cap_after_warmup = bool(cap_after_warmup)
        self.eps = check_positive("eps", eps, allow_zero=True)
        self.mode = mode
        self.clip_option = clip_option
        self.clip_factor = check_positive("clip_factor", clip_factor)
        self.skip_update_on_spike = skip_update_on_spike
        self.count = 0
        self._warm: Tensor | None = None
        self._mean: Tensor | None = None
        self._var: Tensor | None = None

    def __repr__(self) -> str:
        return (
            f"ZClip(alpha={self.alpha}, z_thresh={self.z_thresh}, warmup_steps={self.warmup_steps}, "
            f"max_grad_norm={self.max_grad_norm})"
        )

    @property
    def initialized(self) -> bool:
        """True once the warm-up is over and the EMA statistics exist."""
        return self._mean is not None

    @torch.no_grad()
    def __call__(
        self, params: Iterable[Tensor], *, norms: Tensor | None = None, loss: Tensor | float | None = None
    ) -> RemedyResult:
        _ps, grads = grads_of(params)
        if not grads:
            return RemedyResult("ZClip")
        total = total_norm(norms if norms is not None else per_tensor_norms(grads))
        x = total.to(torch.float64)
        finite = torch.isfinite(x)
        self.count += 1
        spike: Tensor | bool = False
        warming = self._mean is None or self._var is None
        if self._mean is None or self._var is None:
            if self._warm is None or self._warm.device != x.device:
                warm = torch.full((self.warmup_steps,), float("nan"), dtype=torch.float64, device=x.device)
                if self._warm is not None:
                    warm.copy_(self._warm)
                self._warm = warm
            self._warm[min(self.count, self.warmup_steps) - 1] = torch.where(finite, x, float("nan"))
            threshold = torch.full_like(x, float("inf"))
            if self.count >= self.warmup_steps:
                self._mean = torch.nanmean(self._warm)
                self._var = torch.nanmean((self._warm - self._mean) ** 2)
                self._warm = None
        else:
            mean, var = self._mean.to(x.device), self._var.to(x.device)
            std = var.sqrt()
            if self.mode == "percentile":
                adaptive = mean + self.z_thresh * std
                spike = finite & (x > adaptive)
            else:
                z = (x - mean) / (std + self.eps)
                spike = finite & (z > self.z_thresh)
                if self.clip_option == "mean":
                    adaptive = mean
                else:  # mean + z_thresh·std / (z / z_thresh), written with fewer kernel launches
                    adaptive = (self.z_thresh**2) * std / z + mean
                    if self.clip_factor != 1.0:
                        adaptive = adaptive * self.clip_factor
            threshold = torch.where(spike, adaptive, float("inf"))
            effective = torch.where(spike, adaptive, x)
            update = finite & ~spike if self.skip_update_on_spike else finite
            new_mean = torch.lerp(mean, effective, 1 - self.alpha)  # alpha·mean + (1-alpha)·effective
            new_var = torch.lerp(var, (effective - new_mean).square(), 1 - self.alpha)
            # A NaN mean (the warm-up saw no finite norm) restarts from the first finite value.
            known = torch.isfinite(mean)
            new_mean = torch.where(known, new_mean, effective)
            new_var = torch.where(known, new_var, 0.0)
            self._mean = torch.where(update, new_mean, mean)
            self._var = torch.where(update, new_var, var)
        if self.max_grad_norm is not None and (warming or self.cap_after_warmup):
            threshold = torch.clamp(threshold, max=self.max_grad_norm)
        active = finite & (x > threshold)
        coef = torch.where(active, threshold / (x + _EPS), 1.0).to(total.dtype)
        scale_grads_(grads, coef)
        return RemedyResult(
            "ZClip",
            norm_before=total,
            clipped=active,
            threshold=threshold,
            extra={"spike": spike},
            scale=coef,
        )

    def state_dict(self) -> dict[str, Any]:
        """Plain Python state: ``{"count", "mean", "var", "warmup": [floats]}`` (copies to the host)."""
        return {
            "count": self.count,
            "mean": None if self._mean is None else float(self._mean),
            "var": None if self._var is None else float(self._var),
            "warmup": [] if self._warm is None else self._warm[: self.count].tolist(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; tensors are rebuilt on the CPU and follow the gradients.

        Raises:
            ValueError: if ``state`` lacks a key or holds non-numbers.
        """
        try:
            count = int(state["count"])
            mean, var = state["mean"], state["var"]
            warm = [float(v) for v in state.get("warmup", [])]
            self._mean = None if mean is None else torch.tensor(float(mean), dtype=torch.float64)
            self._var = None if var is None else torch.tensor(float(var), dtype=torch.float64)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a ZClip state dict (need 'count', 'mean', 'var'): {exc}") from exc
        self.count = count
        self._warm = None
        if self._mean is None:
            self._warm = torch.full((self.warmup_steps,), float("nan"), dtype=torch.float64)
            self._warm[: len(warm)] = torch.tensor(warm, dtype=torch.float64)
