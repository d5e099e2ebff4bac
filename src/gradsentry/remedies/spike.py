"""Skip the optimizer step on a finite spike of the loss or of the global gradient norm, on the device."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from gradsentry import _dist
from gradsentry.remedies.base import (
    RemedyResult,
    check_optimizer,
    check_positive,
    grads_of,
    per_tensor_norms,
    total_norm,
)
from gradsentry.remedies.skipstep import device_skip

__all__ = ["SpikeSkip"]

_SERIES = ("loss", "norm")


class SpikeSkip:
    """Skip the step when the loss or the global gradient L2 norm jumps above mean + k·σ of the last N.

    The rule, for each watched series x (the step's loss; the global L2 norm of the gradients, before
    any later clipper of a chain): with ``μ`` and ``σ`` the mean and the population standard deviation
    (ddof 0) of the last ``window`` values *of steps that were not skipped*, the step is a spike when
    ``x > μ + k · max(σ, min_std)``, and it is skipped when any watched series spikes or is NaN/inf.
    The rule cannot fire before ``warmup`` values are in the window (``warmup = window`` by default),
    and a skipped step's values never enter it, so one spike does not widen the band for the next.
    One-sided, as Levanter's (a falling loss is never skipped).

    How this relates to the published rules: Levanter (``SkipStepConfig``) uses the same one-sided
    threshold ``mean + sigma_factor · max(std, 1e-6)`` over the last ``rolling_interval_length`` steps
    (128, ``sigma_factor`` 6: our defaults) but starts after ``N // 2`` values and lets spikes enter the
    window; OLMo-core's ``SkipStepOptimizer`` uses ``|x - mean| / std <= sigma_factor`` (two-sided,
    Bessel-corrected std, the last 128 steps, from ``max(20, N // 2)`` steps on). Our warm-up and
    spike exclusion follow ZClip's practice of keeping outliers out of the statistics.

    No host sync: the windows are a device ring buffer (float64, shape ``[2, window]``), the decision
    a 0-d bool tensor. With ``optimizer`` the step is skipped on the device through the optimizer's
    :class:`~gradsentry.remedies.skipstep.DeviceSkip` (``found_inf`` for fused optimizers, restore for
    the others: any ``torch.optim`` optimizer; see that module for what a skipped step still changes).
    Without one, ``result.skip`` (one host copy) tells the caller not to step. It composes with
    clipping: ``Chain(SpikeSkip(opt), ClipGlobalNorm(1.0))`` watches the unclipped norm and hands its
    per-tensor norms on to the clipper. Under ``torch.distributed`` the decision is OR-ed over ranks.

    Args:
        optimizer: the optimizer whose step is skipped on the device (optional, see above).
        k: the number of standard deviations above the mean (dimensionless, > 0).
        window: N, how many accepted steps the statistics cover (>= 2).
        warmup: values needed in the window before the rule can fire (2 <= warmup <= window).
        watch: which series to watch: ``"loss"``, ``"norm"`` or both. The loss is watched on the steps
            where ``loss=`` is given (a tensor or a float; the Monitor passes it).
        min_std: floor of σ, in the series' units (Levanter: 1e-6), so that a flat history does not
            make every rounding-level rise a spike.

    Raises:
        ValueError: a bad number or an unknown series in ``watch``.

    References:
        AI2, OLMo-core ``SkipStepOptimizer`` (allenai/OLMo-core,
        ``src/olmo_core/optim/skip_step_optimizer.py``, 2024-25); Stanford CRFM, Levanter
        ``SkipStepConfig`` (stanford-crfm/levanter, 2025); Kumar et al., "ZClip: Adaptive Spike
        Mitigation for LLM Pre-Training", 2025, arXiv:2504.02507 (outliers kept out of the
        statistics). MaxText's variant was not checked for this rule.

    Example:
        >>> from gradsentry.remedies import Chain, ClipGlobalNorm
        >>> # fix = Chain(SpikeSkip(opt), ClipGlobalNorm(1.0)); fix(model.parameters(), loss=loss)
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        k: float = 6.0,
        window: int = 128,
        warmup: int | None = None,
        watch: str | Sequence[str] = ("loss", "norm"),
        min_std: float = 1e-6,
    ) -> None:
        check_optimizer("SpikeSkip(optimizer=...)", optimizer, optional=True)
        self.k = check_positive("k", k)
        if int(window) < 2:
            raise ValueError(f"window must be >= 2, got {window!r}")
        self.window = int(window)
        self.warmup = self.window if warmup is None else int(warmup)
        if not 2 <= self.warmup <= self.window:
            raise ValueError(f"warmup must be in [2, window={self.window}], got {warmup!r}")
        watched = (watch,) if isinstance(watch, str) else tuple(watch)
        if not watched or any(w not in _SERIES for w in watched):
            raise ValueError(f"watch takes 'loss' and/or 'norm', got {watch!r}")
        self.watch = watched
        self.min_std = check_positive("min_std", min_std, allow_zero=True)
        self.optimizer = optimizer
        self._skipper = device_skip(optimizer) if optimizer is not None else None
        self._buf: Tensor | None = None  # [2, window] float64: rows loss, norm; ring buffers
        self._count: Tensor | None = None  # [2] int64: values in each window (<= window)
        self._pos: Tensor | None = None  # [2] int64: where the next accepted value goes
        self._skips: Tensor | None = None  # 0-d int64
        self._present: dict[tuple[bool, bool], Tensor] = {}

    def __repr__(self) -> str:
        return f"SpikeSkip(k={self.k}, window={self.window}, warmup={self.warmup}, watch={self.watch})"

    def _state_on(self, device: torch.device) -> None:
        dtype = torch.float64 if device.type != "mps" else torch.float32
        if self._buf is None:
            self._buf = torch.zeros(2, self.window, dtype=dtype, device=device)
            self._count = torch.zeros(2, dtype=torch.int64, device=device)
            self._pos = torch.zeros(2, dtype=torch.int64, device=device)
            self._skips = torch.zeros((), dtype=torch.int64, device=device)
            self._present.clear()
        elif self._buf.device != device:
            self._buf, self._count = self._buf.to(device, dtype), self._count.to(device)  # type: ignore[union-attr]
            self._pos, self._skips = self._pos.to(device), self._skips.to(device)  # type: ignore[union-attr]
            self._present.clear()

    @property
    def skips(self) -> int:
        """Steps this remedy skipped (one host copy)."""
        return 0 if self._skips is None else int(self._skips.item())

    def statistics(self) -> dict[str, tuple[float, float, int]]:
        """``{series: (mean, std, n)}`` of the current windows (host copy; for inspection and tests)."""
        if self._buf is None or self._count is None:
            return {}
        mean, std = self._moments()
        n = self._count.tolist()
        return {s: (float(mean[i]), float(std[i]), n[i]) for i, s in enumerate(_SERIES) if s in self.watch}

    def _moments(self) -> tuple[Tensor, Tensor]:
        assert self._buf is not None and self._count is not None
        valid = torch.arange(self.window, device=self._buf.device) < self._count[:, None]
        n = self._count.clamp_min(1).to(self._buf.dtype)
        mean = torch.where(valid, self._buf, 0.0).sum(1) / n
        dev = torch.where(valid, self._buf - mean[:, None], 0.0)
        return mean, (dev * dev).sum(1).div(n).sqrt()

    @torch.no_grad()
    def __call__(
        self, params: Iterable[Tensor], *, norms: Tensor | None = None, loss: Tensor | float | None = None
    ) -> RemedyResult:
        _, grads = grads_of(params)
        watch_norm = "norm" in self.watch and bool(grads)
        watch_loss = "loss" in self.watch and loss is not None
        if not (watch_norm or watch_loss):
            return RemedyResult("SpikeSkip", norms_after=norms)
        if watch_norm and norms is None:
            norms = per_tensor_norms(grads)
        if norms is not None:
            device = norms.device
        elif isinstance(loss, Tensor):
            device = loss.device
        else:
            device = grads[0].device if grads else torch.device("cpu")
        self._state_on(device)
        assert self._buf is not None and self._count is not None and self._pos is not None
        assert self._skips is not None
        dtype = self._buf.dtype
        zero = torch.zeros((), dtype=dtype, device=device)
        norm = total_norm(norms).to(dtype) if watch_norm and norms is not None else zero
        if not watch_loss:
            loss_t = zero
        elif isinstance(loss, Tensor):
            loss_t = loss.detach().to(device, dtype).reshape(())
        else:  # a host number: a fill kernel, no copy
            loss_t = torch.full((), float(loss), dtype=dtype, device=device)  # type: ignore[arg-type]
        x = torch.stack([loss_t, norm])
        present = self._present.get((watch_loss, watch_norm))
        if present is None:
            present = torch.tensor([watch_loss, watch_norm], device=device)
            self._present[(watch_loss, watch_norm)] = present
        mean, std = self._moments()
        threshold = mean + self.k * std.clamp_min(self.min_std)
        warm = self._count >= self.warmup
        spike = present & (~torch.isfinite(x) | (warm & (x > threshold)))
        skip = _dist.any_rank(spike.any())
        accept = present & ~skip
        # the accepted values enter the ring buffers; a skipped step's do not
        col = self._pos[:, None]
        self._buf.scatter_(1, col, torch.where(accept[:, None], x[:, None], self._buf.gather(1, col)))
        step = accept.to(torch.int64)
        self._pos.add_(step).remainder_(self.window)
        self._count.add_(step).clamp_(max=self.window)
        self._skips.add_(skip.to(torch.int64))
        shown = torch.where(warm, threshold, torch.full_like(threshold, float("inf")))
        extra: dict[str, Any] = {}
        if watch_loss:
            extra.update(loss=loss_t, loss_threshold=shown[0])
        if self._skipper is not None:
            self._skipper.arm(self, skip)
            extra["by"] = self._skipper.mode
        return RemedyResult(
            "SpikeSkip",
            norm_before=norm if watch_norm else None,
            norm_after=norm if watch_norm else None,
            skipped=skip,
            threshold=shown[1] if watch_norm else None,
            extra=extra,
            norms_after=norms,
        )

    def state_dict(self) -> dict[str, Any]:
        """Plain Python state (one host copy): ``{"loss": [...], "norm": [...], "skips": int, "pos":
        [int, int]}``, each window's accepted values oldest first; ``pos`` (optional on load) keeps the
        ring's layout, so that a restored remedy sums in the same order and continues bit for bit."""
        out: dict[str, Any] = {"loss": [], "norm": [], "skips": self.skips, "pos": [0, 0]}
        if self._buf is None or self._count is None or self._pos is None:
            return out
        buf, count, pos = self._buf.tolist(), self._count.tolist(), self._pos.tolist()
        out["pos"] = pos
        for i, s in enumerate(_SERIES):
            n = count[i]
            row = buf[i]
            out[s] = row[:n] if n < self.window else row[pos[i] :] + row[: pos[i]]
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (rebuilt on the CPU; it follows the gradients' device).

        Raises:
            ValueError: if ``state`` lacks a key or holds non-numbers.
        """
        try:
            rows = [[float(v) for v in state[s]][-self.window :] for s in _SERIES]
            skips = int(state["skips"])
            pos = [int(v) % self.window for v in state.get("pos", [len(r) % self.window for r in rows])]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a SpikeSkip state dict (need 'loss', 'norm', 'skips'): {exc}") from exc
        self._buf = None
        self._state_on(torch.device("cpu"))
        assert self._buf is not None and self._count is not None and self._pos is not None
        for i, row in enumerate(rows):
            n = len(row)
            at = [(pos[i] - n + j) % self.window for j in range(n)]  # the oldest sits n before pos
            self._buf[i, at] = torch.tensor(row, dtype=self._buf.dtype)
            self._count[i] = n
            self._pos[i] = pos[i]
        self._skips = torch.tensor(skips, dtype=torch.int64)
