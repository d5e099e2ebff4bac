"""Deprecated: the advice catalogue moved to :mod:`gradsentry.diagnosis.advice` (this module goes in the
next release)."""

from __future__ import annotations

import warnings

from gradsentry.diagnosis.advice import *  # noqa: F403
from gradsentry.diagnosis.advice import NORMALIZATION_LAYERS, SATURATING_ACTIVATIONS, RemedyContext  # noqa: F401
from gradsentry.diagnosis.advice import __all__ as __all__

warnings.warn(
    "gradsentry.remedies_catalog moved to gradsentry.diagnosis.advice; the old path goes in the next release",
    DeprecationWarning,
    stacklevel=2,
)
