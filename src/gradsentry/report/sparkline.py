"""A one-line unicode sparkline of a logged series, for terminal summaries."""

from __future__ import annotations

import math
from collections.abc import Sequence

BLOCKS = "▁▂▃▄▅▆▇█"
NONFINITE_MARK = "!"
MISSING_MARK = " "


def sparkline(values: Sequence[float | None], width: int = 60, *, log: bool = False) -> str:
    """Render ``values`` as at most ``width`` unicode block characters.

    Values are split into ``width`` consecutive buckets (by index); each bucket shows its largest
    finite value, so spikes stay visible. A bucket holding a NaN/inf shows ``!``; a bucket with
    nothing logged shows a space.

    Args:
        values: the series [N]; ``None`` means not logged.
        width: maximum number of characters (>= 1).
        log: scale by ``log10`` (non-positive values then count as missing), for gradient norms
            spanning orders of magnitude.

    Returns:
        A string of ``min(N, width)`` characters.

    Raises:
        ValueError: ``width`` < 1.

    Example:
        >>> sparkline([1, 2, 3, 4, 5, 6, 7, 8])
        '▁▂▃▄▅▆▇█'
        >>> sparkline([1.0, None, float("nan"), 1.0])
        '▁ !▁'
    """
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    n = len(values)
    if n == 0:
        return ""
    k = min(n, width)
    buckets: list[float | str | None] = []
    for b in range(k):
        chunk = values[b * n // k : (b + 1) * n // k]
        if any(v is not None and not math.isfinite(v) for v in chunk):
            buckets.append(NONFINITE_MARK)
            continue
        fin = [float(v) for v in chunk if v is not None and (not log or v > 0)]
        if not fin:
            buckets.append(None)
            continue
        top = max(fin)
        buckets.append(math.log10(top) if log else top)
    nums = [b for b in buckets if isinstance(b, float)]
    lo, hi = (min(nums), max(nums)) if nums else (0.0, 0.0)
    out: list[str] = []
    for bucket in buckets:
        if bucket is None:
            out.append(MISSING_MARK)
        elif isinstance(bucket, str):
            out.append(bucket)
        elif hi == lo:
            out.append(BLOCKS[0])
        else:
            out.append(BLOCKS[min(len(BLOCKS) - 1, int((bucket - lo) / (hi - lo) * len(BLOCKS)))])
    return "".join(out)


__all__ = ["BLOCKS", "MISSING_MARK", "NONFINITE_MARK", "sparkline"]
