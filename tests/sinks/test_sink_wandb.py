"""WandbSink against the real wandb in offline mode, read back with W&B's own reader of the run's
``.wandb`` transaction log (``wandb leet inspect --json``); no network, no mocks."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from gradsentry.histograms import HistogramSpec
from gradsentry.monitor import Monitor
from gradsentry.records import StepRecord
from gradsentry.sinks.tensorboard import record_scalars
from sink_records import findings, header, same_value
from sink_records import records as hand_records
from zoo import mlp

wandb = pytest.importorskip("wandb")
from gradsentry.sinks.wandb import FINDING_COLUMNS, WandbSink  # noqa: E402


@pytest.fixture(scope="module")
def wandb_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("wandb")
    with pytest.MonkeyPatch.context() as mp:
        for var, sub in (
            ("WANDB_DIR", ""),
            ("WANDB_DATA_DIR", "data"),
            ("WANDB_CACHE_DIR", "cache"),
            ("WANDB_CONFIG_DIR", "config"),
            ("WANDB_ARTIFACT_DIR", "artifacts"),
        ):
            mp.setenv(var, str(root / sub))
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("WANDB_DISABLE_GIT", "true")
        yield root


def _inspect(run_dir: str) -> list[dict]:
    """Every record of the run's .wandb log, through wandb's own reader."""
    exe = Path(sys.executable).with_name("wandb")
    out = subprocess.run(
        [str(exe), "leet", "inspect", "--json", run_dir],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def _history(recs: list[dict]) -> dict[int, dict]:
    return {int(r["history"]["step"]["num"]): r["history"]["item"] for r in recs if r["type"] == "history"}


def _num(value: object) -> float:
    return float(value)  # type: ignore[arg-type]  # NaN / Infinity arrive as strings


@pytest.fixture(scope="module")
def monitored(wandb_env):
    """A real Monitor run of a small MLP into a run the sink starts (and so finishes)."""
    torch.manual_seed(0)
    model = mlp(3, width=16, act=nn.Tanh)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = WandbSink(project="gs-test", mode="offline", dir=str(wandb_env))
    mon = Monitor(
        model, optimizer=opt, sinks=[sink], histograms=HistogramSpec(bins=16, log10_low=-8, log10_high=0)
    )
    x, y = torch.randn(32, 16), torch.randn(32, 4)
    for i in range(4):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if i == 3:
            model[0].weight.grad[0, 0] = math.nan  # a non-finite step: a finding, NaN in the log
        mon.step(loss=loss)
        opt.step()
        opt.zero_grad()
    mon.close()
    assert sink.run is not None
    return mon, sink, _inspect(sink.run.dir.rsplit("/files", 1)[0])


def test_every_scalar_reads_back_equal_to_the_records(monitored):
    mon, _, recs = monitored
    hist = _history(recs)
    assert sorted(hist) == [r.step for r in mon.records] == [0, 1, 2, 3]
    for rec in mon.records:
        row = hist[rec.step]
        expected = dict(record_scalars(rec, "gradsentry"))
        assert (
            "gradsentry/grad_norm/0" in expected and "gradsentry/update_ratio/2" in expected
        ) or rec.step == 0
        for key, want in expected.items():
            assert same_value(_num(row[key]), want), (rec.step, key, row[key], want)


def test_histograms_read_back_as_wandb_histograms_of_the_counts(monitored):
    mon, _, recs = monitored
    hist = _history(recs)
    rec = mon.records[-1]
    assert rec.histograms is not None
    for lh in rec.histograms:
        for kind, h in (("grad_hist", lh.grad), ("weight_hist", lh.weight)):
            assert h is not None
            assert h.nonfinite == (1 if (kind, lh.name) == ("grad_hist", "0") else 0)
            item = hist[rec.step]
            key = f"gradsentry/{kind}/{lh.name}"
            assert item[f"{key}._type"] == "histogram"
            assert item[f"{key}.values"] == h.counts
            assert item[f"{key}.bins"] == pytest.approx(h.log10_edges(), rel=1e-6)


def test_header_in_config_findings_in_summary_and_a_started_run_is_finished(monitored, wandb_env):
    mon, sink, recs = monitored
    config = {}
    for r in recs:
        if r["type"] == "run":
            config.update(r["run"]["config"]["update"])
        elif r["type"] == "config":
            config.update(r["config"]["update"])
    gs = config["gradsentry"]
    assert [x["name"] for x in gs["layers"]] == [x.name for x in mon.layers]
    assert gs["meta"]["optimizer"] == "sgd"
    summary: dict = {}
    for r in recs:
        if r["type"] == "summary":
            summary.update(r["summary"].get("update", {}))
    found = mon.diagnose()
    assert summary["gradsentry/findings_count"] == len(found) >= 1
    assert "nonfinite" in {f.kind for f in found}
    table = json.loads(Path(sink.run.dir, summary["gradsentry/findings"]["path"]).read_text())
    assert table["columns"] == list(FINDING_COLUMNS)
    assert [row[:2] for row in table["data"]] == [[f.severity, f.kind] for f in found]
    assert any(r["type"] == "exit" for r in recs)  # the sink started the run, so it finished it
    assert wandb.run is None


def test_existing_run_is_used_not_finished_and_lower_steps_are_dropped_by_wandb(wandb_env):
    run = wandb.init(project="gs-test", mode="offline", dir=str(wandb_env))
    try:
        sink = WandbSink()  # picks up wandb.run
        sink.open(header())
        recs = hand_records()  # steps 0, 2, 4, 6 (NaN/inf), 8 (no layers)
        for rec in recs:
            sink.write(rec)
        sink.write(StepRecord(step=3, global_norm=123.0))  # lower than the run's step 8: W&B drops it
        sink.write_findings(findings())
        sink.close()
        assert sink.run is run and wandb.run is run  # not finished: not ours
        run.log({"user/metric": 1.0}, step=9)  # the user's run goes on
    finally:
        run.finish()
    hist = _history(_inspect(run.dir.rsplit("/files", 1)[0]))
    assert sorted(hist) == [0, 2, 4, 6, 8, 9]
    for rec in recs:
        for key, want in record_scalars(rec, "gradsentry"):
            assert same_value(_num(hist[rec.step][key]), want), (rec.step, key)
    assert "gradsentry/grad_norm/" + "(root)" not in hist[0]  # has_grad=False: no gradient scalars
    assert math.isnan(_num(hist[6]["gradsentry/global_norm"]))
    assert math.isinf(_num(hist[6]["gradsentry/grad_norm/blocks.1.fc"]))


def test_missing_wandb_is_one_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match=r"pip install 'gradsentry\[wandb\]'"):
        WandbSink()
    with pytest.raises(ValueError, match="prefix"):
        WandbSink(prefix="a/b")
