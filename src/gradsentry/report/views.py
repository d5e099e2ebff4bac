"""What a person reads in a terminal or a notebook: rich renderables (``__rich__``) and the same as
escaped HTML (``_repr_html_``, through rich's own HTML export) for :class:`~gradsentry.check.CheckReport`,
:class:`~gradsentry.records.Finding`, :class:`~gradsentry.analyze.LogAnalysis` and
:class:`~gradsentry.records.Run`; the ``gradsentry check`` table, fitted to the terminal's width.

A finding's text and the severity colours come from :mod:`gradsentry.report.text`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from gradsentry.report.text import NO_FINDING_LOOK, finding_rich_line
from gradsentry.sinks.tensorboard import LAYER_STATS

if TYPE_CHECKING:
    from rich.console import Group, RenderableType
    from rich.table import Table

    from gradsentry.analyze import LogAnalysis
    from gradsentry.check import CheckReport
    from gradsentry.records import Finding, Run

HTML_WIDTH = 120
"""Characters per line of the HTML views (a notebook cell has no terminal width)."""


def num(x: float | None, pct: bool = False) -> str:
    """A number in at most ~8 characters: ``-`` for None/NaN, a percentage with ``pct``."""
    if x is None or x != x:
        return "-"
    return f"{100 * x:.0f}%" if pct else f"{x:.2e}" if x and not 1e-2 <= abs(x) < 1e4 else f"{x:.3g}"


_COLUMNS: tuple[tuple[str, str], ...] = (
    ("#", "#"),
    ("layer", "layer"),
    ("type", "type"),
    ("params", "params"),
    ("grad norm", "grad\nnorm"),
    ("grad RMS", "grad\nRMS"),
    ("per-example", "per-\nexample"),
    ("predicted", "predicted"),
    ("|g|/|w|", "|g|/\n|w|"),
    ("activation", "act."),
    ("sat.", "sat."),
    ("dead", "dead"),
)
"""(name, header) of the per-layer table's columns."""

_DROP_ORDER = ("params", "grad norm", "per-example", "type", "predicted", "activation")
"""Columns left out, in this order, when the terminal is too narrow for layer names to stay readable."""

_NAME_MIN = 20
"""Layer-name width (characters) kept before columns are left out; longer names fold onto more lines."""


def layer_table(report: CheckReport, width: int) -> tuple[Table, list[str]]:
    """The per-layer table fitted to ``width`` columns: layer names fold (never cut); when the numbers
    leave less than :data:`_NAME_MIN` characters for them, columns of :data:`_DROP_ORDER` are left out.

    Returns:
        the table and the names of the columns left out.
    """
    from rich import box
    from rich.table import Table

    rows = [
        {
            "#": str(r.depth),
            "layer": r.name or "<root>",
            "type": r.type,
            "params": str(r.params),
            "grad norm": num(r.grad_norm) if r.has_grad else "no grad",
            "grad RMS": num(r.grad_rms) if r.has_grad else "no grad",
            "per-example": num(r.example_rms),
            "predicted": num(r.predicted_rms),
            "|g|/|w|": num(r.rel_grad),
            "activation": r.activation or "",
            "sat.": num(r.saturated_frac, pct=True),
            "dead": num(r.dead_frac, pct=True),
        }
        for r in report.rows
    ]

    def need(col: str, header: str) -> int:  # cell width + padding (1 each side) + the blank divider
        return max([*(len(x) for x in header.split("\n")), *(len(row[col]) for row in rows)]) + 3

    longest = max((len(row["layer"]) for row in rows), default=5)
    name_min = min(longest, _NAME_MIN)
    kept = [c for c in _COLUMNS if c[0] != "layer"]
    dropped: list[str] = []
    for col in _DROP_ORDER:
        if sum(need(*c) for c in kept) + name_min + 3 <= width:
            break
        kept = [c for c in kept if c[0] != col]
        dropped.append(col)
    table = Table(box=box.SIMPLE_HEAD, title_justify="left", show_edge=False)
    columns = [c for c in _COLUMNS if c[0] == "layer" or c in kept]
    for col, header in columns:
        if col == "layer":
            table.add_column(header, min_width=name_min, ratio=1, overflow="fold")
        else:
            left = col in ("type", "activation")
            table.add_column(header, justify="left" if left else "right", no_wrap=True)
    for row in rows:
        table.add_row(*(row[col] for col, _ in columns))
    return table, dropped


def check_renderable(report: CheckReport, width: int = HTML_WIDTH, title: str = "gradsentry check") -> Group:
    """The ``gradsentry check`` view of ``report`` for a console ``width`` characters wide: the
    per-layer table (names folded, see :func:`layer_table`), the depth profile, the theory and the
    findings with their first remedies."""
    from rich.console import Group
    from rich.text import Text

    table, dropped = layer_table(report, width)
    table.title = f"{title}  (input {report.input_shape}, loss {report.loss_kind} = {report.loss:.4g})"
    parts: list[RenderableType] = [table]
    if dropped:
        parts.append(
            Text(
                f"columns left out at width {width}: {', '.join(dropped)} (wider terminal or --json)",
                style="dim",
            )
        )
    head = (
        f" over the hidden layers (output head {report.head!r} left out)" if report.head is not None else ""
    )
    parts.append(
        Text(
            f"first/last layer gradient RMS ratio: {num(report.first_last_ratio)}; log10 RMS slope{head}: "
            f"{num(report.log_slope)} decades per layer (positive: shrinks towards the input)"
        )
    )
    if report.theory_max_dev is not None:
        parts.append(
            Text(
                "mean-field prediction of the per-example gradient (weights and biases, anchored at the last "
                f"layer): within {report.theory_max_dev:.2f} decades of the measurement on every layer; the "
                "batch gradient (grad RMS) also carries the correlations between examples",
                style="dim",
            )
        )
    if report.theory is not None:
        parts.append(Text(f"mean-field prediction: {report.theory}", style="dim"))
    if report.blocks is not None:
        b = report.blocks
        where = f", {b.norm_placement}-LN" if b.norm_placement else ""
        parts.append(
            Text(
                f"{b.blocks} repeated blocks in {b.container}{where}: last/first block gradient norm "
                f"{num(b.ratio)} (median over roles)"
            )
        )
    parts.append(findings_renderable(report.findings))
    return Group(*parts)


def finding_renderable(finding: Finding, remedies: int = 3) -> Group:
    """One finding: ``[severity] kind at step S in layers: explanation``, then its first remedies."""
    from rich.console import Group
    from rich.text import Text

    lines: list[RenderableType] = [finding_rich_line(finding)]
    for remedy in finding.remedies[:remedies]:
        api = f"  ({remedy.api})" if remedy.api else ""
        lines.append(Text(f"    fix: {remedy.action}{api}", style="dim"))
    return Group(*lines)


def findings_renderable(findings: Sequence[Finding]) -> Group:
    """The verdict line (healthy or not) and every finding."""
    from rich.console import Group
    from rich.text import Text

    parts: list[RenderableType] = []
    if not findings:
        parts.append(Text("healthy: no finding", style=NO_FINDING_LOOK.rich))
    elif all(f.severity == "info" for f in findings):
        parts.append(Text("healthy: no problem found (information below)", style=NO_FINDING_LOOK.rich))
    parts.extend(finding_renderable(f) for f in findings)
    return Group(*parts)


def _span(steps: Sequence[int]) -> str:
    return f"steps {steps[0]}..{steps[-1]}" if steps else "no step"


def _last_finite(values: Sequence[float | None]) -> str:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return num(finite[-1]) if finite else "-"


def analysis_renderable(analysis: LogAnalysis) -> Group:
    """A log analysis: what was read (format, file, steps, fields) and the findings."""
    from rich.console import Group
    from rich.text import Text

    s = analysis.series
    head = Text.assemble(
        ("gradsentry analyze ", "bold"),
        f"{s.path} ({s.source}): {len(s.steps)} logged steps, {_span(s.steps)}; last loss "
        f"{_last_finite(s.loss)}, last grad norm {_last_finite(s.grad_norm)}",
    )
    notes = [Text(f"note: {n}", style="dim") for n in s.notes]
    return Group(head, *notes, findings_renderable(analysis.findings))


def run_renderable(run: Run) -> Group:
    """A logged run: model, layers, records and the findings stored with it."""
    from rich.console import Group
    from rich.text import Text

    steps = [r.step for r in run.records]
    model = run.header.meta.get("model", "model")
    head = Text.assemble(
        ("gradsentry run ", "bold"),
        f"{model}: {len(run.header.layers)} layers, {len(run.records)} records, {_span(steps)}; last global "
        f"norm {_last_finite([r.global_norm for r in run.records])}, last loss "
        f"{_last_finite([r.loss for r in run.records])}",
    )
    return Group(head, findings_renderable(run.findings))


def to_html(renderable: RenderableType, width: int = HTML_WIDTH) -> str:
    """``renderable`` as an HTML fragment (``<pre>`` with inline styles; text HTML-escaped by rich)."""
    from rich.console import Console

    console = Console(
        record=True, width=width, file=io.StringIO(), force_terminal=False, color_system="standard"
    )
    console.print(renderable)
    return console.export_html(
        inline_styles=True,
        code_format='<pre style="font-family: monospace; white-space: pre">{code}</pre>',
    )


def dataframe(rows: list[dict[str, Any]], columns: Sequence[str]) -> Any:
    """A ``pandas.DataFrame`` of ``rows`` with ``columns`` (pandas imported here, on demand).

    Raises:
        ModuleNotFoundError: pandas is not installed (with the pip command).
    """
    try:
        import pandas as pd
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError("to_dataframe() needs pandas: pip install pandas") from exc
    return pd.DataFrame(rows, columns=list(columns))


RECORD_COLUMNS = ("step", "layer", "depth", "global_norm", "loss", "lr", "numel", *LAYER_STATS, "has_grad")
"""Columns of :func:`records_dataframe`: one row per (step, layer)."""


def records_dataframe(records: Sequence[Any]) -> Any:
    """Step records as a long ``pandas.DataFrame``: one row per logged step and layer (columns
    :data:`RECORD_COLUMNS`; the step's global norm, loss and lr repeated on its rows; NaN/inf kept).

    Raises:
        ModuleNotFoundError: pandas is not installed.
    """
    rows = [
        {
            "step": r.step,
            "layer": x.name,
            "depth": x.depth,
            "global_norm": r.global_norm,
            "loss": r.loss,
            "lr": r.lr,
            **{c: getattr(x, c) for c in RECORD_COLUMNS[6:]},
        }
        for r in records
        for x in r.layers
    ]
    return dataframe(rows, RECORD_COLUMNS)
