"""The package version, in a module of its own so that no library module needs the top level for it."""

__version__ = "0.1.0"
