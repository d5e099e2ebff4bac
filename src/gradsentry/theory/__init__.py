"""Mean-field signal propagation: forward variance map, fixed point q*, backward gain chi, predictions.

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

The package, one job per module:

* :mod:`~gradsentry.theory.gaussian`: the Gaussian integrals (:func:`moments`, :func:`variance_map`,
  :func:`fixed_point`, :func:`chi`, :func:`depth_scale`) and their quadrature;
* :mod:`~gradsentry.theory.prediction`: :func:`predict` and its records (:class:`Prediction`,
  :class:`LayerPrediction`);
* :mod:`~gradsentry.theory.graph`: the propagation over a ``torch.fx`` graph (residual sums,
  normalization, pooling, functional activations; formerly ``gradsentry.propagation``);
* :mod:`~gradsentry.theory.chain`: the fallback for forwards ``torch.fx`` cannot trace (a plain chain);
* :mod:`~gradsentry.theory.coverage`: what is covered, what is not and why (:class:`TheoryNotApplicable`).

Assumptions (what :func:`predict` relies on): large width (fluctuations of order 1/width per layer are
ignored, so the spread between seeds grows with depth), weights i.i.d. and independent of the signal,
and convolutions treated by fan-in (padding borders and strides ignored).

References:
    Poole et al., "Exponential expressivity in deep neural networks through transient chaos", 2016,
    arXiv:1606.05340. Schoenholz et al., "Deep Information Propagation", 2017, arXiv:1611.01232.
    He et al., "Delving Deep into Rectifiers", 2015, arXiv:1502.01852 (fan-in init, sigma_w^2 = 2 for ReLU).
"""

from __future__ import annotations

from gradsentry.theory.chain import trace_forward
from gradsentry.theory.coverage import (
    ACTIVATION_TYPES,
    LINEAR_TYPES,
    NEUTRAL_TYPES,
    NORM_TYPES,
    POOL_TYPES,
    TheoryNotApplicable,
    check_supported,
)
from gradsentry.theory.gaussian import (
    PANEL_WIDTH,
    Phi,
    chi,
    depth_scale,
    fixed_point,
    moments,
    variance_map,
)
from gradsentry.theory.prediction import LayerPrediction, Prediction, predict

__all__ = [
    "ACTIVATION_TYPES",
    "LINEAR_TYPES",
    "NEUTRAL_TYPES",
    "NORM_TYPES",
    "PANEL_WIDTH",
    "POOL_TYPES",
    "LayerPrediction",
    "Phi",
    "Prediction",
    "TheoryNotApplicable",
    "check_supported",
    "chi",
    "depth_scale",
    "fixed_point",
    "moments",
    "predict",
    "trace_forward",
    "variance_map",
]
