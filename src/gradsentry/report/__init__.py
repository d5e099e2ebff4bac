"""Reports: matplotlib figures (:mod:`~gradsentry.report.plots`), self-contained HTML pages
(:mod:`~gradsentry.report.html`) and the rich/notebook views (:mod:`~gradsentry.report.views`).

The names are imported on first use (PEP 562), so that ``gradsentry.report.views`` (the ``check`` table)
works on a core install without matplotlib and jinja2 (the ``[report]`` extra).
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
