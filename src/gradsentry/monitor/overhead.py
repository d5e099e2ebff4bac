"""The Monitor's own cost: time per logged step as a fraction of the training step, the overhead
budget that raises ``every``, and the host memory of its records."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from gradsentry import histograms as layer_hist

if TYPE_CHECKING:
    from gradsentry.monitor.layers import LayerIndex

log = logging.getLogger("gradsentry")

RECORDS_BUDGET_BYTES = 64 << 20
"""Host memory the records kept by a Monitor with ``max_records=None`` may take (64 MiB)."""

SAMPLE_RECORDS = 1024
"""The most records of older steps a Monitor keeps as a uniform sample for the per-layer rules."""


def record_bytes(layers: int, activation_sites: int = 0, histogram_bins: int = 0) -> int:
    """Host memory of one :class:`StepRecord` (Python objects), in bytes, as measured with
    ``tracemalloc`` on CPython 3.11 (records of 10 and 50 layers, 100 steps each): about 2,000 bytes
    per record, 256 per layer, 180 per activation site, and 64 + 34 per histogram bin per site."""
    per_site = 180 + (64 + 34 * histogram_bins if histogram_bins > 0 else 0)
    return 2000 + 256 * layers + per_site * activation_sites


def max_records_for(
    layers: int, activation_sites: int = 0, histogram_bins: int = 0, extra_bytes: int = 0
) -> int:
    """How many records of this size fit in :data:`RECORDS_BUDGET_BYTES` (between 100 and 100,000);
    ``extra_bytes``: what else each record holds (per-layer histograms)."""
    size = record_bytes(layers, activation_sites, histogram_bins) + extra_bytes
    return min(100_000, max(100, RECORDS_BUDGET_BYTES // size))


def default_max_records(
    index: LayerIndex, activations: bool, histogram_bins: int, histograms: layer_hist.HistogramSpec | None
) -> int:
    """A Monitor's ``max_records=None``: the records of this model (its layers, its activation sites
    when ``activations``, their histograms) that fit in :data:`RECORDS_BUDGET_BYTES`."""
    layers = len(index.layers)
    sites = len(index.sites) if activations else 0
    return max_records_for(layers, sites, histogram_bins, layer_hist.record_bytes(layers, histograms))


def _raise_every(old: int, new: int, budget: float) -> None:
    log.info(
        "gradsentry.Monitor: logging every %d steps (was %d) to stay under %.1f%% overhead",
        new,
        old,
        100 * budget,
    )


class OverheadMeter:
    """Measures the Monitor's share of the wall time and applies ``overhead_budget``.

    Args:
        every: the starting logging interval (steps).
        budget: the largest fraction of the step time the Monitor may take, or None.
        distributed: under ``torch.distributed`` a raised ``every`` is only proposed, then agreed
            over ranks (the largest wins) at the next logged step (:meth:`agree`).
    """

    def __init__(self, every: int, budget: float | None, distributed: bool) -> None:
        self.every = every
        self.budget = budget
        self.distributed = distributed
        self.proposed_every = every
        self._last_step_end: float | None = None
        self._last_logged_count = 0
        self._step_time_ema: float | None = None

    def agree(self, agreed: int) -> None:
        """Apply the largest ``every`` that any rank proposed (overhead_budget under distributed)."""
        if agreed > self.every:
            _raise_every(self.every, agreed, self.budget or 0.0)
            self.every = agreed
        self.proposed_every = self.every

    def measure(self, cost: float, step_count: int) -> float | None:
        """Fraction of this logged step's wall time spent in the Monitor (hooks + statistics), given
        its ``cost`` (seconds) and the number of ``step()`` calls so far; None at the first logged step.

        The training step's own time is estimated from the wall time since the previous logged
        step, less the Monitor's cost, divided by the steps in between. Also applies the budget.
        """
        now = time.perf_counter()
        prev, steps = self._last_step_end, step_count - self._last_logged_count
        self._last_step_end, self._last_logged_count = now, step_count
        if prev is None or now <= prev or steps <= 0:
            return None
        step_time = max(now - prev - cost, 1e-9) / steps  # the training step without the Monitor
        ema = self._step_time_ema
        self._step_time_ema = step_time if ema is None else 0.8 * ema + 0.2 * step_time
        if self.budget is not None:
            needed = math.ceil(cost / (self.budget * self._step_time_ema))
            if self.distributed:  # agreed over ranks at the next logged step
                self.proposed_every = max(self.proposed_every, needed)
            elif needed > self.every:
                _raise_every(self.every, needed, self.budget)
                self.every = needed
        return cost / (cost + step_time)

    def amortized(self, overheads: Iterable[float | None]) -> float | None:
        """The Monitor's time as a fraction of training time at the current ``every``: the median
        of the per-logged-step ``overheads`` divided by ``every``; None when there is none."""
        values = sorted(f for f in overheads if f is not None)
        if not values:
            return None
        f = values[len(values) // 2]
        per_step = f / (1 - f) if f < 1 else math.inf  # cost / step_time
        return per_step / self.every / (1 + per_step / self.every)
