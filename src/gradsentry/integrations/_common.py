"""Framework-free helpers shared by the callbacks: metric keys, stopping on a finding, the summary."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from gradsentry.monitor import ALERT_WINDOW, Monitor, alert_finding, alert_message, nonfinite_step
from gradsentry.records import Finding, StepRecord

PREFIX = "gradsentry"
"""First component of every metric key the callbacks log."""

LOG_STATS: tuple[str, ...] = (
    "grad_norm",
    "grad_rms",
    "grad_max_abs",
    "nonfinite",
    "weight_norm",
    "update_ratio",
)
"""Per-layer statistics a callback can log (names of :class:`~gradsentry.records.LayerStats` fields)."""


def check_log_stats(log_stats: Sequence[str]) -> tuple[str, ...]:
    """Return ``log_stats`` as a tuple; raises ValueError naming the unknown entries and the choices."""
    bad = [s for s in log_stats if s not in LOG_STATS]
    if bad:
        raise ValueError(f"unknown log_stats {bad}; choose from {list(LOG_STATS)}")
    return tuple(log_stats)


def record_metrics(record: StepRecord, log_stats: Sequence[str] = ("grad_norm",)) -> dict[str, float]:
    """Flatten a record into metrics: ``gradsentry/global_norm`` and ``gradsentry/<stat>/<layer>``.

    Layers without a gradient (``has_grad=False``) get no gradient figures; unknown values (None) are
    left out. The root module is named ``(root)``.

    Example:
        >>> from gradsentry.records import LayerStats
        >>> rec = StepRecord(step=0, global_norm=2.0, layers=[LayerStats("fc", 0, 4, 2.0, 1.0, 1.5, 0, 3.0)])
        >>> record_metrics(rec)
        {'gradsentry/global_norm': 2.0, 'gradsentry/grad_norm/fc': 2.0}
    """
    out = {f"{PREFIX}/global_norm": record.global_norm}
    for layer in record.layers:
        for stat in log_stats:
            value = getattr(layer, stat)
            if value is None or (stat.startswith("grad") and not layer.has_grad):
                continue
            out[f"{PREFIX}/{stat}/{layer.name or '(root)'}"] = float(value)
    return out


def summarize(findings: list[Finding], n_records: int) -> str:
    """The end-of-run summary: a count line, then one line per finding."""
    head = f"gradsentry: {len(findings)} finding(s) over {n_records} logged step(s)"
    return "\n".join([head, *(f"  {f}" for f in findings)])


STOP_ON: tuple[str, ...] = ("nonfinite", "exploding")
"""Finding kinds a callback's ``stop_on`` can name."""


def check_stop_on(stop_on: Sequence[str] | str) -> tuple[str, ...]:
    """Return ``stop_on`` as a tuple (a single name is accepted as is); raises ValueError naming the
    unknown entries and the valid ones."""
    names = (stop_on,) if isinstance(stop_on, str) else tuple(stop_on)
    bad = [s for s in names if s not in STOP_ON]
    if bad:
        raise ValueError(f"unknown stop_on {bad}; valid names: {list(STOP_ON)}")
    return names


def stop_finding(mon: Monitor, record: StepRecord, stop_on: Sequence[str]) -> Finding | None:
    """The finding that should stop the run at ``record`` (the Monitor's newest), or None.

    ``"nonfinite"``: the record holds a NaN/inf gradient or loss. ``"exploding"``: the diagnosis of the
    last :data:`~gradsentry.monitor.ALERT_WINDOW` records has an ``exploding`` finding whose steps
    include this record's step (the diagnosis runs on every logged step, only when ``"exploding"`` is
    asked for). Either way the finding is the one :func:`gradsentry.diagnose` gives.
    """
    if "nonfinite" in stop_on and nonfinite_step(record):
        return alert_finding(mon.recent(ALERT_WINDOW), mon.layers, "nonfinite", mon.header.meta)
    if "exploding" in stop_on:
        return alert_finding(mon.recent(ALERT_WINDOW), mon.layers, "exploding", mon.header.meta)
    return None


def stop_message(record: StepRecord, finding: Finding) -> str:
    """The WARNING a callback logs when it stops the run."""
    return (
        f"{alert_message(record, finding)} Stopping the run (stop_on {finding.kind!r}); the optimizer "
        f"update of step {record.step} is not applied."
    )


def drop_gradients(optimizer: Any) -> None:
    """Set every gradient of the optimizer's parameters to None: its next ``step()`` leaves those
    weights and their optimizer state unchanged (torch optimizers skip parameters without a gradient)."""
    for group in getattr(optimizer, "param_groups", None) or []:
        for p in group["params"]:
            p.grad = None


def summary_level(findings: Sequence[Finding]) -> int:
    """WARNING when there is any finding, INFO when the run is healthy."""
    return logging.WARNING if findings else logging.INFO
