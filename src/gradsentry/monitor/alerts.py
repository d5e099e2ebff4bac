"""Live alerts on a logged step: whether a record holds a NaN/inf, which layers, the finding and its text."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TypeAlias

from gradsentry.records import Finding, LayerInfo, StepRecord
from gradsentry.report.text import finding_line, remedy_line

log = logging.getLogger("gradsentry")

ALERT_WINDOW = 200
"""How many of the most recent records a live alert diagnoses (:func:`alert_finding`): enough for the
spike test's trailing window (20) and the growth window (50), and a bounded cost per alert however long
the run."""

OnNonFinite: TypeAlias = Literal["warn", "raise"] | Callable[[Finding], Any] | None
"""What :class:`Monitor` does on a logged step that holds a NaN/inf (see its ``on_nonfinite``)."""


class NonFiniteGradientError(FloatingPointError):
    """Raised by :meth:`Monitor.step` (``on_nonfinite="raise"``) on a logged step with a NaN/inf gradient
    or loss, after the step's record was stored and written to the sinks.

    Attributes:
        step: the record's step label.
        layers: the layers whose gradient holds NaN/inf, the origin module first when known, then
            deepest first (empty when only the loss is non-finite).
        record: the :class:`~gradsentry.records.StepRecord` of the step.
        finding: the ``nonfinite`` :class:`~gradsentry.records.Finding` (the same text as the
            end-of-run diagnosis gives).
    """

    def __init__(self, message: str, *, record: StepRecord, layers: list[str], finding: Finding) -> None:
        super().__init__(message)
        self.step = record.step
        self.layers = layers
        self.record = record
        self.finding = finding


def nonfinite_step(record: StepRecord) -> bool:
    """True when the record holds a NaN/inf: its global gradient norm, a layer's gradient
    (``nonfinite > 0`` or a non-finite norm) or its loss."""
    if not math.isfinite(record.global_norm):
        return True
    if record.loss is not None and not math.isfinite(record.loss):
        return True
    return any(
        layer.has_grad and (layer.nonfinite > 0 or not math.isfinite(layer.grad_norm))
        for layer in record.layers
    )


def nonfinite_layers(record: StepRecord) -> list[str]:
    """The layers whose gradient holds NaN/inf in ``record``: the origin module first (when
    ``locate_nonfinite`` named one of them), then deepest first."""
    holding = [
        layer
        for layer in record.layers
        if layer.has_grad and (layer.nonfinite > 0 or not math.isfinite(layer.grad_norm))
    ]
    names = [layer.name for layer in sorted(holding, key=lambda x: -x.depth)]
    origin = record.nonfinite_origin
    if origin is not None and origin in names:
        names = [origin] + [n for n in names if n != origin]
    return names


def alert_finding(
    records: Sequence[StepRecord],
    layers: Sequence[LayerInfo] | None,
    kind: str,
    meta: Mapping[str, Any] | None = None,
) -> Finding | None:
    """The finding of ``kind`` that :func:`gradsentry.diagnose` gives on ``records`` and whose steps
    include the newest record's step; None when there is none.

    ``records`` are the recent records, oldest first, ending with the step being judged (the callers
    pass at most :data:`ALERT_WINDOW`). For ``"nonfinite"`` a diagnosis that fails or finds nothing
    still gives a finding built from the newest record, so that an alert is never lost; for other
    kinds a failed diagnosis is logged and gives None.
    """
    from gradsentry.diagnose import diagnose

    if not records:
        return None
    newest = records[-1]
    try:
        findings = diagnose(records, layers=layers, meta=meta)
    except Exception as exc:  # an alert must never take the run down through the diagnosis
        log.error("gradsentry: diagnosis failed at step %s (%s)", newest.step, exc)
        findings = []
    found = next((f for f in findings if f.kind == kind and newest.step in f.steps), None)
    if found is None and kind == "nonfinite" and nonfinite_step(newest):
        names = nonfinite_layers(newest)
        where = f" in {', '.join(n or '<root>' for n in names[:3])}" if names else ""
        found = Finding(
            "nonfinite",
            "error",
            [newest.step],
            names,
            {"first_step": newest.step, "global_norm": newest.global_norm, "loss": newest.loss},
            f"At step {newest.step} the gradient or the loss is NaN/inf{where}.",
        )
    return found


def alert_message(record: StepRecord, finding: Finding) -> str:
    """One text for a live alert: the step, the layers holding NaN/inf, the origin module, the
    finding's explanation and its first remedy."""
    if nonfinite_step(record):
        names = nonfinite_layers(record)
        if names:
            what = f"NaN/inf gradient at step {record.step} in {', '.join(n or '<root>' for n in names[:5])}"
            if len(names) > 5:
                what += f" (+{len(names) - 5} more layers)"
        elif not math.isfinite(record.global_norm):
            what = f"NaN/inf gradient at step {record.step}"
        else:
            what = f"non-finite loss ({record.loss!r}) at step {record.step}, gradients still finite"
        if record.nonfinite_origin is not None:
            what += f"; first non-finite output: module {record.nonfinite_origin or '<root>'}"
    else:
        what = f"{finding.kind} at step {record.step} (global gradient norm {record.global_norm:.3g})"
    text = f"gradsentry: {what}. {finding_line(finding)}"
    if finding.remedies:
        text += f" Remedy: {remedy_line(finding)}"
    return text


class NonFiniteAlert:
    """Acts on a logged step holding a NaN/inf as the Monitor's ``on_nonfinite`` says: ``"warn"``
    (rank 0, once per stretch of consecutive non-finite steps), ``"raise"`` (after ``flush()`` of the
    sinks) or a callable given the finding.

    Args:
        action: ``"warn"``, ``"raise"`` or a callable taking the ``nonfinite`` :class:`Finding`.
        rank: this process's rank (0 outside ``torch.distributed``).
        flush: pushes the sinks' buffered lines to disk before a raise.
    """

    def __init__(self, action: OnNonFinite, rank: int, flush: Callable[[], None]) -> None:
        self.action = action
        self.rank = rank
        self._flush = flush
        self._in_nonfinite = False  # the previous logged step was non-finite ("warn" once per stretch)

    def check(
        self,
        record: StepRecord,
        recent: Sequence[StepRecord],
        layers: Sequence[LayerInfo],
        meta: Mapping[str, Any],
    ) -> None:
        """Act on ``record`` (the newest of ``recent``) if it holds a NaN/inf.

        Raises:
            NonFiniteGradientError: with ``"raise"``.
        """
        if not nonfinite_step(record):
            self._in_nonfinite = False
            return
        onset = not self._in_nonfinite
        self._in_nonfinite = True
        action = self.action
        if action == "warn" and (not onset or self.rank != 0):
            return
        finding = alert_finding(recent, layers, "nonfinite", meta)
        assert finding is not None  # alert_finding always builds one for a non-finite newest record
        if action == "warn":
            log.warning("%s", alert_message(record, finding))
        elif action == "raise":
            self._flush()
            raise NonFiniteGradientError(
                alert_message(record, finding),
                record=record,
                layers=nonfinite_layers(record),
                finding=finding,
            )
        elif callable(action):
            action(finding)
