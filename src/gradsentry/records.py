"""Plain records: per-layer statistics, step records, findings and remedies.

Every record is a plain dataclass of Python scalars (never tensors) that round-trips through
``to_dict`` / ``from_dict``, so that diagnosis, sinks, reports and the CLI work without a model.
Non-finite values (NaN, +inf, -inf) are kept as floats: they are evidence, never dropped.

The JSONL schema (version :data:`SCHEMA_VERSION`) is one header object
``{"gradsentry": SCHEMA_VERSION, "kind": "header", "layers": [...], "meta": {...}}`` followed by one
``{"kind": "step", ...}`` object per logged step (``StepRecord.to_dict``), and optionally
``{"kind": "findings", "findings": [...]}`` at the end of a run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

SCHEMA_VERSION = 1
"""Version of the JSONL schema written by :class:`gradsentry.sinks.JsonlSink`."""

FindingKind = Literal["vanishing", "exploding", "nonfinite", "saturation", "dead_units", "stalled_layer"]
Severity = Literal["info", "warning", "error"]
SEVERITY_ORDER: dict[str, int] = {"info": 0, "warning": 1, "error": 2}


class RecordError(ValueError):
    """A dict or file line could not be read as a gradsentry record."""


def _num(value: Any) -> float | None:
    """Coerce a JSON value to ``float`` (``None`` stays ``None``); strings like "NaN" are accepted."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise RecordError(f"expected a number, got a boolean {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise RecordError(f"expected a number, got {value!r}") from exc


_FIELD_NAMES: dict[type, frozenset[str]] = {}


def _from_fields(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise RecordError(f"expected an object for {cls.__name__}, got {type(data).__name__}")
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = frozenset(f.name for f in fields(cls))
    return {k: v for k, v in data.items() if k in names}


@dataclass
class LayerInfo:
    """Static description of one layer: a module that owns parameters directly.

    Attributes:
        name: qualified module name, e.g. ``"blocks.3.fc"`` (``""`` for the root module).
        type: module class name, e.g. ``"Linear"``.
        depth: position in forward order (0 = first layer the input reaches).
        params: number of trainable parameter elements owned directly by the module.
    """

    name: str
    type: str
    depth: int
    params: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerInfo:
        d = _from_fields(cls, data)
        try:
            return cls(
                name=str(d["name"]),
                type=str(d.get("type", "")),
                depth=int(d.get("depth", 0)),
                params=int(d.get("params", 0)),
            )
        except KeyError as exc:
            raise RecordError(f"layer entry is missing {exc}") from exc


@dataclass(slots=True)
class LayerStats:
    """Gradient and weight statistics of one layer at one step.

    Attributes:
        name: qualified module name (see :class:`LayerInfo`).
        depth: forward-order index of the layer.
        numel: number of gradient elements in the layer (parameters whose ``.grad`` is not None).
        grad_norm: L2 norm of all the layer's gradients together, same units as the gradient.
        grad_rms: root mean square of the gradient entries, ``grad_norm / sqrt(numel)``.
        grad_max_abs: largest absolute gradient entry (``max |g|``), None when not measured
            (``Monitor(max_abs=False)``).
        nonfinite: number of NaN/inf gradient entries (0 when the norm is finite).
        weight_norm: L2 norm of the layer's parameters, same units as the weights, None when not
            measured (``Monitor(weight_norms=False)``).
        update_ratio: ``||Δw|| / ||w||`` of the last optimizer step, ``w`` being the weights before
            that update (dimensionless; not capped: an update 2,500x the weights reads 2500), or None
            when unknown (no optimizer given, or the first step).
        has_grad: False when every parameter of the layer had ``.grad is None`` (frozen or unused):
            its gradient figures are then 0 and must not be read as a vanishing gradient.
    """

    name: str
    depth: int
    numel: int
    grad_norm: float
    grad_rms: float
    grad_max_abs: float | None
    nonfinite: int
    weight_norm: float | None
    update_ratio: float | None = None
    has_grad: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerStats:
        d = _from_fields(cls, data)
        try:
            return cls(
                name=str(d["name"]),
                depth=int(d.get("depth", 0)),
                numel=int(d.get("numel", 0)),
                grad_norm=_num(d["grad_norm"]) or 0.0,
                grad_rms=_num(d.get("grad_rms", 0.0)) or 0.0,
                grad_max_abs=_num(d.get("grad_max_abs")),
                nonfinite=int(d.get("nonfinite", 0)),
                weight_norm=_num(d.get("weight_norm")),
                update_ratio=_num(d.get("update_ratio")),
                has_grad=bool(d.get("has_grad", True)),
            )
        except KeyError as exc:
            raise RecordError(f"layer statistics are missing {exc}") from exc


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
    pre_mean: float
    pre_std: float
    saturated_frac: float | None = None
    dead_frac: float | None = None
    histogram: dict[str, list[float]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ActivationStats:
        d = _from_fields(cls, data)
        try:
            return cls(
                name=str(d["name"]),
                type=str(d.get("type", "")),
                depth=int(d.get("depth", 0)),
                pre_mean=_num(d.get("pre_mean", 0.0)) or 0.0,
                pre_std=_num(d.get("pre_std", 0.0)) or 0.0,
                saturated_frac=_num(d.get("saturated_frac")),
                dead_frac=_num(d.get("dead_frac")),
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
        d = _from_fields(cls, data)
        try:
            counts = d["counts"]
            if not isinstance(counts, list) or not counts:
                raise RecordError("histogram 'counts' must be a non-empty list")
            return cls(
                log10_low=_num(d["log10_low"]) or 0.0,
                log10_high=_num(d["log10_high"]) or 0.0,
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
        d = _from_fields(cls, data)
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
        d = _from_fields(cls, data)
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
                global_norm=_num(d["global_norm"]) or 0.0,
                layers=[LayerStats.from_dict(x) for x in layers],
                loss=_num(d.get("loss")),
                lr=_num(d.get("lr")),
                activations=[ActivationStats.from_dict(x) for x in acts],
                overhead=_num(d.get("overhead")),
                nonfinite_origin=d.get("nonfinite_origin"),
                actions=list(actions) if isinstance(actions, list) else [],
                histograms=None if hists is None else [LayerHistograms.from_dict(h) for h in hists],
            )
        except KeyError as exc:
            raise RecordError(f"step record is missing {exc}") from exc
        except (TypeError, ValueError) as exc:
            raise RecordError(f"step record is malformed: {exc}") from exc


@dataclass
class Remedy:
    """A suggested fix, ranked by the finding that carries it.

    Attributes:
        action: what to do, in plain words.
        api: the gradsentry call that does it, e.g. ``"gradsentry.ClipGlobalNorm(1.0)"``, if any.
        reference: the source paper, e.g. ``"Pascanu et al. 2013, arXiv:1211.5063"``.
    """

    action: str
    api: str | None = None
    reference: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Remedy:
        d = _from_fields(cls, data)
        return cls(action=str(d.get("action", "")), api=d.get("api"), reference=d.get("reference"))


@dataclass
class Finding:
    """A diagnosed problem with the numbers that prove it and ranked remedies.

    Attributes:
        kind: one of ``vanishing``, ``exploding``, ``nonfinite``, ``saturation``, ``dead_units``,
            ``stalled_layer`` (and the series kinds of :mod:`gradsentry.diagnosis.series_rules`);
            ``gradsentry check`` adds ``gradient_concentration`` (info: the per-block profile of
            normalized blocks).
        severity: ``info``, ``warning`` or ``error``.
        steps: the logged steps concerned (first is where it starts).
        layers: the layers concerned, most implicated first.
        evidence: named numbers (and short strings) supporting the claim.
        explanation: one paragraph in plain words.
        remedies: fixes, best first.
    """

    kind: str
    severity: str
    steps: list[int] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)
    evidence: dict[str, Any] = field(default_factory=dict)
    explanation: str = ""
    remedies: list[Remedy] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Finding:
        d = _from_fields(cls, data)
        return cls(
            kind=str(d.get("kind", "")),
            severity=str(d.get("severity", "warning")),
            steps=[int(s) for s in d.get("steps", [])],
            layers=[str(x) for x in d.get("layers", [])],
            evidence=dict(d.get("evidence", {})),
            explanation=str(d.get("explanation", "")),
            remedies=[Remedy.from_dict(r) for r in d.get("remedies", [])],
        )

    def __str__(self) -> str:
        where = f" at step {self.steps[0]}" if self.steps else ""
        layers = f" in {', '.join(self.layers[:3])}" if self.layers else ""
        return f"[{self.severity}] {self.kind}{where}{layers}: {self.explanation}"

    def __rich__(self) -> Any:
        """The finding and its first remedies as rich renderables (terminal)."""
        from gradsentry.report.views import finding_renderable

        return finding_renderable(self)

    def _repr_html_(self) -> str:
        """The finding and its first remedies as escaped HTML (notebooks)."""
        from gradsentry.report.views import finding_renderable, to_html

        return to_html(finding_renderable(self))


@dataclass
class RunHeader:
    """First line of a JSONL run: schema version, model summary and free-form metadata."""

    layers: list[LayerInfo] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "gradsentry": self.schema_version,
            "kind": "header",
            "layers": [x.to_dict() for x in self.layers],
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunHeader:
        if not isinstance(data, Mapping) or "gradsentry" not in data:
            raise RecordError("not a gradsentry header (no 'gradsentry' schema key)")
        version = data["gradsentry"]
        if not isinstance(version, int) or version > SCHEMA_VERSION or version < 1:
            raise RecordError(
                f"unsupported gradsentry schema version {version!r} (this reader: {SCHEMA_VERSION})"
            )
        layers = data.get("layers", [])
        meta = data.get("meta", {})
        if not isinstance(layers, list) or not isinstance(meta, Mapping):
            raise RecordError("header 'layers' must be a list and 'meta' an object")
        return cls(layers=[LayerInfo.from_dict(x) for x in layers], meta=dict(meta), schema_version=version)


@dataclass
class Run:
    """A whole logged run: header, step records and (optionally) findings stored with it."""

    header: RunHeader
    records: list[StepRecord]
    findings: list[Finding] = field(default_factory=list)

    def __rich__(self) -> Any:
        """The run's summary and findings as rich renderables (terminal)."""
        from gradsentry.report.views import run_renderable

        return run_renderable(self)

    def _repr_html_(self) -> str:
        """The run's summary and findings as escaped HTML (notebooks)."""
        from gradsentry.report.views import run_renderable, to_html

        return to_html(run_renderable(self))

    def to_dataframe(self) -> Any:
        """The records as a ``pandas.DataFrame``, one row per (step, layer); see
        :func:`gradsentry.report.views.records_dataframe`.

        Raises:
            ModuleNotFoundError: pandas is not installed.
        """
        from gradsentry.report.views import records_dataframe

        return records_dataframe(self.records)
