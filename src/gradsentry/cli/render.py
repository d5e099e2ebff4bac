"""Rich renderables the commands share: a series as a sparkline row, findings as a table and their fixes.

``analyze``, ``watch`` and ``run`` print findings through :func:`findings_view`, so a finding reads the
same wherever it is shown. Rich is imported inside the functions (the CLI starts without it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import RenderableType
    from rich.text import Text

    from gradsentry.records import Finding


def fmt(x: float | None) -> str:
    """A number in 4 significant digits, ``-`` for None."""
    return "-" if x is None else f"{x:.4g}"


def series_row(name: str, values: Sequence[float | None], width: int, *, log: bool) -> Text:
    """``name  ▁▂▅█  lo..hi``: a right-aligned name, the sparkline of ``values`` (at most ``width``
    characters, :func:`gradsentry.report.sparkline.sparkline`) and the range of the finite values."""
    from rich.text import Text

    from gradsentry.report.sparkline import sparkline

    fin = [float(x) for x in values if x is not None and math.isfinite(x)]
    rng = f"{fmt(min(fin) if fin else None)}..{fmt(max(fin) if fin else None)}"
    return Text.assemble(
        (f"{name:>9} ", "bold"), (sparkline(values, width, log=log), "cyan"), (f"  {rng}", "dim")
    )


def findings_view(findings: Sequence[Finding]) -> RenderableType:
    """The findings as a table (severity, kind and pattern, first step, explanation) followed by the
    first remedy of each warning or error (each remedy once); ``healthy: no finding`` when empty."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from gradsentry.report.text import FINDING_ROW_COLUMNS, NO_FINDING_LOOK, finding_rich_row

    if not findings:
        return Text("healthy: no finding", style=NO_FINDING_LOOK.rich)
    table = Table(show_lines=False, expand=False)
    for col in FINDING_ROW_COLUMNS:
        table.add_column(col, overflow="fold")
    for f in findings:
        table.add_row(*finding_rich_row(f))
    fixes: list[RenderableType] = []
    shown: set[str] = set()
    for f in findings:
        if f.remedies and f.severity != "info" and _advice_key(f.remedies[0].action) not in shown:
            shown.add(_advice_key(f.remedies[0].action))
            fixes.append(Text(f"fix ({f.kind}): {f.remedies[0].action}", style="dim"))
    return Group(table, *fixes)


def _advice_key(action: str) -> str:
    """The catalogue entry an advice text was made from (the tailored sentences after it, such as the
    recorded learning rate at the finding's step, left out), so that one remedy is shown once."""
    from gradsentry.diagnosis.advice import CATALOG

    for entry in CATALOG.values():
        if action.startswith(entry.action):
            return entry.action
    return action
