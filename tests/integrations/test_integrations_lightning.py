"""GradSentryCallback in a real lightning.Trainer (CPU, tiny model, a few steps)."""

from __future__ import annotations

import copy
import csv
import logging
import math
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from zoo import mlp

L = pytest.importorskip("lightning.pytorch", reason="the lightning extra is not installed")
from lightning.pytorch.utilities import grad_norm  # noqa: E402

from gradsentry.integrations._common import record_metrics  # noqa: E402
from gradsentry.integrations.lightning import GradSentryCallback  # noqa: E402
from gradsentry.logs.run_jsonl import read_jsonl  # noqa: E402
from gradsentry.sinks import JsonlSink  # noqa: E402


class Regressor(L.LightningModule):
    def __init__(self, net: nn.Module, lr: float = 0.05) -> None:
        super().__init__()
        self.net = net
        self.lr = lr
        self.losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x).float(), y)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class Oracle(L.Callback):
    """Placed after GradSentryCallback: independent figures in the same hook and after clipping."""

    def __init__(self) -> None:
        self.pre: dict[int, float] = {}
        self.pre_lightning: dict[int, float] = {}
        self.first_layer: dict[int, torch.Tensor] = {}  # weights of net.0 (weight and bias), pre-update
        self.post: list[float] = []  # after the optimizer step: the gradient it used (clipped)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        def after_step(optimizer: Any, args: Any, kwargs: Any) -> None:
            grads = [p.grad.detach().double() for p in pl_module.parameters() if p.grad is not None]
            self.post.append(math.sqrt(sum(float(g.pow(2).sum()) for g in grads)))

        trainer.optimizers[0].register_step_post_hook(after_step)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        grads = [p.grad.detach().double() for p in pl_module.parameters() if p.grad is not None]
        self.pre[trainer.global_step] = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
        self.pre_lightning[trainer.global_step] = float(
            grad_norm(pl_module, norm_type=2)["grad_2.0_norm_total"]
        )
        first = pl_module.net[0]
        self.first_layer[trainer.global_step] = torch.cat(
            [first.weight.detach().flatten(), first.bias.detach()]
        ).double()


def _data(n: int, in_dim: int = 16, out_dim: int = 4) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, in_dim, generator=g), torch.randn(n, out_dim, generator=g))


def _fit(
    module: L.LightningModule,
    callbacks: list[Any],
    *,
    steps: int,
    batch: int = 8,
    logger: Any = False,
    **trainer_kwargs: Any,
) -> L.Trainer:
    acc = trainer_kwargs.get("accumulate_grad_batches", 1)
    loader = DataLoader(_data(steps * acc * batch), batch_size=batch, shuffle=False)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **trainer_kwargs,
    )
    trainer.fit(module, loader)
    return trainer


def test_records_are_unscaled_pre_clip_and_logged(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    cb = GradSentryCallback(sinks=[JsonlSink(tmp_path / "run.jsonl")], log_stats=("grad_norm", "weight_norm"))
    oracle = Oracle()
    module = Regressor(mlp(3, width=16, act=nn.Tanh))
    logger = CSVLogger(tmp_path, name="csv", version=0)
    _fit(module, [cb, oracle], steps=4, logger=logger, gradient_clip_val=1e-3)

    recs = cb.monitor.records
    assert [r.step for r in recs] == [0, 1, 2, 3]
    for r in recs:
        # float32 gradients; the oracle recomputes in float64 from the same tensors
        assert r.global_norm == pytest.approx(oracle.pre[r.step], rel=1e-6)
        assert r.global_norm == pytest.approx(oracle.pre_lightning[r.step], rel=1e-5)
        # Lightning clipped to 1e-3 after our hook: what we recorded is the raw norm
        assert (
            oracle.post[r.step] == pytest.approx(1e-3, rel=1e-3) and r.global_norm > 10 * oracle.post[r.step]
        )
        assert r.loss == pytest.approx(module.losses[r.step], rel=1e-6)
        assert r.lr == pytest.approx(0.05)
    # update-to-weight ratio of net.0 at step s: ||w_s - w_{s-1}|| / ||w_{s-1}||, from the oracle's snapshots
    assert recs[0].layers[0].update_ratio is None  # no earlier optimizer step
    for s in (1, 2, 3):
        w_prev, w = oracle.first_layer[s - 1], oracle.first_layer[s]
        want = float((w - w_prev).norm() / w_prev.norm())
        assert recs[s].layers[0].name == "net.0"
        assert recs[s].layers[0].update_ratio == pytest.approx(want, rel=1e-4)
    # Every hook is removed and the sink closed at the end of fit
    assert cb.monitor._closed
    run = read_jsonl(tmp_path / "run.jsonl")
    assert [r.global_norm for r in run.records] == [r.global_norm for r in recs]
    assert run.header.meta["source"] == "lightning"

    # The trainer's logger got the figures at gradsentry's cadence, with the exact values
    with (tmp_path / "csv" / "version_0" / "metrics.csv").open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("gradsentry/global_norm")]
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]
    for row, rec in zip(rows, recs, strict=True):
        want = record_metrics(rec, ("grad_norm", "weight_norm"))
        assert set(want) <= set(row)
        for key, value in want.items():
            assert float(row[key]) == pytest.approx(value, rel=1e-12), key
    assert "gradsentry/grad_norm/net.0" in rows[0] and "gradsentry/weight_norm/net.4" in rows[0]


def test_gradient_accumulation_records_once_per_optimizer_step():
    module = Regressor(mlp(2, width=8, act=nn.Tanh))
    start = copy.deepcopy(module.net).double()
    cb = GradSentryCallback()
    oracle = Oracle()
    _fit(module, [cb, oracle], steps=3, batch=4, accumulate_grad_batches=2)

    recs = cb.monitor.records
    assert [r.step for r in recs] == [0, 1, 2]  # 6 backward passes, 3 optimizer steps
    for r in recs:
        assert r.global_norm == pytest.approx(oracle.pre[r.step], rel=1e-6)
    # Independent float64 recomputation of the first optimizer step: mean of two micro-batch losses.
    x, y = _data(3 * 2 * 4)[:8]
    loss = sum(
        nn.functional.mse_loss(start(x[i : i + 4].double()), y[i : i + 4].double()) / 2 for i in (0, 4)
    )
    loss.backward()
    want = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in start.parameters()))
    assert recs[0].global_norm == pytest.approx(want, rel=1e-5)
    assert recs[0].loss == pytest.approx(float(loss.detach()), rel=1e-5)


def test_bf16_mixed_precision():
    cb = GradSentryCallback()
    oracle = Oracle()
    trainer = _fit(Regressor(mlp(3, width=16, act=nn.Tanh)), [cb, oracle], steps=3, precision="bf16-mixed")
    assert trainer.precision == "bf16-mixed"
    recs = cb.monitor.records
    assert len(recs) == 3 and all(r.finite and r.global_norm > 0 for r in recs)
    for r in recs:
        assert r.global_norm == pytest.approx(oracle.pre[r.step], rel=1e-6)
    assert cb.monitor.header.meta["precision"] == "bf16-mixed"


def test_fp16_grad_scaler_records_unscaled_gradients():
    from lightning.pytorch.plugins import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    net = mlp(3, width=16, act=nn.Tanh)
    start = copy.deepcopy(net).double()
    cb = GradSentryCallback()
    oracle = Oracle()
    _fit(Regressor(net), [cb, oracle], steps=3, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    recs = cb.monitor.records
    assert len(recs) == 3
    for r in recs:
        assert r.global_norm == pytest.approx(oracle.pre[r.step], rel=1e-6)
    # Unscaled: the float64 gradient of the first batch, not 1024 times it (fp16 autocast: loose tolerance)
    x, y = _data(3 * 8)[:8]
    nn.functional.mse_loss(start(x.double()), y.double()).backward()
    want = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in start.parameters()))
    assert recs[0].global_norm == pytest.approx(want, rel=2e-2)
    assert scaler.get_scale() >= 1024.0  # the scaler was really in use (no step skipped)


@dataclass
class _Halve:
    """A remedy following the gradsentry interface: halves every gradient in place."""

    calls: int = 0

    def __call__(self, params: list[torch.Tensor], *, norms: torch.Tensor | None = None) -> Any:
        self.calls += 1
        for p in params:
            if p.grad is not None:
                p.grad.mul_(0.5)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"remedy": "Halve", "calls": self.calls}


def test_remedy_runs_after_statistics_and_before_the_optimizer(caplog):
    remedy = _Halve()
    cb = GradSentryCallback(every=2, remedy=remedy)
    oracle = Oracle()
    with caplog.at_level(logging.INFO, logger="gradsentry"):
        _fit(Regressor(mlp(2, width=8, act=nn.Tanh)), [cb, oracle], steps=4)
    assert remedy.calls == 4  # on every optimizer step, logged or not
    recs = cb.monitor.records
    assert [r.step for r in recs] == [0, 2]
    for r in recs:
        # the oracle runs after our hook: it sees the halved gradient, we recorded the raw one
        assert oracle.pre[r.step] == pytest.approx(r.global_norm / 2, rel=1e-6)
        assert r.actions and r.actions[0]["remedy"] == "Halve"
    assert any("gradsentry:" in m and "logged step(s)" in m for m in caplog.messages)
    state = cb.state_dict()
    assert state["steps_seen"] == 4
    fresh = GradSentryCallback()
    fresh.load_state_dict(state)
    assert fresh._steps_seen == 4


def _rms_ratio_first_last(net: nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> float:
    """float64 gradient RMS of the first Linear over the last Linear, for one batch."""
    net = copy.deepcopy(net).double()
    nn.functional.mse_loss(net(x.double()), y.double()).backward()
    linears = [m for m in net if isinstance(m, nn.Linear)]

    def rms(m: nn.Linear) -> float:
        g = torch.cat([m.weight.grad.flatten(), m.bias.grad])
        return float(g.norm() / math.sqrt(g.numel()))

    return rms(linears[0]) / rms(linears[-1])


def test_deep_sigmoid_is_diagnosed_vanishing():
    net = mlp(10, width=32, act=nn.Sigmoid)
    x, y = _data(5 * 8)[:8]
    want_ratio = _rms_ratio_first_last(net, x, y)
    cb = GradSentryCallback()
    _fit(Regressor(net, lr=0.01), [cb], steps=5)
    vanishing = [f for f in cb.findings if f.kind == "vanishing"]
    assert vanishing, cb.findings
    ev = vanishing[0].evidence
    assert ev["first_layer"] == "net.0" and ev["last_layer"] == "net.18"
    assert ev["first_last_rms_ratio_first_step"] == pytest.approx(want_ratio, rel=1e-4)
    assert want_ratio < 1e-3


def test_healthy_tanh_is_not_diagnosed_vanishing():
    cb = GradSentryCallback()
    _fit(Regressor(mlp(3, width=16, act=nn.Tanh)), [cb], steps=5)
    assert cb.monitor.records and "vanishing" not in {f.kind for f in cb.findings}


def test_bad_arguments():
    with pytest.raises(ValueError, match="every must be >= 1"):
        GradSentryCallback(every=0)
    with pytest.raises(ValueError, match=r"unknown log_stats \['grad'\]"):
        GradSentryCallback(log_stats=("grad",))


class Crashing(Regressor):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if batch_idx == 2:
            raise RuntimeError("boom at batch 2")
        return super().training_step(batch, batch_idx)


def test_exception_closes_the_monitor_and_removes_every_hook():
    module = Crashing(mlp(3, width=8, act=nn.Sigmoid))
    cb = GradSentryCallback()
    with pytest.raises(RuntimeError, match="boom at batch 2"):
        _fit(module, [cb], steps=4)
    assert [r.step for r in cb.monitor.records] == [0, 1]
    assert cb.monitor._closed
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in module.modules())
    assert isinstance(cb.findings, list)


# ---------------------------------------------------------------------------------------------- stop_on


class Poisoned(Regressor):
    """A NaN in the input of batch ``nan_at``; the loss multiplied by ``scale`` at batch ``scale_at``."""

    def __init__(
        self, net: nn.Module, nan_at: int | None = None, scale_at: int | None = None, scale: float = 1e6
    ) -> None:
        super().__init__(net)
        self.nan_at, self.scale_at, self.scale = nan_at, scale_at, scale

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if batch_idx == self.nan_at:
            x = x.clone()
            x[0, 0] = math.nan
        loss = nn.functional.mse_loss(self.net(x), y)
        if batch_idx == self.scale_at:
            loss = loss * self.scale
        self.losses.append(float(loss.detach()))
        return loss


class Steps(L.Callback):
    """Counts the optimizer's steps and keeps the weights each batch starts its optimizer step from."""

    def __init__(self) -> None:
        self.count = 0
        self.weights: dict[int, list[torch.Tensor]] = {}

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        def after_step(optimizer: Any, args: Any, kwargs: Any) -> None:
            self.count += 1

        trainer.optimizers[0].register_step_post_hook(after_step)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.weights[trainer.global_step] = [p.detach().clone() for p in pl_module.parameters()]


def _warnings(caplog: Any) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "gradsentry" and r.levelno == logging.WARNING]


def test_stop_on_nonfinite_stops_the_fit_at_the_nan_step(tmp_path, caplog):
    module = Poisoned(mlp(3, width=16, act=nn.Tanh), nan_at=5)
    cb = GradSentryCallback(stop_on=("nonfinite",), sinks=[JsonlSink(tmp_path / "run.jsonl")])
    steps = Steps()
    with caplog.at_level(logging.INFO, logger="gradsentry"):
        trainer = _fit(module, [cb, steps], steps=10)
    assert [r.step for r in cb.monitor.records] == [0, 1, 2, 3, 4, 5]
    assert len(module.losses) == 6  # no batch after the NaN one ran
    # optimizer steps 0..5 were called (global_step counts step 5's) and no further one happened
    assert trainer.global_step == 6 and steps.count == 6
    # the update of the NaN step was dropped: the model keeps the weights step 5 started from
    final = [p.detach() for p in module.parameters()]
    assert all(torch.isfinite(p).all() for p in final)
    assert all(torch.equal(a, b) for a, b in zip(steps.weights[5], final, strict=True))
    assert cb.stopped_by is not None and cb.stopped_by.kind == "nonfinite" and cb.stopped_by.steps == [5]
    stop, summary = _warnings(caplog)  # the finding at step 5, then the end-of-fit summary at WARNING
    assert stop.startswith("gradsentry: NaN/inf gradient at step 5 in ")
    assert "Stopping the run (stop_on 'nonfinite')" in stop and "Remedy: " in stop
    assert (
        summary.startswith("gradsentry: 1 finding(s) over 6 logged step(s)")
        and "nonfinite at step 5" in summary
    )
    assert [r.step for r in read_jsonl(tmp_path / "run.jsonl").records][-1] == 5


def test_stop_on_exploding_stops_the_fit_at_the_spike():
    module = Poisoned(mlp(3, width=16, act=nn.Tanh), scale_at=12)
    cb = GradSentryCallback(stop_on=("nonfinite", "exploding"))
    steps = Steps()
    trainer = _fit(module, [cb, steps], steps=20)
    assert [r.step for r in cb.monitor.records] == list(range(13))  # 12 stable steps, then the spike
    assert trainer.global_step == 13 and steps.count == 13 and len(module.losses) == 13
    assert cb.stopped_by is not None and cb.stopped_by.kind == "exploding" and 12 in cb.stopped_by.steps
    assert all(torch.equal(a, b) for a, b in zip(steps.weights[12], module.parameters(), strict=True))


def test_without_stop_on_a_nan_does_not_stop_the_fit():
    module = Poisoned(mlp(2, width=8, act=nn.Tanh), nan_at=2)
    cb = GradSentryCallback(every=2)
    trainer = _fit(module, [cb], steps=5)
    assert trainer.global_step == 5 and cb.stopped_by is None
    assert [r.finite for r in cb.monitor.records] == [True, False, False]  # NaN weights from step 2 on


@pytest.mark.parametrize(
    ("clip", "want"),
    [
        ({}, {"max_grad_norm": None}),
        ({"gradient_clip_val": 0.5}, {"max_grad_norm": 0.5}),
        ({"gradient_clip_val": 0.5, "gradient_clip_algorithm": "norm"}, {"max_grad_norm": 0.5}),
        (
            {"gradient_clip_val": 0.25, "gradient_clip_algorithm": "value"},
            {"max_grad_norm": None, "clip_value": 0.25},
        ),
    ],
    ids=["no-clipping", "default-norm", "norm", "value"],
)
def test_header_meta_names_trainer_optimizer_lr_and_clipping(tmp_path, clip, want):
    cb = GradSentryCallback(sinks=[JsonlSink(tmp_path / "run.jsonl")])
    _fit(Regressor(mlp(2, width=8, act=nn.Tanh), lr=0.03), [cb], steps=1, **clip)
    meta = read_jsonl(tmp_path / "run.jsonl").header.meta
    assert meta["trainer"] == "lightning" and meta["optimizer"] == "sgd" and meta["lr"] == pytest.approx(0.03)
    assert {k: meta.get(k) for k in want} == want
    assert ("clip_value" in meta) == ("clip_value" in want)


def test_bad_stop_on():
    with pytest.raises(
        ValueError, match=r"unknown stop_on \['vanishing'\]; valid names: \['nonfinite', 'exploding'\]"
    ):
        GradSentryCallback(stop_on=("nonfinite", "vanishing"))
    assert GradSentryCallback(stop_on="nonfinite").stop_on == ("nonfinite",)


def test_tensorboard_logger_gets_the_tags_and_the_chart_layout_and_log_dir_the_records(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import metadata

    cb = GradSentryCallback(every=2)
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    _fit(Regressor(mlp(3, width=16, act=nn.Tanh)), [cb], steps=5, logger=logger)
    recs = cb.monitor.records
    assert [r.step for r in recs] == [0, 2, 4]
    acc = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    assert {"gradsentry/global_norm", "gradsentry/grad_norm/net.0", "gradsentry/grad_norm/net.4"} <= set(
        acc.Tags()["scalars"]
    )
    for tag, want in (
        ("gradsentry/global_norm", [r.global_norm for r in recs]),
        ("gradsentry/grad_norm/net.2", [r.layers[1].grad_norm for r in recs]),
    ):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [0, 2, 4]
        assert [e.value for e in events] == pytest.approx(want, rel=1e-6)  # float32 in the file
    # the custom-scalars layout: one chart per statistic matching every layer's tag
    (layout_event,) = acc.Tensors(metadata.CONFIG_SUMMARY_TAG)
    from tensorboard.plugins.custom_scalar import layout_pb2

    layout = layout_pb2.Layout.FromString(layout_event.tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    assert charts["grad_norm"] == ["gradsentry/grad_norm/.*"]
    # the default record file in the logger's version folder, readable by gradsentry report
    run = read_jsonl(tmp_path / "tb" / "version_0" / "gradsentry.jsonl")
    assert [r.global_norm for r in run.records] == [r.global_norm for r in recs]


def test_without_a_logger_no_default_file_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cb = GradSentryCallback()
    _fit(Regressor(mlp(2, width=8, act=nn.Tanh)), [cb], steps=1, default_root_dir=str(tmp_path))
    assert cb.monitor.records and not list(tmp_path.rglob("gradsentry.jsonl"))


# ---------------------------------------------------------------------------------------------- resume


def test_resumed_fit_is_judged_whole_live_as_analyze_judges_the_joined_log(tmp_path):
    """A fit that diverged early, checkpointed at step 6, stopped at 8 and resumed (same logger version):
    the live verdict after the resume is analyze's on the JSONL it appended to (it judged steps 6.. only)."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from gradsentry.analyze import analyze_log

    def fit(cb: GradSentryCallback, steps: int, **kw: Any) -> L.Trainer:
        torch.manual_seed(0)
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=steps,
            logger=CSVLogger(tmp_path, name="logs", version=0),
            callbacks=[cb, ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=6, save_top_k=-1)],
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(
            Regressor(mlp(3, width=16, act=nn.Tanh), lr=2.0), DataLoader(_data(96), batch_size=8), **kw
        )
        return trainer

    fit(GradSentryCallback(), 8)
    cb = GradSentryCallback()
    trainer = fit(cb, 12, ckpt_path=str(tmp_path / "ck" / "epoch=0-step=6.ckpt"))
    log = tmp_path / "logs" / "version_0" / "gradsentry.jsonl"
    assert trainer.log_dir == str(log.parent)
    assert [r.step for r in cb.monitor.records] == list(range(12))  # 0..5 from the log, 6..11 live
    assert [r.step for r in read_jsonl(log).records] == list(range(12))
    assert any(f.kind == "exploding" and f.steps[0] < 6 for f in cb.findings)  # the early divergence
    want = analyze_log(log).findings
    assert sorted((f.kind, f.severity, tuple(f.steps)) for f in cb.findings) == sorted(
        (f.kind, f.severity, tuple(f.steps)) for f in want
    )
