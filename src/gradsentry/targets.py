"""Deprecated: moved to :mod:`gradsentry.cli.targets` (this path goes in the next release)."""

from gradsentry._moved import moved_module

moved_module(__name__, "gradsentry.cli.targets")
