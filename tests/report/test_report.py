"""HTML reports: escaping of user strings, figures, number formatting, the run report from a real Monitor."""

from __future__ import annotations

import base64
import math
import re
from pathlib import Path
from xml.etree import ElementTree

import pytest
import torch
from torch import nn

import gradsentry as gs
from gradsentry.records import Advice, Finding, LayerInfo, LayerStats, Run, RunHeader, StepRecord
from gradsentry.report import render_run_report
from gradsentry.report.html import embed_svg, fmt

EVIL = "<script>alert(1)</script>"
EVIL_ATTR = 'x"><img src=x onerror=alert(2)> --> <!--'


class _Evil(nn.Module):
    """Two Linear layers whose module names are HTML."""

    def __init__(self) -> None:
        super().__init__()
        self.add_module(EVIL, nn.Linear(4, 8))
        self.act = nn.Tanh()
        self.add_module(EVIL_ATTR, nn.Linear(8, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._modules[EVIL_ATTR](self.act(self._modules[EVIL](x)))  # type: ignore[misc]


def _svgs(html: str) -> list[str]:
    return [
        base64.b64decode(b).decode() for b in re.findall(r'src="data:image/svg\+xml;base64,([^"]+)"', html)
    ]


@pytest.fixture
def evil_run(tmp_path: Path) -> Run:
    model = _Evil()
    path = tmp_path / "evil.jsonl"
    with gs.Monitor(model, sinks=[gs.JsonlSink(path)], meta={"note": "<b>bold</b> & more"}) as mon:
        for _ in range(3):
            model(torch.randn(16, 4)).pow(2).mean().backward()
            mon.step()
    return gs.read_jsonl(path)


def test_user_strings_are_escaped(evil_run: Run) -> None:
    assert [x.name for x in evil_run.header.layers] == [EVIL, EVIL_ATTR]
    finding = Finding(
        kind="vanishing", severity="error", steps=[0], layers=[EVIL, EVIL_ATTR],
        evidence={EVIL: 1e-9, "layers": {EVIL_ATTR: 2.0}}, explanation=f"gradient of {EVIL} is tiny",
        remedies=[Advice(action=EVIL, api=EVIL_ATTR, reference="<i>ref</i>")],
    )  # fmt: skip
    html = render_run_report(evil_run, title=f"run {EVIL}", findings=[finding])
    low = html.lower()
    assert "<script" not in low and "<img src=x" not in low and "<b>bold" not in low and "<i>ref" not in low
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "x&#34;&gt;&lt;img src=x onerror=alert(2)&gt; --&gt; &lt;!--" in html
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; more" in html
    svgs = _svgs(html)
    assert len(svgs) == 3
    for svg in svgs:  # matplotlib's SVG text (comments, ids) carries no raw markup; each SVG stays valid XML
        assert "<script" not in svg.lower() and "<img" not in svg.lower()
        ElementTree.fromstring(svg)


def test_run_report_diagnoses_when_no_findings_are_stored(tmp_path: Path) -> None:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(14):
        layers += [nn.Linear(16, 16), nn.Sigmoid()]
    model = nn.Sequential(*layers, nn.Linear(16, 3))
    path = tmp_path / "deep.jsonl"
    mon = gs.Monitor(model, sinks=[gs.JsonlSink(path)])
    for _ in range(4):
        nn.functional.cross_entropy(model(torch.randn(32, 16)), torch.randint(0, 3, (32,))).backward()
        mon.step()
    mon.close(write_findings=False)
    run = gs.read_jsonl(path)
    assert run.findings == []
    html = render_run_report(run)
    assert "vanishing" in html and "No finding" not in html
    assert "data:image/svg+xml;base64," in html


def test_run_report_of_an_empty_run_says_so() -> None:
    run = Run(header=RunHeader(), records=[])
    html = render_run_report(run)
    assert "holds no step records" in html and "<img" not in html


def test_run_report_marks_nonfinite_steps() -> None:
    layer = LayerStats("fc", 0, 4, math.nan, math.nan, math.nan, 4, 1.0)
    ok = LayerStats("fc", 0, 4, 2.0, 1.0, 1.5, 0, 1.0)
    records = [StepRecord(0, 2.0, [ok], loss=1.0), StepRecord(1, math.nan, [layer], loss=math.nan)]
    html = render_run_report(Run(RunHeader(layers=[LayerInfo("fc", "Linear", 0, 4)]), records))
    assert "first at step 1" in html and "nonfinite" in html


def test_embed_svg_reads_the_size_and_round_trips() -> None:
    svg = '<svg xmlns="http://www.w3.org/2000/svg" width="720pt" height="360pt"><rect/></svg>'
    fig = embed_svg(svg, "f", "alt", "caption")
    assert (fig.width, fig.height) == (960, 480)  # 1 pt = 4/3 CSS px
    assert base64.b64decode(fig.uri.split(",", 1)[1]).decode() == svg


@pytest.mark.parametrize(
    ("value", "text"),
    [(None, "–"), (0.0, "0"), (0.123456, "0.123"), (1.5e-7, "1.50e-07"), (2.5e6, "2.50e+06"), (12.0, "12"),
     (math.nan, "NaN"), (math.inf, "inf"), (-math.inf, "-inf"), (7, "7"), (True, "yes")],
)  # fmt: skip
def test_fmt(value: object, text: str) -> None:
    assert fmt(value) == text


def test_cli_report_renders_a_lightning_callback_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pl = pytest.importorskip("lightning.pytorch", reason="the lightning extra is not installed")
    from torch.utils.data import DataLoader, TensorDataset

    from gradsentry.cli import main
    from gradsentry.integrations.lightning import GradSentryCallback

    class Module(pl.LightningModule):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.Sigmoid(), nn.Linear(16, 1))

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = DataLoader(TensorDataset(torch.randn(32, 8), torch.randn(32, 1)), batch_size=8)
    trainer = pl.Trainer(
        max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[GradSentryCallback(sinks=[gs.JsonlSink(tmp_path / "pl.jsonl")])],
    )  # fmt: skip
    trainer.fit(Module(), data)
    assert main(["report", str(tmp_path / "pl.jsonl")]) == 0
    html = (tmp_path / "pl.html").read_text()
    assert "net.0" in html and html.count("data:image/svg+xml;base64,") == 3
    assert "lightning" in html  # the header's source


def test_run_report_shows_the_update_to_weight_ratio_not_a_method_repr(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "run.jsonl"
    with gs.Monitor(model, optimizer=opt, sinks=[gs.JsonlSink(path)]) as mon:
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(16, 8)).pow(2).mean().backward()
            mon.step()
            opt.step()
    html = render_run_report(gs.read_jsonl(path))
    assert "built-in method" not in html
    from gradsentry.report.html import fmt

    ratio = gs.read_jsonl(path).records[-1].layers[0].update_ratio
    assert ratio is not None and f'<td class="num">{fmt(ratio)}</td></tr>' in html


def test_report_on_a_run_without_step_records_agrees_with_analyze(tmp_path: Path, capsys) -> None:
    """A run holding its header (and findings) but no step record: `analyze` exits 2 saying there are no
    values, while `report` exited 0 and wrote an empty page. Both now say the same, exit 2, and an
    earlier report at the target is kept."""
    log = tmp_path / "run.jsonl"
    header = '{"gradsentry":1,"kind":"header","layers":[{"name":"fc","type":"Linear","depth":0,"params":6}],"meta":{}}'
    log.write_text(header + '\n{"kind":"findings","findings":[]}\n', encoding="utf-8")
    from gradsentry.cli import main

    assert main(["analyze", str(log)]) == 2
    analyze_err = capsys.readouterr().err
    assert "no training loss or gradient norm values found in this gradsentry run" in analyze_err
    assert "TensorBoard" not in analyze_err  # the format was recognised: no list of every other one
    out = tmp_path / "run.html"
    out.write_text("the previous report", encoding="utf-8")
    assert main(["report", str(log)]) == 2
    assert capsys.readouterr().err == analyze_err
    assert out.read_text(encoding="utf-8") == "the previous report"
