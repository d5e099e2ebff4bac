"""The pieces every HTML page shares: embedded SVG figures, the jinja2 environment (autoescaping on),
number formatting and a finding as a template shows it.

Figures are SVG documents embedded as ``data:`` URIs in ``<img>`` elements: the page needs no network
access, runs no script, and an SVG inside ``<img>`` cannot run one either.
"""

from __future__ import annotations

import base64
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from gradsentry._extras import requires_extra
from gradsentry.records import Finding
from gradsentry.report.text import SEVERITY_LOOK

with requires_extra("report", "the HTML report"):
    import jinja2

_SIZE = re.compile(r'<svg[^>]*?\swidth="([\d.]+)pt"[^>]*?\sheight="([\d.]+)pt"', re.S)


@dataclass
class FigureView:
    """One embedded figure: element id, ``data:`` URI, alt text, caption and size in CSS pixels."""

    id: str
    uri: str
    alt: str
    caption: str
    width: int
    height: int


def embed_svg(svg: str, fig_id: str, alt: str, caption: str) -> FigureView:
    """Wrap an SVG document as a base64 ``data:image/svg+xml`` figure (size read from the SVG, pt -> px)."""
    m = _SIZE.search(svg)
    width, height = (float(m.group(1)) * 4 / 3, float(m.group(2)) * 4 / 3) if m else (960.0, 480.0)
    uri = "data:image/svg+xml;base64," + base64.b64encode(svg.encode("utf-8")).decode("ascii")
    return FigureView(fig_id, uri, alt, caption, round(width), round(height))


@lru_cache(maxsize=1)
def env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("gradsentry", "report/templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env


# ---------------------------------------------------------------------------------------------------- formatting


def fmt(value: Any, digits: int = 3) -> str:
    """A number for people: 3 significant digits, scientific below 1e-3 or from 1e5; NaN/inf spelled out."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if value == 0:
            return "0"
        if abs(value) < 1e-3 or abs(value) >= 1e5:
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}"
    return str(value)


def fmt_evidence(value: Any, limit: int = 8) -> str:
    if isinstance(value, dict):
        items = list(value.items())
        text = ", ".join(f"{k}: {fmt(v)}" for k, v in items[:limit])
        return text + (f", … (+{len(items) - limit})" if len(items) > limit else "")
    if isinstance(value, (list, tuple)):
        text = ", ".join(fmt(v) for v in value[:limit])
        return "[" + text + (f", … (+{len(value) - limit})" if len(value) > limit else "") + "]"
    return fmt(value)


def finding_view(f: Finding | dict[str, Any], max_layers: int = 6) -> dict[str, Any]:
    """A finding as the template shows it: kind, severity, where, explanation, evidence rows, remedies."""
    finding = f if isinstance(f, Finding) else Finding.from_dict(f)
    where = ""
    if finding.steps:
        where = f"from step {finding.steps[0]}"
        if len(finding.steps) > 1:
            where += f" ({len(finding.steps)} logged steps)"
    severity = finding.severity if finding.severity in SEVERITY_LOOK else "warning"
    return {
        "kind": finding.kind,
        "severity": severity,
        "where": where,
        "explanation": finding.explanation,
        "layers": [n or "<root>" for n in finding.layers[:max_layers]],
        "more_layers": max(0, len(finding.layers) - max_layers),
        "evidence": [(str(k), fmt_evidence(v)) for k, v in finding.evidence.items()],
        "remedies": [{"action": r.action, "api": r.api, "reference": r.reference} for r in finding.remedies],
    }


__all__ = ["FigureView", "embed_svg", "env", "finding_view", "fmt", "fmt_evidence"]
