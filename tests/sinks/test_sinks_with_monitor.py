"""The new sinks driven by a real Monitor; a failing sink never stops training."""

from __future__ import annotations

import csv
import logging
import math

import pytest
import torch
from torch import nn

from gradsentry.logs.run_jsonl import read_jsonl
from gradsentry.monitor import Monitor
from gradsentry.sinks import CsvSink, JsonlSink, TensorBoardSink
from zoo import mlp

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


class RaisingSink:
    """A sink whose disk is full from the third record on."""

    def __init__(self) -> None:
        self.written = 0

    def open(self, header: object) -> None:
        pass

    def write(self, record: object) -> None:
        if self.written == 2:
            raise OSError(28, "No space left on device")
        self.written += 1

    def write_findings(self, findings: object) -> None:
        pass

    def close(self) -> None:
        pass


def _train(mon: Monitor, model: nn.Module, steps: int, on_step: object = None) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 16), torch.randn(32, 4)
    for i in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        mon.step(loss=loss)
        opt.step()
        opt.zero_grad()
        if callable(on_step):
            on_step(i)


def test_failing_sinks_are_reported_once_and_training_goes_on(tmp_path, caplog):
    model = mlp(3, width=16, act=nn.Tanh)
    csv_sink = CsvSink(tmp_path / "run.csv")
    raising = RaisingSink()
    mon = Monitor(model, optimizer=None, sinks=[csv_sink, raising, JsonlSink(tmp_path / "run.jsonl")])

    def close_csv_file(i: int) -> None:
        if i == 1:
            assert csv_sink._fh is not None
            csv_sink._fh.close()  # the CSV file is closed under the sink after two records

    with caplog.at_level(logging.ERROR, logger="gradsentry"):
        _train(mon, model, steps=6, on_step=close_csv_file)
        mon.close()
    assert mon.step_count == 6 and len(mon.records) == 6  # training and recording went on
    errors = [r.getMessage() for r in caplog.records if "failed in" in r.getMessage()]
    assert len(errors) == 2  # once per failing sink, not once per step
    assert any("CsvSink failed in write" in m for m in errors)
    assert any("RaisingSink failed in write" in m and "No space left" in m for m in errors)
    assert raising.written == 2
    # the healthy sink got everything
    assert [r.global_norm for r in read_jsonl(tmp_path / "run.jsonl").records] == [
        r.global_norm for r in mon.records
    ]
    # the CSV keeps the rows written before its file was closed (3 layers per step)
    with (tmp_path / "run.csv").open(newline="") as fh:
        assert len(list(csv.reader(fh))) == 1 + 2 * 3


def test_monitor_records_through_tensorboard_and_csv(tmp_path):
    model = mlp(3, width=16, act=nn.Sigmoid)
    mon = Monitor(
        model,
        optimizer=None,
        histogram_bins=8,
        sinks=[TensorBoardSink(tmp_path / "tb", histograms_every=2), CsvSink(tmp_path / "run.csv")],
    )
    _train(mon, model, steps=3)
    mon.close(write_findings=False)
    recs = mon.records

    acc = event_accumulator.EventAccumulator(
        str(tmp_path / "tb"), size_guidance={"scalars": 0, "histograms": 0}
    )
    acc.Reload()
    got = {e.step: e.value for e in acc.Scalars("gradsentry/global_norm")}
    assert got == {r.step: pytest.approx(r.global_norm, rel=1e-6) for r in recs}
    for layer in recs[0].layers:
        series = {e.step: e.value for e in acc.Scalars(f"gradsentry/grad_norm/{layer.name}")}
        assert series == {r.step: pytest.approx(r.layer(layer.name).grad_norm, rel=1e-6) for r in recs}
    sat = {e.step: e.value for e in acc.Scalars("gradsentry/saturated_frac/1")}
    assert sat[0] == pytest.approx(recs[0].activations[0].saturated_frac, abs=1e-7)
    # pre-activation histograms from the Monitor on logged steps 0 and 2
    hist = acc.Histograms("gradsentry/preact/1")
    assert [h.step for h in hist] == [0, 2]
    counts = recs[0].activations[0].histogram["counts"]
    assert list(hist[0].histogram_value.bucket) == pytest.approx(counts)

    with (tmp_path / "run.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 * len(recs[0].layers)
    for row in rows:
        rec = recs[int(row["step"])]
        assert float(row["grad_norm"]) == rec.layer(row["layer"]).grad_norm
        assert float(row["global_norm"]) == rec.global_norm
        assert math.isfinite(float(row["loss"]))


@pytest.mark.parametrize("sink_cls", [JsonlSink, CsvSink])
@pytest.mark.parametrize(
    "content",
    [
        b"step,loss,grad_norm\n1,2.0,3.0\n2,1.5",  # another tool's CSV, its last row not ended
        bytes(range(256)) * 8,  # a binary file
        b'{"gradsentry":1,"kind":"header","layers":[]}\n'.replace(b"gradsentry", b"other"),
        b"no newline at all, not a header",
    ],
)
def test_resume_never_touches_a_file_the_sink_did_not_write(tmp_path, caplog, sink_cls, content):
    """A sink resuming on a file that is not its own used to append to it (JSONL into a CSV) and to drop
    its "cut" last line first (a binary file lost bytes) before CsvSink refused it."""
    path = tmp_path / "other.log"
    path.write_bytes(content)
    model = mlp(2, width=8, act=nn.Tanh)
    with caplog.at_level(logging.ERROR, logger="gradsentry"):
        mon = Monitor(model, sinks=[sink_cls(path)])
        _train(mon, model, steps=2)
        mon.close()
    assert path.read_bytes() == content
    assert len(mon.records) == 2  # training and recording went on
    assert f"is not a {'gradsentry JSONL run' if sink_cls is JsonlSink else 'CsvSink table'}" in caplog.text
    assert "resume=False) to replace it" in caplog.text


@pytest.mark.parametrize("sink_cls", [JsonlSink, CsvSink])
def test_resume_after_a_kill_that_cut_the_header_line_starts_the_file_again(tmp_path, sink_cls):
    path = tmp_path / "run.log"
    model = mlp(2, width=8, act=nn.Tanh)
    with Monitor(model, sinks=[sink_cls(path)]) as mon:
        _train(mon, model, steps=1)
    path.write_bytes(path.read_bytes()[:10])  # killed while writing its header
    with Monitor(model, sinks=[sink_cls(path)]) as mon:
        _train(mon, model, steps=2)
    text = path.read_text()
    assert text.startswith('{"gradsentry":' if sink_cls is JsonlSink else "step,layer,")
    if sink_cls is JsonlSink:
        assert [r.step for r in read_jsonl(path).records] == [0, 1]


def test_analyze_of_a_tensorboard_sink_run_reads_its_loss_and_lr(tmp_path):
    """`gradsentry analyze` of a TensorBoardSink directory read only `gradsentry/global_norm`: the loss
    (`gradsentry/loss`) and lr were ignored, so a run the JSONL calls diverging read as healthy."""
    from gradsentry.analyze import analyze_log

    torch.manual_seed(0)
    model = mlp(3, width=16, act=nn.Tanh)
    with Monitor(model, sinks=[TensorBoardSink(tmp_path / "tb"), JsonlSink(tmp_path / "run.jsonl")]) as mon:
        _train(mon, model, steps=6)
    tb, jl = analyze_log(tmp_path / "tb"), analyze_log(tmp_path / "run.jsonl")
    assert tb.series.fields["loss"] == "gradsentry/loss"
    assert tb.series.loss == pytest.approx(jl.series.loss, rel=1e-6)  # float32 in TensorBoard
    from gradsentry.logs.series import LR_KEYS

    assert "gradsentry/lr" in LR_KEYS  # what the sink writes with Monitor(optimizer=...)
