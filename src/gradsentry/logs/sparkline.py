"""Deprecated: moved to :mod:`gradsentry.report.sparkline` (this path goes in the next release)."""

from gradsentry._moved import moved_module

moved_module(__name__, "gradsentry.report.sparkline")
