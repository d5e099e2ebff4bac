"""Module families: activations recognised by type (torch.nn and transformers classes), the note for
functional activations."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import gradsentry as gs
from gradsentry import _taxonomy, stats


class MyReLU(nn.ReLU):
    """A subclass: recognised through the class hierarchy, not by its name."""


@pytest.mark.parametrize(
    ("module", "kind", "family"),
    [
        (nn.Sigmoid(), "Sigmoid", "sigmoid"),
        (nn.Hardtanh(), "Hardtanh", "tanh"),
        (nn.ReLU6(), "ReLU6", "relu"),  # a Hardtanh subclass: the most specific class wins
        (MyReLU(), "ReLU", "relu"),
        (nn.GELU(), "GELU", "smooth"),
        (nn.Linear(2, 2), None, None),
    ],
    ids=["sigmoid", "hardtanh", "relu6", "relu-subclass", "gelu", "linear"],
)
def test_torch_activations_by_type(module, kind, family):
    assert _taxonomy.activation_kind(module) == kind
    assert (_taxonomy.activation_family(kind) if kind else None) == family


def test_old_names_still_importable_and_rules_unchanged():
    assert {"Sigmoid", "Tanh", "Hardtanh", "Hardsigmoid", "Softsign", "ReLU6"} == stats.BOUNDED_ACTIVATIONS
    assert {"ReLU", "ReLU6", "LeakyReLU", "PReLU", "RReLU", "ELU", "CELU", "SELU"} == stats.RELU_FAMILY
    assert (
        stats.BOUNDED_ACTIVATIONS
        | stats.RELU_FAMILY
        | {
            "GELU",
            "SiLU",
            "Mish",
            "Softplus",
            "Hardswish",
        }
        == stats.ACTIVATIONS
    )


def test_every_transformers_activation_class_is_known():
    acts = pytest.importorskip("transformers.activations", reason="the hf extra is not installed")
    classes = {c if isinstance(c, type) else c[0] for c in acts.ACT2CLS.values()}
    unknown = {
        c.__name__
        for c in classes
        if _taxonomy.activation_kind(c.__new__(c)) is None and c.__name__ != "LinearActivation"
    }
    assert not unknown  # LinearActivation is the identity: not an activation to watch


def test_gpt2_gelu_new_is_watched(caplog):
    transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16)
    model = transformers.GPT2LMHeadModel(cfg)  # random init from the config: no download
    assert type(model.transformer.h[0].mlp.act).__name__ == "NewGELUActivation"
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.INFO, logger="gradsentry"), gs.Monitor(model) as mon:
        model(input_ids=ids, labels=ids).loss.backward()
        rec = mon.step()
    acts = {a.name: a for a in rec.activations}
    assert {"transformer.h.0.mlp.act", "transformer.h.1.mlp.act"} <= set(acts)
    assert acts["transformer.h.0.mlp.act"].type == "GELU"
    assert not [m for m in caplog.messages if "no activation module" in m]


def test_relu_squared_dead_units_match_an_independent_count():
    acts = pytest.importorskip("transformers.activations", reason="the hf extra is not installed")

    lin = nn.Linear(8, 10)
    with torch.no_grad():
        lin.bias[:4] = -100.0  # units 0-3 negative on every sample: dead
    model = nn.Sequential(lin, acts.ReLUSquaredActivation(), nn.Linear(10, 1))
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    with gs.Monitor(model) as mon:
        model(x).sum().backward()
        (act,) = mon.step().activations
    want = float((lin(x) <= 0).all(dim=0).float().mean())  # independent: from the pre-activation itself
    assert act.type == "ReLU" and act.dead_frac == pytest.approx(want, abs=1e-7) and want >= 0.4


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.relu(self.fc1(x)))


def test_functional_activations_get_one_note_per_monitor(caplog):
    model = Functional()
    with caplog.at_level(logging.INFO, logger="gradsentry"), gs.Monitor(model) as mon:
        for _ in range(3):
            model(torch.randn(4, 4)).sum().backward()
            mon.step()
    notes = [m for m in caplog.messages if "no activation module" in m]
    assert len(notes) == 1
    assert "F.relu" in notes[0] and "saturation and dead-unit checks are off" in notes[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gradsentry"):
        gs.Monitor(nn.Sequential(nn.Linear(4, 4), nn.ReLU())).close()
        gs.Monitor(Functional(), activations=False).close()
    assert not [m for m in caplog.messages if "no activation module" in m]
