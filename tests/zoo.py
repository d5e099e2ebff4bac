"""Tiny models shared by the tests."""

from __future__ import annotations

import torch
from torch import nn


def mlp(
    depth: int,
    width: int = 32,
    act: type[nn.Module] = nn.Sigmoid,
    in_dim: int = 16,
    out_dim: int = 4,
    init: str = "default",
) -> nn.Sequential:
    """``depth`` Linear layers with ``act`` between them (PyTorch default init unless ``init='he'``)."""
    layers: list[nn.Module] = []
    d = in_dim
    for _ in range(depth - 1):
        lin = nn.Linear(d, width)
        if init == "he":
            nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
            nn.init.zeros_(lin.bias)
        layers += [lin, act()]
        d = width
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


class Tied(nn.Module):
    """Embedding and output projection share one weight."""

    def __init__(self, vocab: int = 10, dim: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mid = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mid(self.emb(idx))))


class FrozenAndUnused(nn.Module):
    """A frozen first layer and a branch that forward never calls (its grads stay None)."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(6, 6)
        self.frozen.requires_grad_(False)
        self.used = nn.Linear(6, 3)
        self.unused = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(torch.relu(self.frozen(x)))


class Reversed(nn.Module):
    """Modules registered in the opposite order of the forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.last = nn.Linear(8, 2)
        self.first = nn.Linear(4, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(torch.relu(self.first(x)))
