"""Plain records: per-layer statistics, step records, findings and their advice; the one JSON codec.

Every record is a plain dataclass of Python scalars (never tensors) that round-trips through
``to_dict`` / ``from_dict``, so that diagnosis, sinks, reports and the CLI work without a model.
Non-finite values (NaN, +inf, -inf) are kept as floats: they are evidence, never dropped. Every JSON
writer and reader goes through :func:`dumps` / :func:`loads` (the codec; see :mod:`gradsentry._codec`).

The JSONL schema (version :data:`SCHEMA_VERSION`) is one header object
``{"gradsentry": SCHEMA_VERSION, "kind": "header", "layers": [...], "meta": {...}}`` followed by one
``{"kind": "step", ...}`` object per logged step (``StepRecord.to_dict``), and optionally
``{"kind": "findings", "findings": [...]}`` at the end of a run.

**The per-layer statistics** are the fields of :class:`LayerStats` declared with ``stat(...)``
metadata; :data:`LAYER_STATS` lists them in field order, and the CSV columns, the TensorBoard / W&B /
MLflow names and the callbacks' log keys are derived from it. Adding one is its field here plus its
kernel in :mod:`gradsentry.monitor.measure` (see README, "Adding a per-layer statistic").

Run-level records (:class:`LayerInfo`, :class:`RunHeader`, :class:`Finding`, :class:`Advice`,
:class:`Run`) live in :mod:`gradsentry._run_records` and are re-exported here.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from gradsentry._codec import (
    NONFINITE,
    SCHEMA_VERSION,
    RecordError,
    StatDef,
    dumps,
    from_fields,
    json_safe,
    loads,
    num,
    read_stat,
    stat,
    stats_of,
)
from gradsentry._run_records import Advice, Finding, LayerInfo, Run, RunHeader

FindingKind = Literal["vanishing", "exploding", "nonfinite", "saturation", "dead_units", "stalled_layer"]
Severity = Literal["info", "warning", "error"]
SEVERITY_ORDER: dict[str, int] = {"info": 0, "warning": 1, "error": 2}


@dataclass(slots=True)
class LayerStats:
    """Gradient and weight statistics of one layer at one step.

    Attributes:
        name: qualified module name (see :class:`LayerInfo`).
        depth: forward-order index of the layer.
        numel: number of gradient elements in the layer (parameters whose ``.grad`` is not None).
        has_grad: False when every parameter of the layer had ``.grad is None`` (frozen or unused):
            its gradient figures are then 0 and must not be read as a vanishing gradient.

    The other attributes are the statistics (:data:`LAYER_STATS`, listed below), each defined once, by
    its field: a new one goes last, with a default (``None``: files written before it still read).
    """

    name: str
    depth: int
    numel: int
    grad_norm: float = field(
        metadata=stat(
            "L2 norm of all the layer's gradients together", "gradient units", needs_grad=True, required=True
        )
    )
    grad_rms: float = field(
        metadata=stat(
            "root mean square of the gradient entries, grad_norm / sqrt(numel)",
            "gradient units",
            needs_grad=True,
        )
    )
    grad_max_abs: float | None = field(
        metadata=stat(
            "largest |gradient entry|; None when not measured (Monitor(max_abs=False))",
            "gradient units",
            needs_grad=True,
        )
    )
    nonfinite: int = field(
        metadata=stat("NaN/inf gradient entries (0 when the norm is finite)", "count", needs_grad=True)
    )
    weight_norm: float | None = field(
        metadata=stat(
            "L2 norm of the layer's parameters; None when not measured (Monitor(weight_norms=False))",
            "weight units",
        )
    )
    update_ratio: float | None = field(
        default=None,
        metadata=stat(
            "||dw|| / ||w|| of the last optimizer step, w before the update (not capped: 2500 is 2,500x); "
            "None when unknown (no optimizer given, or the first step)",
            "dimensionless",
        ),
    )
    has_grad: bool = True

    def to_dict(self) -> dict[str, Any]:
        """The record as plain data (one entry per field)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerStats:
        """Read a layer's statistics written by :meth:`to_dict` (unknown keys ignored).

        Raises:
            RecordError: the name or a required statistic is missing, or a value is not a number.
        """
        d = from_fields(cls, data)
        try:
            values = {s.name: read_stat(s, d) for s in LAYER_STATS}
            return cls(
                name=str(d["name"]),
                depth=int(d.get("depth", 0)),
                numel=int(d.get("numel", 0)),
                has_grad=bool(d.get("has_grad", True)),
                **values,
            )
        except KeyError as exc:
            raise RecordError(f"layer statistics are missing {exc}") from exc


LAYER_STATS: tuple[StatDef, ...] = stats_of(LayerStats)
"""The per-layer statistics, in :class:`LayerStats` field order: the one list that the CSV columns
(:data:`gradsentry.sinks.csv.CSV_COLUMNS`), the TensorBoard / W&B / MLflow names
(:func:`gradsentry.sinks.tensorboard.record_scalars`) and the callbacks' ``log_stats`` choices
(:data:`gradsentry.integrations._common.LOG_STATS`) are derived from."""

LayerStats.__doc__ = (LayerStats.__doc__ or "") + "".join(
    f"\n    - ``{s.name}`` ({s.unit}): {s.description}." for s in LAYER_STATS
)


@dataclass(slots=True)
class ActivationStats:
    """Statistics of one activation module (Sigmoid, Tanh, ReLU, ...) on one forward pass.

    Attributes:
        name: qualified module name of the activation.
        type: module class name, e.g. ``"Sigmoid"``.
        depth: forward-order index among activation modules.
        pre_mean: mean of the activation's input (the pre-activation), same units as the input.
        pre_std: standard deviation of the pre-activation.
        saturated_frac: fraction in [0, 1] of outputs in the saturated region of a bounded
            activation, None for unbounded activations. The band is the Monitor's
            ``Thresholds.sigmoid_saturation`` / ``tanh_saturation`` (recorded in the run header's
            ``meta["saturation"]``); by default sigmoid output < 0.01 or > 0.99 (``|x| > 4.6``), tanh
            ``|y| > 0.99``.
        dead_frac: fraction in [0, 1] of units that output 0 for every sample of the batch
            (ReLU family), None otherwise.
        histogram: optional ``{"edges": [...], "counts": [...]}`` of the pre-activation.
    """

    name: str
    type: str
    depth: int
    pre_mean: float = field(metadata=stat("mean of the pre-activation", "input units"))
    pre_std: float = field(metadata=stat("standard deviation of the pre-activation", "input units"))
    saturated_frac: float | None = field(
        default=None, metadata=stat("fraction of outputs in the saturated band", "fraction in [0, 1]")
    )
    dead_frac: float | None = field(
        default=None, metadata=stat("fraction of units off for the whole batch", "fraction in [0, 1]")
    )
    histogram: dict[str, list[float]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ActivationStats:
        d = from_fields(cls, data)
        try:
            return cls(
                name=str(d["name"]),
                type=str(d.get("type", "")),
                depth=int(d.get("depth", 0)),
                pre_mean=num(d.get("pre_mean", 0.0)) or 0.0,
                pre_std=num(d.get("pre_std", 0.0)) or 0.0,
                saturated_frac=num(d.get("saturated_frac")),
                dead_frac=num(d.get("dead_frac")),
                histogram=d.get("histogram"),
            )
        except KeyError as exc:
            raise RecordError(f"activation statistics are missing {exc}") from exc


def log10_edges(log10_low: float, log10_high: float, bins: int) -> list[float]:
    """The ``bins + 1`` equally spaced edges of log10|x| from ``log10_low`` to ``log10_high``."""
    step = (log10_high - log10_low) / bins
    return [log10_low + i * step for i in range(bins)] + [log10_high]


@dataclass(slots=True)
class Histogram:
    """Counts of |x| over the entries of one layer's gradient (or weights), on log10-spaced bins.

    The binned range is ``10**log10_low <= |x| < 10**log10_high``, cut into ``len(counts)`` bins of
    equal width in log10|x|: bin ``i`` holds ``e[i] <= |x| < e[i+1]`` with ``e`` = :meth:`edges`. Every
    entry is counted exactly once: in a bin, or in ``below``, ``above``, ``zeros`` or ``nonfinite``.
    Computed by :mod:`gradsentry.histograms` (``Monitor(histograms=...)``).

    Attributes:
        log10_low: log10 of the lowest edge (|x| units: the gradient's or the weights').
        log10_high: log10 of the highest edge.
        counts: entries in each bin.
        below: finite entries with ``0 < |x| < 10**log10_low``.
        above: finite entries with ``|x| >= 10**log10_high``.
        zeros: entries exactly 0 (+0.0 or -0.0): dead units, masked or unused parameters.
        nonfinite: NaN and +-inf entries.
    """

    log10_low: float
    log10_high: float
    counts: list[int]
    below: int = 0
    above: int = 0
    zeros: int = 0
    nonfinite: int = 0

    def log10_edges(self) -> list[float]:
        """The ``len(counts) + 1`` bin edges in log10|x|."""
        return log10_edges(self.log10_low, self.log10_high, len(self.counts))

    def edges(self) -> list[float]:
        """The ``len(counts) + 1`` bin edges in |x| units (``10**e`` of :meth:`log10_edges`)."""
        return [10.0**e for e in self.log10_edges()]

    @property
    def total(self) -> int:
        """Every entry counted: the bins, below, above, zeros and non-finite."""
        return sum(self.counts) + self.below + self.above + self.zeros + self.nonfinite

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Histogram:
        d = from_fields(cls, data)
        try:
            counts = d["counts"]
            if not isinstance(counts, list) or not counts:
                raise RecordError("histogram 'counts' must be a non-empty list")
            return cls(
                log10_low=num(d["log10_low"]) or 0.0,
                log10_high=num(d["log10_high"]) or 0.0,
                counts=[int(c) for c in counts],
                **{k: int(d.get(k, 0)) for k in ("below", "above", "zeros", "nonfinite")},
            )
        except KeyError as exc:
            raise RecordError(f"histogram is missing {exc}") from exc


@dataclass(slots=True)
class LayerHistograms:
    """The histograms of one layer at one step (``Monitor(histograms=...)``).

    Attributes:
        name: qualified module name of the layer (see :class:`LayerInfo`).
        grad: histogram of |g| over the layer's gradient entries, None when the layer had no gradient
            or gradient histograms are off.
        weight: histogram of |w| over the layer's parameters, None when weight histograms are off.
    """

    name: str
    grad: Histogram | None = None
    weight: Histogram | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerHistograms:
        d = from_fields(cls, data)
        if "name" not in d:
            raise RecordError("layer histograms are missing 'name'")
        grad, weight = d.get("grad"), d.get("weight")
        return cls(
            name=str(d["name"]),
            grad=None if grad is None else Histogram.from_dict(grad),
            weight=None if weight is None else Histogram.from_dict(weight),
        )


def skipped_steps_of(step: int, actions: Any) -> list[int]:
    """The steps a remedy skipped that one record's ``actions`` tell of: ``step`` itself when an action says
    ``"skipped": True``, and the unlogged steps before it an action lists in ``skipped_unlogged_steps``.

    ``actions`` is taken as read from a file (a list of dicts, or anything else, which tells nothing).
    """
    if not isinstance(actions, list) or not actions:
        return []
    out = [step] if any(isinstance(a, Mapping) and a.get("skipped") is True for a in actions) else []
    for a in actions:
        between = a.get("skipped_unlogged_steps") if isinstance(a, Mapping) else None
        if isinstance(between, list):
            out += [x for x in between if isinstance(x, int) and not isinstance(x, bool)]
    return out


@dataclass(slots=True)
class StepRecord:
    """Everything measured at one logged optimizer step.

    Attributes:
        step: optimizer step index (0-based count of ``Monitor.step`` calls).
        global_norm: L2 norm of all gradients together (NaN/inf kept), same units as the gradient.
        layers: per-layer statistics in depth order.
        loss: training loss at this step, if given.
        lr: learning rate of the first parameter group, if an optimizer was given.
        activations: activation statistics in forward order (empty when none were recorded).
        overhead: the Monitor's own time on this step as a fraction of the step's wall time.
        nonfinite_origin: name of the module where a NaN/inf first appeared, when located.
        actions: what remedies did at this step (e.g. ``{"remedy": "ClipGlobalNorm", "clipped": True}``).
        histograms: per-layer |g| and |w| histograms in depth order (``Monitor(histograms=...)``), or
            None when not recorded (the key is then left out of :meth:`to_dict`, so files without
            histograms are unchanged).
    """

    step: int
    global_norm: float
    layers: list[LayerStats] = field(default_factory=list)
    loss: float | None = None
    lr: float | None = None
    activations: list[ActivationStats] = field(default_factory=list)
    overhead: float | None = None
    nonfinite_origin: str | None = None
    actions: list[dict[str, Any]] = field(default_factory=list)
    histograms: list[LayerHistograms] | None = None

    @property
    def finite(self) -> bool:
        """True when the global gradient norm is finite."""
        return math.isfinite(self.global_norm)

    def layer(self, name: str) -> LayerStats:
        """Return the statistics of the layer called ``name``; raises KeyError if absent."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["histograms"] is None:
            del d["histograms"]
        d["kind"] = "step"
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StepRecord:
        d = from_fields(cls, data)
        try:
            layers = d.get("layers", [])
            acts = d.get("activations", [])
            if not isinstance(layers, list) or not isinstance(acts, list):
                raise RecordError("'layers' and 'activations' must be lists")
            actions = d.get("actions", [])
            hists = d.get("histograms")
            if hists is not None and not isinstance(hists, list):
                raise RecordError("'histograms' must be a list")
            return cls(
                step=int(d["step"]),
                global_norm=num(d["global_norm"]) or 0.0,
                layers=[LayerStats.from_dict(x) for x in layers],
                loss=num(d.get("loss")),
                lr=num(d.get("lr")),
                activations=[ActivationStats.from_dict(x) for x in acts],
                overhead=num(d.get("overhead")),
                nonfinite_origin=d.get("nonfinite_origin"),
                actions=list(actions) if isinstance(actions, list) else [],
                histograms=None if hists is None else [LayerHistograms.from_dict(h) for h in hists],
            )
        except KeyError as exc:
            raise RecordError(f"step record is missing {exc}") from exc
        except (TypeError, ValueError) as exc:
            raise RecordError(f"step record is malformed: {exc}") from exc


ACTIVATION_STATS: tuple[StatDef, ...] = stats_of(ActivationStats)
"""The per-activation statistics, in :class:`ActivationStats` field order (TensorBoard / W&B / MLflow
names ``prefix/<stat>/<activation>``)."""


def __getattr__(name: str) -> Any:
    if name == "Remedy":
        warnings.warn(
            "gradsentry.records.Remedy is renamed Advice (advice text, not the callable "
            "gradsentry.remedies.Remedy); the old name goes in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return Advice
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ACTIVATION_STATS",
    "LAYER_STATS",
    "NONFINITE",
    "SCHEMA_VERSION",
    "SEVERITY_ORDER",
    "ActivationStats",
    "Advice",
    "Finding",
    "FindingKind",
    "Histogram",
    "LayerHistograms",
    "LayerInfo",
    "LayerStats",
    "RecordError",
    "Run",
    "RunHeader",
    "Severity",
    "StatDef",
    "StepRecord",
    "dumps",
    "json_safe",
    "loads",
    "log10_edges",
    "skipped_steps_of",
    "stat",
    "stats_of",
]
