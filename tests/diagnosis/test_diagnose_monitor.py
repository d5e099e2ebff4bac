"""End-to-end diagnosis: real models watched by the Monitor, then ``Monitor.diagnose()``."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

import zoo
from gradsentry.monitor import Monitor
from gradsentry.records import Finding


def run(
    model: nn.Module,
    steps: int,
    *,
    opt: torch.optim.Optimizer | None = None,
    loss_scale: Callable[[int], float] = lambda s: 1.0,
    before_step: Callable[[int, nn.Module], None] | None = None,
    in_dim: int = 16,
    out_dim: int = 4,
    with_optimizer_stats: bool = False,
    locate_nonfinite: bool = False,
) -> tuple[Monitor, list[Finding]]:
    """Train ``model`` on random regression data for ``steps`` steps under a Monitor; diagnose."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, in_dim, generator=gen), torch.randn(256, out_dim, generator=gen)
    opt = opt or torch.optim.SGD(model.parameters(), lr=1e-2)
    mon = Monitor(model, optimizer=opt if with_optimizer_stats else None, locate_nonfinite=locate_nonfinite)
    with mon:
        for s in range(steps):
            idx = torch.randint(0, 256, (32,), generator=gen)
            loss = nn.functional.mse_loss(model(x[idx]), y[idx]) * loss_scale(s)
            opt.zero_grad()
            loss.backward()
            if before_step is not None:
                before_step(s, model)
            mon.step(loss=loss)
            if all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters()):
                opt.step()
        findings = mon.diagnose()
    return mon, findings


def test_20_layer_sigmoid_mlp_at_default_init_is_vanishing() -> None:
    mon, findings = run(zoo.mlp(20, act=nn.Sigmoid), 3)
    (f,) = findings
    assert (f.kind, f.severity) == ("vanishing", "error")
    first, last = mon.records[0].layers[0], mon.records[0].layers[-1]
    assert first.grad_rms / last.grad_rms < 1e-6
    assert f.evidence["first_last_rms_ratio_first_step"] == pytest.approx(first.grad_rms / last.grad_rms)
    assert f.evidence["first_layer"] == "0" and f.evidence["last_layer"] == "38"
    assert f.layers[0] in {"0", "2", "4"}
    # Sigmoid activations seen by the Monitor put ReLU + He init first.
    assert f.remedies[0].api == "gradsentry.reinit(model, 'he')"


def test_20_layer_relu_he_init_and_3_layer_mlp_are_healthy() -> None:
    _, findings = run(zoo.mlp(20, act=nn.ReLU, init="he"), 10)
    assert findings == []
    model = zoo.mlp(3, act=nn.ReLU)
    _, findings = run(model, 40, opt=torch.optim.SGD(model.parameters(), lr=1e-2), with_optimizer_stats=True)
    assert findings == []


def test_loss_scaled_1e4_at_one_step_is_exploding_at_that_step_only() -> None:
    model = zoo.mlp(3, act=nn.ReLU)
    # Adam: the scaled step does not wreck the weights, so only that one step is abnormal.
    _, findings = run(
        model,
        40,
        opt=torch.optim.Adam(model.parameters(), lr=1e-3),
        loss_scale=lambda s: 1e4 if s == 30 else 1.0,
    )
    (f,) = findings
    assert (f.kind, f.steps, f.severity) == ("exploding", [30], "warning")  # Adam recovered
    assert f.evidence["first_ratio"] == pytest.approx(1e4, rel=0.5)


def test_nan_injected_in_one_layer_is_nonfinite_naming_that_layer_and_step() -> None:
    def inject(s: int, model: nn.Module) -> None:
        if s == 12:
            model[2].weight.grad[0, 0] = math.nan  # type: ignore[index]

    mon, findings = run(zoo.mlp(3, act=nn.ReLU), 20, before_step=inject, locate_nonfinite=True)
    (f,) = findings
    # run() skips the optimizer step on non-finite gradients, so training goes on finite: a warning.
    assert (f.kind, f.severity, f.steps, f.layers) == ("nonfinite", "warning", [12], ["2"])
    assert f.evidence["finite_points_after_last_nonfinite"] == 7
    assert f.evidence["layer_nonfinite_counts"] == {"2": 1}
    # Forward was finite, so the located origin is the deepest layer with a non-finite gradient.
    assert mon.records[12].nonfinite_origin == "2" and f.evidence["origin"] == "2"


def test_nan_that_reaches_the_weights_is_an_error_and_one_that_was_skipped_a_warning() -> None:
    """A NaN gradient the optimizer applies poisons every later step (error); the same NaN with the step
    skipped (an fp16 GradScaler, a guard) leaves the run finite after it (warning, training went on)."""

    def inject(s: int, model: nn.Module) -> None:
        if s == 5:
            model[0].weight.grad[0, 0] = math.nan  # type: ignore[index]

    verdicts = {}
    for skip in (False, True):
        model = zoo.mlp(3, act=nn.ReLU)
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        gen = torch.Generator().manual_seed(0)
        x, y = torch.randn(64, 16, generator=gen), torch.randn(64, 4, generator=gen)
        with Monitor(model) as mon:
            for s in range(20):
                opt.zero_grad()
                nn.functional.mse_loss(model(x), y).backward()
                inject(s, model)
                mon.step(loss=nn.functional.mse_loss(model(x), y).detach())
                finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
                if finite or not skip:
                    opt.step()
            (f,) = [f for f in mon.diagnose() if f.kind == "nonfinite"]
        verdicts[skip] = (f.severity, f.steps[0], f.evidence["finite_points_after_last_nonfinite"])
    assert verdicts[False][:2] == ("error", 5) and verdicts[False][2] == 0
    assert verdicts[True] == ("warning", 5, 14)


def test_layer_with_zero_learning_rate_is_stalled() -> None:
    model = zoo.mlp(4, act=nn.ReLU)
    groups = [
        {"params": [p for n, p in model.named_parameters() if not n.startswith("2.")]},
        {"params": list(model[2].parameters()), "lr": 1e-9},  # type: ignore[index]
    ]
    opt = torch.optim.SGD(groups, lr=5e-2)
    _, findings = run(model, 12, opt=opt, with_optimizer_stats=True)
    assert [f.kind for f in findings] == ["stalled_layer"]
    assert findings[0].layers == ["2"]
    assert findings[0].evidence["median_update_ratio"]["2"] < 1e-6


def test_dead_relu_units_and_saturated_sigmoid() -> None:
    dead = zoo.mlp(3, act=nn.ReLU)
    with torch.no_grad():
        dead[0].bias.fill_(-50.0)  # type: ignore[index]  # every unit of the first ReLU is off
    _, findings = run(dead, 5)
    assert "dead_units" in [f.kind for f in findings]
    f = next(f for f in findings if f.kind == "dead_units")
    assert f.layers[0] == "1" and f.evidence["worst_median_fraction"] == 1.0

    sat = zoo.mlp(3, act=nn.Sigmoid)
    with torch.no_grad():
        sat[0].weight.mul_(100.0)  # type: ignore[index]  # pre-activations ~ +-20: sigmoid saturated
    _, findings = run(sat, 5)
    f = next(f for f in findings if f.kind == "saturation")
    assert f.layers[0] == "1" and f.evidence["worst_median_fraction"] > 0.8


def test_frozen_first_layer_is_not_vanishing() -> None:
    model = zoo.mlp(4, act=nn.ReLU)
    model[0].requires_grad_(False)  # type: ignore[index]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    mon, findings = run(model, 10, opt=opt, with_optimizer_stats=True)
    # Its gradient figures are 0 (a vanished gradient if it were counted); has_grad=False keeps it out.
    assert mon.records[0].layers[0].has_grad is False and mon.records[0].layers[0].grad_rms == 0.0
    assert findings == []


def _sigmoid_adam_run(path, max_records: int) -> tuple[list, list]:
    """holdout layer_vanish_adam: a 6-layer sigmoid MLP at default init (first/last gradient RMS 9e-6)
    that Adam still trains on the digits; (live findings, findings of the JSONL read back)."""
    from sklearn.datasets import load_digits

    from gradsentry.analyze import analyze_log
    from gradsentry.sinks import JsonlSink

    d = load_digits()
    x, y = torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target)
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(64, 32), nn.Sigmoid()]
    for _ in range(5):
        layers += [nn.Linear(32, 32), nn.Sigmoid()]
    net = nn.Sequential(*layers, nn.Linear(32, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1000)
    perm = torch.randperm(len(x), generator=gen)
    sink = JsonlSink(path)
    with Monitor(
        net, optimizer=opt, sinks=[sink], max_records=max_records, activations=False, max_abs=False
    ) as mon:
        for i in range(200):
            if (i + 1) * 32 > len(perm):  # epochs of shuffled batches
                perm = torch.cat([perm, torch.randperm(len(x), generator=gen)])
            idx = perm[i * 32 : (i + 1) * 32]
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            mon.step(loss=loss)
            opt.step()
        live = mon.diagnose()
    return live, analyze_log(path).findings


def _summary(findings: list) -> list[tuple[str, str, int | None]]:
    return [(f.kind, f.severity, f.steps[0] if f.steps else None) for f in findings if f.severity != "info"]


@pytest.mark.parametrize("max_records", [0, 7, 40])
def test_a_bounded_monitor_and_its_log_read_back_give_one_verdict(tmp_path, max_records: int) -> None:
    # the per-layer rules judge the window and the history's sample: analyze used its own (4096 records,
    # a sample of 1024) where the Monitor kept max_records, so the live verdict said healthy and the log
    # read back said vanishing. The header now states the Monitor's window, and analyze reads with it
    live, read = _sigmoid_adam_run(tmp_path / "run.jsonl", max_records)
    assert _summary(live) == _summary(read)


def test_a_bounded_window_weighs_every_part_of_the_run_the_same(tmp_path) -> None:
    # with max_records=40 the window (the last 40 of 200 records) stood beside a sample of 40 standing
    # for the other 160: the end of the run, where Adam had trained the net out of vanishing, had half
    # the vote, and the verdict lost the vanishing that every record shows. The window is now thinned
    # to the sample's stride
    full, _ = _sigmoid_adam_run(tmp_path / "full.jsonl", 1000)
    assert "vanishing" in [k for k, _, _ in _summary(full)]
    for max_records in (7, 40):
        live, _ = _sigmoid_adam_run(tmp_path / f"{max_records}.jsonl", max_records)
        assert [k for k, _, _ in _summary(live)] == [k for k, _, _ in _summary(full)]


@pytest.mark.parametrize("init_scale", [2.0**40, 2.0**126], ids=["2^40", "2^126"])
def test_fp16_gradscaler_calibrating_its_scale_is_a_warning_live_and_post_mortem(
    tmp_path: pytest.TempPathFactory, init_scale: float
) -> None:
    """Real fp16 autocast + GradScaler on CPU with too high an initial scale: the first ~25-100 steps
    overflow and are skipped while the scale halves, then the model trains. Live and from its JSONL the
    verdict is a nonfinite *warning* (the steps never reached the weights), never "cannot recover"."""
    from gradsentry.analyze import analyze_log
    from gradsentry.sinks import JsonlSink

    torch.manual_seed(0)
    model = zoo.mlp(3, act=nn.ReLU)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 16, generator=gen), torch.randn(64, 4, generator=gen)
    path = tmp_path / "amp.jsonl"  # type: ignore[operator]
    first_loss = last_loss = math.nan
    with Monitor(model, every=1, sinks=[JsonlSink(path, resume=False)]) as mon:
        for s in range(130):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.mse_loss(model(x).float(), y)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            mon.step(loss=loss)
            scaler.step(opt)
            scaler.update()
            first_loss = float(loss.detach()) if s == 0 else first_loss
            last_loss = float(loss.detach())
        live = [f for f in mon.diagnose() if f.kind in ("nonfinite", "skipped_steps")]
    assert last_loss < first_loss  # it did train after calibrating
    post = [f for f in analyze_log(path).findings if f.kind in ("nonfinite", "skipped_steps")]
    for found in (live, post):
        assert [(f.kind, f.severity, f.steps[0]) for f in found] == [("nonfinite", "warning", 0)]
        assert "cannot recover" not in found[0].explanation
