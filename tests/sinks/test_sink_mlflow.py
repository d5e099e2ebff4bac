"""MlflowSink against the real MLflow with a local file store, read back with MlflowClient; no mocks."""

from __future__ import annotations

import json
import logging
import math
import sys

import pytest
import torch
from torch import nn

from gradsentry.monitor import Monitor
from gradsentry.records import RunHeader
from gradsentry.sinks.tensorboard import record_scalars
from sink_records import findings, header, same_value
from sink_records import records as hand_records
from zoo import mlp

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402
from mlflow.utils.validation import (  # noqa: E402
    MAX_ENTITY_KEY_LENGTH,
    MAX_PARAM_VAL_LENGTH,
    _validate_metric_name,
)

from gradsentry.sinks.mlflow import (  # noqa: E402
    FINDINGS_ARTIFACT,
    MAX_KEY_LENGTH,
    MAX_PARAM_VALUE_LENGTH,
    MlflowSink,
    metric_key,
)


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses file stores without it
    return (tmp_path / "mlruns").as_uri()


def _check_metrics(client: MlflowClient, run_id: str, records: list) -> int:
    n = 0
    for rec in records:
        for tag, want in record_scalars(rec, "gradsentry"):
            points = [m for m in client.get_metric_history(run_id, metric_key(tag)) if m.step == rec.step]
            assert len(points) == 1 and same_value(points[0].value, want), (rec.step, tag, points, want)
            n += 1
    return n


def test_monitor_run_reads_back_with_the_client(store, tmp_path):
    model = mlp(3, width=16, act=nn.Tanh)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = MlflowSink(experiment="gs", tracking_uri=store)
    mon = Monitor(model, optimizer=opt, sinks=[sink], meta={"note": "x" * 10_000})
    x, y = torch.randn(32, 16), torch.randn(32, 4)
    for i in range(4):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if i == 3:
            model[2].bias.grad[0] = math.nan
        mon.step(loss=loss)
        opt.step()
        opt.zero_grad()
    mon.close()
    client = MlflowClient(tracking_uri=store)
    run = client.get_run(sink.run_id)
    assert run.info.status == "FINISHED"  # created by the sink, so ended by it
    assert client.get_experiment(run.info.experiment_id).name == "gs"
    assert _check_metrics(client, sink.run_id, mon.records) > 4 * 10
    assert math.isnan(client.get_metric_history(sink.run_id, "gradsentry/global_norm")[-1].value)
    params = run.data.params
    assert params["gradsentry/every"] == "1" and params["gradsentry/optimizer"] == "sgd"
    assert params["gradsentry/layers"] == "3"
    assert len(params["gradsentry/note"]) == MAX_PARAM_VALUE_LENGTH == MAX_PARAM_VAL_LENGTH
    assert params["gradsentry/note"].endswith("...")
    path = client.download_artifacts(sink.run_id, FINDINGS_ARTIFACT, str(tmp_path))
    with open(path) as fh:
        stored = json.load(fh)["findings"]
    assert [(f["kind"], f["severity"], f["steps"]) for f in stored] == [
        (f.kind, f.severity, f.steps) for f in mon.diagnose()
    ]
    assert "nonfinite" in {f["kind"] for f in stored}


def test_active_run_is_used_and_left_running_and_nan_inf_kept(store, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    with mlflow.start_run() as active:
        mlflow.log_param("gradsentry/source", "old")  # a resumed run's older value: kept, warned
        sink = MlflowSink()
        with caplog.at_level(logging.WARNING, logger="gradsentry"):
            sink.open(header())  # header().meta == {"source": "test"}
        assert "keeps parameter gradsentry/source='old' (now 'test')" in caplog.text
        recs = hand_records()  # NaN/inf, frozen layer (root module: "(root)"), a record without layers
        for rec in recs:
            sink.write(rec)
        sink.write_findings(findings())
        sink.close()
        client = MlflowClient()
        assert sink.run_id == active.info.run_id
        assert client.get_run(active.info.run_id).info.status == "RUNNING"  # not ours: not ended
    assert client.get_run(active.info.run_id).info.status == "FINISHED"
    _check_metrics(client, active.info.run_id, recs)
    inf = client.get_metric_history(active.info.run_id, "gradsentry/grad_norm/blocks.1.fc")
    assert [m.step for m in inf] == [0, 2, 4, 6] and math.isinf(inf[-1].value)
    weights = client.get_metric_history(active.info.run_id, "gradsentry/weight_norm/_root_")
    assert [m.value for m in weights] == [5.0, 5.0, 5.0, 5.0]
    params = client.get_run(active.info.run_id).data.params
    assert params["gradsentry/source"] == "old" and params["gradsentry/layers"] == "3"


def test_many_layers_are_sent_in_batches(store):
    sink = MlflowSink(tracking_uri=store)
    rec = hand_records()[0]
    rec.layers = [type(rec.layers[0])(f"l{i}", i, 4, 1.0 + i, 0.5, 0.1, 0, 2.0, None) for i in range(300)]
    sink.open(RunHeader(meta={}))
    sink.write(rec)  # 300 layers x 5 statistics + 3: over MLflow's 1000 metrics per batch
    sink.close()
    client = MlflowClient(tracking_uri=store)
    assert client.get_metric_history(sink.run_id, "gradsentry/grad_norm/l299")[0].value == 300.0


def test_metric_keys_pass_mlflows_own_validation():
    for tag in ["gradsentry/grad_norm/(root)", "p/x//y", "p/./a/../b/", "p/é:ü*?", "/lead", "p/" + "w" * 400]:
        key = metric_key(tag)
        _validate_metric_name(key)  # raises MlflowException for a key MLflow refuses
        assert len(key) <= MAX_KEY_LENGTH == MAX_ENTITY_KEY_LENGTH
    assert metric_key("gradsentry/grad_norm/blocks.3.fc") == "gradsentry/grad_norm/blocks.3.fc"
    assert metric_key("p/" + "w" * 400) != metric_key("p/" + "w" * 399 + "v")


def test_missing_mlflow_is_one_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(ImportError, match=r"pip install 'gradsentry\[mlflow\]'"):
        MlflowSink()
    with pytest.raises(ValueError, match="prefix"):
        MlflowSink(prefix="")
