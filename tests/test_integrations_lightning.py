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
from gradsentry.sinks import JsonlSink, read_jsonl  # noqa: E402


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
    # update-to-weight ratio of net.0 at step s: ||w_s - w_{s-1}|| / ||w_s||, from the oracle's snapshots
    assert recs[0].layers[0].update_ratio is None  # no earlier optimizer step
    for s in (1, 2, 3):
        w_prev, w = oracle.first_layer[s - 1], oracle.first_layer[s]
        want = float((w - w_prev).norm() / w.norm())
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
