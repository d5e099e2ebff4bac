"""Diagnosis: one detector core for the live Monitor and for other tools' logs.

- :mod:`~gradsentry.diagnosis.signals`: pure detectors over ``(steps, values)`` (robust z, jumps, growth
  fit, loss outcome);
- :mod:`~gradsentry.diagnosis.thresholds`: the one :class:`Thresholds`;
- :mod:`~gradsentry.diagnosis.series_rules`: rules on the global gradient norm and the loss;
- :mod:`~gradsentry.diagnosis.layer_rules`: rules that need per-layer records, and the attribution of
  series findings to layers;
- :mod:`~gradsentry.diagnosis.core`: :func:`diagnose` (records) and :func:`diagnose_series` (a log).
"""

from gradsentry.diagnosis.core import diagnose, diagnose_series
from gradsentry.diagnosis.thresholds import Thresholds

__all__ = ["Thresholds", "diagnose", "diagnose_series"]
