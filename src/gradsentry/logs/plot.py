"""Deprecated: moved to :mod:`gradsentry.report.series_plot` (this path goes in the next release)."""

from gradsentry._moved import moved_module

moved_module(__name__, "gradsentry.report.series_plot")
