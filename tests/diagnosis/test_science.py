"""Published results, reproduced on real runs and checked against independent float64 computations.

- Glorot & Bengio 2010 (Fig. 2): the top hidden layer of a 4-layer sigmoid MLP with the standard init is
  pushed to its lower asymptote early in training; the saturation band is a documented threshold, and set
  as the paper reads it (outputs near 0.02 count) the Monitor flags it.
- He et al. 2015 (Fig. 3, sec. 2.2): a 30-layer ReLU net with Xavier init stalls; the Monitor names it
  from its first logged step (vanishing gradient and collapsing forward signal) and the flat loss.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradsentry as gs
from gradsentry import stats
from gradsentry.lab.data import load_digits
from gradsentry.lab.models import build_mlp


@pytest.fixture(scope="module")
def digits():  # type: ignore[no-untyped-def]
    return load_digits()


# ------------------------------------------------------------------------------------------------ item 6
def test_saturation_band_is_a_validated_threshold_with_the_stats_default() -> None:
    t = gs.Thresholds()
    assert t.sigmoid_saturation == stats.SIGMOID_SATURATION == 0.01
    assert t.tanh_saturation == stats.TANH_SATURATION == 0.01
    assert stats.sigmoid_saturation_x(0.01) == pytest.approx(math.log(99.0), rel=1e-15)
    assert 1 / (1 + math.exp(-stats.sigmoid_saturation_x(0.05))) == pytest.approx(0.95, rel=1e-12)
    for bad in (0.5, 0.7, 0.0, -0.1):
        with pytest.raises(ValueError, match="sigmoid_saturation"):
            gs.Thresholds(sigmoid_saturation=bad)
    with pytest.raises(ValueError, match="saturation band"):
        stats.sigmoid_saturation_x(0.5)


def _glorot_sigmoid_mlp(width: int = 256, seed: int = 0) -> nn.Sequential:
    """Glorot & Bengio's setting: 4 sigmoid hidden layers, 'standard' init U[-1/sqrt(n), 1/sqrt(n)]
    (their eq. 1), zero biases, softmax output."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    fan = 64
    for _ in range(4):
        layers += [nn.Linear(fan, width), nn.Sigmoid()]
        fan = width
    layers.append(nn.Linear(fan, 10))
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.in_features)
                m.weight.uniform_(-bound, bound)
                m.bias.zero_()
    return model


def _train_glorot(digits, band: float | None, steps: int = 144):  # type: ignore[no-untyped-def]
    model = _glorot_sigmoid_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    thresholds = gs.Thresholds(sigmoid_saturation=band) if band is not None else None
    top: dict[str, torch.Tensor] = {}
    model[7].register_forward_hook(lambda _m, _i, out: top.__setitem__("y", out.detach().double()))
    model[1].register_forward_hook(lambda _m, _i, out: top.__setitem__("low", out.detach().double()))
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(digits.x_train.shape[0], generator=gen)
    with gs.Monitor(model, every=4, optimizer=opt, thresholds=thresholds) as mon:
        for step in range(steps):
            idx = perm[(10 * step) % 1430 : (10 * step) % 1430 + 10]  # Glorot & Bengio's mini-batches of 10
            loss = nn.functional.cross_entropy(model(digits.x_train[idx]), digits.y_train[idx])
            opt.zero_grad()
            loss.backward()
            rec = mon.step(loss=loss)
            if rec is not None:
                last_rec, last_top, low = rec, top["y"], top["low"]
            opt.step()
    assert 0.3 < float(low.mean()) < 0.7  # the first hidden layer stays near 0.5
    return mon, last_rec, last_top


def test_glorot_top_sigmoid_layer_stuck_near_0_02_is_flagged_with_the_papers_band(digits) -> None:  # type: ignore[no-untyped-def]
    mon, rec, y = _train_glorot(digits, band=0.05)
    top = {a.name: a for a in rec.activations}["7"]
    # the top layer sits near 0.02, the lower ones near 0.5 (Glorot & Bengio 2010, Fig. 2)
    assert 0.005 < float(y.mean()) < 0.05
    # the recorded fraction equals an independent float64 count with the same band
    expected = float(((y < 0.05) | (y > 0.95)).double().mean())
    assert top.saturated_frac == pytest.approx(expected, abs=1e-6)
    assert expected > 0.9
    assert mon.header.meta["saturation"] == {"sigmoid": 0.05, "tanh": 0.01}
    findings = {f.kind: f for f in mon.diagnose()}
    assert "saturation" in findings
    sat = findings["saturation"]
    assert sat.layers[0] == "7" and sat.evidence["band"]["sigmoid"] == 0.05
    assert "below 0.05 or above 0.95" in sat.explanation
    # with the default band (0.01) the same run shows (almost) nothing saturated: nothing is flagged
    mon0, rec0, y0 = _train_glorot(digits, band=None)
    top0 = {a.name: a for a in rec0.activations}["7"]
    assert top0.saturated_frac == pytest.approx(float(((y0 < 0.01) | (y0 > 0.99)).double().mean()), abs=1e-6)
    assert top0.saturated_frac < 0.5
    assert "saturation" not in [f.kind for f in mon0.diagnose()]


# ------------------------------------------------------------------------------------------------ item 7
def _he_30_layer_run(digits, init: str, epochs: int = 40, seed: int = 0):  # type: ignore[no-untyped-def]
    """He et al. 2015's comparison on the digits: 30 ReLU layers (width 64), zero biases, Xavier
    (n Var[w] = 1 for square layers) or He init; SGD lr 0.002, momentum 0.9, batch 128."""
    torch.manual_seed(seed)
    model = build_mlp(depth=30, width=64, activation="relu")
    gs.reinit(model, "xavier" if init == "xavier" else "he")
    start = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.002, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    n = digits.x_train.shape[0]
    first_idx = None
    with gs.Monitor(model, every=4, optimizer=opt) as mon:
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen)
            for s in range(0, n, 128):
                idx = perm[s : s + 128]
                first_idx = idx if first_idx is None else first_idx
                loss = nn.functional.cross_entropy(model(digits.x_train[idx]), digits.y_train[idx])
                opt.zero_grad()
                loss.backward()
                mon.step(loss=loss)
                opt.step()
    with torch.no_grad():
        acc = float((model(digits.x_test).argmax(1) == digits.y_test).double().mean())
    return mon, acc, start, first_idx


def test_he_et_al_30_layer_xavier_relu_stall_is_named_from_its_first_step(digits) -> None:  # type: ignore[no-untyped-def]
    mon, acc, start, idx = _he_30_layer_run(digits, "xavier")
    assert acc < 0.3  # it did not learn (14 % measured)
    findings = mon.diagnose()
    vanishing = [f for f in findings if f.kind == "vanishing"]
    assert len(vanishing) == 1
    f = vanishing[0]
    assert f.severity == "error" and f.evidence["pattern"] == "stalled_init" and f.steps == [0]
    assert f.layers[0] == "blocks.0.fc"
    assert f.evidence["chance_level_classes"] == 10
    assert f.evidence["loss_gain"] < 0.1
    # the init numbers against an independent float64 forward/backward on the same first batch
    ref = build_mlp(depth=30, width=64, activation="relu").double()
    ref.load_state_dict(start)
    pre: dict[str, torch.Tensor] = {}
    for i in (0, 29):
        ref.blocks[i].act.register_forward_hook(
            lambda _m, args, _o, i=i: pre.__setitem__(f"blocks.{i}.act", args[0].detach())
        )
    x, y = digits.x_train[idx].double(), digits.y_train[idx]
    nn.functional.cross_entropy(ref(x), y).backward()

    def rms(m: nn.Linear) -> float:
        g = torch.cat([m.weight.grad.flatten(), m.bias.grad.flatten()])
        return float(g.norm()) / math.sqrt(g.numel())

    ratio = rms(ref.blocks[0].fc) / rms(ref.head)
    assert f.evidence["first_last_rms_ratio_init"] == pytest.approx(ratio, rel=1e-3)
    assert ratio < 1e-3
    fwd = float(pre["blocks.29.act"].std() / pre["blocks.0.act"].std())
    assert f.evidence["forward_std_ratio_init"] == pytest.approx(fwd, rel=1e-3)
    # He et al. sec. 2.2: the second moment halves per layer, the std by sqrt(2): 29 layers apart
    assert math.log10(fwd) == pytest.approx(math.log10(2 ** (-29 / 2)), abs=0.5)
    # later steps drift above the vanishing threshold: the old majority rule alone missed the stall
    assert f.evidence["first_last_rms_ratio_last_step"] > 1e-3


def test_he_init_30_layer_relu_trains_and_is_not_called_stalled(digits) -> None:  # type: ignore[no-untyped-def]
    mon, acc, _, _ = _he_30_layer_run(digits, "he")
    assert acc > 0.8
    assert "vanishing" not in [f.kind for f in mon.diagnose()]


def test_stall_rule_needs_a_flat_loss(digits) -> None:  # type: ignore[no-untyped-def]
    # the same records with a loss that fell by 50 %: vanishing at init but the net learned
    mon, _, _, _ = _he_30_layer_run(digits, "xavier", epochs=4)
    records = mon.records
    for i, rec in enumerate(records):
        rec.loss = 2.3 * (1.0 - 0.5 * i / (len(records) - 1))
    kinds = [(f.kind, f.evidence.get("pattern")) for f in gs.diagnose(records, layers=mon.layers)]
    assert ("vanishing", "stalled_init") not in kinds
    assert ("vanishing", "stalled_init") in [
        (f.kind, f.evidence.get("pattern"))
        for f in gs.diagnose(records, layers=mon.layers, stall_loss_gain=0.6)
    ]
