"""A bracketed scalar root finder (Brent's method), so that the core needs no SciPy."""

from __future__ import annotations

import math
from collections.abc import Callable


def find_root(
    f: Callable[[float], float],
    lo: float,
    hi: float,
    *,
    xtol: float = 2e-12,
    rtol: float = 4 * 2.220446049250313e-16,
    max_iter: int = 100,
) -> float:
    """A root of ``f`` in ``[lo, hi]``, where ``f(lo)`` and ``f(hi)`` have opposite signs.

    Brent's method: inverse quadratic interpolation or the secant step when it stays well inside the
    bracket and shrinks it fast enough, bisection otherwise, so the bracket always holds a sign change
    and convergence is never slower than bisection's (superlinear near a simple root). The step rule
    follows SciPy's ``brentq`` (``scipy/optimize/Zeros/brentq.c``), so results agree with it.

    Args:
        f: a continuous function of one float.
        lo, hi: the bracket's ends (either order).
        xtol, rtol: stop when the bracket's half-width is below ``(xtol + rtol * |x|) / 2``; absolute
            and relative, in the units of ``x``.
        max_iter: most iterations (each evaluates ``f`` once).

    Returns:
        ``x`` with ``f(x) == 0`` or within the tolerance of a sign change of ``f``.

    Raises:
        ValueError: ``f(lo)`` and ``f(hi)`` have the same sign or one is NaN, ``f`` returns NaN inside
            the bracket, a tolerance is negative, or no convergence in ``max_iter`` iterations.

    References:
        Brent, *Algorithms for Minimization without Derivatives*, 1973, chapter 4.

    Example:
        >>> round(find_root(lambda x: x * x - 2.0, 0.0, 2.0), 12)
        1.414213562373
    """
    if xtol < 0 or rtol < 0:
        raise ValueError(f"xtol and rtol must be >= 0, got {xtol} and {rtol}")
    x_pre, x_cur = float(lo), float(hi)
    f_pre, f_cur = float(f(x_pre)), float(f(x_cur))
    if math.isnan(f_pre) or math.isnan(f_cur):
        raise ValueError(f"f is NaN at an end of the bracket [{lo}, {hi}]: f={f_pre}, {f_cur}")
    if f_pre == 0:
        return x_pre
    if f_cur == 0:
        return x_cur
    if (f_pre > 0) == (f_cur > 0):
        raise ValueError(f"f({lo}) = {f_pre} and f({hi}) = {f_cur} have the same sign: no bracketed root")
    x_blk = f_blk = s_pre = s_cur = 0.0
    for _ in range(max_iter):
        if f_pre != 0 and f_cur != 0 and (f_pre > 0) != (f_cur > 0):  # the sign change is [x_pre, x_cur]
            x_blk, f_blk = x_pre, f_pre
            s_pre = s_cur = x_cur - x_pre
        if abs(f_blk) < abs(f_cur):  # x_cur: the best estimate so far
            x_pre, x_cur, x_blk = x_cur, x_blk, x_cur
            f_pre, f_cur, f_blk = f_cur, f_blk, f_cur
        delta = (xtol + rtol * abs(x_cur)) / 2
        s_bis = (x_blk - x_cur) / 2
        if f_cur == 0 or abs(s_bis) < delta:
            return x_cur
        if abs(s_pre) > delta and abs(f_cur) < abs(f_pre):
            if x_pre == x_blk:  # secant
                s_try = -f_cur * (x_cur - x_pre) / (f_cur - f_pre)
            else:  # inverse quadratic interpolation
                d_pre = (f_pre - f_cur) / (x_pre - x_cur)
                d_blk = (f_blk - f_cur) / (x_blk - x_cur)
                s_try = -f_cur * (f_blk * d_blk - f_pre * d_pre) / (d_blk * d_pre * (f_blk - f_pre))
            if 2 * abs(s_try) < min(abs(s_pre), 3 * abs(s_bis) - delta):  # a good, short step
                s_pre, s_cur = s_cur, s_try
            else:
                s_pre = s_cur = s_bis
        else:
            s_pre = s_cur = s_bis
        x_pre, f_pre = x_cur, f_cur
        x_cur += s_cur if abs(s_cur) > delta else math.copysign(delta, s_bis)
        f_cur = float(f(x_cur))
        if math.isnan(f_cur):
            raise ValueError(f"f is NaN at {x_cur}, inside the bracket [{lo}, {hi}]")
    raise ValueError(f"no root within tolerance after {max_iter} iterations in [{lo}, {hi}]")
