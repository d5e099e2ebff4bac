"""Monitor(on_nonfinite=...): the alert comes at the logged step that holds the NaN/inf."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import gradsentry as gs
from gradsentry.monitor import alerts as monitor_mod  # where the Monitor looks nonfinite_step up
from gradsentry.records import Finding
from zoo import mlp


def _train(
    mon: gs.Monitor,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    steps: int,
    *,
    nan_at: tuple[int, ...] = (),
    skip_bad: bool = False,
    stop: Callable[[], bool] = lambda: False,
) -> list[int]:
    """A plain loop; a NaN in the input at the steps ``nan_at``. Returns the steps whose optimizer step ran.

    ``skip_bad``: do not take the optimizer step of a NaN step (the weights stay finite).
    """
    g = torch.Generator().manual_seed(0)
    stepped = []
    for step in range(steps):
        x = torch.randn(8, 16, generator=g)
        if step in nan_at:
            x[0, 0] = math.nan
        loss = model(x).pow(2).mean()
        loss.backward()
        mon.step(loss=loss)
        if not (skip_bad and step in nan_at):
            opt.step()
            stepped.append(step)
        opt.zero_grad()
        if stop():
            break
    return stepped


def _setup(**kw: Any) -> tuple[nn.Module, torch.optim.Optimizer, gs.Monitor]:
    torch.manual_seed(0)
    model = mlp(3, width=16, act=nn.Tanh)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    return model, opt, gs.Monitor(model, optimizer=opt, **kw)


def test_warn_logs_at_the_nan_step_once_per_stretch_naming_layers_origin_and_remedy(caplog):
    model, opt, mon = _setup(on_nonfinite="warn", locate_nonfinite=True)
    with caplog.at_level(logging.WARNING, logger="gradsentry"), mon:
        # NaN batches at 5, 8 and 9; the bad steps are not applied, so the weights stay finite
        _train(mon, model, opt, 12, nan_at=(5, 8, 9), skip_bad=True)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "gradsentry"]
    assert len(warnings) == 2  # one per stretch of consecutive non-finite steps: 5, then 8-9
    first, second = (r.getMessage() for r in warnings)
    # the origin module first, then the others deepest first (as the end-of-run finding orders them)
    assert first.startswith("gradsentry: NaN/inf gradient at step 5 in 0, 4, 2")
    assert "first non-finite output: module 0" in first  # locate_nonfinite names the origin
    assert "[error] nonfinite at step 5" in first
    assert "Remedy: " in first and "NonFiniteGuard" in first
    assert second.startswith("gradsentry: NaN/inf gradient at step 8")
    assert [r.step for r in mon.records if not r.finite] == [5, 8, 9]


def test_warn_when_the_weights_became_nan_warns_once(caplog):
    model, opt, mon = _setup(on_nonfinite="warn")
    with caplog.at_level(logging.WARNING, logger="gradsentry"), mon:
        _train(mon, model, opt, 9, nan_at=(5,))  # the NaN step is applied: every later step is NaN
    assert [r.step for r in mon.records if not r.finite] == [5, 6, 7, 8]
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(msgs) == 1 and "at step 5" in msgs[0]


def test_raise_comes_after_the_record_is_stored_and_written(tmp_path):
    path = tmp_path / "run.jsonl"
    # flush_every=100: the sink buffers; the Monitor flushes it before raising
    model, opt, mon = _setup(on_nonfinite="raise", sinks=[gs.JsonlSink(path, flush_every=100)])
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(gs.NonFiniteGradientError) as info:
        _train(mon, model, opt, 10, nan_at=(5,))
    err = info.value
    assert isinstance(err, FloatingPointError)
    assert err.step == 5 and err.record is mon.records[-1] and err.record.step == 5
    assert err.layers == ["4", "2", "0"]
    assert err.finding.kind == "nonfinite" and err.finding.steps == [5]
    assert "NaN/inf gradient at step 5 in 4, 2, 0" in str(err)
    assert [r.step for r in mon.records] == [0, 1, 2, 3, 4, 5]
    # nothing lost: the JSONL holds the NaN step, read back before close
    run = gs.read_jsonl(path)
    assert [r.step for r in run.records] == [0, 1, 2, 3, 4, 5]
    assert not run.records[-1].finite
    # raised inside mon.step(): the optimizer step of the NaN batch never ran
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    # the Monitor goes on after the error is caught (hooks re-armed, next step logged)
    opt.zero_grad()
    model(torch.randn(8, 16)).pow(2).mean().backward()
    rec = mon.step()
    assert rec is not None and rec.step == 6 and rec.finite
    mon.close()
    assert gs.read_jsonl(path).findings[0].kind == "nonfinite"


def test_raise_on_a_nonfinite_loss_with_finite_gradients():
    model, _, mon = _setup(on_nonfinite="raise")
    model(torch.randn(8, 16)).pow(2).mean().backward()
    with pytest.raises(
        gs.NonFiniteGradientError, match=r"non-finite loss \(inf\) at step 0, gradients still finite"
    ):
        mon.step(loss=math.inf)
    assert mon.records[0].finite and mon.records[0].loss == math.inf
    mon.close()


def test_callable_gets_the_nonfinite_finding_of_the_end_of_run_diagnosis():
    got: list[Finding] = []
    model, opt, mon = _setup(on_nonfinite=got.append, locate_nonfinite=True)
    with mon:
        _train(mon, model, opt, 20, nan_at=(5,), stop=lambda: bool(got))  # the user stops at the alert
    assert len(got) == 1
    end = [f for f in mon.diagnose() if f.kind == "nonfinite"]
    # the same finding, text included (compared as JSON text: NaN evidence is never == itself)
    assert json.dumps(got[0].to_dict(), sort_keys=True) == json.dumps(end[0].to_dict(), sort_keys=True)
    assert got[0].steps == [5] and got[0].evidence["origin"] == "0"
    assert [r.step for r in mon.records][-1] == 5


def test_callable_is_called_on_every_nonfinite_logged_step_and_its_errors_propagate():
    seen: list[int] = []

    def on_nan(f: Finding) -> None:
        seen.append(f.steps[-1])
        if len(seen) == 3:
            raise KeyboardInterrupt("user stop")

    model, opt, mon = _setup(on_nonfinite=on_nan)
    with pytest.raises(KeyboardInterrupt, match="user stop"), mon:
        _train(mon, model, opt, 12, nan_at=(5,))
    assert seen == [5, 6, 7]


def test_with_every_an_unlogged_nan_is_caught_at_the_next_logged_step(monkeypatch):
    checked: list[int] = []
    real = monitor_mod.nonfinite_step
    monkeypatch.setattr(monitor_mod, "nonfinite_step", lambda r: checked.append(r.step) or real(r))
    model, opt, mon = _setup(on_nonfinite="raise", every=3)
    with pytest.raises(gs.NonFiniteGradientError) as info:
        _train(mon, model, opt, 12, nan_at=(4,))  # step 4 is not logged; its update makes the weights NaN
    assert info.value.step == 6
    assert sorted(set(checked)) == [0, 3, 6]  # only logged steps are looked at
    mon.close()


def test_healthy_run_never_alerts(caplog):
    calls: list[Finding] = []
    for action in ("warn", "raise", calls.append):
        model, opt, mon = _setup(on_nonfinite=action)
        with caplog.at_level(logging.WARNING, logger="gradsentry"), mon:
            _train(mon, model, opt, 6)
        assert len(mon.records) == 6
    assert not calls and not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_bad_on_nonfinite_values_are_clear_errors():
    model = mlp(2, width=4)
    with pytest.raises(
        ValueError, match="on_nonfinite must be None, 'warn', 'raise' or a callable, got 'log'"
    ):
        gs.Monitor(model, on_nonfinite="log")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="on_nonfinite must be None, 'warn', 'raise' or a callable, got int"):
        gs.Monitor(model, on_nonfinite=1)  # type: ignore[arg-type]


def test_header_meta_names_the_optimizer_and_its_lr(tmp_path):
    model = mlp(2, width=4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    with gs.Monitor(model, optimizer=opt, sinks=[gs.JsonlSink(tmp_path / "a.jsonl")]) as mon:
        model(torch.randn(2, 16)).sum().backward()
        mon.step()
    meta = gs.read_jsonl(tmp_path / "a.jsonl").header.meta
    assert meta["optimizer"] == "adamw" and meta["lr"] == pytest.approx(3e-4)
    # no optimizer: unknown, so absent; the user's meta wins over what the Monitor fills in
    with gs.Monitor(model, sinks=[gs.JsonlSink(tmp_path / "b.jsonl")], meta={"lr": 0.5}) as mon:
        model(torch.randn(2, 16)).sum().backward()
        mon.step()
    meta = gs.read_jsonl(tmp_path / "b.jsonl").header.meta
    assert "optimizer" not in meta and meta["lr"] == 0.5


def test_header_lr_is_the_base_lr_under_a_warmup_scheduler():
    model = mlp(2, width=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda step: step / 10)  # warm-up: lr starts at 0
    assert opt.param_groups[0]["lr"] == 0.0
    mon = gs.Monitor(model, optimizer=opt)
    assert mon.header.meta["optimizer"] == "sgd" and mon.header.meta["lr"] == pytest.approx(0.1)
    mon.close()
