"""Per-layer predictions: :func:`predict` and the records it returns.

:func:`predict` propagates the mean-field statistics (Poole et al. 2016, arXiv:1606.05340: forward
second moments; Schoenholz et al. 2017, arXiv:1611.01232: the backward gain ``chi``) through the model's
``torch.fx`` graph (:mod:`gradsentry.theory.graph`); a forward ``torch.fx`` cannot trace falls back to a
plain chain traced with forward hooks (:mod:`gradsentry.theory.chain`). What gets a prediction and what
does not is listed in :mod:`gradsentry.theory.coverage`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from torch import nn

from gradsentry.theory.coverage import TheoryNotApplicable

__all__ = ["LayerPrediction", "Prediction", "predict"]

log = logging.getLogger("gradsentry")


@dataclass
class LayerPrediction:
    """Mean-field prediction for one Linear/Conv layer and the activation that follows it.

    Attributes:
        name: qualified module name.
        type: module class name.
        activation: activation class name (``"Identity"`` when none follows).
        fan_in: inputs per output unit (Conv: in_channels/groups x kernel size).
        fan_out: outputs per input unit (Conv: out_channels x kernel size), used for the backward pass.
        sigma_w2: empirical weight variance x fan_in (read from the weights).
        sigma_b2: empirical bias second moment (0 without bias).
        q: predicted pre-activation second moment ``E[h^2]``.
        act_second_moment: ``E[phi(h)^2]``, what feeds the next layer.
        dphi2: ``E[phi'(h)^2]``.
        chi: gain on the squared per-unit backward signal from the next layer's pre-activation into this
            one, ``sigma_w,next^2 (fan_out_next / fan_in_next) E[phi'(h)^2]``; None for the last layer.
        backward_rms: predicted RMS of dL/dh (per unit) relative to the last layer (= 1).
        weight_grad_rms: predicted RMS of dL/dW relative to the last layer (= 1): backward RMS times the
            RMS of the layer's input; correlations between the samples of a batch are ignored.
        input_rms: predicted RMS of the layer's input (``sqrt`` of the second moment that feeds it), in the
            input's units.
        n_weight: weight entries of the layer.
        n_bias: bias entries (0 without bias).
        grad_rms: predicted RMS of the layer's *whole* per-example gradient (weight and bias entries
            together), relative to the last layer's (= 1): ``backward_rms * sqrt((n_weight * input_rms^2 +
            n_bias) / (n_weight + n_bias))``, since a bias entry's gradient is the backward signal itself and
            a weight entry's is the backward signal times the input. This is what ``gradsentry check``
            measures per example; where the input shrinks with depth (ReLU with Xavier init) the bias
            entries dominate and this profile falls while ``weight_grad_rms`` stays flat.
    """

    name: str
    type: str
    activation: str
    fan_in: int
    fan_out: int
    sigma_w2: float
    sigma_b2: float
    q: float
    act_second_moment: float
    dphi2: float
    chi: float | None = None
    backward_rms: float = 1.0
    weight_grad_rms: float = 1.0
    input_rms: float = 1.0
    n_weight: int = 0
    n_bias: int = 0
    grad_rms: float = 1.0


@dataclass
class Prediction:
    """Per-layer mean-field predictions for a chain model, in forward order (see :func:`predict`)."""

    input_second_moment: float
    layers: list[LayerPrediction] = field(default_factory=list)

    def backward_ratio(self, first: int = 0, last: int = -1) -> float:
        """Predicted RMS ratio of dL/dh between layers ``first`` and ``last`` (by index)."""
        return self.layers[first].backward_rms / self.layers[last].backward_rms

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fans(module: nn.Module) -> tuple[int, int]:
    shape = tuple(module.weight.shape)  # type: ignore[arg-type]
    if isinstance(module, nn.Linear):
        return int(shape[1]), int(shape[0])
    receptive = int(np.prod(shape[2:]))
    groups = max(1, int(getattr(module, "groups", 1)))
    return int(shape[1]) * receptive, int(shape[0]) * receptive // groups


def predict(
    model: nn.Module,
    *,
    input_second_moment: float | None = None,
    example_input: Any | None = None,
    hermite_nodes: int | None = None,
) -> Prediction:
    """Predict the per-layer forward second moments and backward gradient profile of a chain model at init.

    Reads every Linear/Conv layer's actual init, ``sigma_w^2 = var(W) * fan_in`` and
    ``sigma_b^2 = mean(b^2)``, and the activation module that follows it; iterates the layer-by-layer
    (not fixed-point) variance map from the input's second moment; then multiplies the per-layer gains
    backwards from the last layer.

    Args:
        model: any module ``torch.fx`` can trace built from Linear/Conv layers, elementwise activations,
            residual sums, normalization and average pooling (see :mod:`gradsentry.theory.graph`); a forward
            it cannot trace must be a plain chain, and then ``example_input`` is required.
        input_second_moment: mean of ``x^2`` over the input entries; default: from ``example_input``, else 1.
        example_input: a batch ``[N, ...]`` (or a tuple of positional inputs) used to trace the forward order.
        hermite_nodes: Gauss-Hermite nodes, or None for composite Gauss-Legendre (see :func:`moments`).

    Returns:
        A :class:`Prediction` with one :class:`LayerPrediction` per Linear/Conv layer in forward order.

    Example:
        >>> m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        >>> p = predict(m, input_second_moment=1.0)
        >>> round(p.layers[0].chi / (p.layers[1].sigma_w2 / 2), 6)  # ReLU, equal widths: chi = sigma_w^2 / 2
        1.0
        >>> p.layers[-1].backward_rms
        1.0

    Raises:
        TheoryNotApplicable: the model holds something the propagation does not cover (attention, a
            recurrence or any layer called twice, an embedding, a product of tensors...: the message says
            which), or has no Linear/Conv layer.
    """
    from gradsentry.theory.graph import predict_graph

    try:
        return predict_graph(
            model,
            example_input=example_input,
            input_second_moment=input_second_moment,
            hermite_nodes=hermite_nodes,
        )
    except TheoryNotApplicable:
        raise
    except Exception as exc:  # torch.fx cannot trace this forward: a plain chain traced with hooks still can
        log.debug(
            "gradsentry: torch.fx could not trace %s (%s); tracing a plain chain", type(model).__name__, exc
        )
    from gradsentry.theory.chain import predict_chain

    return predict_chain(
        model,
        input_second_moment=input_second_moment,
        example_input=example_input,
        hermite_nodes=hermite_nodes,
    )


def _mix(lp: LayerPrediction) -> float:
    """RMS over a layer's weight and bias entries of (input RMS, 1): the per-entry gradient scale for a unit
    backward signal (weight entries: the input; bias entries: 1)."""
    n = lp.n_weight + lp.n_bias
    if n == 0:
        return lp.input_rms
    return math.sqrt((lp.n_weight * lp.input_rms**2 + lp.n_bias) / n)
