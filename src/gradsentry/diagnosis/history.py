"""What a Monitor keeps of the records that left its bounded window, so that its verdict covers the whole run.

A Monitor keeps its last ``max_records`` records in full. Each record that leaves that window is
*absorbed* here:

- its series point (step, loss, global gradient norm, learning rate, skipped steps) goes into compact
  arrays (about 34 bytes per logged step), so the series rules (NaN/inf, spikes, growth, skipped steps,
  the loss) judge every logged step of the run, exactly as they would with every record kept;
- a few records are *pinned* in full because a per-layer verdict depends on them: the first record
  holding a NaN/inf (the layers it names), the first one naming a non-finite origin, and the first and
  the largest update-to-weight ratio above ``update_ratio_any_step`` (a finding on its own, whatever
  the other steps show; smaller ratios are left to the sample, so that pinning never tilts the rules
  that count how often something happens);
- a uniform sample of at most ``sample_size`` records (every ``stride``-th absorbed record, the stride
  doubling whenever the sample is full) stands for the rest in the per-layer rules that count how
  often something happens (vanishing by depth, saturation, dead units, stalled layers).

:meth:`RunHistory.records` and :meth:`RunHistory.signals` give :func:`gradsentry.diagnosis.diagnose`
what it needs: with nothing absorbed (every record still kept) they are the kept records themselves and
their series, so the verdict is unchanged.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Mapping, Sequence
from typing import Any

from gradsentry.diagnosis.core import skipped_steps
from gradsentry.diagnosis.layer_rules import _step_bad
from gradsentry.diagnosis.series_rules import RunSignals
from gradsentry.diagnosis.thresholds import Thresholds
from gradsentry.records import StepRecord

__all__ = ["RunHistory"]

_ANY_STEP = Thresholds().update_ratio_any_step


class RunHistory:
    """The compact series and the kept records of the records a bounded window let go.

    Args:
        sample_size: the most records of the uniform sample (0: none).
    """

    def __init__(self, sample_size: int) -> None:
        self.sample_size = max(0, int(sample_size))
        self.absorbed = 0
        self._steps = array("q")
        self._loss = array("d")
        self._has_loss = array("b")
        self._norm = array("d")
        self._lr = array("d")
        self._has_lr = array("b")
        self._skipped = array("q")
        self._stride = 1
        self._sample: list[tuple[int, StepRecord]] = []
        self._first_bad: StepRecord | None = None
        self._first_origin: StepRecord | None = None
        self._first_big_update: StepRecord | None = None
        self._worst_update: tuple[float, StepRecord] | None = None

    def absorb(self, rec: StepRecord) -> None:
        """Take in a record that leaves the window (records arrive in logging order)."""
        self._steps.append(int(rec.step))
        self._loss.append(math.nan if rec.loss is None else float(rec.loss))
        self._has_loss.append(rec.loss is not None)
        self._norm.append(float(rec.global_norm))
        self._lr.append(math.nan if rec.lr is None else float(rec.lr))
        self._has_lr.append(rec.lr is not None)
        self._skipped.extend(skipped_steps(rec))
        if self._first_bad is None and _step_bad(rec):
            self._first_bad = rec
        if self._first_origin is None and rec.nonfinite_origin is not None:
            self._first_origin = rec
        for layer in rec.layers:
            r = layer.update_ratio
            if r is None or not layer.has_grad or not math.isfinite(r):
                continue
            if r <= _ANY_STEP:
                continue
            if self._first_big_update is None:
                self._first_big_update = rec
            if self._worst_update is None or r > self._worst_update[0]:
                self._worst_update = (r, rec)
        index = self.absorbed
        self.absorbed += 1
        if self.sample_size and index % self._stride == 0:
            self._sample.append((index, rec))
            if len(self._sample) > self.sample_size:
                self._stride *= 2
                self._sample = [(i, r) for i, r in self._sample if i % self._stride == 0]

    def kept(self) -> list[StepRecord]:
        """The absorbed records still held (pinned and sampled), in logging order, each once."""
        pinned = [self._first_bad, self._first_origin, self._first_big_update]
        pinned.append(self._worst_update[1] if self._worst_update is not None else None)
        seen: set[int] = set()
        out = []
        for rec in [*(r for _, r in self._sample), *(p for p in pinned if p is not None)]:
            if id(rec) not in seen:
                seen.add(id(rec))
                out.append(rec)
        return out

    def records(self, live: Sequence[StepRecord]) -> list[StepRecord]:
        """The records to diagnose: the kept absorbed ones, then the live window."""
        return [*self.kept(), *live]

    def signals(self, live: Sequence[StepRecord], meta: Mapping[str, Any] | None = None) -> RunSignals:
        """The whole run's series: every absorbed point, then the live records', ordered by step."""
        steps = [*self._steps, *(r.step for r in live)]
        loss = [
            *(v if h else None for v, h in zip(self._loss, self._has_loss, strict=True)),
            *(r.loss for r in live),
        ]
        norm = [*self._norm, *(r.global_norm for r in live)]
        lr = [*(v if h else None for v, h in zip(self._lr, self._has_lr, strict=True)), *(r.lr for r in live)]
        skipped = set(self._skipped)
        for r in live:
            skipped.update(skipped_steps(r))
        order = sorted(range(len(steps)), key=steps.__getitem__)
        return RunSignals.from_lists(
            [steps[i] for i in order],
            [loss[i] for i in order],
            [norm[i] for i in order],
            [lr[i] for i in order],
            skipped=sorted(skipped),
            meta=dict(meta or {}),
        )

    def nbytes(self) -> int:
        """Bytes held by the compact arrays (the pinned and sampled records not counted)."""
        arrays = (self._steps, self._loss, self._has_loss, self._norm, self._lr, self._has_lr, self._skipped)
        return sum(a.itemsize * len(a) for a in arrays)
