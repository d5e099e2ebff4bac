"""Records of a whole run: its header (the layers), its findings and their advice, and the :class:`Run`.

Import these names from :mod:`gradsentry.records`, which re-exports them (the per-step records live there).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from gradsentry._codec import SCHEMA_VERSION, RecordError, from_fields

if TYPE_CHECKING:
    from gradsentry.records import StepRecord

__all__ = ["Advice", "Finding", "LayerInfo", "Run", "RunHeader"]


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
        d = from_fields(cls, data)
        try:
            return cls(
                name=str(d["name"]),
                type=str(d.get("type", "")),
                depth=int(d.get("depth", 0)),
                params=int(d.get("params", 0)),
            )
        except KeyError as exc:
            raise RecordError(f"layer entry is missing {exc}") from exc


@dataclass
class Advice:
    """A suggested fix (what to do), ranked by the finding that carries it.

    Not to be confused with a remedy (:class:`gradsentry.remedies.Remedy`), the callable that acts on the
    gradients: an ``Advice`` is text, and its ``api`` names the remedy (or other call) that applies it. In
    a finding's ``to_dict`` (and the JSONL files) the list of advice keeps its key ``"remedies"``.

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
    def from_dict(cls, data: Mapping[str, Any]) -> Advice:
        d = from_fields(cls, data)
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
        remedies: advice (:class:`Advice`), best first.
    """

    kind: str
    severity: str
    steps: list[int] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)
    evidence: dict[str, Any] = field(default_factory=dict)
    explanation: str = ""
    remedies: list[Advice] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Finding:
        d = from_fields(cls, data)
        return cls(
            kind=str(d.get("kind", "")),
            severity=str(d.get("severity", "warning")),
            steps=[int(s) for s in d.get("steps", [])],
            layers=[str(x) for x in d.get("layers", [])],
            evidence=dict(d.get("evidence", {})),
            explanation=str(d.get("explanation", "")),
            remedies=[Advice.from_dict(r) for r in d.get("remedies", [])],
        )

    def __str__(self) -> str:
        """The finding in one line (:func:`gradsentry.report.text.finding_line`)."""
        from gradsentry.report.text import finding_line

        return finding_line(self)

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
