"""NaN/inf injected at every layer of two small transformers: the Monitor must name where it came from.

Models: one built from ``nn.TransformerEncoderLayer`` (whose attention never calls ``out_proj`` as a
module) and a hand-written one (attention written as tensor code around two Linears). For each layer, in
fp32 and bf16, with NaN and with inf:

- forward: one entry of the layer's weight is made non-finite; the record's ``nonfinite_origin`` (and the
  first layer ``nonfinite_layers`` names) is that layer, or for ``out_proj`` the attention that uses it;
- backward: the gradient flowing out of the layer's output is made non-finite (a tensor hook), the
  forward staying finite; the origin is then the deepest layer holding a non-finite gradient: the layer
  itself, or the last layer inside it (``out_proj`` for the attention).

The expected depth orders are written out by hand, independently of the Monitor.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

import gradsentry as gs
from gradsentry.monitor import nonfinite_layers
from gradsentry.records import StepRecord

pytestmark = pytest.mark.faults

VOCAB, D = 13, 16


class TorchTiny(nn.Module):
    ORDER = (
        "emb",
        "enc.self_attn",
        "enc.self_attn.out_proj",
        "enc.norm1",
        "enc.linear1",
        "enc.linear2",
        "enc.norm2",
        "head",
    )

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.enc = nn.TransformerEncoderLayer(D, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(x)))


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).split(D, dim=-1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(D)
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).tril()
        weights = torch.softmax(scores.masked_fill(~causal, -math.inf), dim=-1)
        return self.proj(weights @ v)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.attn, self.ln2 = nn.LayerNorm(D), Attention(), nn.LayerNorm(D)
        self.fc1, self.act, self.fc2 = nn.Linear(D, 32), nn.GELU(), nn.Linear(32, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class HandTiny(nn.Module):
    ORDER = (
        "emb",
        "block.ln1",
        "block.attn.qkv",
        "block.attn.proj",
        "block.ln2",
        "block.fc1",
        "block.fc2",
        "ln_f",
        "head",
    )

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.block, self.ln_f, self.head = (
            nn.Embedding(VOCAB, D),
            Block(),
            nn.LayerNorm(D),
            nn.Linear(D, VOCAB),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln_f(self.block(self.emb(x))))


def _build(cls: type[nn.Module], dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return cls().to(dtype)


def _step(model: nn.Module, inject: Callable[[nn.Module], None] | None = None) -> StepRecord:
    x = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    with gs.Monitor(model, locate_nonfinite=True, activations=False) as mon:
        if inject is not None:
            inject(model)
        logits = model(x)
        nn.functional.cross_entropy(logits.float().reshape(-1, VOCAB), x.reshape(-1)).backward()
        rec = mon.step()
        assert [layer.name for layer in mon.layers] == list(model.ORDER)  # type: ignore[attr-defined]
    assert rec is not None
    return rec


def _poison_weight(name: str, value: float) -> Callable[[nn.Module], None]:
    def inject(model: nn.Module) -> None:
        module = model.get_submodule(name)
        w = module.in_proj_weight if isinstance(module, nn.MultiheadAttention) else module.weight
        with torch.no_grad():
            if isinstance(module, nn.Embedding):
                w[:, 0] = value  # every token's vector
            elif w.dim() == 1:
                w[0] = value
            else:
                w[0, 0] = value

    return inject


def _poison_gradient(name: str, value: float) -> Callable[[nn.Module], None]:
    def hook(module: nn.Module, args: object, output: object) -> None:
        out = output[0] if isinstance(output, tuple) else output
        assert isinstance(out, torch.Tensor)
        out.register_hook(lambda g: g * value)

    def inject(model: nn.Module) -> None:
        model.get_submodule(name).register_forward_hook(hook)

    return inject


MODELS = {"torch_encoder_layer": TorchTiny, "hand_written": HandTiny}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_forward_injection_at_every_layer_is_located(model_name: str, dtype: str, value: float) -> None:
    cls = MODELS[model_name]
    assert _step(_build(cls, DTYPES[dtype])).finite  # the clean model is finite
    wrong = []
    for layer in cls.ORDER:  # type: ignore[attr-defined]
        rec = _step(_build(cls, DTYPES[dtype]), _poison_weight(layer, value))
        want = "enc.self_attn" if layer == "enc.self_attn.out_proj" else layer  # out_proj: its attention
        named = nonfinite_layers(rec)
        if rec.finite or rec.nonfinite_origin != want or named[:1] != [want]:
            wrong.append((layer, rec.nonfinite_origin, named[:2]))
    assert not wrong, wrong


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_backward_injection_at_every_layer_is_located(model_name: str, dtype: str, value: float) -> None:
    cls = MODELS[model_name]
    order = list(cls.ORDER)  # type: ignore[attr-defined]
    wrong = []
    for layer in order:
        if layer == "enc.self_attn.out_proj":
            continue  # never called as a module: its output is the attention's (injected there)
        rec = _step(_build(cls, DTYPES[dtype]), _poison_gradient(layer, value))
        inside = [n for n in order if n == layer or n.startswith(layer + ".")]
        want = inside[-1]  # the deepest layer whose gradient the hook reaches first
        holding = {n for n in nonfinite_layers(rec)}
        upstream = set(order[: order.index(want) + 1])
        if rec.finite or rec.nonfinite_origin != want or not holding <= upstream or want not in holding:
            wrong.append((layer, rec.nonfinite_origin, sorted(holding)))
    assert not wrong, wrong
