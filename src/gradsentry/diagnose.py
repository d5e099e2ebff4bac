"""``gradsentry.diagnose``: kept as the import path of :func:`diagnose` and :class:`Thresholds`.

The rules live in :mod:`gradsentry.diagnosis` (one detector core for the Monitor and the log analysis).
"""

from gradsentry.diagnosis.core import diagnose, diagnose_series
from gradsentry.diagnosis.thresholds import Thresholds

__all__ = ["Thresholds", "diagnose", "diagnose_series"]
