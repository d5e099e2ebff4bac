"""Wrong numbers the hostile tester found, each checked against an independent computation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradsentry as gs

pytestmark = pytest.mark.faults


def test_update_ratio_divides_by_the_weights_before_the_update() -> None:
    """An SGD update 2,500x the weights reads ~2500 (it read 1.0: divided by the weights after it)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4, bias=False))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    w = model[0].weight
    with gs.Monitor(model, optimizer=opt, activations=False) as mon:
        for _ in range(2):
            model(torch.randn(2, 4)).sum().backward()
            mon.step()
            before = w.detach().double().clone()
            w.grad = -2500.0 * w.detach().clone()  # SGD(lr=1): w <- w + 2500 w
            opt.step()
            opt.zero_grad()
            after = w.detach().double().clone()
        model(torch.randn(2, 4)).sum().backward()
        rec = mon.step()
    assert rec is not None
    want = ((after - before).norm() / before.norm()).item()
    assert want == pytest.approx(2500.0, rel=1e-6)
    assert rec.layers[0].update_ratio == pytest.approx(want, rel=1e-5)
    findings = mon.diagnose()
    upd = [f for f in findings if f.evidence.get("pattern") == "update_ratio"]
    assert upd and upd[0].evidence["max_update_ratio"] == pytest.approx(want, rel=1e-5)


def _loop(model: nn.Module, mon: gs.Monitor, opt: torch.optim.Optimizer | None, calls: int) -> None:
    model(torch.randn(4, 4)).sum().backward()
    for _ in range(calls):
        mon.step()
    if opt is not None:
        opt.step()
        opt.zero_grad()
    else:
        model.zero_grad()


@pytest.mark.parametrize("with_optimizer", [True, False])
def test_step_called_twice_per_optimizer_step_warns_once(caplog, with_optimizer: bool) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1) if with_optimizer else None
    with caplog.at_level("WARNING", logger="gradsentry"), gs.Monitor(model, optimizer=opt) as mon:
        for _ in range(3):
            _loop(model, mon, opt, calls=1)
        assert "called again for the same optimizer step" not in caplog.text
        for _ in range(3):
            _loop(model, mon, opt, calls=2)
    assert caplog.text.count("called again for the same optimizer step") == 1


def test_a_skipped_optimizer_step_is_not_taken_for_a_second_call(caplog) -> None:
    """A loss scaler that skips optimizer.step() (then zero_grad) makes a new gradient: no warning."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with caplog.at_level("WARNING", logger="gradsentry"), gs.Monitor(model, optimizer=opt) as mon:
        for i in range(6):
            model(torch.randn(4, 4)).sum().backward()
            mon.step()
            if i % 2:
                opt.step()
            opt.zero_grad()
    assert "called again" not in caplog.text


def test_device_guard_flag_does_not_outlive_its_optimizer_step() -> None:
    """NonFiniteGuard(sync=False) on a NaN step, then a fused step without the guard: it must update."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    guard = gs.NonFiniteGuard(opt, sync=False)
    model(torch.randn(4, 3)).sum().backward()
    model.weight.grad[0, 0] = math.nan
    before = model.weight.detach().clone()
    guard(model.parameters())
    opt.step()  # skipped on the device flag
    assert torch.equal(model.weight, before) and guard.skips == 1
    assert getattr(opt, "found_inf", None) is None
    opt.zero_grad()
    model(torch.randn(4, 3)).sum().backward()
    opt.step()  # no guard call this time: a plain fused step that must move the weights
    assert not torch.equal(model.weight, before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_model_converted_to_low_precision_after_the_first_logged_step(dtype: torch.dtype) -> None:
    """Norms after model.to(bf16/fp16) equal float64 norms of the same gradients (no stale fp32 path)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64))
    with gs.Monitor(model, activations=False) as mon:
        model(torch.randn(8, 64)).pow(2).mean().backward()
        mon.step()
        model.zero_grad()
        model.to(dtype)
        model(torch.randn(8, 64, dtype=dtype)).pow(2).mean().backward()
        rec = mon.step()
    assert rec is not None
    for layer, name in zip(rec.layers, ["0", "2"], strict=True):
        m = model.get_submodule(name)
        want = math.sqrt(sum(p.grad.double().pow(2).sum().item() for p in m.parameters()))
        assert layer.grad_norm == pytest.approx(want, rel=1e-5), layer.name


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 16)
        self.enc = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 11)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(x)))


def test_attention_out_proj_is_placed_after_the_attention_not_after_the_head() -> None:
    """nn.MultiheadAttention never calls out_proj as a module: it goes where the attention's call ends."""
    model = _Encoder()
    with gs.Monitor(model) as mon:
        model(torch.randint(0, 11, (2, 5))).sum().backward()
        mon.step()
    names = [layer.name for layer in mon.layers]
    assert names == [
        "emb",
        "enc.self_attn",
        "enc.self_attn.out_proj",
        "enc.norm1",
        "enc.linear1",
        "enc.linear2",
        "enc.norm2",
        "head",
    ]
    assert [layer.depth for layer in mon.layers] == list(range(len(names)))


def test_layers_never_called_still_go_last() -> None:
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.spare = nn.Linear(3, 3)  # never used
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x))

    model = Unused()
    with gs.Monitor(model) as mon:
        model(torch.randn(2, 3)).sum().backward()
        mon.step()
    assert [layer.name for layer in mon.layers] == ["a", "b", "spare"]


class _MaskedAttention(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.q, self.k, self.v, self.proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = (self.q(x) @ self.k(x).transpose(-1, -2)).masked_fill(~mask, -math.inf)
        return self.proj(torch.softmax(scores, dim=-1) @ self.v(x))  # a fully masked row: NaN


class _Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.attn, self.head = nn.Linear(4, 8), _MaskedAttention(), nn.Linear(8, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(self.inp(x), mask))


def test_nan_made_by_tensor_code_inside_a_module_is_blamed_on_that_module() -> None:
    torch.manual_seed(0)
    model = _Masked()
    mask = torch.ones(2, 5, 5, dtype=torch.bool)
    mask[0, 3] = False  # query 3 of sample 0 may attend to nothing
    with gs.Monitor(model, locate_nonfinite=True) as mon:
        model(torch.randn(2, 5, 4), mask).sum().backward()
        rec = mon.step()
    assert rec is not None and not rec.finite
    assert rec.nonfinite_origin == "attn"  # not attn.proj, which only received the NaN


def test_a_nan_layer_is_still_its_own_origin() -> None:
    torch.manual_seed(0)
    model = _Masked()
    with torch.no_grad():
        model.attn.v.weight[0, 0] = math.nan
    with gs.Monitor(model, locate_nonfinite=True) as mon:
        model(torch.randn(2, 5, 4), torch.ones(2, 5, 5, dtype=torch.bool)).sum().backward()
        rec = mon.step()
    assert rec is not None and rec.nonfinite_origin == "attn.v"


def test_forward_passes_that_never_reach_step_keep_memory_bounded() -> None:
    """locate_nonfinite with 3,000 forwards (with gradients) before the next step(): no growth."""
    import gc

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    x = torch.randn(2, 4)

    def live_tensors() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))

    with gs.Monitor(model, locate_nonfinite=True) as mon:
        model(x).sum().backward()
        mon.step()
        model(x)
        start = live_tensors()
        for i in range(3000):
            out = model(x)
            if i == 1500:
                out = out * math.nan  # outside every module: not an origin
        grown = live_tensors() - start
        model(x).sum().backward()
        rec = mon.step()
    assert grown < 50, f"{grown} tensors kept by 3,000 forwards"
    assert rec is not None and rec.finite


def test_an_lstm_wrecked_at_step_0_is_diagnosed_by_its_update_not_only_as_stalled() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm, self.head = nn.LSTM(8, 16, batch_first=True), nn.Linear(16, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.lstm(x)[0][:, -1])

    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gs.Monitor(model, optimizer=opt) as mon:
        for step in range(60):
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(16, 5, 8, generator=g), torch.randn(16, 1, generator=g)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            mon.step(loss=loss)
            if step == 0:  # the wreck: SGD moves the LSTM by 3,000x its weights
                for p in model.lstm.parameters():
                    p.grad = -3000.0 * p.detach() / 0.05
            opt.step()
            opt.zero_grad()
    upd = next(f for f in mon.diagnose() if f.evidence.get("pattern") == "update_ratio")
    assert upd.layers[0] == "lstm" and upd.steps[0] == 1
    assert upd.evidence["layer_max_update_ratio"]["lstm"] == pytest.approx(3000.0, rel=1e-4)
