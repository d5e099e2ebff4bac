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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from gradsentry.diagnosis.core import skipped_steps
from gradsentry.diagnosis.layer_rules import _step_bad
from gradsentry.diagnosis.series_rules import RunSignals
from gradsentry.diagnosis.thresholds import Thresholds
from gradsentry.records import StepRecord, skipped_steps_of

__all__ = ["RunHistory"]

_ANY_STEP = Thresholds().update_ratio_any_step


def _float(value: Any) -> float | None:
    """A JSON number (or "NaN"-like string) as a float; None stays None."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)


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
        ratio = max(
            (
                r
                for layer in rec.layers
                if (r := layer.update_ratio) is not None and layer.has_grad and math.isfinite(r)
            ),
            default=None,
        )
        self._add_point(rec.step, rec.loss, rec.global_norm, rec.lr, skipped_steps(rec))
        self._consider(rec.step, lambda: rec, _step_bad(rec), rec.nonfinite_origin is not None, ratio)

    def absorb_raw(self, obj: Mapping[str, Any], build: Callable[[], StepRecord]) -> None:
        """:meth:`absorb` for a step line's dict as read from a JSONL file; ``build`` makes its
        :class:`StepRecord`, called only for the few records kept (a 1e6-step log builds ~1,000).

        Raises:
            KeyError, TypeError, ValueError: the dict is not a step record (the caller reports it).
        """
        step = obj["step"]
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step must be an integer, got {step!r}")
        norm = obj["global_norm"]
        norm = norm if type(norm) is float else _float(norm)
        loss = obj.get("loss")
        loss = loss if loss is None or type(loss) is float else _float(loss)
        lr = obj.get("lr")
        lr = lr if lr is None or type(lr) is float else _float(lr)
        # A NaN/inf in any layer's gradient makes the global norm (the root of their sum of squares)
        # non-finite, so the global norm and the loss tell a non-finite step.
        bad = not math.isfinite(norm) or (loss is not None and not math.isfinite(loss))  # type: ignore[arg-type]
        ratio: float | None = None
        for layer in obj.get("layers") or ():
            r = layer.get("update_ratio")
            if r is not None and r > _ANY_STEP and math.isfinite(r) and layer.get("has_grad", True):
                ratio = r if ratio is None or r > ratio else ratio
        skipped = skipped_steps_of(step, obj.get("actions"))
        self._steps.append(step)
        self._loss.append(math.nan if loss is None else loss)  # type: ignore[arg-type]
        self._has_loss.append(loss is not None)
        self._norm.append(norm)  # type: ignore[arg-type]
        self._lr.append(math.nan if lr is None else lr)  # type: ignore[arg-type]
        self._has_lr.append(lr is not None)
        if skipped:
            self._skipped.extend(skipped)
        self._consider(step, build, bad, obj.get("nonfinite_origin") is not None, ratio)

    def _add_point(
        self, step: int, loss: float | None, norm: float, lr: float | None, skipped: Sequence[int]
    ) -> None:
        self._steps.append(int(step))
        self._loss.append(math.nan if loss is None else float(loss))
        self._has_loss.append(loss is not None)
        self._norm.append(float(norm))
        self._lr.append(math.nan if lr is None else float(lr))
        self._has_lr.append(lr is not None)
        self._skipped.extend(skipped)

    def _consider(
        self, step: int, build: Callable[[], StepRecord], bad: bool, origin: bool, ratio: float | None
    ) -> None:
        """Keep the record when it is pinned or sampled (built once, only then)."""
        made: list[StepRecord] = []

        def rec() -> StepRecord:
            if not made:
                made.append(build())
            return made[0]

        if self._first_bad is None and bad:
            self._first_bad = rec()
        if self._first_origin is None and origin:
            self._first_origin = rec()
        if ratio is not None and ratio > _ANY_STEP:
            if self._first_big_update is None:
                self._first_big_update = rec()
            if self._worst_update is None or ratio > self._worst_update[0]:
                self._worst_update = (ratio, rec())
        index = self.absorbed
        self.absorbed += 1
        if self.sample_size and index % self._stride == 0:
            self._sample.append((index, rec()))
            if len(self._sample) > self.sample_size:
                self._stride *= 2
                self._sample = [(i, r) for i, r in self._sample if i % self._stride == 0]

    def truncate_from(self, step: int) -> None:
        """Forget what was absorbed from ``step`` on (a resumed run redoes those steps)."""
        keep = [i for i, s in enumerate(self._steps) if s < step]
        if len(keep) == len(self._steps):
            return
        for name in ("_steps", "_loss", "_has_loss", "_norm", "_lr", "_has_lr"):
            old = getattr(self, name)
            setattr(self, name, array(old.typecode, (old[i] for i in keep)))
        self._skipped = array("q", (s for s in self._skipped if s < step))
        self._sample = [(i, r) for i, r in self._sample if r.step < step]
        for name in ("_first_bad", "_first_origin", "_first_big_update"):
            pinned = getattr(self, name)
            if pinned is not None and pinned.step >= step:
                setattr(self, name, None)
        if self._worst_update is not None and self._worst_update[1].step >= step:
            self._worst_update = None

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
        """The records to diagnose: the kept absorbed ones, then the live window.

        Once records were absorbed, the window is thinned to the sample's stride (its records whose index
        in the run is a multiple of it; the latest one always stays, the rules read the last step), so
        every part of the run weighs the same in the rules that count how often something happens: a
        window of 40 records beside a sample of 40 standing for 160 would give the last fifth of the
        run half the vote (a net that Adam trained out of vanishing would no longer read as vanishing).
        """
        if not self.absorbed or self._stride == 1:
            return [*self.kept(), *live]
        thinned = [r for k, r in enumerate(live) if (self.absorbed + k) % self._stride == 0]
        if live and (not thinned or thinned[-1] is not live[-1]):
            thinned.append(live[-1])
        return [*self.kept(), *thinned]

    def signals(self, live: Sequence[StepRecord], meta: Mapping[str, Any] | None = None) -> RunSignals:
        """The whole run's series: every absorbed point, then the live records', ordered by step (the
        arrays are read in place, no per-point Python objects: a 1e6-step run takes ~34 MB)."""
        steps = np.concatenate(
            [np.frombuffer(self._steps, dtype=np.int64), np.array([r.step for r in live], dtype=np.int64)]
        )
        loss = np.concatenate(
            [
                np.frombuffer(self._loss),
                np.array([math.nan if r.loss is None else r.loss for r in live], dtype=float),
            ]
        )
        has_loss = np.concatenate(
            [
                np.frombuffer(self._has_loss, dtype=np.int8) != 0,
                np.array([r.loss is not None for r in live], dtype=bool),
            ]
        )
        grad = np.concatenate(
            [np.frombuffer(self._norm), np.array([r.global_norm for r in live], dtype=float)]
        )
        lr = np.concatenate(
            [
                np.frombuffer(self._lr),
                np.array([math.nan if r.lr is None else r.lr for r in live], dtype=float),
            ]
        )
        skipped = set(self._skipped)
        for r in live:
            skipped.update(skipped_steps(r))
        if steps.size > 1 and bool((np.diff(steps) < 0).any()):
            order = np.argsort(steps, kind="stable")
            steps, loss, has_loss, grad, lr = (
                steps[order],
                loss[order],
                has_loss[order],
                grad[order],
                lr[order],
            )
        return RunSignals(
            steps,
            loss,
            has_loss,
            grad,
            np.ones(steps.size, dtype=bool),
            lr,
            sorted(skipped),
            dict(meta or {}),
        )
