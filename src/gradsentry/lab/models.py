"""Deep MLPs for the lab: sigmoid/tanh/ReLU, three initialisations, optional residual and batch norm.

Architecture (``depth`` hidden blocks, then a linear head)::

    x [N, in] -> blocks.0 -> blocks.1 -> ... -> blocks.{depth-1} -> head -> logits [N, classes]
    block i:   z = fc(h)            Linear(width_in, width)
               z = bn(z)            BatchNorm1d(width), only with ``batchnorm=True`` (before the activation,
                                    as in Ioffe & Szegedy 2015, arXiv:1502.03167)
               a = act(z)           Sigmoid / Tanh / ReLU module (so activation hooks see it)
               h = h + a            with ``residual=True`` (He et al. 2016, arXiv:1512.03385) for every block
                                    whose input width equals ``width``; otherwise h = a

Layer names are stable: ``blocks.{i}.fc``, ``blocks.{i}.bn``, ``blocks.{i}.act``, ``head``.

Initialisations:
    * ``default``: PyTorch's ``nn.Linear`` default (weights U(-1/sqrt(fan_in), 1/sqrt(fan_in)), i.e.
      variance 1/(3 fan_in), a gain of 1/sqrt(3) per layer before the activation's own factor);
    * ``he``: He et al. 2015 (arXiv:1502.01852) normal init, variance 2/fan_in, zero biases;
    * ``oversized``: He init multiplied by ``init_gain`` (> 1): with ReLU each layer multiplies the
      signal (and the backward gradient) by about ``init_gain``, so both grow geometrically with depth.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import nn

Activation = Literal["sigmoid", "tanh", "relu"]
Init = Literal["default", "he", "oversized"]
ACTIVATIONS: tuple[str, ...] = get_args(Activation)
INITS: tuple[str, ...] = get_args(Init)

_ACT_MODULES: dict[str, type[nn.Module]] = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU}


class Block(nn.Module):
    """One hidden block: ``fc -> [bn] -> act``, with an optional identity shortcut ``h + act(...)``."""

    def __init__(
        self, width_in: int, width: int, activation: Activation, *, batchnorm: bool, residual: bool
    ) -> None:
        super().__init__()
        self.fc = nn.Linear(width_in, width)
        self.bn = nn.BatchNorm1d(width) if batchnorm else None
        self.act = _ACT_MODULES[activation]()
        self.residual = residual and width_in == width

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.fc(h)
        if self.bn is not None:
            z = self.bn(z)
        a = self.act(z)
        return h + a if self.residual else a


class DeepMLP(nn.Module):
    """A deep multilayer perceptron (see the module docstring for the layout and names).

    Args:
        in_features: input features per example (64 for the digits).
        n_classes: output logits per example.
        depth: number of hidden blocks (>= 1).
        width: units per hidden block (>= 1).
        activation: ``"sigmoid"``, ``"tanh"`` or ``"relu"``.
        init: ``"default"``, ``"he"`` or ``"oversized"``.
        init_gain: factor on the He standard deviation for ``init="oversized"`` (dimensionless).
        residual: add identity shortcuts ``h + F(h)``.
        batchnorm: batch normalization before each hidden activation.

    Raises:
        ValueError: on a non-positive depth or width, an unknown activation or init.

    Example:
        >>> m = build_mlp(depth=3, width=8, activation="relu", init="he")
        >>> m(torch.zeros(2, 64)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        in_features: int,
        n_classes: int,
        depth: int,
        width: int,
        activation: Activation,
        init: Init = "default",
        *,
        init_gain: float = 1.0,
        residual: bool = False,
        batchnorm: bool = False,
    ) -> None:
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError(f"depth and width must be >= 1, got depth={depth}, width={width}")
        if activation not in _ACT_MODULES:
            raise ValueError(f"unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; valid: {', '.join(INITS)}")
        self.blocks = nn.ModuleList(
            Block(in_features if i == 0 else width, width, activation, batchnorm=batchnorm, residual=residual)
            for i in range(depth)
        )
        self.head = nn.Linear(width, n_classes)
        if init != "default":
            gain = init_gain if init == "oversized" else 1.0
            for lin in self.linears():
                nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
                with torch.no_grad():
                    lin.weight.mul_(gain)
                nn.init.zeros_(lin.bias)

    def linears(self) -> list[nn.Linear]:
        """The Linear layers in forward order: ``blocks.0.fc`` ... ``blocks.{depth-1}.fc``, ``head``."""
        return [block.fc for block in self.hidden_blocks()] + [self.head]

    def hidden_blocks(self) -> list[Block]:
        """The hidden blocks in forward order."""
        return [b for b in self.blocks if isinstance(b, Block)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``x`` ``[N, in_features]`` to logits ``[N, n_classes]``."""
        h = x
        for block in self.hidden_blocks():
            h = block(h)
        return self.head(h)  # type: ignore[no-any-return]


def build_mlp(
    depth: int = 20,
    width: int = 64,
    activation: Activation = "sigmoid",
    init: Init = "default",
    *,
    init_gain: float = 1.0,
    residual: bool = False,
    batchnorm: bool = False,
    in_features: int = 64,
    n_classes: int = 10,
) -> DeepMLP:
    """Build a :class:`DeepMLP` for the digits (64 inputs, 10 classes by default); see that class."""
    return DeepMLP(
        in_features,
        n_classes,
        depth,
        width,
        activation,
        init,
        init_gain=init_gain,
        residual=residual,
        batchnorm=batchnorm,
    )
