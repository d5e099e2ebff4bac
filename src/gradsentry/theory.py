"""Mean-field signal propagation: forward variance map, fixed point q*, backward gain chi.

For a stack of fully-connected layers ``h_l = W_l x_{l-1} + b_l``, ``x_l = phi(h_l)``, with i.i.d.
zero-mean weights of variance ``sigma_w^2 / fan_in`` and biases of variance ``sigma_b^2``, the mean-field
theory of Poole et al. 2016 and Schoenholz et al. 2017 says that, for large width, every pre-activation is
Gaussian with second moment ``q_l`` and

* forward:  ``q_l = sigma_w^2 E[phi(sqrt(q_{l-1}) z)^2] + sigma_b^2`` (``z ~ N(0, 1)``). It is the *second
  moment* ``E[phi^2]`` (not the variance) of the previous activation that feeds the next pre-activation,
  because the weights have zero mean: a sigmoid's mean 0.5 counts in full;
* backward: the squared backward signal ``dL/dh`` (per unit) is multiplied, per layer, by
  ``chi = sigma_w^2 E[phi'(sqrt(q) z)^2]``, so the gradient decays (``chi < 1``) or grows (``chi > 1``)
  geometrically with depth, over the depth scale ``-1/ln(chi)`` layers.

Expectations ``E[f(h)]``, ``h ~ N(0, q)``, are Gaussian quadratures for any elementwise activation given as
a torch or numpy callable (derivatives by autograd, or by central differences for numpy callables). The
default rule is composite Gauss-Legendre: panels of width ``<= min(0.25, sqrt(q)/4)`` in ``h`` over
``|h| <= 8.5 sqrt(q)``, 8 nodes each, with panel edges at every multiple of 0.25 (kinks of ReLU-like and
hard activations). Gauss-Hermite (probabilists' weights,
:func:`numpy.polynomial.hermite_e.hermegauss`, ``hermite_nodes=n``) is available and exact to ~1e-14 for
tanh/sigmoid at ``q <= 1`` with 200 nodes, but its nodes spread as ``sqrt(q)`` while an activation's features
stay at width ~1 in ``h``: for tanh at ``q = 25`` it is off by 1e-2 (96 nodes), and kinks (hardtanh at
``h = +-1``) cost it 3-7 % at ``q ~ 1``. ReLU, leaky ReLU and
the identity use their closed forms (``E[relu(sqrt(q) z)^2] = q/2``, ``E[relu'^2] = 1/2``).

Assumptions (what :func:`predict` relies on): large width (fluctuations of order 1/width per layer are
ignored, so the spread between seeds grows with depth), weights i.i.d. and independent of the signal,
and convolutions treated by fan-in (padding borders and strides ignored). Beyond chains of Linear/Conv
layers and elementwise activations, :func:`predict` follows residual sums, normalization layers and
average pooling through the ``torch.fx`` graph (:mod:`gradsentry.propagation`, which lists its rules
and what gets no prediction); a forward ``torch.fx`` cannot trace falls back to a plain chain traced
with forward hooks.

References:
    Poole et al., "Exponential expressivity in deep neural networks through transient chaos", 2016,
    arXiv:1606.05340. Schoenholz et al., "Deep Information Propagation", 2017, arXiv:1611.01232.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import nn

from gradsentry._roots import find_root

log = logging.getLogger("gradsentry")

PANEL_WIDTH = 0.25
"""Width (in units of the pre-activation ``h``) of the composite Gauss-Legendre panels used by default."""

_PANEL_NODES = 8
_MAX_PANELS = 20_000

LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""Layer types whose init variance :func:`predict` reads (Conv by fan-in)."""

ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.GELU,
    nn.SiLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.Softplus,
    nn.Mish,
    nn.Hardtanh,
    nn.ReLU6,
    nn.Hardsigmoid,
    nn.Hardswish,
    nn.Softsign,
    nn.Tanhshrink,
    nn.LogSigmoid,
)
"""Elementwise activation modules the theory understands (any elementwise callable works in :func:`chi`)."""

NEUTRAL_TYPES: tuple[type[nn.Module], ...] = (nn.Flatten, nn.Identity, nn.Unflatten)
"""Modules that do not change the per-unit statistics."""

Phi = Callable[[Any], Any]


class TheoryNotApplicable(ValueError):
    """The model is not a plain chain of Linear/Conv layers and elementwise activations."""


@lru_cache(maxsize=8)
def _nodes(n: int) -> tuple[np.ndarray, np.ndarray]:
    x, w = np.polynomial.hermite_e.hermegauss(n)
    return x, w / math.sqrt(2.0 * math.pi)


def _gauss_rule(q: float, hermite_nodes: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Points ``h`` and weights ``w`` with ``sum(w f(h)) ~ E[f(h)]`` for ``h ~ N(0, q)``."""
    sd = math.sqrt(q)
    if hermite_nodes is not None:
        x, w = _nodes(hermite_nodes)
        return sd * x, w
    # panel width PANEL_WIDTH / m (m integer) so that every multiple of PANEL_WIDTH is an edge: kinks at
    # 0, +-1 (hardtanh), +-3 (hardsigmoid), 6 (ReLU6) fall on edges
    width = PANEL_WIDTH / math.ceil(PANEL_WIDTH / (sd / 4))
    per_side = math.ceil(8.5 * sd / width)
    if per_side > _MAX_PANELS // 2:
        per_side = _MAX_PANELS // 2
        width = 8.5 * sd / per_side
    edges = width * np.arange(-per_side, per_side + 1, dtype=np.float64)
    gx, gw = np.polynomial.legendre.leggauss(_PANEL_NODES)
    mid, half = (edges[1:] + edges[:-1]) / 2, (edges[1:] - edges[:-1]) / 2
    h = (mid[:, None] + half[:, None] * gx[None, :]).ravel()
    w = (half[:, None] * gw[None, :]).ravel() * np.exp(-h * h / (2 * q)) / (sd * math.sqrt(2 * math.pi))
    return h, w


def _phi_and_derivative(phi: Phi, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Evaluate ``phi`` and ``phi'`` at ``xs`` (float64): autograd for torch callables, else differences."""
    try:
        t = torch.tensor(xs, dtype=torch.float64, requires_grad=True)
        y = phi(t.clone())  # clone: in-place activations (ReLU(inplace=True)) must not touch the leaf
        if isinstance(y, torch.Tensor):
            (g,) = torch.autograd.grad(y.sum(), t, allow_unused=True)
            dy = np.zeros_like(xs) if g is None else g.detach().numpy()
            return y.detach().numpy().astype(np.float64), dy.astype(np.float64)
    except (TypeError, RuntimeError, AttributeError):
        pass
    y = np.asarray(phi(xs), dtype=np.float64)
    eps = 1e-6 * np.maximum(1.0, np.abs(xs))
    dy = (np.asarray(phi(xs + eps), dtype=np.float64) - np.asarray(phi(xs - eps), dtype=np.float64)) / (
        2 * eps
    )
    return y, dy


def _closed_form(phi: Phi) -> tuple[float, float] | None:
    """``(a, b)`` with ``E[phi(sqrt(q) z)^2] = a q`` and ``E[phi'^2] = b`` for positively homogeneous phi."""
    if phi is torch.relu or phi is torch.nn.functional.relu or isinstance(phi, nn.ReLU):
        return 0.5, 0.5
    if isinstance(phi, nn.LeakyReLU):
        s = float(phi.negative_slope)
        return (1 + s * s) / 2, (1 + s * s) / 2
    if isinstance(phi, nn.Identity):
        return 1.0, 1.0
    return None


def moments(phi: Phi, q: float, *, hermite_nodes: int | None = None) -> tuple[float, float, float]:
    """Gaussian moments of an activation at pre-activation second moment ``q``.

    Args:
        phi: elementwise activation: an ``nn.Module`` (``nn.Tanh()``), a torch function (``torch.tanh``)
            or a numpy function (``np.tanh``).
        q: second moment (variance, zero mean) of the pre-activation, ``q >= 0``.
        hermite_nodes: use Gauss-Hermite quadrature with this many nodes (accurate for smooth activations
            at ``q <~ 1``); default None: composite Gauss-Legendre (see the module docstring).

    Returns:
        ``(E[phi(h)], E[phi(h)^2], E[phi'(h)^2])`` for ``h ~ N(0, q)``.

    Raises:
        ValueError: if ``q`` is negative or not finite.
    """
    if not math.isfinite(q) or q < 0:
        raise ValueError(f"q must be a finite second moment >= 0, got {q!r}")
    closed = _closed_form(phi)
    if closed is not None and not isinstance(phi, nn.Identity):
        slope = float(phi.negative_slope) if isinstance(phi, nn.LeakyReLU) else 0.0
        return (1 - slope) * math.sqrt(q / (2 * math.pi)), closed[0] * q, closed[1]
    if closed is not None:
        return 0.0, q, 1.0
    if q == 0:
        y, dy = _phi_and_derivative(phi, np.zeros(1))
        return float(y[0]), float(y[0] ** 2), float(dy[0] ** 2)
    h, w = _gauss_rule(q, hermite_nodes)
    y, dy = _phi_and_derivative(phi, h)
    return float(w @ y), float(w @ (y * y)), float(w @ (dy * dy))


def variance_map(
    phi: Phi, q: float, sigma_w2: float, sigma_b2: float = 0.0, *, hermite_nodes: int | None = None
) -> float:
    """One layer of the forward map ``q -> sigma_w^2 E[phi(sqrt(q) z)^2] + sigma_b^2`` (dimensionless)."""
    return sigma_w2 * moments(phi, q, hermite_nodes=hermite_nodes)[1] + sigma_b2


def fixed_point(
    phi: Phi,
    sigma_w2: float,
    sigma_b2: float = 0.0,
    *,
    q0: float = 1.0,
    tol: float = 1e-12,
    max_iter: int = 2000,
    hermite_nodes: int | None = None,
) -> float:
    """Fixed point ``q*`` of :func:`variance_map`, reached by iterating from ``q0``.

    Returns ``0.0`` when the map collapses to zero (e.g. tanh with ``sigma_w^2 <= 1``, ``sigma_b = 0``:
    convergence is only algebraic there, so a collapse is detected and confirmed by the sign of
    ``map(q) - q`` near 0) and ``inf`` when it diverges (ReLU with ``sigma_w^2 > 2``).
    """
    q = float(q0)
    for _ in range(max_iter):
        nxt = variance_map(phi, q, sigma_w2, sigma_b2, hermite_nodes=hermite_nodes)
        if not math.isfinite(nxt) or nxt > 1e12:
            return math.inf
        if abs(nxt - q) <= tol * max(1.0, q):
            return nxt
        prev, q = q, nxt
        if q < 0.05 and q < prev:  # falling towards 0, possibly algebraically slowly: bracket a root below q

            def g(v: float) -> float:
                return variance_map(phi, v, sigma_w2, sigma_b2, hermite_nodes=hermite_nodes) - v

            lo = 1e-14
            if g(q) < 0:
                if g(lo) <= 0:
                    return 0.0
                return find_root(g, lo, q, xtol=1e-16, rtol=1e-12)
    return q


def chi(
    phi: Phi,
    sigma_w2: float,
    sigma_b2: float = 0.0,
    *,
    q: float | None = None,
    hermite_nodes: int | None = None,
) -> float:
    """Backward mean-field gain ``chi = sigma_w^2 E[phi'(sqrt(q) z)^2]`` (Schoenholz et al. 2017's chi_1).

    The factor by which one layer multiplies the squared backward signal (per unit). ``chi < 1``: vanishing,
    ``chi > 1``: exploding, ``chi = 1``: critical (edge of chaos).

    Args:
        phi: elementwise activation (module, torch or numpy callable).
        sigma_w2: weight variance times fan-in (1/3 for PyTorch's default Linear init, 2 for He/ReLU).
        sigma_b2: bias variance.
        q: pre-activation second moment; default: the fixed point :func:`fixed_point`.
        hermite_nodes: Gauss-Hermite nodes, or None for composite Gauss-Legendre (see :func:`moments`).

    Returns:
        chi (dimensionless, >= 0).

    Example:
        >>> round(chi(torch.nn.ReLU(), 2.0), 6)
        1.0
    """
    if q is None:
        q = fixed_point(phi, sigma_w2, sigma_b2, hermite_nodes=hermite_nodes)
        if not math.isfinite(q):
            q = 1e6
    return sigma_w2 * moments(phi, q, hermite_nodes=hermite_nodes)[2]


def depth_scale(chi_value: float) -> float:
    """Gradient depth scale ``-1/ln(chi)`` in layers (Schoenholz et al. 2017, xi_nabla).

    Positive for vanishing (the squared gradient falls by ``e`` every ``xi`` layers), negative for exploding,
    ``inf`` at criticality ``chi = 1``, ``0`` for ``chi = 0``.
    """
    if chi_value <= 0:
        return 0.0
    if chi_value == 1.0:
        return math.inf
    return -1.0 / math.log(chi_value)


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


def trace_forward(model: nn.Module, example_input: Any) -> tuple[list[tuple[str, nn.Module, Any, Any]], Any]:
    """Run one forward pass (no grad) and return the leaf modules as ``(name, module, input, output)``
    in the order they ran, and the model's output. Hooks are removed and the train/eval mode is untouched."""
    calls: list[tuple[str, nn.Module, Any, Any]] = []
    handles = []
    for name, mod in model.named_modules():
        if next(mod.children(), None) is None:

            def hook(m: nn.Module, args: tuple[Any, ...], out: Any, _n: str = name) -> None:
                calls.append((_n, m, args[0] if args else None, out))

            handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            result = model(*example_input) if isinstance(example_input, tuple) else model(example_input)
    finally:
        for h in handles:
            h.remove()
    return calls, result


def _chain_leaves(model: nn.Module, example_input: Any | None) -> list[tuple[str, nn.Module]]:
    if example_input is None:
        if not isinstance(model, nn.Sequential):
            raise TheoryNotApplicable(
                f"{type(model).__name__} is not an nn.Sequential: pass example_input so that the forward "
                "order and the chain structure can be traced"
            )
        return [(n, m) for n, m in model.named_modules() if next(m.children(), None) is None]
    calls, result = trace_forward(model, example_input)
    first = example_input[0] if isinstance(example_input, tuple) else example_input
    prev: Any = first
    out: list[tuple[str, nn.Module]] = []
    for name, mod, inp, outp in calls:
        if inp is not prev and not (
            isinstance(inp, torch.Tensor)
            and isinstance(prev, torch.Tensor)
            and inp.data_ptr() == prev.data_ptr()
            and inp.shape == prev.shape
        ):
            raise TheoryNotApplicable(
                f"module {name!r} ({type(mod).__name__}) does not take the previous module's output: "
                "the model is not a plain chain (residual connection, functional op or normalization "
                "in forward)"
            )
        prev = outp
        out.append((name, mod))
    if result is not prev:
        raise TheoryNotApplicable(
            "the model's output is not its last module's output: the model is not a plain chain "
            "(residual connection or functional op after the last module)"
        )
    return out


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
            residual sums, normalization and average pooling (see :mod:`gradsentry.propagation`); a forward
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
    from gradsentry.propagation import predict_graph

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
    for name, mod in model.named_modules():  # cheap structural check before any forward pass
        if next(mod.children(), None) is None and not isinstance(
            mod, (*LINEAR_TYPES, *ACTIVATION_TYPES, *NEUTRAL_TYPES, nn.Dropout)
        ):
            raise TheoryNotApplicable(
                f"module {name!r} ({type(mod).__name__}) is outside the mean-field chain "
                "(Linear/Conv + elementwise activation)"
            )
    leaves = _chain_leaves(model, example_input)
    if input_second_moment is None:
        if example_input is not None:
            x = example_input[0] if isinstance(example_input, tuple) else example_input
            input_second_moment = float(x.detach().double().pow(2).mean())
        else:
            input_second_moment = 1.0
    entries: list[tuple[str, nn.Module, nn.Module | None]] = []
    for name, mod in leaves:
        if isinstance(mod, LINEAR_TYPES):
            entries.append((name, mod, None))
        elif isinstance(mod, ACTIVATION_TYPES):
            if not entries or entries[-1][2] is not None:
                raise TheoryNotApplicable(f"activation {name!r} does not directly follow a Linear/Conv layer")
            entries[-1] = (entries[-1][0], entries[-1][1], mod)
        elif isinstance(mod, NEUTRAL_TYPES) or (
            isinstance(mod, nn.Dropout) and (mod.p == 0 or not mod.training)
        ):
            continue
        else:
            raise TheoryNotApplicable(
                f"module {name!r} ({type(mod).__name__}) is outside the mean-field chain "
                "(Linear/Conv + elementwise activation)"
            )
    if not entries:
        raise TheoryNotApplicable("the model has no Linear/Conv layer")
    pred = Prediction(input_second_moment=input_second_moment)
    m2 = input_second_moment
    for name, mod, act in entries:
        fan_in, fan_out = _fans(mod)
        w = mod.weight.detach().double()  # type: ignore[operator]
        sigma_w2 = float(w.var(unbiased=False)) * fan_in
        b = getattr(mod, "bias", None)
        sigma_b2 = float(b.detach().double().pow(2).mean()) if isinstance(b, torch.Tensor) else 0.0
        q = sigma_w2 * m2 + sigma_b2
        phi: Phi = act if act is not None else nn.Identity()
        _, act_m2, dphi2 = moments(phi, q, hermite_nodes=hermite_nodes)
        pred.layers.append(
            LayerPrediction(
                name=name,
                type=type(mod).__name__,
                activation=type(phi).__name__,
                fan_in=fan_in,
                fan_out=fan_out,
                sigma_w2=sigma_w2,
                sigma_b2=sigma_b2,
                q=q,
                act_second_moment=act_m2,
                dphi2=dphi2,
            )
        )
        pred.layers[-1].weight_grad_rms = math.sqrt(m2)  # input RMS, multiplied by backward RMS below
        pred.layers[-1].input_rms = math.sqrt(m2)
        pred.layers[-1].n_weight = int(mod.weight.numel())  # type: ignore[operator]
        pred.layers[-1].n_bias = int(b.numel()) if isinstance(b, torch.Tensor) else 0
        m2 = act_m2
    back2 = 1.0
    inputs_rms = [lp.weight_grad_rms for lp in pred.layers]
    for i in range(len(pred.layers) - 1, -1, -1):
        lp = pred.layers[i]
        if i < len(pred.layers) - 1:
            nxt = pred.layers[i + 1]
            lp.chi = nxt.sigma_w2 * (nxt.fan_out / nxt.fan_in) * lp.dphi2
            back2 *= lp.chi
        lp.backward_rms = math.sqrt(back2)
        lp.weight_grad_rms = lp.backward_rms * inputs_rms[i] / inputs_rms[-1]
        lp.grad_rms = lp.backward_rms * _mix(lp)
    last = _mix(pred.layers[-1])
    for lp in pred.layers:
        lp.grad_rms /= last
    return pred


def _mix(lp: LayerPrediction) -> float:
    """RMS over a layer's weight and bias entries of (input RMS, 1): the per-entry gradient scale for a unit
    backward signal (weight entries: the input; bias entries: 1)."""
    n = lp.n_weight + lp.n_bias
    if n == 0:
        return lp.input_rms
    return math.sqrt((lp.n_weight * lp.input_rms**2 + lp.n_bias) / n)
