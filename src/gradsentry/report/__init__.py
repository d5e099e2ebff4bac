"""Everything a person reads: findings as text (:mod:`~gradsentry.report.text`: one line, Markdown, rich
rows, the severity looks), matplotlib figures (:mod:`~gradsentry.report.plots`,
:mod:`~gradsentry.report.lab_plots`, :mod:`~gradsentry.report.series_plot` for ``analyze --plot``),
sparklines (:mod:`~gradsentry.report.sparkline`), self-contained HTML pages
(:mod:`~gradsentry.report.html`, with :mod:`~gradsentry.report.page` and
:mod:`~gradsentry.report.lab_sections`) and the rich/notebook views (:mod:`~gradsentry.report.views`).

The names are imported on first use (PEP 562), so that ``gradsentry.report.views`` (the ``check`` table)
and ``gradsentry.report.text`` work on a core install without matplotlib and jinja2 (the ``[report]``
extra).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gradsentry._lazy import lazy_names

if TYPE_CHECKING:
    from gradsentry.report.html import render_lab_report, render_run_report

_HOME = {
    "render_lab_report": "gradsentry.report.html",
    "render_run_report": "gradsentry.report.html",
}

__getattr__, __dir__ = lazy_names(__name__, _HOME)

__all__ = ["render_lab_report", "render_run_report"]
