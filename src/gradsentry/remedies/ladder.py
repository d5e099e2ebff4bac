"""The escalation ladder: clip, then skip, then reset moments, then roll back with a lower rate."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from gradsentry import _dist
from gradsentry.remedies.base import (
    Remedy,
    RemedyResult,
    grads_of,
    names_for,
    param_names,
    per_tensor_norms,
    total_norm,
)
from gradsentry.remedies.guard import ResetMoments
from gradsentry.remedies.rollback import Rollback

__all__ = ["Ladder"]

RUNGS = ("clip", "skip", "reset_moments", "rollback")


class Ladder:
    """Escalating response to unstable steps, each rung optional.

    On every call (after ``backward()``, before ``optimizer.step()``):

    1. **clip** – on a finite step, the ``clip`` remedy runs (e.g. ``ClipGlobalNorm(1.0)`` or
       ``ZClip()``); with a ``rollback`` rung the step is also checked for a loss spike (which goes
       straight to rung 4) and snapshotted when due.
    2. **skip** – on a non-finite step (a NaN/inf gradient or loss) every gradient is set to None so
       ``optimizer.step()`` leaves weights and optimizer state untouched (``result.skip`` is True).
    3. **reset_moments** – from the ``reset_after``-th consecutive non-finite step on, the optimizer
       state of the parameters with non-finite gradients is dropped (:class:`ResetMoments`).
    4. **rollback** – at the ``rollback_after``-th consecutive non-finite step (or on a loss spike),
       :class:`Rollback` restores the last good snapshot and lowers the learning rate; the count of
       consecutive bad steps starts again from zero.

    Every escalation is recorded as a dict (``{"remedy": "Ladder", "rung": ..., "step": ...,
    "layers": [...], ...}``) in :attr:`log` and in the step's result (``result.to_dicts()``), and
    :attr:`counts` counts the uses of each rung. One host sync per call (the non-finite flags and the
    loss, copied together); the clip rung adds none.

    Args:
        clip: remedy for finite steps, or None.
        skip: whether to skip non-finite steps (rung 2). Without it, rungs 3 and 4 still apply.
        reset: a :class:`ResetMoments` for rung 3, or None.
        rollback: a :class:`Rollback` for rung 4, or None.
        reset_after: consecutive non-finite steps before rung 3 (>= 1).
        rollback_after: consecutive non-finite steps before rung 4 (>= 1).
        model: used only to name layers in the records.
        max_log: how many escalation records :attr:`log` keeps.

    Raises:
        ValueError: ``reset_after`` or ``rollback_after`` < 1.
        TypeError: ``clip`` is not callable, ``reset`` not a :class:`ResetMoments` or ``rollback`` not a
            :class:`Rollback`.
    """

    def __init__(
        self,
        clip: Remedy | None = None,
        *,
        skip: bool = True,
        reset: ResetMoments | None = None,
        rollback: Rollback | None = None,
        reset_after: int = 2,
        rollback_after: int = 3,
        model: nn.Module | None = None,
        max_log: int = 10_000,
    ) -> None:
        if int(reset_after) < 1 or int(rollback_after) < 1:
            raise ValueError(
                f"reset_after and rollback_after must be >= 1, got {reset_after!r}, {rollback_after!r}"
            )
        for name, part, kind in (
            ("clip", clip, None),
            ("reset", reset, ResetMoments),
            ("rollback", rollback, Rollback),
        ):
            if part is not None and not (callable(part) if kind is None else isinstance(part, kind)):
                want = "a remedy (a callable)" if kind is None else f"a {kind.__name__}"
                raise TypeError(f"Ladder({name}=...) expects {want}, got {type(part).__name__}")
        self.clip = clip
        self.skip = skip
        self.reset = reset
        self.rollback = rollback
        self.reset_after = int(reset_after)
        self.rollback_after = int(rollback_after)
        self._names = param_names(model) if model is not None else None
        self.step = 0
        self.consecutive = 0
        self.counts: dict[str, int] = dict.fromkeys(RUNGS, 0)
        self.log: deque[dict[str, Any]] = deque(maxlen=int(max_log))

    def __repr__(self) -> str:
        return (
            f"Ladder(clip={self.clip!r}, skip={self.skip}, reset={self.reset!r}, rollback={self.rollback!r}, "
            f"reset_after={self.reset_after}, rollback_after={self.rollback_after})"
        )

    def _record(self, rung: str, **fields: Any) -> RemedyResult:
        self.counts[rung] += 1
        action = {"remedy": "Ladder", "rung": rung, "step": self.step, **fields}
        self.log.append(action)
        return RemedyResult(
            "Ladder", skipped=rung != "clip", extra={"rung": rung, "step": self.step, **fields}
        )

    @torch.no_grad()
    def __call__(
        self, params: Iterable[Tensor], *, norms: Tensor | None = None, loss: Tensor | float | None = None
    ) -> RemedyResult:
        ps, grads = grads_of(params)
        if norms is None and grads:
            norms = per_tensor_norms(grads)
        bad = ~torch.isfinite(norms) if norms is not None else torch.zeros(0, dtype=torch.bool)
        loss_t = torch.as_tensor(loss if loss is not None else float("nan"), dtype=torch.float64)
        # under torch.distributed: mean loss and OR-ed flags of all ranks, the same decision everywhere
        loss_t, bad = _dist.agree(loss_t.detach().reshape(()).to(bad.device), bad)
        flags = torch.cat(
            [loss_t.detach().reshape(1).to(bad.device), bad.to(torch.float64)]
        ).tolist()  # one sync
        loss_v = flags[0] if loss is not None else None
        mask = [bool(f) for f in flags[1:]]
        names = names_for(ps, self._names, layer=True)
        hit = [n for n, f in zip(names, mask, strict=True) if f]
        nonfinite = any(mask) or (loss_v is not None and not math.isfinite(loss_v))
        children: list[RemedyResult] = []
        try:
            if not nonfinite:
                self.consecutive = 0
                reason = self.rollback.diverged(loss_v, True) if self.rollback is not None else None
                if reason is not None and self.rollback is not None:
                    action = self.rollback.rescue(ps, reason)
                    children.append(
                        self._record(
                            "rollback",
                            reason=reason,
                            restored_step=action["restored_step"],
                            lr=action["lr"],
                            layers=[],
                        )
                    )
                    return self._result(norms, children)
                if self.rollback is not None:
                    self.rollback.good_step(loss_v)
                if self.clip is not None:
                    res = self.clip(ps, norms=norms, loss=loss)
                    self.counts["clip"] += 1
                    children.append(res)
                return self._result(norms, children)
            self.consecutive += 1
            roll = self.rollback is not None and self.consecutive >= self.rollback_after
            if self.skip and not roll:
                for p in ps:
                    p.grad = None
                children.append(self._record("skip", layers=hit, consecutive=self.consecutive))
                if self.rollback is not None:
                    self.rollback.step += 1
            if self.reset is not None and self.consecutive >= self.reset_after:
                n = self.reset.reset(p for p, f in zip(ps, mask, strict=True) if f)
                children.append(
                    self._record("reset_moments", layers=hit, reset=n, consecutive=self.consecutive)
                )
            if roll and self.rollback is not None:
                reason = "nonfinite_grad" if any(mask) else "nonfinite_loss"
                action = self.rollback.rescue(ps, reason)
                children.append(
                    self._record(
                        "rollback",
                        reason=reason,
                        restored_step=action["restored_step"],
                        lr=action["lr"],
                        layers=hit,
                    )
                )
                self.consecutive = 0
            return self._result(norms, children)
        finally:
            self.step += 1

    def _result(self, norms: Tensor | None, children: list[RemedyResult]) -> RemedyResult:
        skipped = any(c.skipped is True for c in children)
        return RemedyResult(
            "Ladder",
            norm_before=total_norm(norms) if norms is not None else None,
            skipped=skipped,
            children=children,
            composite=True,
        )
