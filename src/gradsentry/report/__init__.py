"""Reports: matplotlib figures (:mod:`~gradsentry.report.plots`) and self-contained HTML pages."""

from gradsentry.report.html import render_lab_report, render_run_report

__all__ = ["render_lab_report", "render_run_report"]
