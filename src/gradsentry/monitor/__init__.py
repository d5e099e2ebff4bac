"""The Monitor: per-layer gradient, weight, update and activation statistics during training.

A package of small modules, one job each: :mod:`~gradsentry.monitor.monitor` (the facade),
:mod:`~gradsentry.monitor.layers`, :mod:`~gradsentry.monitor.hooks`, :mod:`~gradsentry.monitor.measure`,
:mod:`~gradsentry.monitor.remedy_link`, :mod:`~gradsentry.monitor.overhead` and
:mod:`~gradsentry.monitor.alerts`. The names below are the ones other modules import from here.
"""

from __future__ import annotations

from gradsentry._dist import DistributedError
from gradsentry.monitor.alerts import (
    ALERT_WINDOW,
    NonFiniteGradientError,
    OnNonFinite,
    alert_finding,
    alert_message,
    nonfinite_layers,
    nonfinite_step,
)
from gradsentry.monitor.layers import NO_PARAMS_MSG
from gradsentry.monitor.monitor import Monitor
from gradsentry.monitor.options import Sync
from gradsentry.monitor.overhead import RECORDS_BUDGET_BYTES, SAMPLE_RECORDS, record_bytes

__all__ = [
    "ALERT_WINDOW",
    "NO_PARAMS_MSG",
    "RECORDS_BUDGET_BYTES",
    "SAMPLE_RECORDS",
    "DistributedError",
    "Monitor",
    "NonFiniteGradientError",
    "OnNonFinite",
    "Sync",
    "alert_finding",
    "alert_message",
    "nonfinite_layers",
    "nonfinite_step",
    "record_bytes",
]
