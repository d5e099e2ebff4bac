"""Gaussian integrals of an activation: moments, the variance map, its fixed point q* and the gain chi.

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

References:
    Poole et al., "Exponential expressivity in deep neural networks through transient chaos", 2016,
    arXiv:1606.05340 (the variance map and q*). Schoenholz et al., "Deep Information Propagation", 2017,
    arXiv:1611.01232 (chi_1 and the depth scale xi_nabla).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import nn

from gradsentry._roots import find_root

__all__ = ["PANEL_WIDTH", "Phi", "chi", "depth_scale", "fixed_point", "moments", "variance_map"]

PANEL_WIDTH = 0.25
"""Width (in units of the pre-activation ``h``) of the composite Gauss-Legendre panels used by default."""

_PANEL_NODES = 8
_MAX_PANELS = 20_000

Phi = Callable[[Any], Any]
"""An elementwise activation: an ``nn.Module``, a torch function or a numpy function."""


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
