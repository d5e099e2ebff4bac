"""Plot a logged series with its findings (matplotlib, Agg): PNG, SVG or a self-contained HTML page."""

from __future__ import annotations

import html
import io
import os
from pathlib import Path

import numpy as np

from gradsentry._extras import requires_extra
from gradsentry._io import write_atomic, write_text_atomic
from gradsentry.logs.series import Series
from gradsentry.records import Finding
from gradsentry.report.text import finding_html_item, severity_look

PLOT_SUFFIXES = (".png", ".svg", ".html")


def plot_series(series: Series, findings: list[Finding], path: str | os.PathLike[str]) -> Path:
    """Draw the gradient norm (log scale) and the loss against the step, with findings marked.

    Non-finite values are drawn as red crosses on the top edge; each finding's steps as vertical lines
    coloured by severity.

    Args:
        series: the log.
        findings: findings to mark.
        path: output file; the suffix picks the format: ``.png``, ``.svg`` or ``.html`` (an SVG inlined
            in a minimal page, user strings HTML-escaped).

    Returns:
        The path written.

    Raises:
        ValueError: the suffix is not one of :data:`PLOT_SUFFIXES`.
        gradsentry._extras.MissingExtraError: matplotlib is not installed (``gradsentry[report]``).
    """
    out = Path(path)
    suffix = out.suffix.lower()
    if suffix not in PLOT_SUFFIXES:
        raise ValueError(f"plot file must end in {', '.join(PLOT_SUFFIXES)}, got {out.name!r}")
    with requires_extra("report", "plotting"):
        from matplotlib.figure import Figure

    panels = [name for name in ("grad_norm", "loss") if series.has(name)]  # type: ignore[arg-type]
    fig = Figure(figsize=(9, 2.6 * max(1, len(panels))), layout="constrained")
    axes = fig.subplots(max(1, len(panels)), 1, sharex=True, squeeze=False)[:, 0]
    for ax, name in zip(axes, panels, strict=False):
        s, v = series.values(name)  # type: ignore[arg-type]
        fin = np.isfinite(v)
        ax.plot(s[fin], v[fin], lw=1.0, color="tab:blue")
        if name == "grad_norm" and (v[fin] > 0).all() and fin.any():
            ax.set_yscale("log")
        if (~fin).any():
            top = float(np.max(v[fin])) if fin.any() else 1.0
            ax.scatter(
                s[~fin], np.full(int((~fin).sum()), top), marker="x", color="red", label="NaN/inf", zorder=3
            )
            ax.legend(loc="upper left", fontsize=8)
        label = series.fields.get(name, name)
        ax.set_ylabel("grad norm (pre-clip)" if name == "grad_norm" else "loss")
        ax.set_title(label, fontsize=9, loc="right")
        for f in findings:
            for st in f.steps[:20]:
                ax.axvline(st, color=severity_look(f.severity).plot, lw=0.8, alpha=0.6)
    axes[-1].set_xlabel("step")
    kinds = ", ".join(sorted({f.kind for f in findings})) or "no findings"
    fig.suptitle(f"{Path(series.path).name} ({series.source}): {kinds}", fontsize=10)
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".html":
        buf = io.StringIO()
        fig.savefig(buf, format="svg")
        svg = buf.getvalue()
        svg = svg[svg.index("<svg") :]
        items = "".join(finding_html_item(f) for f in findings)
        title = html.escape(f"gradsentry analyze: {series.path}")
        write_text_atomic(
            out,
            f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title></head><body>"
            f"<h1>{title}</h1>{svg}<ul>{items}</ul></body></html>",
        )
    else:
        write_atomic(out, lambda tmp: fig.savefig(tmp, format=suffix[1:], dpi=110))
    return out


__all__ = ["PLOT_SUFFIXES", "plot_series"]
