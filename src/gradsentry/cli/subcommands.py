"""The list of subcommand modules; each exposes ``register(app)``. Add one line per subcommand."""

from __future__ import annotations

from collections.abc import Callable

import typer

from gradsentry.cli import analyze, check, lab, report, run, watch

REGISTRY: list[Callable[[typer.Typer], None]] = [
    lab.register,
    check.register,
    analyze.register,
    report.register,
    watch.register,
    run.register,
]
