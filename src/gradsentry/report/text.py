"""Findings as text, in every form a person reads: one line, Markdown, table cells, rich rows, HTML items.

The one home of a finding's wording and of the severity colours: ``Finding.__str__``, the CLI tables,
the rich/notebook views, the HTML report's CSS, the plots' marker lines, the TensorBoard text, the W&B
table, the trainer callbacks' summaries and the Monitor's live alerts all read from here. The severity
order itself is data (:data:`gradsentry.records.SEVERITY_ORDER`) and re-exported here.

Light by design: rich is imported inside the functions that build rich objects, so ``Finding.__str__``
(which imports this module on first use) costs no rich import.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gradsentry.records import SEVERITY_ORDER

if TYPE_CHECKING:
    from rich.text import Text

    from gradsentry.records import Finding

SEVERITIES: tuple[str, ...] = tuple(sorted(SEVERITY_ORDER, key=SEVERITY_ORDER.__getitem__))
"""The severities, least severe first: ``("info", "warning", "error")``."""


@dataclass(frozen=True)
class SeverityLook:
    """How one severity looks in each medium.

    Attributes:
        rich: rich style (terminal and notebook views).
        plot: matplotlib colour of the marker lines at a finding's steps.
        css_color: text colour of the HTML badge.
        css_background: background colour of the HTML badge.
    """

    rich: str
    plot: str
    css_color: str
    css_background: str


SEVERITY_LOOK: dict[str, SeverityLook] = {
    "info": SeverityLook(rich="cyan", plot="tab:gray", css_color="#026aa2", css_background="#e0f2fe"),
    "warning": SeverityLook(rich="yellow", plot="tab:orange", css_color="#b54708", css_background="#fef0c7"),
    "error": SeverityLook(rich="red", plot="tab:red", css_color="#b42318", css_background="#fee4e2"),
}
"""The look of each severity, defined once; an unknown severity looks like ``warning``."""

NO_FINDING_LOOK = SeverityLook(
    rich="bold green", plot="tab:green", css_color="#067647", css_background="#dcfae6"
)
"""The look of "no finding" (a healthy run): the HTML ``sev-none`` badge and the rich verdict line."""

FINDING_COLUMNS: tuple[str, ...] = ("severity", "kind", "first step", "layers", "explanation")
"""The columns of a findings table (:func:`finding_cells`, :func:`findings_markdown`)."""


def severity_look(severity: str) -> SeverityLook:
    """The look of ``severity`` (``warning``'s for an unknown one)."""
    return SEVERITY_LOOK.get(severity, SEVERITY_LOOK["warning"])


def severity_rank(severity: str) -> int:
    """The order of ``severity`` (info 0, warning 1, error 2; an unknown one counts as a warning)."""
    return SEVERITY_ORDER.get(severity, SEVERITY_ORDER["warning"])


def worst_severity(severities: Iterable[str]) -> str | None:
    """The most severe of ``severities`` (the first of equal ones), None when there is none."""
    worst: str | None = None
    for s in severities:
        if worst is None or severity_rank(s) > severity_rank(worst):
            worst = s
    return worst


def severity_css() -> str:
    """The CSS rules of the HTML severity badges (``.sev-info``, ``.sev-warning``, ``.sev-error``,
    ``.sev-none``), from :data:`SEVERITY_LOOK`."""
    looks = {**SEVERITY_LOOK, "none": NO_FINDING_LOOK}
    return "\n".join(
        f"  .sev-{name} {{ background: {look.css_background}; color: {look.css_color}; }}"
        for name, look in looks.items()
    )


def finding_kind(finding: Finding) -> str:
    """The finding's kind with its pattern when it has one: ``exploding (spike)``."""
    pattern = finding.evidence.get("pattern")
    return finding.kind + (f" ({pattern})" if pattern else "")


def finding_where(finding: Finding, max_layers: int = 3) -> str:
    """`` at step S in a, b, c``: the first step and the first layers ('' for each when unknown)."""
    where = f" at step {finding.steps[0]}" if finding.steps else ""
    layers = f" in {', '.join(finding.layers[:max_layers])}" if finding.layers else ""
    return where + layers


def finding_line(finding: Finding) -> str:
    """The finding in one line: ``[severity] kind at step S in layers: explanation`` (``str(finding)``)."""
    return f"[{finding.severity}] {finding.kind}{finding_where(finding)}: {finding.explanation}"


def remedy_line(finding: Finding, index: int = 0) -> str:
    """``action (api)`` of the finding's remedy ``index`` ('' when it has none)."""
    if len(finding.remedies) <= index:
        return ""
    remedy = finding.remedies[index]
    return remedy.action + (f" ({remedy.api})" if remedy.api else "")


def finding_cells(finding: Finding, max_layers: int = 5) -> tuple[str, str, str, str, str]:
    """The finding as the plain cells of :data:`FINDING_COLUMNS` (first step '' when unknown)."""
    return (
        finding.severity,
        finding.kind,
        str(finding.steps[0]) if finding.steps else "",
        ", ".join(finding.layers[:max_layers]),
        finding.explanation,
    )


def _md_cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def findings_markdown(findings: Sequence[Finding]) -> str:
    """The findings as a Markdown table of :data:`FINDING_COLUMNS` (``No findings.`` when empty)."""
    if not findings:
        return "No findings."
    rows = [
        "| " + " | ".join(FINDING_COLUMNS) + " |",
        "| " + " | ".join("---" for _ in FINDING_COLUMNS) + " |",
    ]
    rows += ["| " + " | ".join(_md_cell(c) for c in finding_cells(f)) + " |" for f in findings]
    return "\n".join(rows)


def finding_markdown(finding: Finding) -> str:
    """One finding as a Markdown list item: bold severity and kind, where, explanation, first remedy."""
    fix = remedy_line(finding)
    text = f"- **{finding.severity}** **{finding.kind}**{finding_where(finding)}: {finding.explanation}"
    return text + (f" Fix: {fix}" if fix else "")


def finding_html_item(finding: Finding) -> str:
    """One finding as an HTML ``<li>`` (its one line, escaped; class ``sev-<severity>``)."""
    return f'<li class="sev-{html.escape(finding.severity)}">{html.escape(finding_line(finding))}</li>'


def finding_rich_line(finding: Finding) -> Text:
    """The finding's one line as rich text, ``[severity] kind`` in the severity's colour."""
    from rich.text import Text

    return Text.assemble(
        (f"[{finding.severity}] {finding.kind}", severity_look(finding.severity).rich),
        f"{finding_where(finding)}: ",
        finding.explanation,
    )


def finding_rich_row(finding: Finding) -> tuple[Any, str, str, Any]:
    """The finding as a row of the CLI's findings table: severity (coloured), kind with its pattern,
    first step (``-`` when unknown), explanation."""
    from rich.text import Text

    return (
        Text(finding.severity, style=severity_look(finding.severity).rich),
        finding_kind(finding),
        str(finding.steps[0]) if finding.steps else "-",
        Text(finding.explanation),
    )


FINDING_ROW_COLUMNS: tuple[str, ...] = ("severity", "kind", "step", "what was found")
"""The headers of :func:`finding_rich_row`'s cells."""


__all__ = [
    "FINDING_COLUMNS",
    "FINDING_ROW_COLUMNS",
    "NO_FINDING_LOOK",
    "SEVERITIES",
    "SEVERITY_LOOK",
    "SEVERITY_ORDER",
    "SeverityLook",
    "finding_cells",
    "finding_html_item",
    "finding_kind",
    "finding_line",
    "finding_markdown",
    "finding_rich_line",
    "finding_rich_row",
    "finding_where",
    "findings_markdown",
    "remedy_line",
    "severity_css",
    "severity_look",
    "severity_rank",
    "worst_severity",
]
