"""GradSentryCallback in a real transformers.Trainer (CPU, tiny model, a few steps, no downloads)."""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import pytest
import torch
from torch import nn

from zoo import mlp

transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
pytest.importorskip("accelerate", reason="the hf extra (accelerate) is not installed")

from gradsentry.integrations.transformers import GradSentryCallback  # noqa: E402
from gradsentry.logs.run_jsonl import read_jsonl  # noqa: E402
from gradsentry.sinks import JsonlSink  # noqa: E402

N = 8  # samples: one optimizer step always covers the whole data set, so its gradient is order-free


class Regressor(nn.Module):
    """A tiny model with the HF calling convention: keyword inputs, ``labels``, a dict with ``loss``."""

    def __init__(self, net: nn.Module, poison_at: int | None = None) -> None:
        super().__init__()
        self.net = net
        self.poison_at = poison_at  # training forward call (1-based) whose input is multiplied by inf
        self.calls = 0

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if self.training:
            self.calls += 1
            if self.calls == self.poison_at:
                x = x * math.inf
        out = self.net(x)
        result = {"logits": out}
        if labels is not None:
            result["loss"] = nn.functional.mse_loss(out, labels)
        return result


def _data(in_dim: int = 16, out_dim: int = 4) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, in_dim, generator=g), torch.randn(N, out_dim, generator=g)
    return [{"x": x[i], "labels": y[i]} for i in range(N)]


def _train(
    tmp_path: Any,
    model: nn.Module,
    cb: GradSentryCallback,
    *,
    steps: int = 3,
    ga: int = 1,
    extra: list[Any] | None = None,
    resume: str | None = None,
    **kw: Any,
) -> Any:
    settings: dict[str, Any] = {
        "logging_steps": 1,
        "report_to": [],
        "learning_rate": 0.05,
        "save_strategy": "no",
        **kw,
    }
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=steps,
        per_device_train_batch_size=N // ga,
        gradient_accumulation_steps=ga,
        optim="sgd",
        lr_scheduler_type="constant",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        **settings,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=_data(), callbacks=[cb, *(extra or [])]
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _full_batch_grad_norm(net: nn.Module) -> tuple[float, float]:
    """float64 global gradient norm and loss of the mean-squared error over the whole data set."""
    net = copy.deepcopy(net).double()
    data = _data()
    x = torch.stack([d["x"] for d in data]).double()
    y = torch.stack([d["labels"] for d in data]).double()
    loss = nn.functional.mse_loss(net(x), y)
    loss.backward()
    return math.sqrt(sum(float(p.grad.pow(2).sum()) for p in net.parameters())), float(loss.detach())


def _train_logs(trainer: Any) -> list[dict[str, Any]]:
    return [e for e in trainer.state.log_history if "grad_norm" in e]


@pytest.mark.parametrize("ga", [1, 2], ids=["no-accumulation", "accumulate-2"])
def test_pre_clip_norm_equals_trainer_grad_norm(tmp_path, ga):
    model = Regressor(mlp(3, width=16, act=nn.Tanh))
    want0, loss0 = _full_batch_grad_norm(model.net)
    cb = GradSentryCallback(sinks=[JsonlSink(tmp_path / "run.jsonl")])
    trainer = _train(tmp_path, model, cb, ga=ga, max_grad_norm=1e-3)

    recs = cb.monitor.records
    assert cb.mode == "backward"
    # once per optimizer step, not per micro-batch, labelled as the Trainer labels it in its log
    assert [r.step for r in recs] == [1, 2, 3]
    logs = _train_logs(trainer)
    assert [e["step"] for e in logs] == [1, 2, 3]
    for entry, rec in zip(logs, recs, strict=True):
        # the Trainer's grad_norm is its pre-clip norm; it clipped to 1e-3 after we recorded
        assert rec.global_norm == pytest.approx(entry["grad_norm"], rel=1e-5)
        assert rec.global_norm > 10 * 1e-3
        assert entry["gradsentry/global_norm"] == rec.global_norm
        assert entry["gradsentry/nonfinite_steps"] == 0
        assert "gradsentry/grad_norm/net.0" not in entry  # per-layer keys stay off the console by default
        assert entry["gradsentry/worst_layer"].startswith("net.")
    # Independent float64 recomputation of the first optimizer step's gradient and loss
    assert recs[0].global_norm == pytest.approx(want0, rel=1e-5)
    assert recs[0].loss == pytest.approx(loss0, rel=1e-5)
    assert recs[1].layers[0].update_ratio is not None
    run = read_jsonl(tmp_path / "run.jsonl")
    assert [r.global_norm for r in run.records] == [r.global_norm for r in recs]
    assert run.header.meta["source"] == "transformers"
    assert not cb._handles and cb.monitor._closed  # every hook removed at the end


def test_nonfinite_steps_show_although_the_trainer_filters_its_loss(tmp_path):
    model = Regressor(mlp(3, width=16, act=nn.Tanh), poison_at=3)
    cb = GradSentryCallback()
    trainer = _train(tmp_path, model, cb, steps=4)
    logs = _train_logs(trainer)
    assert trainer.args.logging_nan_inf_filter
    assert all(math.isfinite(e["loss"]) for e in logs)  # the Trainer's logged loss hides it
    recs = cb.monitor.records
    assert [r.finite for r in recs] == [True, True, False, False]  # NaN weights after the bad step
    assert not math.isfinite(recs[2].loss)
    assert recs[2].layers[0].nonfinite > 0
    assert [e["gradsentry/nonfinite_steps"] for e in logs] == [0, 0, 1, 1]
    assert math.isnan(logs[2]["grad_norm"]) and math.isnan(logs[2]["gradsentry/global_norm"])


def test_pre_optimizer_step_capture_sees_clipped_gradients_and_warns(tmp_path, caplog):
    cb = GradSentryCallback(capture="pre_optimizer_step")
    with caplog.at_level(logging.WARNING, logger="gradsentry"):
        trainer = _train(tmp_path, Regressor(mlp(2, width=8, act=nn.Tanh)), cb, steps=2, max_grad_norm=1e-3)
    assert any("after the Trainer clipped" in m for m in caplog.messages)
    for entry, rec in zip(_train_logs(trainer), cb.monitor.records, strict=True):
        assert rec.global_norm == pytest.approx(1e-3, rel=1e-4)  # post-clip: why "backward" is the default
        assert entry["grad_norm"] > 10 * rec.global_norm


def test_deep_sigmoid_is_diagnosed_vanishing(tmp_path):
    model = Regressor(mlp(10, width=32, act=nn.Sigmoid))
    net = copy.deepcopy(model.net).double()
    data = _data()
    x, y = torch.stack([d["x"] for d in data]).double(), torch.stack([d["labels"] for d in data]).double()
    nn.functional.mse_loss(net(x), y).backward()
    rms = [
        float(torch.cat([m.weight.grad.flatten(), m.bias.grad]).pow(2).mean().sqrt())
        for m in (net[0], net[18])
    ]
    cb = GradSentryCallback()
    _train(tmp_path, model, cb, steps=4, max_grad_norm=0.0)
    vanishing = [f for f in cb.findings if f.kind == "vanishing"]
    assert vanishing, cb.findings
    ev = vanishing[0].evidence
    assert (ev["first_layer"], ev["last_layer"]) == ("net.0", "net.18")
    assert (
        ev["first_last_rms_ratio_first_step"] == pytest.approx(rms[0] / rms[1], rel=1e-4)
        and rms[0] / rms[1] < 1e-3
    )
    healthy = GradSentryCallback()
    _train(tmp_path, Regressor(mlp(3, width=16, act=nn.Tanh)), healthy, steps=4)
    assert healthy.monitor.records and "vanishing" not in {f.kind for f in healthy.findings}


def test_bad_arguments():
    with pytest.raises(ValueError, match="every must be >= 1"):
        GradSentryCallback(every=0)
    with pytest.raises(ValueError, match="capture must be 'auto', 'backward' or 'pre_optimizer_step'"):
        GradSentryCallback(capture="later")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"unknown log_stats \['norm'\]"):
        GradSentryCallback(log_stats=("norm",))


# ---------------------------------------------------------------------------------------------- stop_on


class Scaled(Regressor):
    """The loss multiplied by ``scale`` at training forward call ``scale_at`` (1-based)."""

    def __init__(self, net: nn.Module, scale_at: int, scale: float = 1e6) -> None:
        super().__init__(net)
        self.scale_at, self.scale = scale_at, scale

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out = super().forward(x, labels)
        if self.calls == self.scale_at and "loss" in out:
            out["loss"] = out["loss"] * self.scale
        return out


class Steps(transformers.TrainerCallback):
    """Counts the optimizer's steps; keeps the weights each optimizer step starts from."""

    def __init__(self) -> None:
        self.count = 0
        self.weights: dict[int, list[torch.Tensor]] = {}

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kw: Any
    ) -> None:
        def after_step(opt: Any, a: Any, k: Any) -> None:
            self.count += 1

        optimizer.optimizer.register_step_post_hook(after_step)  # accelerate's wrapper holds the torch one

    def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        self.weights[state.global_step] = [p.detach().clone() for p in model.parameters()]


def _warnings(caplog: Any) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "gradsentry" and r.levelno == logging.WARNING]


def test_stop_on_nonfinite_stops_the_trainer_at_the_nan_step(tmp_path, caplog):
    model = Regressor(mlp(3, width=16, act=nn.Tanh), poison_at=6)  # the batch of step 5 holds inf
    cb = GradSentryCallback(stop_on=("nonfinite", "exploding"), sinks=[JsonlSink(tmp_path / "run.jsonl")])
    steps = Steps()
    with caplog.at_level(logging.INFO, logger="gradsentry"):
        trainer = _train(tmp_path, model, cb, extra=[steps], steps=10)
    assert [r.step for r in cb.monitor.records] == [1, 2, 3, 4, 5, 6]  # the Trainer's step labels
    assert model.calls == 6  # no batch after the bad one
    # optimizer steps 0..5 were called (global_step counts step 5's) and no further one happened
    assert trainer.state.global_step == 6 and steps.count == 6
    # the update of the NaN step was dropped: the model keeps the weights step 5 started from
    assert all(torch.equal(a, b) for a, b in zip(steps.weights[5], model.parameters(), strict=True))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # the Trainer logged its own (NaN) grad_norm of step 5 before the gradients were dropped
    assert math.isnan(_train_logs(trainer)[-1]["grad_norm"])
    # step 6 in the Trainer's numbering, the step of the NaN grad_norm line in trainer_state.json
    assert _train_logs(trainer)[-1]["step"] == 6
    assert cb.stopped_by is not None and cb.stopped_by.kind == "nonfinite" and cb.stopped_by.steps == [6]
    stop, summary = _warnings(caplog)
    assert stop.startswith("gradsentry: NaN/inf gradient at step 6 in net.4, net.2, net.0")
    assert "Stopping the run (stop_on 'nonfinite')" in stop
    assert summary.startswith("gradsentry: 1 finding(s) over 6 logged step(s)")
    assert read_jsonl(tmp_path / "run.jsonl").records[-1].step == 6


def test_stop_on_exploding_stops_the_trainer_at_the_spike(tmp_path):
    model = Scaled(mlp(3, width=16, act=nn.Tanh), scale_at=13)  # step 12, after 12 stable steps
    cb = GradSentryCallback(stop_on=("exploding",))
    steps = Steps()
    trainer = _train(tmp_path, model, cb, extra=[steps], steps=20)  # max_grad_norm=1.0: the Trainer clips
    assert [r.step for r in cb.monitor.records] == list(range(1, 14))
    assert trainer.state.global_step == 13 and steps.count == 13 and model.calls == 13
    assert cb.stopped_by is not None and cb.stopped_by.kind == "exploding" and 13 in cb.stopped_by.steps
    assert cb.monitor.records[-1].global_norm > 1e4 * cb.monitor.records[-2].global_norm
    assert all(torch.equal(a, b) for a, b in zip(steps.weights[12], model.parameters(), strict=True))


def test_on_nonfinite_raise_through_the_callback_comes_before_the_optimizer_step(tmp_path):
    import gradsentry as gs

    model = Regressor(mlp(2, width=8, act=nn.Tanh), poison_at=3)
    cb = GradSentryCallback(on_nonfinite="raise")
    steps = Steps()
    with pytest.raises(gs.NonFiniteGradientError) as info:
        _train(tmp_path, model, cb, extra=[steps], steps=6)
    cb.close()
    assert info.value.step == 3 and steps.count == 2  # the third optimizer step, as the Trainer logs it
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(("max_grad_norm", "want"), [(1.0, 1.0), (0.0, None)], ids=["clips", "no-clipping"])
def test_header_meta_names_trainer_optimizer_lr_and_clipping(tmp_path, max_grad_norm, want):
    cb = GradSentryCallback(sinks=[JsonlSink(tmp_path / "run.jsonl")])
    _train(tmp_path, Regressor(mlp(2, width=8, act=nn.Tanh)), cb, steps=1, max_grad_norm=max_grad_norm)
    meta = read_jsonl(tmp_path / "run.jsonl").header.meta
    assert meta["trainer"] == "hf" and meta["optimizer"] == "sgd" and meta["lr"] == pytest.approx(0.05)
    assert meta["max_grad_norm"] == want


def test_bad_stop_on():
    with pytest.raises(
        ValueError, match=r"unknown stop_on \['nan'\]; valid names: \['nonfinite', 'exploding'\]"
    ):
        GradSentryCallback(stop_on=("nan",))


# ---------------------------------------------------------------------- where the figures go


def _events(folder: Any) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def test_figures_reach_report_to_tensorboard_on_the_trainer_logging_steps(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    cb = GradSentryCallback(every=3)  # every=3 does not divide logging_steps=2
    trainer = _train(
        tmp_path,
        Regressor(mlp(3, width=16, act=nn.Tanh)),
        cb,
        steps=6,
        logging_steps=2,
        report_to=["tensorboard"],
    )
    # records at the Monitor's cadence (1, 4) and at every step the Trainer logs (2, 4, 6)
    assert [r.step for r in cb.monitor.records] == [1, 2, 4, 6]
    by_step = {r.step: r for r in cb.monitor.records}
    logs = _train_logs(trainer)
    assert [e["step"] for e in logs] == [2, 4, 6]
    for entry in logs:  # the figure on a line is that line's step's, equal to the Trainer's grad_norm
        assert entry["gradsentry/global_norm"] == by_step[entry["step"]].global_norm
        assert entry["gradsentry/global_norm"] == pytest.approx(entry["grad_norm"], rel=1e-5)
        assert not [k for k in entry if k.startswith("gradsentry/grad_norm/")]
    assert cb.norm_mismatches == []
    # the TensorBoard file written by report_to holds the global and per-layer figures, same steps
    acc = _events(tmp_path / "tb")
    tags = set(acc.Tags()["scalars"])
    assert {
        "train/gradsentry/global_norm",
        "train/gradsentry/grad_norm/net.0",
        "train/gradsentry/grad_norm/net.4",
    } <= tags
    tb_global = {e.step: e.value for e in acc.Scalars("train/gradsentry/global_norm")}
    tb_trainer = {e.step: e.value for e in acc.Scalars("train/grad_norm")}
    assert sorted(tb_global) == [2, 4, 6]
    for step, value in tb_global.items():  # TensorBoard stores float32
        assert value == pytest.approx(by_step[step].global_norm, rel=1e-6)
        assert value == pytest.approx(tb_trainer[step], rel=1e-5)
    tb_layer = {e.step: e.value for e in acc.Scalars("train/gradsentry/grad_norm/net.0")}
    assert tb_layer[4] == pytest.approx(by_step[4].layers[0].grad_norm, rel=1e-6)
    # the console (PrinterCallback, disable_tqdm) shows the global figures and the worst layer only
    printed = [line for line in capsys.readouterr().out.splitlines() if "gradsentry/global_norm" in line]
    assert (
        len(printed) == 3
        and "gradsentry/worst_layer" in printed[0]
        and "gradsentry/grad_norm/" not in printed[0]
    )
    # a default JSONL record file in output_dir, which gradsentry report renders
    run = read_jsonl(tmp_path / "out" / "gradsentry.jsonl")
    assert [r.step for r in run.records] == [1, 2, 4, 6]
    assert not any(isinstance(c, type(cb._front)) for c in trainer.callback_handler.callbacks)


def test_console_layers_and_no_default_sink(tmp_path):
    cb = GradSentryCallback(sinks=(), console_layers=True, log_stats=("grad_norm", "weight_norm"))
    trainer = _train(tmp_path, Regressor(mlp(2, width=8, act=nn.Tanh)), cb, steps=2)
    entry = _train_logs(trainer)[-1]
    rec = cb.monitor.records[-1]
    assert entry["gradsentry/grad_norm/net.0"] == rec.layers[0].grad_norm
    assert entry["gradsentry/weight_norm/net.2"] == rec.layers[1].weight_norm
    assert not (tmp_path / "out" / "gradsentry.jsonl").exists()


class ShardCountingTrainer(transformers.Trainer):
    """A Trainer whose logged grad_norm carries the sqrt(shards) bug: the true norm times sqrt(2)."""

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
        return super()._get_grad_norm(model, grad_norm) * math.sqrt(2)


def test_a_trainer_norm_off_by_sqrt2_is_reported(tmp_path, caplog):
    cb = GradSentryCallback(sinks=())
    model = Regressor(mlp(2, width=8, act=nn.Tanh))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=N,
        learning_rate=0.05,
        optim="sgd",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    with caplog.at_level(logging.WARNING, logger="gradsentry"):
        ShardCountingTrainer(model=model, args=args, train_dataset=_data(), callbacks=[cb]).train()
    assert [s for s, _, _ in cb.norm_mismatches] == [1, 2, 3]
    for _, theirs, ours in cb.norm_mismatches:
        assert theirs / ours == pytest.approx(math.sqrt(2), rel=1e-5)
    (warning,) = _warnings(caplog)[:1]
    assert "at step 1 the trainer logged grad_norm" in warning and "over 2 shards or replicas" in warning


# ---------------------------------------------------------------------------------------------- resume


class Crash(transformers.TrainerCallback):
    """Raises at the end of optimizer step ``at`` (the Trainer's numbering): a run killed mid-way."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.global_step == self.at:
            raise KeyboardInterrupt("killed")


def _kinds(findings: list[Any]) -> list[tuple[str, str, tuple[int, ...]]]:
    return sorted((f.kind, f.severity, tuple(f.steps)) for f in findings)


def test_resumed_run_is_judged_whole_live_as_analyze_judges_the_joined_log(tmp_path):
    """A run that diverged early, killed at step 8 and resumed from checkpoint-6: the live verdict after
    the resume is analyze's on the JSONL and on trainer_state.json (it used to judge steps 7.. only)."""
    from gradsentry.analyze import analyze_log

    kw: dict[str, Any] = {"steps": 12, "save_strategy": "steps", "save_steps": 6, "learning_rate": 5.0}
    first = GradSentryCallback()
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, Regressor(mlp(3, width=16, act=nn.Tanh)), first, extra=[Crash(8)], **kw)
    first.close()
    cb = GradSentryCallback()
    trainer = _train(
        tmp_path,
        Regressor(mlp(3, width=16, act=nn.Tanh)),
        cb,
        resume=str(tmp_path / "out" / "checkpoint-6"),
        **kw,
    )
    assert [r.step for r in cb.monitor.records] == list(range(1, 13))  # steps 1..6 from the log, 7..12 live
    log = tmp_path / "out" / "gradsentry.jsonl"
    assert [r.step for r in read_jsonl(log).records] == list(range(1, 13))
    assert any(f.kind == "exploding" and f.steps[0] <= 6 for f in cb.findings)  # the early divergence
    assert _kinds(cb.findings) == _kinds(analyze_log(log).findings)
    series = {f.kind for f in analyze_log(tmp_path / "out" / "checkpoint-12" / "trainer_state.json").findings}
    assert series <= {f.kind for f in cb.findings}
    assert all(
        e["grad_norm"] == pytest.approx(e["gradsentry/global_norm"], rel=1e-5) for e in _train_logs(trainer)
    )


def test_record_loss_is_the_trainer_loss_of_a_causal_lm_under_accumulation(tmp_path):
    """A causal LM gets ``num_items_in_batch``: each micro-batch's loss is its share of the step's token
    mean, and the step's loss is their sum, as the Trainer logs it (the mean of the shares was 1/4 of it)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32, (N, 12), generator=g)
    data = [{"input_ids": ids[i], "labels": ids[i]} for i in range(N)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    cb = GradSentryCallback(sinks=())
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])
    trainer.train()
    logged = {e["step"]: e["loss"] for e in _train_logs(trainer)}
    assert {r.step: r.loss for r in cb.monitor.records} == pytest.approx(logged, rel=1e-5)
    assert logged[1] == pytest.approx(math.log(32), rel=0.1)  # chance level at init: the mean, not a share
