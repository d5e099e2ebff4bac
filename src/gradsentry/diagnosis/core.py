"""The one entry point every verdict goes through: a Monitor's records or another tool's log.

``Monitor.diagnose()``, :func:`gradsentry.diagnose` and ``gradsentry analyze`` all call :func:`diagnose`
(records) or :func:`diagnose_series` (a log without per-layer data); both run the same series rules on the
global gradient norm and the loss with the same :class:`~gradsentry.diagnosis.thresholds.Thresholds`, so a
run judged live and its log judged later get the same verdict. Records add the per-layer rules and name
the layers behind each series finding.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from gradsentry.diagnosis.advice import RemedyContext
from gradsentry.diagnosis.attribution import attribute
from gradsentry.diagnosis.layer_rules import LayerContext, _step_bad, layer_findings
from gradsentry.diagnosis.series_rules import RuleContext, RunSignals, series_findings
from gradsentry.diagnosis.thresholds import Thresholds, resolve
from gradsentry.logs.series import Series
from gradsentry.records import (
    SEVERITY_ORDER,
    ActivationStats,
    Finding,
    LayerInfo,
    StepRecord,
    skipped_steps_of,
)

__all__ = ["diagnose", "diagnose_series", "remedy_context", "signals_from_records", "skipped_steps"]

logger = logging.getLogger("gradsentry")


def remedy_context(meta: Mapping[str, Any] | None) -> RemedyContext:
    """What the run's metadata says that shapes the advice: optimizer, learning rate, trainer clipping.

    Args:
        meta: a JSONL header's ``meta`` or a log's ``Series.meta``: ``optimizer`` (class name),
            ``max_grad_norm`` (None or <= 0: no clipping), ``lr``.
    """
    meta = meta or {}
    opt = meta.get("optimizer")
    clip = meta.get("max_grad_norm")
    lr = meta.get("lr")

    def num(x: Any) -> float | None:
        return (
            float(x) if isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) else None
        )

    clip_v = num(clip)
    return RemedyContext(
        optimizer=str(opt).lower() if isinstance(opt, str) and opt else None,
        lr=num(lr),
        max_grad_norm=clip_v if clip_v is not None and clip_v > 0 else None,
    )


def _saturation_band(meta: Mapping[str, Any] | None) -> dict[str, float]:
    """The saturation bands a run's fractions were measured with (``meta["saturation"]``), if recorded."""
    band = (meta or {}).get("saturation")
    if not isinstance(band, Mapping):
        return {}
    return {
        k: float(v)
        for k, v in band.items()
        if k in ("sigmoid", "tanh") and isinstance(v, int | float) and not isinstance(v, bool) and 0 < v < 0.5
    }


def skipped_steps(rec: StepRecord) -> list[int]:
    """The steps a remedy skipped that this record tells of (see :func:`gradsentry.records.skipped_steps_of`)."""
    return skipped_steps_of(rec.step, rec.actions)


def signals_from_records(records: Sequence[StepRecord], meta: Mapping[str, Any] | None = None) -> RunSignals:
    """The series of a Monitor run: steps, loss, global norm, lr and the steps a guard skipped
    (logged ones, and unlogged ones the next record lists in ``skipped_unlogged_steps``).

    Equal, point for point, to what ``gradsentry.logs.load_series`` reads back from the run's JSONL.
    """
    skipped: set[int] = set()
    for r in records:
        skipped.update(skipped_steps(r))
    return RunSignals.from_lists(
        [r.step for r in records],
        [r.loss for r in records],
        [r.global_norm for r in records],
        [r.lr for r in records],
        skipped=sorted(skipped),
        meta=dict(meta or {}),
    )


def _finish(findings: list[Finding], sig: RunSignals, c: RuleContext) -> list[Finding]:
    """Link NaN/inf to a spike before it, then sort: most severe first, then by first step."""
    bad = sig.first_bad_index()
    if bad is not None:
        first_bad = int(sig.steps[bad])
        after = any(f.kind == "exploding" and f.steps and f.steps[0] <= first_bad for f in findings)
        for f in findings:
            if f.kind == "nonfinite":
                f.evidence["preceded_by_exploding"] = after
                if after:
                    f.explanation += " The gradient norm had spiked, grown or diverged just before, so it most likely overflowed."
                    f.remedies = c.advice("nonfinite", sig, first_bad, after_spike=True)
    findings.sort(key=lambda f: (-SEVERITY_ORDER.get(f.severity, 1), f.steps[0] if f.steps else math.inf))
    return findings


def diagnose_series(series: Series, thresholds: Thresholds | None = None, **overrides: Any) -> list[Finding]:
    """Diagnose a log's series (global gradient norm, loss, lr, skipped steps) with the series rules.

    Args:
        series: a log read by :func:`gradsentry.logs.load_series`.
        thresholds: a :class:`Thresholds`; the defaults when None.
        **overrides: individual thresholds, e.g. ``spike_z=8.0``.

    Returns:
        Findings, most severe first, then by first step.

    Raises:
        TypeError: ``series`` is not a :class:`Series`, or ``thresholds`` not a :class:`Thresholds`.
        ValueError: an unknown threshold name or an invalid value.
    """
    if not isinstance(series, Series):
        raise TypeError(
            "diagnose_series(series=...) expects a gradsentry.logs.Series (from gradsentry.logs.load_series), "
            f"got {type(series).__name__}"
        )
    t = resolve(thresholds, overrides)
    sig = RunSignals.from_lists(
        list(series.steps),
        list(series.loss),
        list(series.grad_norm),
        list(series.lr),
        skipped=list(series.skipped),
        meta=dict(series.meta),
    )
    c = RuleContext(t, remedy_context(series.meta))
    with np.errstate(all="ignore"):  # values near 1e308 overflow in ratios: inf, judged as such
        return _finish(series_findings(sig, c), sig, c)


def _check_records(records: Iterable[StepRecord]) -> list[StepRecord]:
    if isinstance(records, StepRecord | str | bytes | Mapping) or not isinstance(records, Iterable):
        single = "a single " if isinstance(records, StepRecord) else ""
        raise TypeError(
            f"diagnose(records=...) expects a sequence of StepRecord, got {single}{type(records).__name__}; "
            "pass Monitor.records or gradsentry.read_jsonl(path).records"
        )
    out = list(records)
    for i, rec in enumerate(out):
        if not isinstance(rec, StepRecord):
            raise TypeError(
                f"diagnose expects StepRecord objects, got {type(rec).__name__} at position {i}; "
                "use StepRecord.from_dict(...) or gradsentry.read_jsonl(path) to load plain dicts"
            )
    out.sort(key=lambda r: r.step)
    return out


def diagnose(
    records: Sequence[StepRecord],
    layers: Sequence[LayerInfo] | None = None,
    thresholds: Thresholds | None = None,
    meta: Mapping[str, Any] | None = None,
    *,
    signals: RunSignals | None = None,
    **overrides: Any,
) -> list[Finding]:
    """Diagnose a Monitor run: the series rules on its global norm and loss, and the per-layer rules.

    Series rules (the same as ``gradsentry analyze`` applies to any log; thresholds in :class:`Thresholds`):

    - ``nonfinite`` (first NaN/inf gradient or loss, the layers holding it, deepest first, and the module
      where it appeared), ``skipped_steps`` (a guard or loss scaler skipping steps), ``zero_grad_norm``;
    - ``exploding``: a spike (robust z-score against a rolling median/MAD), a jump among the first logged
      points (short runs), sustained exponential growth, or the loss diverging (early: many-fold above its
      start; late: far above its best level); a norm event counts only if it harmed the loss, led to NaN/inf
      or was enormous;
    - ``vanishing``: the norm collapsing while the loss is flat, or a loss that never improved.

    Per-layer rules: ``vanishing`` by depth (first/last-layer gradient RMS ratio), ``exploding`` by the
    update-to-weight ratio, ``saturation``, ``dead_units``, ``stalled_layer``.

    Args:
        records: logged step records (any order; sorted by step here). Empty gives no findings.
        layers: the model's layers (``Monitor.layers`` or ``RunHeader.layers``); their depth and type take
            precedence over the records' and their types tailor the remedies. Optional.
        thresholds: a :class:`Thresholds`; the defaults when None.
        meta: the run's metadata (``Monitor.header.meta``): ``optimizer``, ``lr`` and ``max_grad_norm``
            tailor the remedies (e.g. no "clip the global norm" first for a run that already clips).
        signals: the whole run's series when ``records`` are only part of it (a Monitor that kept its last
            ``max_records`` records; see :class:`gradsentry.diagnosis.history.RunHistory`): the series rules
            then judge every logged step, the per-layer rules the records given. None: the records' series.
        **overrides: individual thresholds to change, e.g. ``spike_z=8.0``.

    Returns:
        Findings sorted by severity (errors first), then by first step. Each carries its steps, layers (most
        implicated first), evidence numbers, a plain-words explanation and ranked remedies.

    Raises:
        TypeError: ``records`` is not a sequence (None, a number, a single record, a path: read it with
            :func:`gradsentry.read_jsonl` first) or holds something other than :class:`StepRecord`,
            ``layers`` is not None or a sequence of :class:`LayerInfo`, ``meta`` is not None or a dict,
            or ``thresholds`` is not a :class:`Thresholds`.
        ValueError: an unknown threshold name or an invalid threshold value.

    Example:
        >>> from gradsentry.records import StepRecord
        >>> diagnose([StepRecord(step=0, global_norm=float("nan"))])[0].kind
        'nonfinite'
    """
    t = resolve(thresholds, overrides)
    recs = _check_records(records)
    if layers is not None and not isinstance(layers, Iterable):
        raise TypeError(
            "diagnose(layers=...) expects None or a sequence of LayerInfo (Monitor.layers, or "
            f"gradsentry.read_jsonl(path).header.layers), got {type(layers).__name__}"
        )
    if meta is not None and not isinstance(meta, Mapping):
        raise TypeError(
            f"diagnose(meta=...) expects None or a dict (the run header's meta), got {type(meta).__name__}"
        )
    if not recs and (signals is None or len(signals) == 0):
        return []
    infos = list(layers or [])
    for info in infos:
        if not isinstance(info, LayerInfo):
            raise TypeError(f"layers must be LayerInfo objects, got {type(info).__name__}")
    lctx = LayerContext(
        records=recs,
        t=t,
        depth={info.name: info.depth for info in infos},
        types={info.name: info.type for info in infos},
        activation_types={a.type for r in recs for a in r.activations if isinstance(a, ActivationStats)},
        nonfinite_idx=[i for i, r in enumerate(recs) if _step_bad(r)],
        remedy=remedy_context(meta),
        saturation_band=_saturation_band(meta),
    )
    sig = signals if signals is not None else signals_from_records(recs, meta)
    c = RuleContext(t, lctx.advice_context(monitored=True))
    with np.errstate(all="ignore"):
        found = series_findings(sig, c)
    attribute(found, lctx)
    per_layer = layer_findings(lctx)
    if any(f.kind == "vanishing" for f in per_layer):  # the layers show it directly: drop the series guess
        found = [f for f in found if f.kind != "vanishing"]
    found += per_layer
    logger.debug("diagnose: %d records, %d findings", len(recs), len(found))
    return _finish(found, sig, c)
