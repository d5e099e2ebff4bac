"""Deprecated: the graph propagation moved to :mod:`gradsentry.theory.graph` (what it covers and the
reasons where it makes no prediction: :mod:`gradsentry.theory.coverage`). This module goes in the next
release."""

from __future__ import annotations

import warnings

from gradsentry.theory.coverage import NORM_TYPES, POOL_TYPES, check_supported, why_not
from gradsentry.theory.graph import predict_graph

_why_not = why_not

__all__ = ["NORM_TYPES", "POOL_TYPES", "check_supported", "predict_graph"]

warnings.warn(
    "gradsentry.propagation moved to gradsentry.theory.graph; the old path goes in the next release",
    DeprecationWarning,
    stacklevel=2,
)
