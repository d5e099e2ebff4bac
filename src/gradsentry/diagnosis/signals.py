"""Pure detectors over one logged signal ``(steps, values)``: the numbers every verdict is built from.

Nothing here knows where the series came from (a Monitor, a log file) or what a finding is; the rules in
:mod:`~gradsentry.diagnosis.series_rules` and :mod:`~gradsentry.diagnosis.layer_rules` decide with these.
Arrays are numpy float64 ``[N]`` aligned with int64 steps ``[N]``; norms and losses must be finite and
positive where a log scale is taken (callers filter first).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gradsentry.diagnosis.thresholds import Thresholds

__all__ = [
    "MAD_TO_SIGMA",
    "find_growth",
    "find_jumps",
    "find_spikes",
    "log_noise",
    "loglinear_fit",
    "loss_harmed",
    "loss_outcome",
    "robust_z",
    "rolling_median",
    "runs",
    "thirds_change",
    "trend_t",
    "window_medians",
]

MAD_TO_SIGMA = 1.4826
"""Scale turning a median absolute deviation into a standard deviation for Gaussian data (1 / Φ⁻¹(3/4))."""


_BLOCK = 65536
"""Rows of the sliding window processed at once by :func:`robust_z` (bounds its temporary memory)."""


def rnd(x: float) -> float:
    """Round for evidence (6 significant digits), keeping NaN/inf."""
    return float(f"{x:.6g}") if math.isfinite(x) else float(x)


_ROWS = 1 << 15
"""Windows per chunk of the windowed medians: their copies stay at ``_ROWS * window`` floats (12 MB for
a window of 50) however long the series (a 1e6-step log would otherwise take 400 MB at once)."""


def _window_medians(x: np.ndarray, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Median and median absolute deviation of every ``w`` consecutive points of ``x`` (row k: points
    k .. k+w-1), computed chunk by chunk."""
    win = np.lib.stride_tricks.sliding_window_view(x, w)
    med = np.empty(win.shape[0])
    mad = np.empty(win.shape[0])
    for a in range(0, win.shape[0], _ROWS):
        chunk = win[a : a + _ROWS]
        m = np.median(chunk, axis=1)
        med[a : a + _ROWS] = m
        mad[a : a + _ROWS] = np.median(np.abs(chunk - m[:, None]), axis=1)
    return med, mad


def window_medians(x: np.ndarray, w: int) -> np.ndarray:
    """Median of every ``w`` consecutive points of ``x`` [N] (row k: points k .. k+w-1): [N - w + 1]."""
    win = np.lib.stride_tricks.sliding_window_view(x, w)
    out = np.empty(win.shape[0])
    for a in range(0, win.shape[0], _ROWS):
        out[a : a + _ROWS] = np.median(win[a : a + _ROWS], axis=1)
    return out


def rolling_median(x: np.ndarray, window: int) -> np.ndarray:
    """Centred rolling median of ``x`` [N] over ``window`` points (shrinking at the edges)."""
    n = x.size
    h = max(0, window // 2)
    out = np.empty(n, dtype=np.float64)
    w = 2 * h + 1
    if n >= w:
        out[h : n - h] = window_medians(x, w)
        edges = [*range(min(h, n)), *range(max(h, n - h), n)]
    else:
        edges = list(range(n))
    for i in edges:
        out[i] = np.median(x[max(0, i - h) : i + h + 1])
    return out


def robust_z(logx: np.ndarray, t: Thresholds) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Robust z-score of each point against the ``spike_window`` points before it.

    Args:
        logx: ``ln(value)`` of finite, positive values [N].
        t: thresholds (``spike_window``, ``spike_min_history``, ``mad_floor``).

    Returns:
        ``(z, median, scale)`` arrays [N]; NaN where fewer than ``spike_min_history`` points precede.
        ``scale = max(1.4826 * MAD, mad_floor)`` in natural-log units.
    """
    n = logx.size
    med = np.full(n, np.nan)
    scale = np.full(n, np.nan)
    w = t.spike_window
    for i in range(t.spike_min_history, min(w, n)):
        ref = logx[:i]
        mi = float(np.median(ref))
        med[i], scale[i] = mi, max(MAD_TO_SIGMA * float(np.median(np.abs(ref - mi))), t.mad_floor)
    if n > w:
        wmed, mad = _window_medians(logx[:-1], w)  # row k: points k .. k+w-1
        start = max(w, t.spike_min_history)
        med[start:] = wmed[start - w :]
        scale[start:] = np.maximum(MAD_TO_SIGMA * mad[start - w :], t.mad_floor)
    return (logx - med) / scale, med, scale


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Half-open index ranges ``[start, end)`` of consecutive True values of a boolean array."""
    m = np.concatenate(([False], np.asarray(mask, dtype=bool), [False]))
    d = np.diff(m.astype(np.int8))
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist(), strict=True))


def find_spikes(steps: np.ndarray, values: np.ndarray, t: Thresholds) -> list[dict[str, Any]]:
    """Spike events: runs of points with robust z > ``spike_z`` and ratio >= ``spike_min_factor``.

    Args:
        steps: [N] logged steps.
        values: [N] finite positive values (e.g. global gradient L2 norms, same units as the gradient).
        t: thresholds.

    Returns:
        One dict per event (consecutive flagged points), at its largest value: ``index``, ``step``,
        ``value``, ``median`` (rolling median before it, same units), ``ratio`` (value / median), ``z``,
        ``first_step``, ``points``.
    """
    if values.size <= t.spike_min_history:
        return []
    logx = np.log(values)
    z, med, _ = robust_z(logx, t)
    ratio = np.exp(logx - med)
    flag = np.nan_to_num(z, nan=-np.inf) > t.spike_z
    flag &= np.nan_to_num(ratio, nan=0.0) >= t.spike_min_factor
    events = []
    for a, b in runs(flag):
        i = a + int(np.argmax(values[a:b]))
        events.append(
            {
                "index": i,
                "step": int(steps[i]),
                "value": rnd(float(values[i])),
                "median": rnd(float(np.exp(med[i]))),
                "ratio": rnd(float(ratio[i])),
                "z": rnd(float(z[i])),
                "first_step": int(steps[a]),
                "points": b - a,
            }
        )
    return events


def find_jumps(steps: np.ndarray, values: np.ndarray, t: Thresholds) -> list[dict[str, Any]]:
    """Jumps among the first points, where the z-score has too little history (short and early runs).

    A point ``i`` with ``1 <= i < spike_min_history`` jumps when it is at least ``jump_factor`` times the
    median of the points before it (the first point alone, then the median of the first ``i``). Scale
    invariant: multiplying every value by a constant changes nothing.

    Returns:
        One dict per run of consecutive jumping points, at its largest value: ``index``, ``step``,
        ``value``, ``median``, ``ratio``, ``first_step``, ``points``.
    """
    n = min(values.size, max(t.spike_min_history, 1))
    flags = np.zeros(values.size, dtype=bool)
    ref = np.full(values.size, np.nan)
    for i in range(1, n):
        ref[i] = float(np.median(values[:i]))
        flags[i] = values[i] >= t.jump_factor * ref[i]
    events = []
    for a, b in runs(flags):
        i = a + int(np.argmax(values[a:b]))
        events.append(
            {
                "index": i,
                "step": int(steps[i]),
                "value": rnd(float(values[i])),
                "median": rnd(float(ref[i])),
                "ratio": rnd(float(values[i] / ref[i])),
                "first_step": int(steps[a]),
                "points": b - a,
            }
        )
    return events


def loglinear_fit(steps: np.ndarray, values: np.ndarray) -> tuple[float, float, float]:
    """Least-squares fit ``ln(value) = a + rate * step``.

    Args:
        steps: [N] logged steps.
        values: [N] positive values.

    Returns:
        ``(rate, intercept, r2)``: rate in natural-log units per step (``exp(rate)`` is the growth factor
        per step), intercept at step 0, coefficient of determination in [0, 1].
    """
    s = steps.astype(np.float64)
    y = np.log(values.astype(np.float64))
    s0 = s.mean()  # centre for numerical stability with large step numbers
    sc = s - s0
    denom = float(np.dot(sc, sc))
    if denom == 0.0:
        return 0.0, float(y.mean()), 0.0
    rate = float(np.dot(sc, y - y.mean()) / denom)
    intercept = float(y.mean() - rate * s0)
    resid = y - (y.mean() + rate * sc)
    ss_tot = float(np.dot(y - y.mean(), y - y.mean()))
    r2 = 1.0 - float(np.dot(resid, resid)) / ss_tot if ss_tot > 0 else 0.0
    return rate, intercept, r2


def find_growth(steps: np.ndarray, values: np.ndarray, t: Thresholds) -> dict[str, Any] | None:
    """The largest sustained rise of the smoothed ``ln(value)``, if it is steady exponential growth.

    The centred rolling median (``smooth_window``) removes isolated spikes; the segment runs from the
    lowest smoothed point before the highest rise to that rise's top. It counts when the smoothed value
    rises by ``growth_factor`` above both the segment start and the median before it, spans
    ``growth_min_points`` points and a log-linear fit reaches ``growth_min_r2``. A step change (one
    smoothed increment holding over a third of the rise: a spike or jump that stayed, the spike test's
    business) is not growth; only the part before or after the step can be, on its own.

    Returns:
        ``start_step``, ``end_step``, ``start_norm``, ``end_norm`` (logged values), ``rate_per_step``
        (slope of ``ln(value)`` per step), ``factor_per_100_steps``, ``doubling_steps``, ``r2``,
        ``fitted_growth``, ``start_index``, ``end_index``, ``points``; or None.
    """
    n = values.size
    if n < t.growth_min_points:
        return None
    logv = np.log(values)
    m = rolling_median(logv, t.smooth_window)
    best, lo, i_best, j_best = -math.inf, 0, 0, 0
    for j in range(n):
        if m[j] < m[lo]:
            lo = j
        if m[j] - m[lo] > best:
            best, i_best, j_best = m[j] - m[lo], lo, j
    i, j = i_best, j_best
    # start where the rise leaves the noise of the flat part before it: the last point still within
    # 3 robust standard deviations (of raw ln-value around its smoothed curve) of the low point
    resid = logv - m
    noise = MAD_TO_SIGMA * float(np.median(np.abs(resid - np.median(resid))))
    within = np.flatnonzero(m[i : j + 1] <= m[i] + 3.0 * noise)
    k_noise = int(within[-1]) if within.size else 0
    # ... and not before the knee: the last point still below a tenth of the rise (a flat stretch that
    # wiggles more than its noise estimate must not pull the start back to the run's beginning)
    below = np.flatnonzero(m[i : j + 1] <= m[i] + 0.1 * (m[j] - m[i]))
    k_knee = int(below[-1]) if below.size else 0
    flat_prefix = k_knee > 0.3 * (j - i)  # the first tenth of the rise took a third of the segment
    i = i + max(k_noise, k_knee if flat_prefix else 0)
    gaps = np.diff(steps[i : j + 1]).astype(np.float64)
    if gaps.size >= 2 and float(gaps.max()) > 100.0 * float(np.median(gaps)):
        # a restart with a wrong step counter inside the rise: a rate per step cannot span it, so judge
        # the longer side of the gap alone
        g = i + int(np.argmax(gaps))
        i, j = (g + 1, j) if j - g > g - i + 1 else (i, g)
    ref = max(m[i_best], float(np.median(m[: i_best + 1])))
    if m[j] - max(ref, m[i]) < math.log(t.growth_factor) or j - i + 1 < t.growth_min_points:
        return None
    # steady growth spreads its rise; a step change (a spike or jump that stayed, which the spike test
    # reports) puts much of it into one smoothed increment (a median filter keeps edges sharp): then only
    # the part before or after the step can be growth, if it rises by growth_factor on its own
    inc = np.diff(m[i : j + 1])
    k = int(np.argmax(inc))
    if inc[k] > float(m[j] - m[i]) / 3:
        parts = [(i, i + k), (i + k + 1, j)]
        rises = [(float(m[b] - m[a]), a, b) for a, b in parts if b - a + 1 >= t.growth_min_points]
        rises = [r for r in rises if r[0] >= math.log(t.growth_factor)]
        if not rises:
            return None
        _, i, j = max(rises)
    rate, _, r2 = loglinear_fit(steps[i : j + 1], values[i : j + 1])
    if rate <= 0 or r2 < t.growth_min_r2:
        return None
    span = float(steps[j] - steps[i])
    return {
        "start_step": int(steps[i]),
        "end_step": int(steps[j]),
        "start_norm": rnd(float(values[i])),
        "end_norm": rnd(float(values[j])),
        "rate_per_step": float(rate),
        "factor_per_100_steps": rnd(math.exp(min(rate * 100, 700.0))),
        "doubling_steps": rnd(math.log(2) / rate),
        "r2": rnd(r2),
        "fitted_growth": rnd(math.exp(min(rate * span, 700.0))),
        "start_index": i,
        "end_index": j,
        "points": j - i + 1,
    }


def log_noise(values: np.ndarray) -> float:
    """Point-to-point noise of ``ln(values)`` [N]: ``1.4826 * MAD / sqrt(2)`` of its first differences.

    The standard deviation of one logged value around its local level (natural-log units) for independent
    noise: differencing removes a slow trend, and the MAD ignores the few large steps of a real event.
    A small batch's loss is noisy (a fine-tune at batch 8 logs 0.2 to 2.6 around 0.7: 0.77), a large
    batch's is not (a GPT-2 at batch 16 from chance: 0.02). 0.0 with fewer than 3 differences or a value
    that is not positive.
    """
    if values.size < 4 or not bool(np.all(values > 0)):
        return 0.0
    d = np.diff(np.log(values))
    return MAD_TO_SIGMA * float(np.median(np.abs(d - np.median(d)))) / math.sqrt(2.0)


def trend_t(values: np.ndarray) -> float:
    """t-statistic of the least-squares slope of ``values`` [N] over their index (N >= 3).

    Negative and large in magnitude (below -3: a one-sided p of about 0.001 for Gaussian noise) means
    the values fall steadily, however little; near 0 means no trend. 0 when the values are constant.
    """
    n = values.size
    x = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
    y = values.astype(np.float64) - float(values.mean())
    sxx = float(np.dot(x, x))
    slope = float(np.dot(x, y)) / sxx
    resid = y - slope * x
    dof = max(1, n - 2)
    se = math.sqrt(float(np.dot(resid, resid)) / dof / sxx)
    if se == 0.0:
        return 0.0 if slope == 0.0 else math.copysign(math.inf, slope)
    return slope / se


def thirds_change(v: np.ndarray) -> float:
    """Relative change (last third median - first third median) / |first third median|."""
    k = max(1, v.size // 3)
    first = float(np.median(v[:k]))
    last = float(np.median(v[-k:]))
    return (last - first) / abs(first) if first != 0 else math.inf


def loss_harmed(loss_steps: np.ndarray, loss: np.ndarray, step: int, t: Thresholds) -> bool | None:
    """Did the loss rise after ``step`` (within ``loss_harm_window`` logged points)?

    Args:
        loss_steps: [M] steps where a loss was logged.
        loss: [M] logged losses (NaN/inf allowed: a non-finite loss after the step is harm).
        step: the step of the event (a spike, a jump).
        t: thresholds (``loss_harm_window``, ``loss_harm_factor``, ``spike_window``).

    Returns:
        True when a loss after the step (the step included) is non-finite or above ``loss_harm_factor``
        times the median of the finite losses before it (or, with a non-positive median, simply above
        it); False when the loss was logged around the step and did not rise; None when there is no loss
        before or after the step to judge by.
    """
    before = loss[(loss_steps < step) & np.isfinite(loss)][-t.spike_window :]
    after = loss[loss_steps >= step][: t.loss_harm_window + 1]
    if before.size == 0 or after.size == 0:
        return None
    if not np.all(np.isfinite(after)):
        return True
    base = float(np.median(before))
    peak = float(np.max(after))
    return (
        peak > t.loss_harm_factor * base if base > 0 else peak > base + abs(base) * (t.loss_harm_factor - 1)
    )


def loss_outcome(loss_steps: np.ndarray, loss: np.ndarray, step: int, t: Thresholds) -> dict[str, Any]:
    """Did the loss stay above ``divergence_factor`` times its level before ``step``, or recover?

    Returns:
        ``{"outcome": "diverged" | "partial" | "recovered" | "unknown", ...}`` with the levels compared:
        ``pre_loss`` (median of up to ``spike_window`` finite losses before), ``tail_loss_median`` (median
        of the last ``divergence_tail`` losses from the step on, non-finite counted as +inf),
        ``tail_ratio``, ``peak_loss_after`` and, when recovered, ``recovered_by_step``.
    """
    before = loss[(loss_steps < step) & np.isfinite(loss)][-t.spike_window :]
    after = loss[loss_steps >= step]
    if before.size < 1 or after.size < 1:
        return {"outcome": "unknown", "reason": "no loss logged before or after the step"}
    pre = float(np.median(before))
    if pre <= 0:
        return {"outcome": "unknown", "reason": "loss level before the step is not positive"}
    after_inf = np.where(np.isfinite(after), after, np.inf)
    tail = after_inf[-t.divergence_tail :]
    tail_med = float(np.median(tail))
    out: dict[str, Any] = {
        "pre_loss": rnd(pre),
        "tail_loss_median": rnd(tail_med),
        "tail_ratio": rnd(tail_med / pre),
        "peak_loss_after": rnd(float(np.max(after_inf))),
    }
    if tail_med > t.divergence_factor * pre:
        out["outcome"] = "diverged"
    elif tail_med > t.recovery_factor * pre:
        out["outcome"] = "partial"
    else:
        out["outcome"] = "recovered"
        s_after = loss_steps[loss_steps >= step]
        peak_i = int(np.argmax(after_inf))
        back = np.flatnonzero(np.isfinite(after) & (after <= t.recovery_factor * pre))
        later = back[back >= peak_i]
        if later.size:
            out["recovered_by_step"] = int(s_after[int(later[0])])
    return out
