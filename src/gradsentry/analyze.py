"""Post-mortem analysis of a training log (``gradsentry analyze``): read it, then judge it with the core.

Reading is :func:`gradsentry.logs.load_series` (HF, TensorBoard, CSV, mmengine, console text, gradsentry
JSONL; nothing in a log is executed). Judging is :mod:`gradsentry.diagnosis`: the very rules and
:class:`~gradsentry.diagnosis.thresholds.Thresholds` the live Monitor uses, so a run's log gets the
verdict its Monitor gave. A gradsentry JSONL run is judged from its records (per-layer rules included),
exactly as ``Monitor.diagnose()`` judged it. Everything is relative to the run's own history; the logged
norm is the *pre-clip* norm in HF, Lightning and most trainers, so a value above ``max_grad_norm`` is
never called a clipping failure.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gradsentry._io import check_path, check_tags
from gradsentry.diagnosis.core import diagnose, diagnose_series
from gradsentry.diagnosis.signals import find_growth, find_jumps, find_spikes, loglinear_fit, robust_z
from gradsentry.diagnosis.thresholds import Thresholds, resolve
from gradsentry.logs import Series, load_series
from gradsentry.logs.errors import LogFormatError
from gradsentry.logs.series import largest_gap
from gradsentry.records import SEVERITY_ORDER, Finding, json_safe

if TYPE_CHECKING:
    from gradsentry.diagnosis.series_rules import RunSignals

__all__ = [
    "AnalyzeThresholds",
    "LogAnalysis",
    "analyze_log",
    "detect",
    "find_growth",
    "find_jumps",
    "find_spikes",
    "hidden_nonfinite_steps",
    "loglinear_fit",
    "robust_z",
    "unhide_nonfinite_loss",
]

log = logging.getLogger("gradsentry")

AnalyzeThresholds = Thresholds
"""The log analysis uses the one :class:`~gradsentry.diagnosis.thresholds.Thresholds` (old name kept)."""


@dataclass
class LogAnalysis:
    """The result of :func:`analyze_log`: the series read and the findings.

    Attributes:
        series: what was read.
        findings: problems found, most severe first, then by step.
        thresholds: the thresholds used.
    """

    series: Series
    findings: list[Finding] = field(default_factory=list)
    thresholds: Thresholds = field(default_factory=Thresholds)

    @property
    def problems(self) -> list[Finding]:
        """Findings of severity ``warning`` or ``error`` (``info`` findings are not problems)."""
        return [f for f in self.findings if SEVERITY_ORDER.get(f.severity, 1) >= SEVERITY_ORDER["warning"]]

    @property
    def healthy(self) -> bool:
        """True when no finding is a problem."""
        return not self.problems

    def __rich__(self) -> Any:
        """The analysis (what was read, the findings) as rich renderables (terminal)."""
        from gradsentry.report.views import analysis_renderable

        return analysis_renderable(self)

    def _repr_html_(self) -> str:
        """The analysis (what was read, the findings) as escaped HTML (notebooks)."""
        from gradsentry.report.views import analysis_renderable, to_html

        return to_html(analysis_renderable(self))

    def to_dataframe(self) -> Any:
        """The series read as a ``pandas.DataFrame``: columns ``step``, ``loss``, ``grad_norm``, ``lr``
        (None/NaN where not logged) and ``skipped`` (the log says the optimizer step was skipped).

        Raises:
            ModuleNotFoundError: pandas is not installed.
        """
        from gradsentry.report.views import dataframe

        s = self.series
        skipped = set(s.skipped)
        rows = [
            {"step": st, "loss": lo, "grad_norm": g, "lr": lr, "skipped": st in skipped}
            for st, lo, g, lr in zip(s.steps, s.loss, s.grad_norm, s.lr, strict=True)
        ]
        return dataframe(rows, ("step", "loss", "grad_norm", "lr", "skipped"))

    def to_dict(self) -> dict[str, Any]:
        """Strict-JSON-ready dict (non-finite numbers become ``"NaN"``/``"Infinity"`` strings)."""
        s = unhide_nonfinite_loss(self.series)  # a hidden NaN loss counts as non-finite, not as 0.0
        summary: dict[str, Any] = {
            "points": len(s),
            "first_step": s.steps[0] if s.steps else None,
            "last_step": s.steps[-1] if s.steps else None,
        }
        for name in ("loss", "grad_norm"):
            _, v = s.values(name)  # type: ignore[arg-type]
            fin = v[np.isfinite(v)]
            summary[name] = {
                "logged": int(v.size),
                "nonfinite": int(v.size - fin.size),
                "first": float(fin[0]) if fin.size else None,
                "last": float(fin[-1]) if fin.size else None,
                "min": float(fin.min()) if fin.size else None,
                "max": float(fin.max()) if fin.size else None,
            }
        return json_safe(
            {
                "path": self.series.path,
                "format": self.series.source,
                "fields": s.fields,
                "notes": s.notes,
                "healthy": self.healthy,
                "summary": summary,
                "findings": [f.to_dict() for f in self.findings],
                "thresholds": asdict(self.thresholds),
            }
        )


def hidden_nonfinite_steps(series: Series) -> set[int]:
    """Steps where the loss is exactly 0.0 beside a non-finite gradient norm (a hidden non-finite loss)."""
    return {
        s
        for s, lo, g in zip(series.steps, series.loss, series.grad_norm, strict=True)
        if lo == 0.0 and g is not None and not math.isfinite(g)
    }


def unhide_nonfinite_loss(series: Series, fill: float | None = math.nan) -> Series:
    """A copy of ``series`` whose hidden non-finite losses (see :func:`hidden_nonfinite_steps`) are ``fill``.

    Args:
        series: the log as read.
        fill: the value put in place of the logged 0.0 (NaN to show it as non-finite, None to drop it).
    """
    hidden = hidden_nonfinite_steps(series)
    if not hidden:
        return series
    loss = [fill if s in hidden else lo for s, lo in zip(series.steps, series.loss, strict=True)]
    return replace(series, loss=loss, notes=list(series.notes))


def detect(series: Series, thresholds: Thresholds | None = None, **overrides: Any) -> list[Finding]:
    """Judge a log's series with the detector core (:func:`gradsentry.diagnosis.diagnose_series`).

    Args:
        series: a loaded log (see :func:`gradsentry.logs.load_series`).
        thresholds: thresholds to use (default :class:`Thresholds`).
        **overrides: individual thresholds, e.g. ``spike_z=8``.

    Returns:
        Findings, most severe first, then by first step. An ``info`` finding ``no_grad_norm`` says when
        no gradient norm was logged (the loss is then analysed alone).

    Raises:
        TypeError: ``thresholds`` is not a :class:`Thresholds`.
        ValueError: an unknown threshold name or an invalid value.
    """
    return diagnose_series(series, thresholds, **overrides)


def analyze_log(
    path: str | os.PathLike[str],
    format: str = "auto",
    tags: dict[str, str] | None = None,
    thresholds: Thresholds | None = None,
    **overrides: Any,
) -> LogAnalysis:
    """Read another tool's training log and judge it: :func:`load_series` + the detector core.

    Args:
        path: the log file or directory (see :data:`gradsentry.logs.FORMATS`).
        format: ``"auto"`` or one of the format names of :func:`gradsentry.logs.load_series`.
        tags: optional ``{"loss": name, "grad_norm": name, "lr": name}`` (tag, column or key).
        thresholds: detector thresholds (default :class:`Thresholds`).
        **overrides: individual thresholds, e.g. ``spike_z=8``.

    Returns:
        A :class:`LogAnalysis` with the series and the findings. A gradsentry JSONL run is judged from its
        records with :func:`gradsentry.diagnose` (per-layer rules included), as its Monitor judged it.

    Raises:
        TypeError: ``path`` is not a str or path (e.g. None or a number), ``tags`` is not None or a
            dict of strings, or ``thresholds`` is not a :class:`Thresholds`.
        FileNotFoundError: ``path`` does not exist.
        LogFormatError: the input is unreadable or unrecognised (the message says what was expected).
        ValueError: an unknown threshold name or an invalid value.
    """
    check_path(path, "analyze_log(path=...)")
    check_tags(tags, "analyze_log(tags=...)")
    th = resolve(thresholds, overrides)
    target = _gradsentry_jsonl(path, format, tags)
    if target is not None:  # a gradsentry run: the Monitor's own verdict, from its records, in one pass
        from gradsentry.logs.run_jsonl import scan_jsonl

        scanned = scan_jsonl(target)
        whole = scanned.signals()
        series = _jsonl_series(whole, target)
        signals = whole if scanned.history.absorbed else None
        findings = diagnose(
            scanned.records,
            layers=scanned.header.layers,
            thresholds=th,
            meta=scanned.header.meta,
            signals=signals,
        )
    else:
        series = load_series(path, format=format, tags=tags)
        findings = diagnose_series(series, th)
    if any(v is not None and math.isfinite(v) and v <= 0 for v in series.loss):
        series.notes.append(
            "the loss takes values <= 0 (a negative log-likelihood bound, a reward?): the rules that compare "
            "loss ratios (harm after a spike, divergence, stall) judge only positive stretches of it"
        )
    n = sum(1 for v in series.grad_norm if v is not None and math.isfinite(v) and v > 0)
    if 0 < n < 2:
        series.notes.append(
            "only one finite gradient norm was logged: spikes, jumps and growth could not be judged"
        )
    return LogAnalysis(series=series, findings=findings, thresholds=th)


def _gradsentry_jsonl(path: str | os.PathLike[str], format: str, tags: dict[str, str] | None) -> Path | None:
    """The file when ``path`` is a gradsentry JSONL run read with its fixed keys, else None."""
    p = Path(path)
    if tags or format not in ("auto", "jsonl") or not p.is_file():
        return None  # the readers give the errors (tags on a fixed-key log, a directory, no file)
    if format == "jsonl":
        return p
    from gradsentry.logs.detect import sniff_format

    try:
        return p if sniff_format(p) == "jsonl" else None
    except LogFormatError:
        return None


def _jsonl_series(sig: RunSignals, path: Path) -> Series:
    """The run's loss, global norm and lr as a :class:`Series`, as ``load_series`` reads a JSONL run, built
    from a scan's series (no per-step dictionaries: a 1e6-step run stays ~100 MB)."""
    from gradsentry.logs.series import build_series

    steps = sig.steps.tolist()
    fields = {
        name: key
        for name, key, has in (
            ("loss", "loss", sig.has_loss),
            ("grad_norm", "global_norm", sig.has_grad),
            ("lr", "lr", ~np.isnan(sig.lr)),
        )
        if bool(has.any())
    }
    notes = ["global_norm is the Monitor's global norm before clipping"]
    if not steps or bool((np.diff(sig.steps) <= 0).any()):
        points: dict[Any, dict[int, float]] = {
            "loss": {
                s: v for s, v, h in zip(steps, sig.loss.tolist(), sig.has_loss.tolist(), strict=True) if h
            },
            "grad_norm": dict(zip(steps, sig.grad.tolist(), strict=True)),
            "lr": {s: v for s, v in zip(steps, sig.lr.tolist(), strict=True) if v == v},
        }
        return build_series(points, source="jsonl", path=str(path), fields=fields, notes=notes)
    cache: dict[float, float] = {}  # one float object per distinct lr (usually a handful)
    gap = largest_gap(steps)
    return Series(
        steps=steps,
        loss=[v if h else None for v, h in zip(sig.loss.tolist(), sig.has_loss.tolist(), strict=True)],
        grad_norm=sig.grad.tolist(),
        lr=[None if v != v else cache.setdefault(v, v) for v in sig.lr.tolist()],
        source="jsonl",
        path=str(path),
        fields=fields,
        notes=notes + ([gap] if gap is not None else []),
    )
