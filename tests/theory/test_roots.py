"""``gradsentry._roots.find_root`` (Brent's method, replacing SciPy's ``brentq``) against roots derived
by hand, and the mean-field fixed point that uses it against an independent Gauss-Hermite sum."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from torch import nn

from gradsentry import theory
from gradsentry._roots import find_root

# (f, bracket, root derived by hand)
HAND: list[tuple[str, Callable[[float], float], float, float, float]] = [
    ("x^2 - 2 = 0: sqrt 2", lambda x: x * x - 2.0, 0.0, 2.0, math.sqrt(2.0)),
    ("e^x = 3: ln 3", lambda x: math.exp(x) - 3.0, -5.0, 5.0, math.log(3.0)),
    ("(x-1)(x-2)(x-3), middle root", lambda x: (x - 1) * (x - 2) * (x - 3), 1.5, 2.7, 2.0),
    ("cos x = 0 on [1, 2]: pi/2", math.cos, 1.0, 2.0, math.pi / 2),
    ("1/x = 4 (reversed bracket)", lambda x: 1.0 / x - 4.0, 1.0, 0.1, 0.25),
    ("a steep step at 0.3", lambda x: math.tanh(1000.0 * (x - 0.3)), 0.0, 1.0, 0.3),
    ("x = 1e-9 (the theory's scale)", lambda x: x - 1e-9, 1e-14, 0.04, 1e-9),
]


@pytest.mark.parametrize(("name", "f", "lo", "hi", "root"), HAND, ids=[h[0] for h in HAND])
@pytest.mark.parametrize(("xtol", "rtol"), [(2e-12, 8.9e-16), (1e-16, 1e-12)])
def test_hand_derived_roots(
    name: str, f: Callable[[float], float], lo: float, hi: float, root: float, xtol: float, rtol: float
) -> None:
    x = find_root(f, lo, hi, xtol=xtol, rtol=rtol)
    # the bracket's half-width is below (xtol + rtol |x|) / 2 when it stops, plus a few ulps of rounding
    assert abs(x - root) <= xtol + rtol * abs(root) + 4 * math.ulp(root), (name, x, root)


def test_faster_than_bisection_near_a_simple_root() -> None:
    """Wallis's cubic x^3 - 2x - 5 (root 2.0945514815423265): bisection of [2, 3] to 1e-12 needs 40
    halvings; Brent's interpolation steps need far fewer evaluations."""
    calls: list[float] = []

    def f(x: float) -> float:
        calls.append(x)
        return x**3 - 2 * x - 5

    x = find_root(f, 2.0, 3.0, xtol=1e-12, rtol=0.0)
    assert abs(x**3 - 2 * x - 5) < 1e-10
    assert abs(x - 2.0945514815423265) <= 1e-12
    assert len(calls) <= 12, len(calls)


def test_root_at_an_end_is_returned_exactly() -> None:
    assert find_root(lambda x: x - 1.0, 1.0, 5.0) == 1.0
    assert find_root(lambda x: x - 5.0, 1.0, 5.0) == 5.0


@pytest.mark.parametrize(
    ("f", "lo", "hi", "match"),
    [
        (lambda x: x * x + 1.0, -1.0, 1.0, "have the same sign"),
        (lambda x: math.nan, 0.0, 1.0, "NaN at an end"),
        (lambda x: math.nan if 0.2 < x < 0.8 else x - 0.5, 0.0, 1.0, "NaN at 0.5, inside the bracket"),
    ],
    ids=["no sign change", "nan at an end", "nan inside"],
)
def test_bad_brackets_raise(f: Callable[[float], float], lo: float, hi: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        find_root(f, lo, hi)


def test_no_convergence_and_negative_tolerance_raise() -> None:
    with pytest.raises(ValueError, match="no root within tolerance after 3 iterations"):
        find_root(lambda x: math.exp(x) - 3.0, -5.0, 5.0, xtol=0.0, rtol=0.0, max_iter=3)
    with pytest.raises(ValueError, match="must be >= 0"):
        find_root(lambda x: x, -1.0, 1.0, xtol=-1.0)


def test_tanh_fixed_point_below_the_bracket_threshold() -> None:
    """tanh with sigma_w^2 = 1.05, sigma_b = 0: the map falls from q0 = 1 below 0.05, where the fixed
    point is found by the root finder. q* must solve q = 1.05 E[tanh(sqrt(q) z)^2], the expectation
    summed here independently with 200-node probabilists' Gauss-Hermite quadrature (relative 1e-9)."""
    q = theory.fixed_point(nn.Tanh(), 1.05, 0.0)
    z, w = np.polynomial.hermite_e.hermegauss(200)
    mapped = 1.05 * float(np.sum(w * np.tanh(math.sqrt(q) * z) ** 2) / math.sqrt(2 * math.pi))
    assert 0.01 < q < 0.05
    assert mapped == pytest.approx(q, rel=1e-9)
