"""Deprecated: :class:`JsonlFollower` reads, so it moved to :mod:`gradsentry.logs.follow` (this module goes
in the next release)."""

from __future__ import annotations

import warnings

from gradsentry.logs.follow import CHUNK_BYTES as CHUNK_BYTES
from gradsentry.logs.follow import JsonlFollower as JsonlFollower

__all__ = ["JsonlFollower"]

warnings.warn(
    "gradsentry.sinks.follow moved to gradsentry.logs.follow (sinks write, logs read); "
    "the old path goes in the next release",
    DeprecationWarning,
    stacklevel=2,
)
