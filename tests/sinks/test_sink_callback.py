"""CallbackSink driven by a real Monitor; the tracker sinks are loaded lazily."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch
from torch import nn

import gradsentry
from gradsentry.logs.run_jsonl import read_jsonl
from gradsentry.monitor import Monitor
from gradsentry.sinks import CallbackSink, JsonlSink
from zoo import mlp


def test_callback_gets_every_record_the_header_and_the_findings(tmp_path):
    got, headers, found = [], [], []
    sink = CallbackSink(got.append, on_findings=found.append, on_open=headers.append)
    model = mlp(3, width=8, act=nn.Sigmoid)
    with Monitor(model, every=2, sinks=[sink, JsonlSink(tmp_path / "run.jsonl")]) as mon:
        for i in range(5):
            model(torch.randn(4, 16)).pow(2).mean().backward()
            if i == 4:
                model[0].bias.grad[0] = float("inf")
            mon.step()
            model.zero_grad()
    assert [r.step for r in got] == [0, 2, 4]
    assert got == mon.records  # the very records the Monitor keeps
    assert [r.to_dict() for r in got] == [r.to_dict() for r in read_jsonl(tmp_path / "run.jsonl").records]
    assert len(headers) == 1 and [x.name for x in headers[0].layers] == ["0", "2", "4"]
    assert len(found) == 1 and "nonfinite" in {f.kind for f in found[0]}


def test_a_raising_callback_is_reported_once_and_training_goes_on(caplog):
    calls = []

    def boom(record):
        calls.append(record.step)
        raise RuntimeError("user bug")

    model = mlp(2, width=4)
    with (
        caplog.at_level(logging.ERROR, logger="gradsentry"),
        Monitor(model, sinks=[CallbackSink(boom)]) as mon,
    ):
        for _ in range(3):
            model(torch.randn(2, 16)).sum().backward()
            mon.step()
    assert calls == [0] and mon.step_count == 3
    assert sum("CallbackSink failed in write" in r.getMessage() for r in caplog.records) == 1


def test_bad_arguments():
    with pytest.raises(TypeError, match="fn must be callable"):
        CallbackSink(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="on_findings must be callable"):
        CallbackSink(print, on_findings=3)  # type: ignore[arg-type]


def test_tracker_sinks_are_exported_lazily():
    code = (
        "import sys, gradsentry, gradsentry.sinks\n"
        "assert 'wandb' not in sys.modules and 'mlflow' not in sys.modules, 'imported eagerly'\n"
        "assert {'WandbSink', 'MlflowSink', 'CallbackSink'} <= set(gradsentry.sinks.__all__)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert gradsentry.CallbackSink is CallbackSink
    with pytest.raises(AttributeError):
        gradsentry.sinks.NoSuchSink  # noqa: B018
