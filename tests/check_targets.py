"""Model factories used by the theory / init / check tests (also loaded as ``check`` TARGETs by path)."""

from __future__ import annotations

import torch
from torch import nn


def mlp(
    activation: str = "sigmoid", init: str = "default", depth: int = 20, width: int = 64
) -> nn.Sequential:
    """``depth`` hidden (Linear, activation) pairs on 64 inputs, then a Linear head to 10 logits."""
    act = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU}[activation]
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(64 if i == 0 else width, width), act()]
    layers.append(nn.Linear(width, 10))
    model = nn.Sequential(*layers)
    for m in model:
        if isinstance(m, nn.Linear) and init != "default":
            if init == "he":
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            elif init == "xavier":
                nn.init.xavier_normal_(m.weight, gain=nn.init.calculate_gain(activation))
            else:
                raise ValueError(init)
            nn.init.zeros_(m.bias)
    return model


def sigmoid20() -> nn.Module:
    return mlp("sigmoid")


def relu20_he() -> nn.Module:
    return mlp("relu", "he")


def small_mlp() -> nn.Module:
    return mlp("tanh", depth=3, width=32)


class TokenEncoder(nn.Module):
    """Embedding -> ``nn.TransformerEncoder`` (12 layers, d_model 128) -> vocabulary logits."""

    def __init__(
        self, norm_first: bool, vocab: int = 64, d_model: int = 128, layers: int = 12, xavier: bool = False
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model,
            nhead=4,
            dim_feedforward=4 * d_model,
            dropout=0.0,
            batch_first=True,
            norm_first=norm_first,
        )
        self.encoder = nn.TransformerEncoder(
            layer, layers, norm=nn.LayerNorm(d_model) if norm_first else None, enable_nested_tensor=False
        )
        self.out = nn.Linear(d_model, vocab)
        if xavier:
            for p in self.encoder.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.encoder(self.embed(tokens)))  # type: ignore[no-any-return]


def preln() -> nn.Module:
    return TokenEncoder(norm_first=True)


def postln() -> nn.Module:
    return TokenEncoder(norm_first=False)


def not_a_module() -> int:
    return 3


def broken_factory() -> nn.Module:
    raise RuntimeError("factory exploded on purpose")


def relu20_oversized() -> nn.Module:
    """He init times 2: each layer doubles the backward signal (exploding towards the input)."""
    model = mlp("relu", "he")
    with torch.no_grad():
        for m in model[:-1]:
            if isinstance(m, nn.Linear):
                m.weight.mul_(2.0)
    return model


def gpt2_tiny() -> nn.Module:
    """A randomly initialised GPT-2 from a small config (no download)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=4, n_head=4)
    return GPT2LMHeadModel(config)


def tanh20_chaotic() -> nn.Module:
    """tanh with weight std 5/sqrt(fan_in): the chaotic phase, chi ~ 2.8 per layer (bounded forward signal)."""
    model = mlp("tanh")
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=5.0 / m.in_features**0.5)
    return model


def overflowing() -> nn.Module:
    """Weights so large that the float32 forward pass overflows to inf: NaN gradients at init."""
    model = mlp("relu", depth=3, width=16)
    with torch.no_grad():
        model[2].weight.fill_(1e38)
    return model
