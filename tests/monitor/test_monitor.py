"""Monitor statistics against independent float64 recomputations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradsentry as gs
from gradsentry.monitor import NO_PARAMS_MSG
from zoo import FrozenAndUnused, Reversed, Tied, mlp


def _train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return loss


def _ref_layer(module: nn.Module) -> tuple[float, float, float, int]:
    grads = [
        p.grad.detach().double().flatten() for p in module.parameters(recurse=False) if p.grad is not None
    ]
    g = torch.cat(grads)
    w = torch.cat([p.detach().double().flatten() for p in module.parameters(recurse=False)])
    return g.norm().item(), g.abs().max().item(), w.norm().item(), g.numel()


def test_per_layer_norms_match_float64_recomputation() -> None:
    model = mlp(6, 24, nn.Tanh)
    x, y = torch.randn(32, 16), torch.randint(0, 4, (32,))
    with gs.Monitor(model) as mon:
        _train_step(model, x, y)
        rec = mon.step()
    assert rec is not None
    modules = dict(model.named_modules())
    assert [layer.name for layer in rec.layers] == ["0", "2", "4", "6", "8", "10"]
    for layer in rec.layers:
        norm, maxabs, wnorm, n = _ref_layer(modules[layer.name])
        assert layer.numel == n
        assert layer.grad_norm == pytest.approx(norm, rel=1e-6)
        assert layer.grad_rms == pytest.approx(norm / math.sqrt(n), rel=1e-6)
        assert layer.grad_max_abs == pytest.approx(maxabs, rel=1e-6)
        assert layer.weight_norm == pytest.approx(wnorm, rel=1e-6)
        assert layer.nonfinite == 0 and layer.has_grad


def test_large_layers_match_float64_recomputation_to_1e6() -> None:
    """Layers of 0.26M-4M entries, where float32 sequential accumulation (torch's CPU norm, and so
    clip_grad_norm_) is off by 2e-6 to 1e-4: the Monitor's chunked reduction stays within 1e-6."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 128), nn.ReLU(), nn.Linear(128, 10)
    )
    x, y = torch.randn(64, 2048), torch.randint(0, 10, (64,))
    with gs.Monitor(model) as mon:
        _train_step(model, x, y)
        rec = mon.step()
    assert rec is not None
    modules = dict(model.named_modules())
    for layer in rec.layers:
        norm, maxabs, wnorm, n = _ref_layer(modules[layer.name])
        assert layer.numel == n
        assert layer.grad_norm == pytest.approx(norm, rel=1e-6)
        assert layer.grad_max_abs == pytest.approx(maxabs, rel=1e-6)
        assert layer.weight_norm == pytest.approx(wnorm, rel=1e-6)
    ref_global = math.sqrt(sum(p.grad.double().pow(2).sum().item() for p in model.parameters()))
    assert rec.global_norm == pytest.approx(ref_global, rel=1e-6)


def test_global_norm_equals_torch_get_total_norm() -> None:
    model = mlp(5, 32, nn.ReLU)
    with gs.Monitor(model) as mon:
        _train_step(model, torch.randn(16, 16), torch.randint(0, 4, (16,)))
        rec = mon.step()
    expected = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()
    assert rec is not None
    assert rec.global_norm == pytest.approx(expected, rel=1e-6)


def test_update_to_weight_ratio_of_the_last_optimizer_step() -> None:
    model = mlp(3, 16, nn.ReLU)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(16, 16), torch.randint(0, 4, (16,))
    before: dict[int, dict[str, torch.Tensor]] = {}
    after: dict[int, dict[str, torch.Tensor]] = {}
    with gs.Monitor(model, optimizer=opt, every=2) as mon:
        records = []
        for step in range(5):  # record 2 (4) holds the ratio of the optimizer step taken at step 1 (3)
            _train_step(model, x, y)
            if step in (1, 3):
                before[step] = {n: p.detach().clone() for n, p in model.named_parameters()}
            rec = mon.step(loss=1.0)
            if rec is not None:
                records.append(rec)
            opt.step()
            opt.zero_grad()
            if step in (1, 3):
                after[step] = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert [r.step for r in records] == [0, 2, 4]
    assert all(layer.update_ratio is None for layer in records[0].layers)
    for rec, step in ((records[1], 1), (records[2], 3)):  # the second reuses the snapshot buffer
        b, a = before[step], after[step]
        for layer in rec.layers:
            names = [n for n in b if n.rsplit(".", 1)[0] == layer.name]
            du = math.sqrt(sum((a[n].double() - b[n].double()).pow(2).sum().item() for n in names))
            w = math.sqrt(sum(b[n].double().pow(2).sum().item() for n in names))  # before the update
            assert layer.update_ratio == pytest.approx(du / w, rel=1e-5)
    assert records[1].lr == pytest.approx(1e-2)


def test_only_logged_steps_are_recorded_and_unlogged_steps_do_no_host_transfer(monkeypatch) -> None:
    model = mlp(4, 16, nn.Sigmoid)
    mon = gs.Monitor(model, every=3)
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    calls = {"n": 0}
    originals = {name: getattr(torch.Tensor, name) for name in ("cpu", "tolist", "item", "__bool__")}

    def counting(name):
        def f(self, *a, **k):
            calls["n"] += 1
            return originals[name](self, *a, **k)

        return f

    logged = []
    for step in range(7):
        loss = _train_step(model, x, y)
        armed = sum(len(m._forward_hooks) for m in model.modules())
        for name in originals:
            monkeypatch.setattr(torch.Tensor, name, counting(name))
        calls["n"] = 0
        rec = mon.step(loss=loss)
        for name, fn in originals.items():
            monkeypatch.setattr(torch.Tensor, name, fn)
        if rec is None:
            assert calls["n"] == 0, f"step {step} touched the host"
            assert armed == 0, "activation hooks armed on an unlogged step"
        else:
            logged.append(rec.step)
            assert armed > 0
        model.zero_grad()
    mon.close()
    assert logged == [0, 3, 6]
    assert len(mon.records) == 3


def test_close_removes_every_hook_and_leaves_the_model_unchanged() -> None:
    model = mlp(4, 16, nn.ReLU)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    mon = gs.Monitor(model, optimizer=opt, locate_nonfinite=True, histogram_bins=8)
    model(torch.randn(4, 16)).sum().backward()
    mon.step()
    mon.close()
    mon.close()  # idempotent
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    with pytest.raises(RuntimeError, match="after close"):
        mon.step()


def test_model_without_parameters_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no parameters"):
        gs.Monitor(nn.Sequential(nn.ReLU(), nn.Sigmoid()))
    assert "no parameters" in NO_PARAMS_MSG
    with pytest.raises(TypeError, match=r"nn\.Module"):
        gs.Monitor("not a model")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="every"):
        gs.Monitor(nn.Linear(2, 2), every=0)


def test_frozen_and_unused_layers_have_no_gradient_not_zero_gradient() -> None:
    model = FrozenAndUnused()
    with gs.Monitor(model) as mon:
        model(torch.randn(5, 6)).sum().backward()
        rec = mon.step()
    assert rec is not None
    by_name = {layer.name: layer for layer in rec.layers}
    assert [layer.name for layer in rec.layers] == ["frozen", "used", "unused"]  # unused: last
    assert not by_name["frozen"].has_grad and not by_name["unused"].has_grad
    assert by_name["used"].has_grad and by_name["used"].grad_norm > 0
    frozen_w = torch.cat([model.frozen.weight.flatten(), model.frozen.bias]).double().norm().item()
    assert by_name["frozen"].weight_norm == pytest.approx(frozen_w, rel=1e-6)


def test_all_frozen_model_gives_records_without_gradients() -> None:
    model = nn.Linear(3, 2)
    model.requires_grad_(False)
    with gs.Monitor(model) as mon:
        rec = mon.step()
    assert rec is not None and rec.global_norm == 0.0 and not rec.layers[0].has_grad


def test_depth_is_forward_order_and_tied_weights_count_once() -> None:
    model = Reversed()
    with gs.Monitor(model) as mon:
        model(torch.randn(2, 4)).sum().backward()
        rec = mon.step()
    assert rec is not None and [layer.name for layer in rec.layers] == ["first", "last"]
    tied = Tied()
    with gs.Monitor(tied) as mon:
        tied(torch.randint(0, 10, (4, 3))).sum().backward()
        rec = mon.step()
    assert rec is not None and [layer.name for layer in rec.layers] == ["emb", "mid"]
    expected = torch.nn.utils.get_total_norm([p.grad for p in tied.parameters()]).item()
    assert rec.global_norm == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_gradients_give_float32_accurate_norms(dtype: torch.dtype) -> None:
    model = nn.Sequential(nn.Linear(200, 100), nn.Linear(100, 2)).to(dtype)
    with gs.Monitor(model, activations=False) as mon:
        for p in model.parameters():  # values whose fp16 sum of squares would overflow
            p.grad = torch.full_like(p, 300.0)
        rec = mon.step()
    assert rec is not None
    for layer, module in zip(rec.layers, model, strict=True):
        ref = torch.cat([p.grad.double().flatten() for p in module.parameters()]).norm().item()
        assert math.isfinite(layer.grad_norm)
        assert layer.grad_norm == pytest.approx(ref, rel=1e-6)


def test_nonfinite_gradient_is_counted_in_its_layer() -> None:
    model = mlp(4, 8, nn.Tanh)
    with gs.Monitor(model) as mon:
        model(torch.randn(3, 16)).sum().backward()
        model[2].weight.grad[0, :3] = torch.tensor([math.nan, math.inf, -math.inf])
        rec = mon.step()
    assert rec is not None
    assert math.isnan(rec.global_norm)
    by_name = {layer.name: layer for layer in rec.layers}
    assert by_name["2"].nonfinite == 3
    assert all(layer.nonfinite == 0 for name, layer in by_name.items() if name != "2")


def test_locate_nonfinite_names_the_first_module_with_a_nonfinite_output() -> None:
    class Bad(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x / 0.0 * 0.0  # NaN

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), Bad(), nn.Linear(4, 2))
    with gs.Monitor(model, locate_nonfinite=True) as mon:
        model(torch.randn(3, 4)).sum().backward()
        rec = mon.step()
    assert rec is not None and rec.nonfinite_origin == "2"


def test_activation_saturation_and_dead_units_match_manual_counts() -> None:
    lin = nn.Linear(4, 6)
    model = nn.Sequential(lin, nn.Sigmoid(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 1))
    x = torch.randn(50, 4) * 5
    with gs.Monitor(model) as mon:
        model(x).sum().backward()
        rec = mon.step()
    assert rec is not None
    acts = {a.type: a for a in rec.activations}
    pre1 = lin(x).detach()
    assert acts["Sigmoid"].saturated_frac == pytest.approx((pre1.abs() > math.log(99)).double().mean().item())
    assert acts["Sigmoid"].pre_mean == pytest.approx(pre1.mean().item(), rel=1e-5, abs=1e-6)
    assert acts["Sigmoid"].pre_std == pytest.approx(pre1.std().item(), rel=1e-5)
    assert acts["Sigmoid"].dead_frac is None
    pre2 = model[2](torch.sigmoid(pre1)).detach()
    assert acts["ReLU"].dead_frac == pytest.approx((pre2 <= 0).all(dim=0).double().mean().item())
    assert acts["ReLU"].saturated_frac is None


def test_dead_units_on_a_constructed_relu_layer() -> None:
    lin = nn.Linear(3, 4)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.copy_(torch.tensor([-1.0, -2.0, 0.5, 1.0]))  # units 0 and 1 never fire
    model = nn.Sequential(lin, nn.ReLU(), nn.Linear(4, 1))
    with gs.Monitor(model) as mon:
        model(torch.randn(10, 3)).sum().backward()
        rec = mon.step()
    assert rec is not None and rec.activations[0].dead_frac == pytest.approx(0.5)


def test_loss_tensor_nan_is_kept() -> None:
    model = nn.Linear(2, 1)
    with gs.Monitor(model) as mon:
        model(torch.randn(2, 2)).sum().backward()
        rec = mon.step(loss=torch.tensor(math.nan))
    assert rec is not None and rec.loss is not None and math.isnan(rec.loss)


def test_overhead_is_measured_and_budget_lowers_the_logging_frequency() -> None:
    model = mlp(8, 64, nn.ReLU)
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    mon = gs.Monitor(model, overhead_budget=1e-6)
    for _ in range(4):
        _train_step(model, x, y)
        mon.step()
        model.zero_grad()
    mon.close()
    assert mon.every > 1  # a budget of one millionth cannot be met at every=1
    overheads = [r.overhead for r in mon.records if r.overhead is not None]
    assert overheads and all(0 < o < 1 for o in overheads)
    amortized = mon.amortized_overhead
    assert amortized is not None and 0 < amortized < max(overheads)


def test_lean_mode_reads_gradients_once_and_shares_norms_with_the_clipper() -> None:
    torch.manual_seed(1)
    model = mlp(5, 32, nn.ReLU)
    twin = mlp(5, 32, nn.ReLU)
    twin.load_state_dict(model.state_dict())
    x, y = torch.randn(16, 16) * 50, torch.randint(0, 4, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = gs.Monitor(model, optimizer=opt, max_abs=False, weight_norms=False, remedy=gs.ClipGlobalNorm(0.5))
    _train_step(model, x, y)
    rec = mon.step()
    _train_step(twin, x, y)
    ref_norm = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.5).item()
    mon.close()
    assert rec is not None
    assert rec.global_norm == pytest.approx(ref_norm, rel=1e-6)
    assert all(
        la.grad_max_abs is None and la.weight_norm is None and la.update_ratio is None for la in rec.layers
    )
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)
    assert rec.actions and rec.actions[0]["clipped"] is True
    assert rec.actions[0]["norm_before"] == pytest.approx(ref_norm, rel=1e-6)


def test_non_scalar_loss_and_fractional_every_are_clear_errors() -> None:
    model = nn.Linear(3, 1)
    with pytest.raises(ValueError, match="int >= 1"):
        gs.Monitor(model, every=1.5)  # type: ignore[arg-type]
    with gs.Monitor(model) as mon:
        model(torch.randn(2, 3)).sum().backward()
        with pytest.raises(ValueError, match="scalar loss"):
            mon.step(loss=torch.tensor([1.0, 5.0]))


def test_two_monitors_on_one_optimizer_both_get_update_ratios() -> None:
    """Each Monitor's update hook used to remove itself from inside the optimizer's post-hook loop,
    which broke that loop ("OrderedDict mutated during iteration") when another post-hook followed."""
    torch.manual_seed(0)
    enc, dec = nn.Sequential(nn.Linear(8, 8), nn.ReLU()), nn.Linear(8, 1)
    opt = torch.optim.SGD([*enc.parameters(), *dec.parameters()], lr=0.1)
    with gs.Monitor(enc, optimizer=opt) as m1, gs.Monitor(dec, optimizer=opt) as m2:
        for _ in range(3):
            loss = dec(enc(torch.randn(4, 8))).pow(2).mean()
            loss.backward()
            m1.step(loss=loss)
            m2.step(loss=loss)
            opt.step()
            opt.zero_grad()
    for mon in (m1, m2):
        assert all(la.update_ratio is not None and la.update_ratio > 0 for la in mon.records[-1].layers)
    assert not opt._optimizer_step_post_hooks  # close() removed every hook


def test_a_single_sink_or_a_wrong_optimizer_is_a_clear_error(tmp_path) -> None:
    """`sinks=JsonlSink(...)` (no list) failed with "'JsonlSink' object is not iterable" and a string
    optimizer with an AttributeError from deep inside; neither leaves a hook on the model."""
    model = nn.Linear(3, 1)
    with pytest.raises(
        TypeError, match=r"expects a list of sinks, e.g. sinks=\[JsonlSink\(path\)\], got a JsonlSink"
    ):
        gs.Monitor(model, sinks=gs.JsonlSink(tmp_path / "run.jsonl"))
    with pytest.raises(TypeError, match=r"optimizer=\.\.\.\) expects a torch.optim.Optimizer, got str"):
        gs.Monitor(model, optimizer="sgd")  # type: ignore[arg-type]
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert not (tmp_path / "run.jsonl").exists()


def _hook_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, list[int]]:
    """The ids of every module hook of ``model`` (all submodules) and every step hook of ``opt``."""
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    state = {k: sorted(h for m in model.modules() for h in getattr(m, k)) for k in kinds}
    state["opt_pre"] = sorted(opt._optimizer_step_pre_hooks)
    state["opt_post"] = sorted(opt._optimizer_step_post_hooks)
    return state


@pytest.mark.parametrize("failure", ["dist_timeout", "process_group", "late"])
def test_a_failed_construction_leaves_exactly_the_hooks_there_were(failure: str, monkeypatch) -> None:
    """Monitor() used to leave its forward-order, activation, locate_nonfinite and optimizer hooks on
    the model when it raised after building its layer index (a bad dist_timeout, a process_group
    without torch.distributed, any later error): construction is all-or-nothing."""
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model[0].register_forward_hook(lambda *a: None)  # the user's own hooks stay
    opt.register_step_post_hook(lambda *a: None)
    before = _hook_state(model, opt)
    kwargs: dict = {"optimizer": opt, "locate_nonfinite": True, "histogram_bins": 4}
    if failure == "dist_timeout":
        kwargs["dist_timeout"] = -1.0
        expected: tuple[type[Exception], str] = (ValueError, "dist_timeout")
    elif failure == "process_group":
        kwargs["process_group"] = object()
        expected = (ValueError, "process_group")
    else:  # the very last construction step fails: every hook is set by then

        def boom(model: nn.Module) -> str:
            raise RuntimeError("late failure")

        monkeypatch.setattr("gradsentry.monitor.monitor._taxonomy.functional_activation_note", boom)
        expected = (RuntimeError, "late failure")
    with pytest.raises(expected[0], match=expected[1]):
        gs.Monitor(model, **kwargs)
    assert _hook_state(model, opt) == before
    model(torch.randn(2, 4)).sum().backward()  # and the model still trains
    opt.step()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss": "x"}, r"step\(loss=\.\.\.\) expects a float, a 0-dim tensor .* or None, got str \('x'\)"),
        ({"loss": [1.0]}, r"step\(loss=\.\.\.\) expects a float.*got list"),
        ({"loss": True}, r"step\(loss=\.\.\.\) expects a float.*got bool"),
        ({"loss": torch.tensor(1 + 2j)}, r"step\(loss=\.\.\.\) .*got a complex64 tensor"),
        ({"lr": "0.1"}, r"step\(lr=\.\.\.\) expects a float, a one-element tensor or None, got str"),
        ({"step": "a"}, r"step\(step=\.\.\.\) expects an int .* or None, got str \('a'\)"),
        ({"step": 1.5}, r"step\(step=\.\.\.\) expects an int .* or None, got float \(1\.5\)"),
    ],
)
def test_bad_step_arguments_are_type_errors_naming_the_argument(kwargs: dict, message: str) -> None:
    """`mon.step(loss="x")` said "could not convert string to float", `step="a"` "invalid literal for
    int()", and `lr="x"` or `step=1.5` were recorded as given (a string lr, step 1). The bad call is
    not counted: the next good call is still the logged step 0."""
    model = nn.Linear(3, 1)
    with gs.Monitor(model, every=2) as mon:
        model(torch.randn(2, 3)).sum().backward()
        with pytest.raises(TypeError, match=message):
            mon.step(**kwargs)
        rec = mon.step(loss=torch.tensor(0.5), lr=torch.tensor(0.25))
    assert rec is not None and rec.step == 0 and rec.loss == 0.5 and rec.lr == 0.25
    assert mon.step_count == 1
