"""Readable everywhere: the check table fitted to the terminal, rich and HTML views, DataFrames."""

from __future__ import annotations

import io
import math

import pytest
import torch
from rich.console import Console
from torch import nn

import gradsentry as gs
from gradsentry.analyze import analyze_log
from gradsentry.check import check_model
from gradsentry.records import Advice, Finding, Run
from gradsentry.report.views import check_renderable


class LongNames(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder_stack = nn.ModuleDict(
            {
                "residual_block_number_one": nn.Sequential(
                    nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.Tanh()
                )
            }
        )
        self.classifier_head_projection = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier_head_projection(self.encoder_stack["residual_block_number_one"](x))


def _text(renderable: object, width: int) -> str:
    console = Console(width=width, file=io.StringIO(), record=True)
    console.print(renderable)
    return console.export_text()


@pytest.mark.parametrize("width", [100, 60])
def test_check_table_folds_names_to_the_terminal_width(width):
    report = check_model(LongNames(), input_shape=(8,), loss="mse")
    out = _text(report, width)  # CheckReport.__rich_console__: the console's width
    assert max(len(line) for line in out.splitlines()) <= width
    table = out.split("first/last layer")[0]
    for row in report.rows:
        # folded into pieces of at least 20 characters (never 5-character shreds), in order
        pieces = [line.split()[1] for line in table.splitlines() if line.split()[:1] == [str(row.depth)]]
        assert pieces and len(pieces[0]) >= min(20, len(row.name)) and row.name.startswith(pieces[0])
    assert "grad" in table and "dead" in table  # the key columns stay
    assert "columns left out" in out or width > 100
    assert out == _text(check_renderable(report, width), width)


def test_findings_views_escape_html_and_keep_the_text():
    f = Finding(
        kind="exploding",
        severity="error",
        steps=[3],
        layers=["blocks.<0>"],
        explanation="norm 1e6 & <script>alert(1)</script>",
        remedies=[Advice(action="clip", api="gs.ClipGlobalNorm(1.0)")],
    )
    html = f._repr_html_()
    assert "<script>" not in html and "&lt;script&gt;" in html and "&amp;" in html
    assert (
        "[error] exploding</span> at step 3 in blocks.&lt;0&gt;" in html and "gs.ClipGlobalNorm(1.0)" in html
    )
    assert str(f) in _text(f, 200)


def _run() -> Run:
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    with gs.Monitor(model, meta={"model": "Tiny<MLP>"}) as mon:
        for _ in range(3):
            model(torch.randn(16, 4)).pow(2).mean().backward()
            mon.step(loss=1.0)
            model.zero_grad()
    return Run(header=mon.header, records=mon.records, findings=mon.diagnose())


def test_run_views_and_dataframe():
    pd = pytest.importorskip("pandas")
    run = _run()
    assert "Tiny&lt;MLP&gt;: 2 layers, 3 records, steps 0..2" in run._repr_html_()
    assert "healthy" in _text(run, 120)
    df = run.to_dataframe()
    assert isinstance(df, pd.DataFrame) and len(df) == 3 * 2
    for r in run.records:  # independent: the records' own fields
        for x in r.layers:
            row = df[(df.step == r.step) & (df.layer == x.name)].iloc[0]
            assert row.grad_norm == x.grad_norm and row.global_norm == r.global_norm and row.depth == x.depth


def test_log_analysis_views_and_dataframe(tmp_path):
    pd = pytest.importorskip("pandas")
    log = tmp_path / "train.csv"
    lines = ["step,loss,grad_norm"] + [f"{s},{2.0 / (s + 1)},{1.0 + 0.01 * s}" for s in range(30)]
    lines[10] = "9,nan,nan"
    log.write_text("\n".join(lines) + "\n")
    analysis = analyze_log(log)
    df = analysis.to_dataframe()
    assert isinstance(df, pd.DataFrame) and list(df.columns) == ["step", "loss", "grad_norm", "lr", "skipped"]
    assert df.step.tolist() == list(range(30)) and math.isnan(df.loss[9]) and df.loss[3] == pytest.approx(0.5)
    text = _text(analysis, 400)
    assert "train.csv (csv): 30 logged steps, steps 0..29" in text and "nonfinite" in text
    assert "nonfinite" in analysis._repr_html_()


def test_to_dataframe_without_pandas_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pandas", None)  # an absent pandas: import raises
    with pytest.raises(ModuleNotFoundError, match=r"to_dataframe\(\) needs pandas: pip install pandas"):
        _run().to_dataframe()
