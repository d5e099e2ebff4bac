"""The core imports without the frameworks; the HF capture runs after other final backward callbacks."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from gradsentry.integrations._common import (
    check_log_stats,
    check_stop_on,
    record_metrics,
    stop_finding,
    summarize,
    summary_level,
)
from gradsentry.monitor import Monitor
from gradsentry.records import Finding, LayerStats, StepRecord
from zoo import mlp

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _run(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def test_core_imports_without_lightning_and_transformers():
    proc = _run("""
        import sys
        sys.modules["lightning"] = None        # make both frameworks unimportable
        sys.modules["transformers"] = None
        import gradsentry, gradsentry.sinks, gradsentry.integrations, gradsentry.monitor
        from gradsentry.sinks import TensorBoardSink, CsvSink
        assert "torch.utils.tensorboard" not in sys.modules  # the writer is imported on open()
        for name in ("lightning", "transformers"):
            try:
                __import__("gradsentry.integrations." + name)
            except ModuleNotFoundError as exc:
                print(exc)
        """)
    assert proc.returncode == 0, proc.stderr
    assert (
        "gradsentry.integrations.lightning needs Lightning: pip install 'gradsentry[lightning]'"
        in proc.stdout
    )
    assert "pip install 'gradsentry[hf]'" in proc.stdout


def test_record_metrics_and_summary():
    rec = StepRecord(
        step=3,
        global_norm=5.0,
        layers=[
            LayerStats("fc", 0, 4, 3.0, 1.5, 2.0, 0, 7.0, update_ratio=None),
            LayerStats("", 1, 0, 0.0, 0.0, 0.0, 0, 2.0, has_grad=False),
        ],
    )
    assert record_metrics(rec, ("grad_norm", "weight_norm", "update_ratio")) == {
        "gradsentry/global_norm": 5.0,
        "gradsentry/grad_norm/fc": 3.0,
        "gradsentry/weight_norm/fc": 7.0,
        "gradsentry/weight_norm/(root)": 2.0,
    }
    text = summarize([Finding(kind="vanishing", severity="warning", steps=[3], layers=["fc"])], 10)
    assert text.splitlines()[0] == "gradsentry: 1 finding(s) over 10 logged step(s)"
    assert "vanishing at step 3 in fc" in text.splitlines()[1]
    with pytest.raises(ValueError, match=r"unknown log_stats \['x'\]; choose from \['grad_norm'"):
        check_log_stats(["x"])


def test_summary_level_is_warning_whenever_there_is_a_finding():
    assert summary_level([]) == logging.INFO
    assert summary_level([Finding(kind="saturation", severity="info")]) == logging.WARNING
    assert summary_level([Finding(kind="exploding", severity="error")]) == logging.WARNING


def test_check_stop_on():
    assert check_stop_on(()) == ()
    assert check_stop_on(["exploding", "nonfinite"]) == ("exploding", "nonfinite")
    assert check_stop_on("nonfinite") == ("nonfinite",)  # one name, not its letters
    with pytest.raises(
        ValueError, match=r"unknown stop_on \['exploded'\]; valid names: \['nonfinite', 'exploding'\]"
    ):
        check_stop_on(["exploded"])


def test_stop_finding_judges_the_newest_record_only_for_the_kinds_asked():
    torch.manual_seed(0)
    model = mlp(3, width=8, act=nn.Tanh)
    mon = Monitor(model)
    for step in range(14):
        x = torch.randn(8, 16)
        loss = model(x).pow(2).mean() * (1e6 if step == 12 else 1.0)
        if step == 13:
            loss = loss * float("nan")
        loss.backward()
        rec = mon.step(loss=loss)
        model.zero_grad()
        assert rec is not None
        both = stop_finding(mon, rec, ("nonfinite", "exploding"))
        if step < 12:
            assert both is None, (step, both)
        elif step == 12:
            assert both is not None and both.kind == "exploding" and 12 in both.steps
            assert stop_finding(mon, rec, ("nonfinite",)) is None
        else:
            assert both is not None and both.kind == "nonfinite" and both.steps == [13]
            assert stop_finding(mon, rec, ()) is None
    mon.close()


def _hf_args_state(max_grad_norm: float) -> tuple[SimpleNamespace, SimpleNamespace]:
    """The TrainingArguments and TrainerState fields on_train_begin reads (no Trainer, no output folder)."""
    args = SimpleNamespace(
        max_grad_norm=max_grad_norm,
        gradient_accumulation_steps=1,
        output_dir=None,
        logging_strategy="steps",
        logging_first_step=False,
    )
    state = SimpleNamespace(global_step=0, is_world_process_zero=True, log_history=[], logging_steps=500)
    return args, state


def test_hf_capture_runs_after_final_callbacks_queued_during_backward():
    pytest.importorskip("transformers")
    from gradsentry.integrations.transformers import GradSentryCallback

    model = mlp(3, width=8, act=nn.Tanh)
    cb = GradSentryCallback(activations=False)
    sync = SimpleNamespace(sync_gradients=True)
    optimizer = SimpleNamespace(
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1), gradient_state=sync, scaler=None
    )
    args, state = _hf_args_state(max_grad_norm=0.0)
    cb.on_train_begin(args, state, None, model=model, optimizer=optimizer)

    # A DDP-like finalizer: queued late in the backward (the input layer's gradient comes last) by a
    # hook registered after gradsentry's, it rescales every gradient (as an all-reduce average would).
    def finalize() -> None:
        for p in model.parameters():
            p.grad.mul_(0.25)

    first = model[0].weight
    first.register_post_accumulate_grad_hook(
        lambda p: torch.autograd.Variable._execution_engine.queue_callback(finalize)
    )

    x, y = torch.randn(5, 16), torch.randn(5, 4)
    nn.functional.mse_loss(model(x), y).backward()
    final = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in model.parameters())).item()
    (rec,) = cb.monitor.records
    assert rec.global_norm == pytest.approx(final, rel=1e-6)  # recorded after the finalizer ran

    # A micro-batch that is not the last of its optimizer step is not recorded
    for p in model.parameters():
        p.grad = None
    sync.sync_gradients = False
    nn.functional.mse_loss(model(x), y).backward()
    assert len(cb.monitor.records) == 1
    cb.close()
    assert not cb._handles


@pytest.mark.parametrize(
    ("capture", "scaler", "mode"),
    [
        ("auto", None, "backward"),
        ("auto", object(), "pre_optimizer_step"),
        ("backward", object(), "backward"),
        ("pre_optimizer_step", None, "pre_optimizer_step"),
    ],
    ids=["auto-fp32", "auto-fp16-scaler", "forced-backward", "forced-pre-step"],
)
def test_hf_capture_mode_and_double_clipping_warnings(capture, scaler, mode, caplog):
    pytest.importorskip("transformers")
    from gradsentry.integrations.transformers import GradSentryCallback

    model = mlp(2, width=4, act=nn.Tanh)
    optimizer = SimpleNamespace(optimizer=torch.optim.SGD(model.parameters(), lr=0.1), scaler=scaler)
    args, state = _hf_args_state(max_grad_norm=1.0)
    cb = GradSentryCallback(capture=capture, remedy=lambda params, norms=None: None)
    with caplog.at_level(logging.WARNING, logger="gradsentry"):
        cb.on_train_begin(args, state, None, model=model, optimizer=optimizer)
    assert cb.mode == mode
    grad_hooks = len(cb._handles) - 1  # one forward hook for the loss, then one per parameter
    assert grad_hooks == (len(list(model.parameters())) if mode == "backward" else 0)
    assert any("both act" in m for m in caplog.messages)  # remedy + max_grad_norm > 0
    assert any("after the Trainer clipped" in m for m in caplog.messages) == (mode == "pre_optimizer_step")
    cb.close()
