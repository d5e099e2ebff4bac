"""What the series rules read and share: :class:`RunSignals` (the run's global norm, loss, learning rate and
loss-scale series with their derived masks, computed once) and :class:`RuleContext` (thresholds and advice).

The rules themselves: :mod:`~gradsentry.diagnosis.rules_nonfinite`, :mod:`~gradsentry.diagnosis.rules_exploding`,
:mod:`~gradsentry.diagnosis.rules_vanishing`, run in order by :func:`gradsentry.diagnosis.series_rules.series_findings`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import numpy as np

from gradsentry.diagnosis.advice import CATALOG, RemedyContext, remedies_for
from gradsentry.diagnosis.thresholds import Thresholds
from gradsentry.records import Advice

__all__ = ["RuleContext", "RunSignals"]


@dataclass
class RunSignals:
    """The series every rule reads, as numpy arrays; built from a log's Series or a Monitor's records.

    Attributes:
        steps: [N] every logged step (int64, increasing).
        loss: [N] the loss at each step, NaN where not logged (see ``has_loss``).
        has_loss: [N] True where a loss was logged.
        grad: [N] the global gradient L2 norm (pre-clip, same units as the gradient), NaN where not logged.
        has_grad: [N] True where a norm was logged.
        lr: [N] the learning rate, NaN where not logged.
        skipped: steps a loss scaler or guard skipped (from the log's overflow lines or remedy actions).
        meta: what the run says about its set-up (``optimizer``, ``max_grad_norm``, ``lr``).
    """

    steps: np.ndarray
    loss: np.ndarray
    has_loss: np.ndarray
    grad: np.ndarray
    has_grad: np.ndarray
    lr: np.ndarray
    skipped: list[int] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_lists(
        cls,
        steps: list[int],
        loss: list[float | None],
        grad_norm: list[float | None],
        lr: list[float | None],
        skipped: list[int] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> RunSignals:
        def col(values: list[float | None]) -> tuple[np.ndarray, np.ndarray]:
            arr = np.array(values, dtype=np.float64)  # None becomes NaN
            has = np.fromiter((v is not None for v in values), dtype=bool, count=len(values))
            return arr, has

        lo, hl = col(loss)
        g, hg = col(grad_norm)
        r, _ = col(lr)
        return cls(
            np.asarray(steps, dtype=np.int64), lo, hl, g, hg, r, sorted(skipped or []), dict(meta or {})
        )

    def __len__(self) -> int:
        return int(self.steps.size)

    # Derived once (the arrays are not changed after construction): every rule and every event reads them.

    @cached_property
    def hidden(self) -> np.ndarray:
        """[N] a loss of exactly 0.0 logged beside a non-finite gradient norm (a hidden non-finite loss)."""
        return self.has_loss & (self.loss == 0.0) & self.has_grad & ~np.isfinite(self.grad)

    @cached_property
    def _clean_loss(self) -> tuple[np.ndarray, np.ndarray]:
        keep = self.has_loss & ~self.hidden
        return self.steps[keep], self.loss[keep]

    def loss_points(self) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of the logged losses (NaN/inf kept), hidden non-finite ones left out."""
        return self._clean_loss

    def grad_points(self) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of the logged gradient norms (NaN/inf kept)."""
        return self.steps[self.has_grad], self.grad[self.has_grad]

    def finite_positive(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of the finite, positive points of ``"grad"`` or ``"loss"``."""
        values = self.grad if name == "grad" else self.loss
        has = self.has_grad if name == "grad" else self.has_loss & ~self.hidden
        keep = has & np.isfinite(values) & (values > 0)
        return self.steps[keep], values[keep]

    @cached_property
    def _first_bad(self) -> int | None:
        bad = (self.has_grad & ~np.isfinite(self.grad)) | (self.has_loss & ~np.isfinite(self.loss))
        bad |= self.hidden
        i = np.flatnonzero(bad)
        return int(i[0]) if i.size else None

    def first_bad_index(self) -> int | None:
        """Index of the first step with a non-finite norm or loss (hidden ones included)."""
        return self._first_bad

    def lr_at(self, step: int) -> float | None:
        """The last learning rate logged at or before ``step`` (or the run's stated one)."""
        keep = np.isfinite(self.lr) & (self.steps <= step)
        if keep.any():
            return float(self.lr[np.flatnonzero(keep)[-1]])
        first = np.flatnonzero(np.isfinite(self.lr))
        if first.size:
            return float(self.lr[first[0]])
        value = self.meta.get("lr")
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


@dataclass
class RuleContext:
    """What the series rules share: thresholds and the facts that shape the advice."""

    t: Thresholds
    remedy: RemedyContext = field(default_factory=RemedyContext)

    def run_monitor(self) -> list[Advice]:
        """Advice to record the run with a Monitor, unless it was (its per-layer records exist)."""
        if self.remedy.monitored:
            return []
        return [
            Advice(
                "run gradsentry's Monitor to see which layers' gradients vanish", "gradsentry.Monitor(model)"
            )
        ]

    def advice(self, kind: str, sig: RunSignals, step: int | None = None, **changes: Any) -> list[Advice]:
        lr = sig.lr_at(step) if step is not None else None
        if step is not None and "early" not in changes and len(sig):
            # a problem in the first logged points: the learning rate is the first suspect
            changes["early"] = int(np.searchsorted(sig.steps, step)) < self.t.spike_min_history
        ctx = replace(self.remedy, lr=lr if lr is not None else self.remedy.lr, **changes)
        return remedies_for(kind, ctx)


def _r(key: str) -> Advice:
    return CATALOG[key].make()
