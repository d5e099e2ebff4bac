"""Per-layer histograms of |gradient| and |weight| entries, counted on the device on logged steps.

Bins: ``bins`` bins of equal width in log10|x| between ``10**log10_low`` and ``10**log10_high``
(defaults: 64 bins from 1e-24 to 1e8, half a decade each). A log scale because vanishing and exploding
gradients are changes of decades, and one scale serves layers whose magnitudes differ by many of
them. Every entry is counted exactly once (:class:`gradsentry.records.Histogram`):

- ``e[i] <= |x| < e[i+1]``: bin ``i`` (``e`` the edges, :func:`gradsentry.records.log10_edges`);
- ``0 < |x| < 10**log10_low``: ``below``; finite ``|x| >= 10**log10_high``: ``above`` (never clamped
  into the end bins, so the end bins mean what their edges say);
- ``x == 0`` (+0.0 and -0.0): ``zeros`` (dead units, masked entries: a fact, not a tiny value);
- NaN and +-inf: ``nonfinite``.

How: each tensor's |x| (float32; fp16/bf16 upcast) is compared with the float32 edges
(``torch.bucketize``, half-open bins on the left edge) and the bin indices are added into one
``[layers, bins + 4]`` int64 counter with ``index_add_``; no host sync: the counts travel in the
Monitor's one device-to-host copy of the step (and, under FSDP2, in its sum over the ranks' shards).
Cost: a few elementwise passes and a temporary int64 index per tensor, per logged step (see
``benchmarks/overhead.py``); memory of a record: :func:`record_bytes`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from gradsentry import _dist, stats
from gradsentry.records import Histogram, LayerHistograms, LayerStats, log10_edges

_EXTRA = 4  # below, above, zeros, nonfinite (in that order after the bins)


@dataclass(frozen=True)
class HistogramSpec:
    """What ``Monitor(histograms=...)`` counts: bins, range, and which tensors.

    Args:
        bins: number of bins of equal width in log10|x| (1 to 512; W&B's limit is 512).
        log10_low: log10 of the lowest edge, in the tensor's units (default -24: 1e-24).
        log10_high: log10 of the highest edge (default 8: 1e8); must exceed ``log10_low``.
        grads: count each layer's gradient entries.
        weights: count each layer's parameter entries.

    Raises:
        ValueError: ``bins`` is not an int in [1, 512], the range is not finite and increasing, or
            neither ``grads`` nor ``weights`` is asked for.
    """

    bins: int = 64
    log10_low: float = -24.0
    log10_high: float = 8.0
    grads: bool = True
    weights: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.bins, bool) or not isinstance(self.bins, int) or not 1 <= self.bins <= 512:
            raise ValueError(f"histogram bins must be an int in [1, 512], got {self.bins!r}")
        lo, hi = self.log10_low, self.log10_high
        if not (isinstance(lo, (int, float)) and isinstance(hi, (int, float))) or not (
            math.isfinite(lo) and math.isfinite(hi) and lo < hi
        ):
            raise ValueError(
                f"histogram range must be finite with log10_low < log10_high, got {lo!r}, {hi!r}"
            )
        if not (self.grads or self.weights):
            raise ValueError("HistogramSpec counts nothing: grads and weights are both False")

    @property
    def width(self) -> int:
        """Counters per layer and tensor kind: below, the bins, above, zeros, non-finite."""
        return self.bins + _EXTRA

    def edges(self, device: torch.device) -> Tensor:
        """The ``bins + 1`` edges in |x| units as float32 on ``device`` (the values compared)."""
        exps = log10_edges(self.log10_low, self.log10_high, self.bins)
        return torch.tensor([10.0**e for e in exps], dtype=torch.float32, device=device)


def resolve(histograms: bool | HistogramSpec | None) -> HistogramSpec | None:
    """``Monitor(histograms=...)``: False/None: off; True: the default :class:`HistogramSpec`.

    Raises:
        TypeError: anything else.
    """
    if histograms is None or histograms is False:
        return None
    if histograms is True:
        return HistogramSpec()
    if isinstance(histograms, HistogramSpec):
        return histograms
    raise TypeError(f"histograms must be a bool or a HistogramSpec, got {type(histograms).__name__}")


def count(
    tensors: list[Tensor], owners: list[int], layers: int, spec: HistogramSpec, edges: Tensor
) -> Tensor:
    """Per-layer counts of ``tensors`` (each belonging to layer ``owners[i]``) on the edges' device.

    Args:
        tensors: strided tensors of any float dtype (a DTensor's local shard, a sparse gradient's values).
        owners: layer index of each tensor, in ``[0, layers)``.
        layers: number of layers (rows).
        spec: the bins.
        edges: ``spec.edges(device)``.

    Returns:
        int64 ``[layers * spec.width]``: per layer, below, the bin counts, above, zeros, non-finite.
    """
    w = spec.width
    out = torch.zeros(layers * w, dtype=torch.int64, device=edges.device)
    one = torch.ones(1, dtype=torch.int64, device=edges.device)
    for t, owner in zip(tensors, owners, strict=True):
        a = t.detach().reshape(-1).to(edges.device, torch.float32).abs()
        # right=True: index i in 1..bins means e[i-1] <= a < e[i]; 0 is below the range, bins+1 at or
        # above its top: exactly the layout [below, bins..., above], then zeros and non-finite
        idx = torch.bucketize(a, edges, right=True)
        idx = torch.where(a == 0, spec.bins + 2, idx)
        idx = torch.where(torch.isfinite(a), idx, spec.bins + 3)
        out.index_add_(0, idx + owner * w, one.expand(idx.numel()))
    return out


def unpack(values: list[float], names: list[str], spec: HistogramSpec) -> list[Histogram]:
    """Turn the host copy of :func:`count`'s ``[layers * width]`` counts into one Histogram per layer."""
    w, b = spec.width, spec.bins
    out = []
    for i in range(len(names)):
        row = [round(v) for v in values[i * w : (i + 1) * w]]
        out.append(
            Histogram(
                spec.log10_low,
                spec.log10_high,
                row[1 : b + 1],
                below=row[0],
                above=row[b + 1],
                zeros=row[b + 2],
                nonfinite=row[b + 3],
            )
        )
    return out


class LayerCounter:
    """The Monitor's side: counts for every layer on a logged step, and the records made of them.

    Args:
        spec: the bins and the tensors to count.
    """

    def __init__(self, spec: HistogramSpec) -> None:
        self.spec = spec
        self._edges: dict[torch.device, Tensor] = {}  # made once per device: no copy on logged steps

    def size(self, layers: int) -> int:
        """Number of values :meth:`part` returns for ``layers`` layers."""
        return layers * self.spec.width * (int(self.spec.grads) + int(self.spec.weights))

    def part(
        self,
        grads: list[Tensor],
        grad_owners: list[int],
        params: list[Tensor],
        param_owners: list[int],
        layers: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> Tensor:
        """The gradient counts then the weight counts (those asked for) as one ``dtype`` tensor on
        ``device`` (float64 holds counts exactly up to 2**53); DTensors count their local shard."""
        edges = self._edges.get(device)
        if edges is None:
            edges = self._edges[device] = self.spec.edges(device)
        out = []
        if self.spec.grads:
            g = [stats.entries(_dist.local(t)) for t in grads]
            out.append(count(g, grad_owners, layers, self.spec, edges))
        if self.spec.weights:
            out.append(count([_dist.local(p) for p in params], param_owners, layers, self.spec, edges))
        return torch.cat(out).to(dtype)

    def unpack(self, values: list[float], layers: list[LayerStats]) -> list[LayerHistograms]:
        """One :class:`LayerHistograms` per layer from the host copy of :meth:`part`; a layer without a
        gradient (``has_grad=False``) gets no gradient histogram."""
        names = [x.name for x in layers]
        n = len(names) * self.spec.width
        grads = unpack(values[:n], names, self.spec) if self.spec.grads else [None] * len(names)
        rest = values[n:] if self.spec.grads else values
        weights = unpack(rest, names, self.spec) if self.spec.weights else [None] * len(names)
        return [
            LayerHistograms(x.name, grad=g if x.has_grad else None, weight=w)
            for x, g, w in zip(layers, grads, weights, strict=True)
        ]


def record_bytes(layers: int, spec: HistogramSpec | None) -> int:
    """Bytes the histograms add to one record in memory (CPython 3.11, measured with ``tracemalloc``
    in ``tests/monitor/test_histograms.py``): about 100 per layer and, per layer and kind, 200 + 8 per bin (+32
    per count above 256: 16 per bin is taken)."""
    if spec is None:
        return 0
    kinds = int(spec.grads) + int(spec.weights)
    return layers * (100 + kinds * (200 + 16 * spec.bins))
