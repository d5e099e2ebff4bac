"""Skip steps with non-finite gradients, and reset the optimizer moments of hit parameters.

Why gradients are set to None rather than zeroed: PyTorch optimizers skip every parameter whose
``.grad`` is None, so ``optimizer.step()`` then leaves weights *and* optimizer state (Adam moments and
step count, SGD momentum buffers) bit-identical (checked on torch 2.13 for SGD-momentum, Adam and
AdamW, foreach and fused). Zeroed gradients would still let momentum and weight decay move the weights.
That is the ``sync=True`` path (one host copy per step). ``NonFiniteGuard(optimizer, sync=False)`` skips
on the device instead, through :mod:`gradsentry.remedies.skipstep` (``found_inf`` for fused optimizers,
snapshot-and-restore for the others; what a skipped step still changes is listed there).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from gradsentry import _dist
from gradsentry.remedies.base import (
    RemedyResult,
    check_optimizer,
    check_positive,
    grads_of,
    names_for,
    param_names,
    per_tensor_norms,
    total_norm,
)
from gradsentry.remedies.skipstep import device_skip

__all__ = ["NonFiniteGuard", "ResetMoments", "scale_lr_"]

log = logging.getLogger("gradsentry")


def scale_lr_(optimizer: torch.optim.Optimizer, factor: float, min_lr: float = 0.0) -> list[float]:
    """Multiply every parameter group's learning rate by ``factor`` (floored at ``min_lr``).

    Works for float and tensor learning rates (the latter in place). Returns the new rates.
    """
    out = []
    for group in optimizer.param_groups:
        lr = group["lr"]
        if isinstance(lr, Tensor):
            lr.mul_(factor).clamp_(min=min_lr)
            out.append(float(lr))
        else:
            group["lr"] = max(float(lr) * factor, min_lr)
            out.append(group["lr"])
    return out


class NonFiniteGuard:
    """Skip the optimizer step when any gradient (or the loss) is NaN or infinite.

    Two ways to skip:

    * ``sync=True`` (default, any optimizer): one device→host copy per step reads which gradients are
      non-finite; on a bad step every ``p.grad`` is set to None, so a following ``optimizer.step()``
      changes nothing (see the module docstring), and ``result.skip`` is True.
    * ``sync=False`` (any ``torch.optim`` optimizer, passed as ``optimizer``): no host copy. The guard
      hands its device flag to the optimizer's :class:`~gradsentry.remedies.skipstep.DeviceSkip`; call
      ``optimizer.step()`` as usual and step hooks make it a no-op on a bad step. Fused optimizers
      (``AdamW(fused=True)``, ``SGD(fused=True)``...) get the flag as ``optimizer.found_inf``, the tensor
      ``GradScaler`` hands to fused kernels, which then leave weights, moments and step counts
      untouched (no extra memory); other optimizers have their stepping parameters and optimizer state
      copied before the step and put back with ``torch.where`` after it (memory for one copy; a CPU
      step counter of a GPU model is not restored). A parameter's first step (no optimizer state yet)
      takes one host sync instead. The flag is for the coming step only. The skip count is kept on the
      device (``skips`` copies it); ``result.skipped`` is the device flag.

    Under ``torch.distributed`` with more than one rank, the decision is OR-ed over ranks (one
    ``all_reduce(MAX)`` of one flag per call), so every rank skips the step or none does, even when only
    one rank's gradient or loss is non-finite; with FSDP2 the norms are those of the whole gradient.

    Beside an enabled ``torch.amp.GradScaler`` (pass it as ``scaler``), non-finite gradients are the
    scaler's normal overflow signal: the scaler skips the step and lowers its scale itself, so the guard
    leaves the gradients alone (setting them to None would hide the overflow from ``scaler.unscale_``
    and the scale would never drop) and counts the step in ``scaler_skips``, not in ``skips`` (with
    ``sync=False`` it counts neither: read the scaler's own record).

    Args:
        optimizer: needed for ``sync=False`` and for the learning-rate back-off.
        model: used only to name the layers with non-finite gradients in the record.
        scaler: an AMP ``GradScaler`` that already skips overflowing steps.
        sync: see above.
        backoff_after: after this many consecutive skipped steps, multiply the learning rate by
            ``lr_factor`` (and again every ``backoff_after`` further skips); None disables it.
        lr_factor: learning-rate multiplier in (0, 1].
        min_lr: floor of the learning rate.
        check_loss: also skip when a given loss is non-finite.

    Raises:
        ValueError: ``sync=False`` without an optimizer, ``backoff_after`` without an optimizer or
            with ``sync=False``, or a bad number.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        model: nn.Module | None = None,
        scaler: Any | None = None,
        sync: bool = True,
        backoff_after: int | None = None,
        lr_factor: float = 0.5,
        min_lr: float = 0.0,
        check_loss: bool = True,
    ) -> None:
        check_optimizer("NonFiniteGuard(optimizer=...)", optimizer, optional=True)
        if not sync and optimizer is None:
            raise ValueError(
                "sync=False needs the optimizer (optimizer=): its step is skipped on the device "
                "(found_inf for fused optimizers, e.g. torch.optim.AdamW(params, fused=True), else restored)"
            )
        if backoff_after is not None:
            if optimizer is None or not sync:
                raise ValueError("backoff_after needs optimizer= and sync=True")
            if int(backoff_after) < 1:
                raise ValueError(f"backoff_after must be >= 1, got {backoff_after!r}")
        if not 0.0 < float(lr_factor) <= 1.0:
            raise ValueError(f"lr_factor must be in (0, 1], got {lr_factor!r}")
        self.optimizer = optimizer
        self.scaler = scaler
        self.sync = sync
        self.backoff_after = None if backoff_after is None else int(backoff_after)
        self.lr_factor = float(lr_factor)
        self.min_lr = check_positive("min_lr", min_lr, allow_zero=True)
        self.check_loss = check_loss
        self._names = param_names(model) if model is not None else None
        self.scaler_skips = 0
        self.consecutive = 0
        self.backoffs = 0
        self._skips = 0
        self._skips_dev: Tensor | None = None
        self._skipper = device_skip(optimizer) if not sync and optimizer is not None else None

    def __repr__(self) -> str:
        return f"NonFiniteGuard(sync={self.sync}, backoff_after={self.backoff_after})"

    @property
    def skips(self) -> int:
        """Steps this guard skipped (excluding GradScaler's own skips); copies to the host if sync=False."""
        return self._skips + (int(self._skips_dev.item()) if self._skips_dev is not None else 0)

    def _scaler_active(self) -> bool:
        return self.scaler is not None and bool(self.scaler.is_enabled())

    @torch.no_grad()
    def __call__(
        self, params: Iterable[Tensor], *, norms: Tensor | None = None, loss: Tensor | float | None = None
    ) -> RemedyResult:
        ps, grads = grads_of(params)
        if not grads:
            return RemedyResult("NonFiniteGuard")
        if norms is None:
            norms = per_tensor_norms(grads)
        bad = ~torch.isfinite(norms)
        bad_any = bad.any()
        loss_bad = torch.zeros_like(bad_any)
        if self.check_loss and loss is not None:
            loss_bad = ~torch.isfinite(torch.as_tensor(loss, dtype=torch.float32)).to(bad_any.device)
            bad_any = bad_any | loss_bad
        bad_any = _dist.any_rank(bad_any)  # under torch.distributed: skip on every rank or on none
        names = names_for(ps, self._names, layer=True)
        before = total_norm(norms)
        if not self.sync:
            return self._device_skip(bad, bad_any, before, names)
        # the one host sync: [skip, loss not finite, one flag per tensor]
        flags = torch.cat([bad_any.view(1), loss_bad.view(1).to(bad.device), bad]).tolist()
        tensor_flags = flags[2:]
        if flags[0] and any(tensor_flags) and not _dist.is_multi_rank():
            # A float32 norm is also inf when a finite gradient's norm exceeds ~1.8e19: look at the
            # entries of the flagged tensors (a rare path: one more copy to the host; single process
            # only, since ranks must agree on skipping).
            flagged = [i for i, f in enumerate(tensor_flags) if f]
            really = torch.stack([~torch.isfinite(grads[i]).all() for i in flagged]).tolist()
            for i, r in zip(flagged, really, strict=True):
                tensor_flags[i] = r
            flags[0] = any(tensor_flags) or flags[1]
        mask = torch.tensor(tensor_flags, dtype=torch.bool)
        if not flags[0]:
            self.consecutive = 0
            return RemedyResult(
                "NonFiniteGuard",
                norm_before=before,
                norm_after=before,
                affected=mask,
                names=names,
                norms_after=norms,
            )
        if self._scaler_active():
            self.scaler_skips += 1
            return RemedyResult(
                "NonFiniteGuard",
                norm_before=before,
                skipped=True,
                affected=mask,
                names=names,
                extra={"by": "GradScaler"},
            )
        for p in ps:
            p.grad = None
        self._skips += 1
        self.consecutive += 1
        extra: dict[str, Any] = {"by": "NonFiniteGuard", "consecutive": self.consecutive}
        if (
            self.backoff_after is not None
            and self.optimizer is not None
            and self.consecutive % self.backoff_after == 0
        ):
            extra["lr"] = scale_lr_(self.optimizer, self.lr_factor, self.min_lr)
            self.backoffs += 1
            log.warning(
                "NonFiniteGuard: %d consecutive non-finite steps, learning rate lowered to %s",
                self.consecutive,
                extra["lr"],
            )
        return RemedyResult(
            "NonFiniteGuard", norm_before=before, skipped=True, affected=mask, names=names, extra=extra
        )

    def _device_skip(self, bad: Tensor, bad_any: Tensor, before: Tensor, names: list[str]) -> RemedyResult:
        assert self._skipper is not None  # sync=False has an optimizer (checked in __init__)
        if self._skips_dev is None or self._skips_dev.device != bad_any.device:
            self._skips_dev = torch.zeros((), dtype=torch.int64, device=bad_any.device)
        if self._scaler_active():  # GradScaler skips the overflowing step itself and counts it
            self._skipper.disarm(self)
            by = "GradScaler"
        else:
            self._skipper.arm(self, bad_any)
            self._skips_dev.add_(bad_any.to(torch.int64))
            by = "found_inf" if self._skipper.mode == "found_inf" else "restore"
        return RemedyResult(
            "NonFiniteGuard", norm_before=before, skipped=bad_any, affected=bad, names=names, extra={"by": by}
        )

    def state_dict(self) -> dict[str, int]:
        """Counters as plain ints: ``skips``, ``scaler_skips``, ``consecutive``, ``backoffs``."""
        return {
            "skips": self.skips,
            "scaler_skips": self.scaler_skips,
            "consecutive": self.consecutive,
            "backoffs": self.backoffs,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore the counters of :meth:`state_dict`."""
        self._skips, self._skips_dev = int(state["skips"]), None
        self.scaler_skips = int(state["scaler_skips"])
        self.consecutive = int(state["consecutive"])
        self.backoffs = int(state.get("backoffs", 0))


_MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "step")


class ResetMoments:
    """Forget the optimizer state of parameters hit by a spike or a non-finite gradient.

    The whole per-parameter state is dropped (Adam/AdamW ``exp_avg``, ``exp_avg_sq``,
    ``max_exp_avg_sq`` and ``step``; SGD ``momentum_buffer``), so the optimizer re-initialises it
    lazily at the next step as for a fresh parameter: Adam restarts its bias correction, SGD restarts
    momentum from the current gradient. Other parameters keep their state. This is the moment reset of
    SPAM made optimizer-agnostic and targeted at the affected parameters only.

    Called as a remedy, it resets the parameters whose per-tensor gradient norm is non-finite, or above
    ``max_norm`` when given (one host sync). :meth:`reset` resets an explicit list.

    Args:
        optimizer: any ``torch.optim`` optimizer with lazily initialised state.
        max_norm: optional per-tensor L2 gradient norm above which a parameter counts as spiking.
        model: used only to name the layers in the record.

    References:
        Huang et al., "SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training", 2025,
        arXiv:2501.06842.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        max_norm: float | None = None,
        model: nn.Module | None = None,
    ) -> None:
        check_optimizer("ResetMoments", optimizer)
        self.optimizer = optimizer
        self.max_norm = None if max_norm is None else check_positive("max_norm", max_norm)
        self._names = param_names(model) if model is not None else None
        self.resets = 0

    def __repr__(self) -> str:
        return f"ResetMoments(max_norm={self.max_norm})"

    def reset(self, params: Iterable[Tensor]) -> int:
        """Drop the optimizer state of ``params``; returns how many had state."""
        n = 0
        for p in params:
            if self.optimizer.state.pop(p, None) is not None:
                n += 1
        self.resets += n
        return n

    @torch.no_grad()
    def __call__(
        self, params: Iterable[Tensor], *, norms: Tensor | None = None, loss: Tensor | float | None = None
    ) -> RemedyResult:
        ps, grads = grads_of(params)
        if not grads:
            return RemedyResult("ResetMoments")
        if norms is None:
            norms = per_tensor_norms(grads)
        hit = ~torch.isfinite(norms)
        if self.max_norm is not None:
            hit = hit | (norms > self.max_norm)
        flags = hit.tolist()  # the one host sync
        n = self.reset(p for p, f in zip(ps, flags, strict=True) if f)
        return RemedyResult(
            "ResetMoments",
            norm_before=total_norm(norms),
            affected=torch.tensor(flags, dtype=torch.bool),
            names=names_for(ps, self._names, layer=True),
            extra={"reset": n},
            norms_after=norms,
        )
