"""The text forms of a finding (:mod:`gradsentry.report.text`): the severity order and looks are defined
once, and every renderer (``str``, the CLI table, the rich views, the HTML report and plot page, the
TensorBoard text, the callbacks' summary, the live alert) shows the same words."""

from __future__ import annotations

import ast
import html
import re
from pathlib import Path

import pytest

from gradsentry.records import SEVERITY_ORDER, Advice, Finding, LayerStats, Run, RunHeader, StepRecord
from gradsentry.report import text

SRC = Path(__file__).resolve().parents[2] / "src" / "gradsentry"

FINDING = Finding(
    "exploding",
    "error",
    [12, 13],
    ["blocks.0.fc", "head"],
    {"pattern": "spike", "ratio": 40.0},
    "The gradient norm | jumped <40x> & stayed high.",
    [Advice("Clip the global gradient norm at 1.0.", api="gradsentry.ClipGlobalNorm(1.0)")],
)
INFO = Finding("gradient_concentration", "info", [], [], {}, "Blocks share the gradient evenly.")


def test_one_line_form() -> None:
    line = (
        "[error] exploding at step 12 in blocks.0.fc, head: The gradient norm | jumped <40x> & stayed high."
    )
    assert text.finding_line(FINDING) == str(FINDING) == line
    assert str(INFO) == "[info] gradient_concentration: Blocks share the gradient evenly."
    many = Finding("vanishing", "warning", [3], [f"l{i}" for i in range(6)], explanation="x")
    assert str(many) == "[warning] vanishing at step 3 in l0, l1, l2: x"


def test_severity_order_and_looks_are_one_table() -> None:
    assert text.SEVERITY_ORDER is SEVERITY_ORDER
    assert text.SEVERITIES == ("info", "warning", "error")
    assert set(text.SEVERITY_LOOK) == set(text.SEVERITIES)
    assert text.severity_rank("error") > text.severity_rank("warning") > text.severity_rank("info")
    assert text.severity_rank("bogus") == text.severity_rank("warning")
    assert text.severity_look("bogus") == text.SEVERITY_LOOK["warning"]
    assert text.worst_severity(["info", "error", "warning"]) == "error" and text.worst_severity([]) is None
    css = text.severity_css()
    for name, look in {**text.SEVERITY_LOOK, "none": text.NO_FINDING_LOOK}.items():
        assert f".sev-{name} {{ background: {look.css_background}; color: {look.css_color}; }}" in css


def _severity_tables(tree: ast.AST) -> list[int]:
    """Line numbers of dict literals keyed by two or more severities (a private severity table)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            keys = {k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
            if len(keys & {"info", "warning", "error"}) >= 2:
                found.append(node.lineno)
    return found


def test_no_other_module_keeps_a_severity_table() -> None:
    """Severity order and colours live in records.py and report/text.py only (the CSS too: no template
    spells a ``.sev-error`` colour)."""
    owners = {"records.py", "report/text.py"}
    bad = {}
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel in owners:
            continue
        lines = _severity_tables(ast.parse(path.read_text(encoding="utf-8")))
        if lines:
            bad[rel] = lines
    assert not bad, f"severity tables outside report/text.py: {bad}"
    for template in (SRC / "report" / "templates").glob("*.j2"):
        assert not re.search(r"\.sev-(error|warning|info)\s*\{", template.read_text()), template.name


def test_markdown_and_cells() -> None:
    cells = text.finding_cells(FINDING)
    assert cells == ("error", "exploding", "12", "blocks.0.fc, head", FINDING.explanation)
    md = text.findings_markdown([FINDING, INFO])
    lines = md.splitlines()
    assert lines[0] == "| severity | kind | first step | layers | explanation |"
    assert lines[2] == (
        "| error | exploding | 12 | blocks.0.fc, head | The gradient norm \\| jumped <40x> & stayed high. |"
    )
    assert lines[3] == "| info | gradient_concentration |  |  | Blocks share the gradient evenly. |"
    assert text.findings_markdown([]) == "No findings."
    item = text.finding_markdown(FINDING)
    assert item.startswith("- **error** **exploding** at step 12 in blocks.0.fc, head: The gradient")
    assert item.endswith("Fix: Clip the global gradient norm at 1.0. (gradsentry.ClipGlobalNorm(1.0))")


def test_rich_forms_use_the_looks() -> None:
    line = text.finding_rich_line(FINDING)
    assert line.plain == text.finding_line(FINDING)
    assert any(span.style == text.SEVERITY_LOOK["error"].rich for span in line.spans)
    severity, kind, step, explanation = text.finding_rich_row(FINDING)
    assert (severity.plain, kind, step, explanation.plain) == (
        "error",
        "exploding (spike)",
        "12",
        FINDING.explanation,
    )
    assert severity.style == "red"
    assert text.finding_rich_row(INFO)[2] == "-"


# --- every renderer shows the same words -----------------------------------------------------------


def test_views_and_notebook_html_show_the_line() -> None:
    from rich.console import Console

    from gradsentry.report.views import finding_renderable

    console = Console(width=400, record=True, color_system=None)
    console.print(finding_renderable(FINDING))
    assert console.export_text().splitlines()[0] == text.finding_line(FINDING)
    assert html.escape(FINDING.explanation) in FINDING._repr_html_()


def test_the_cli_table_shows_the_row(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    from gradsentry.cli import main
    from hf_states import write_state

    monkeypatch.setenv("COLUMNS", "3000")  # no column folds
    monkeypatch.setenv("NO_COLOR", "1")
    path = write_state(tmp_path / "trainer_state.json", spike=True)
    from gradsentry.analyze import analyze_log

    findings = analyze_log(path).findings
    assert findings
    main(["analyze", str(path)])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "│" in line or "┃" in line]
    for f in findings:
        sev, kind, step, explanation = text.finding_rich_row(f)
        row = next(r for r in rows if f" {kind} " in r)
        cells = [c.strip() for c in re.split(r"[│┃]", row)[1:-1]]
        assert cells == [sev.plain, kind, step, explanation.plain]


def test_html_report_and_plot_page(tmp_path: Path) -> None:
    pytest.importorskip("jinja2")
    pytest.importorskip("matplotlib")
    from gradsentry.logs.series import Series
    from gradsentry.report.html import render_run_report
    from gradsentry.report.series_plot import plot_series

    ok = LayerStats("fc", 0, 4, 2.0, 1.0, 1.5, 0, 1.0)
    run = Run(RunHeader(), [StepRecord(0, 2.0, [ok], loss=1.0), StepRecord(1, 3.0, [ok], loss=0.9)])
    page = render_run_report(run, findings=[FINDING, INFO])
    assert html.escape(FINDING.explanation) in page and html.escape(INFO.explanation) in page
    assert text.severity_css() in page
    series = Series([0, 1, 12], [2.0, 1.9, 5.0], [1.0, 1.1, 40.0], [None] * 3, source="test", path="run.log")
    out = plot_series(series, [FINDING, INFO], tmp_path / "plot.html")
    body = out.read_text()
    assert text.finding_html_item(FINDING) in body
    assert html.escape(text.finding_line(FINDING)) in body


def test_tensorboard_text_summary_and_alert() -> None:
    from gradsentry.integrations._common import summarize
    from gradsentry.monitor.alerts import alert_message
    from gradsentry.sinks.tensorboard import findings_markdown

    assert findings_markdown([FINDING]) == text.findings_markdown([FINDING])
    summary = summarize([FINDING, INFO], 20)
    assert summary.splitlines()[1:] == [f"  {text.finding_line(FINDING)}", f"  {text.finding_line(INFO)}"]
    rec = StepRecord(12, 40.0, [LayerStats("head", 1, 4, 40.0, 1.0, 1.5, 0, 1.0)], loss=1.0)
    message = alert_message(rec, FINDING)
    assert text.finding_line(FINDING) in message and text.remedy_line(FINDING) in message
