"""Figures of the reports, drawn with matplotlib (Agg, no pyplot state) and returned as SVG text.

Each function takes plain data (a :class:`gradsentry.records.Run`, a chapter's series) and returns one
SVG document as a string; :mod:`gradsentry.report.html` embeds them. The lab's own figures are in
:mod:`gradsentry.report.lab_plots` (still reachable here by their old names). Text is drawn as paths, so
the SVG needs no fonts; the output is deterministic (fixed hash salt, no date).
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from gradsentry._extras import requires_extra
from gradsentry.records import Run

with requires_extra("report", "the HTML report"):
    from matplotlib import colormaps, rc_context
    from matplotlib import colors as mcolors
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

_STYLE: Any = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.titleweight": "bold",
    "axes.labelsize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#dddddd",
    "grid.linewidth": 0.6,
    "legend.fontsize": 8.5,
    "legend.frameon": False,
    "svg.hashsalt": "gradsentry",
    "svg.fonttype": "path",
    "figure.dpi": 100,
}

# Colour per lab variant: the vanishing family in warm/cool hues by activation, the exploding family in greys/greens.
_VARIANT_COLORS = {
    "sigmoid_default": "#d62728",
    "tanh_default": "#ff7f0e",
    "relu_default": "#8c564b",
    "relu_he": "#1f77b4",
    "sigmoid_residual": "#2ca02c",
    "sigmoid_batchnorm": "#9467bd",
    "exploding": "#111111",
    "exploding_clip": "#17becf",
    "exploding_wd": "#7f7f7f",
    "exploding_agc": "#bcbd22",
    "exploding_zclip": "#e377c2",
}
_FALLBACK = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
NONFINITE_COLOR = "#ff00ff"
"""Colour of NaN/inf cells in heat maps."""


def variant_color(name: str, index: int = 0) -> str:
    """The fixed colour of a lab variant (a fallback palette colour for other names)."""
    return _VARIANT_COLORS.get(name, _FALLBACK[index % len(_FALLBACK)])


@contextmanager
def _figure(
    width: float,
    height: float,
    *,
    left: float = 0.8,
    right: float = 0.2,
    bottom: float = 0.6,
    top: float = 0.4,
    wspace: float = 0.25,
    hspace: float = 0.5,
) -> Iterator[Figure]:
    """A figure of ``width`` x ``height`` inches with fixed margins given in inches.

    Fixed margins instead of a layout engine: constrained layout measured every text extent again
    and was most of the drawing time.
    """
    with rc_context(_STYLE):
        fig = Figure(figsize=(width, height))
        fig.subplots_adjust(
            left=left / width,
            right=1 - right / width,
            bottom=bottom / height,
            top=1 - top / height,
            wspace=wspace,
            hspace=hspace,
        )
        yield fig


def _colorbar(fig: Figure, im: Any, label: str, right: float) -> None:
    """A colour bar in the right margin (``right`` inches wide), over the plotting area's height."""
    w = float(fig.get_size_inches()[0])
    sp = fig.subplotpars
    cax = fig.add_axes((1 - (right - 0.15) / w, sp.bottom, 0.15 / w, sp.top - sp.bottom))
    cb = fig.colorbar(im, cax=cax)
    cb.set_label(label)


def to_svg(fig: Figure) -> str:
    """Serialise a figure to an SVG document (text as paths, no date metadata)."""
    buf = io.StringIO()
    with rc_context(_STYLE):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    return buf.getvalue()


def _finite_positive(values: Sequence[float] | np.ndarray) -> np.ndarray:
    a = np.asarray(values, dtype=float)
    return np.where(np.isfinite(a) & (a > 0), a, np.nan)


def _heat(
    ax: Axes, matrix: np.ndarray, steps: Sequence[int], names: Sequence[str], norm: mcolors.Normalize
) -> Any:
    cmap = colormaps["viridis"].with_extremes(bad=NONFINITE_COLOR)
    extent = (float(steps[0]) - 0.5, float(steps[-1]) + 0.5, len(names) - 0.5, -0.5) if steps else None
    im = ax.imshow(matrix, aspect="auto", interpolation="nearest", cmap=cmap, norm=norm, extent=extent)
    return im


def _log_matrix(rows: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    a = np.asarray(rows, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(np.isfinite(a) & (a > 0), np.log10(np.where(a > 0, a, 1.0)), np.nan)
        out = np.where(a == 0, -np.inf, out)  # an exactly zero gradient: bottom of the scale
    return out


def _shared_norm(mats: Sequence[np.ndarray]) -> mcolors.Normalize:
    vals = np.concatenate([m[np.isfinite(m)].ravel() for m in mats] or [np.array([0.0])])
    if vals.size == 0:
        vals = np.array([0.0])
    lo, hi = float(np.percentile(vals, 1)), float(np.percentile(vals, 99.5))
    if hi - lo < 1e-9:
        lo, hi = lo - 1, hi + 1
    return mcolors.Normalize(vmin=lo, vmax=hi, clip=True)


# ---------------------------------------------------------------------------------------------------- any run


def _run_matrix(run: Run) -> tuple[list[str], list[int], np.ndarray]:
    names = [info.name for info in sorted(run.header.layers, key=lambda i: i.depth)]
    if not names and run.records:
        names = [ls.name for ls in sorted(run.records[0].layers, key=lambda s: s.depth)]
    steps = [rec.step for rec in run.records]
    mat = np.full((len(names), len(steps)), np.nan)
    index = {n: i for i, n in enumerate(names)}
    for j, rec in enumerate(run.records):
        for ls in rec.layers:
            i = index.get(ls.name)
            if i is not None:
                mat[i, j] = ls.grad_norm if ls.has_grad else np.nan
    return names, steps, mat


def _label(name: str) -> str:
    return name if name else "<root>"


def run_depth_figure(run: Run, max_lines: int = 6) -> str:
    """Per-layer gradient norm vs depth at a few logged steps of a run (first to last, light to dark)."""
    names, steps, mat = _run_matrix(run)
    with _figure(10, 4.4, bottom=1.45, right=1.5) as fig:
        ax = fig.subplots()
        if steps:
            picks = sorted(
                set(np.linspace(0, len(steps) - 1, min(max_lines, len(steps))).round().astype(int))
            )
            cmap = colormaps["plasma"]
            for k, j in enumerate(picks):
                y = _finite_positive(mat[:, j])
                color = cmap(0.85 * k / max(1, len(picks) - 1))
                ax.plot(range(len(names)), y, marker="o", ms=3, lw=1.6, color=color, label=f"step {steps[j]}")
            ax.set_yscale("log")
            ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))
        n = len(names)
        stride = max(1, math.ceil(n / 24))
        ax.set_xticks(range(0, n, stride))
        ax.set_xticklabels(
            [_label(names[i]) for i in range(0, n, stride)], rotation=60, ha="right", fontsize=7
        )
        ax.set_xlabel("layer, in depth order (first = next to the input)")
        ax.set_ylabel("gradient L2 norm of the layer")
        ax.set_title("Gradient flow over depth")
        return to_svg(fig)


def run_time_figure(run: Run) -> str:
    """Global gradient norm and loss over the logged steps of a run; NaN/inf steps marked."""
    steps = np.array([r.step for r in run.records], dtype=float)
    gn = np.array([r.global_norm for r in run.records], dtype=float)
    loss = np.array([np.nan if r.loss is None else r.loss for r in run.records], dtype=float)
    with _figure(10, 3.6, wspace=0.25) as fig:
        ax1, ax2 = fig.subplots(1, 2)
        ax1.plot(steps, _finite_positive(gn), lw=1.4, color="#1f77b4")
        bad = ~np.isfinite(gn)
        if bad.any():
            finite_gn = gn[np.isfinite(gn) & (gn > 0)]
            top = float(finite_gn.max()) * 3 if finite_gn.size else 1.0
            ax1.plot(steps[bad], np.full(bad.sum(), top), "X", color=NONFINITE_COLOR, ms=8, label="NaN/inf")
            ax1.legend(loc="upper left")
        ax1.set_yscale("log")
        ax1.set_title("Global gradient norm")
        ax1.set_xlabel("step")
        ax1.set_ylabel("L2 norm, same units as the gradient")
        if np.isfinite(loss).any():
            ax2.plot(steps, np.where(np.isfinite(loss), loss, np.nan), lw=1.4, color="#d62728")
            if np.nanmin(np.where(np.isfinite(loss), loss, np.nan)) > 0:
                ax2.set_yscale("log")
        else:
            ax2.text(0.5, 0.5, "no finite loss recorded", ha="center", va="center", transform=ax2.transAxes)
        ax2.set_title("Training loss")
        ax2.set_xlabel("step")
        return to_svg(fig)


def run_heatmap_figure(run: Run) -> str:
    """Heat map of one run: log10 per-layer gradient norm, layer (rows) x logged step (columns)."""
    names, steps, mat = _run_matrix(run)
    m = _log_matrix(mat)
    m = np.where(np.isneginf(m), np.nan, m)
    height = min(9.0, 1.6 + 0.16 * len(names))
    with _figure(10, height, left=1.9, right=1.3) as fig:
        ax = fig.subplots()
        if steps:
            im = _heat(ax, m, steps, names, _shared_norm([m]))
            _colorbar(fig, im, "log10 gradient L2 norm\n(magenta: NaN/inf)", 1.3)
        ax.grid(False)
        stride = max(1, math.ceil(len(names) / 40))
        ax.set_yticks(range(0, len(names), stride))
        ax.set_yticklabels([_label(names[i]) for i in range(0, len(names), stride)], fontsize=7)
        ax.set_xlabel("step")
        ax.set_title("Per-layer gradient norm over time")
        return to_svg(fig)


def lines_figure(
    panels: Sequence[tuple[str, dict[str, Sequence[float]]]],
    *,
    xlabel: str,
    ylabel: str,
    logy: bool = True,
    xs: Sequence[float] | None = None,
) -> str:
    """Side-by-side panels of labelled lines (the chapters beyond MLPs): ``panels`` is
    ``[(title, {label: values})]``; x is ``xs`` or 1, 2, ...; non-finite or (log scale) non-positive
    values are left out."""
    n = max(1, len(panels))
    with _figure(4.6 * n, 3.4, right=0.2, wspace=0.3) as fig:
        axes = fig.subplots(1, n, squeeze=False)[0]
        for ax, (title, series) in zip(axes, panels, strict=False):
            for i, (label, values) in enumerate(series.items()):
                y = _finite_positive(values) if logy else np.asarray(values, dtype=float)
                x = np.asarray(xs if xs is not None else range(1, len(y) + 1), dtype=float)[: len(y)]
                ax.plot(
                    x,
                    y,
                    marker="o" if len(y) <= 24 else None,
                    ms=3,
                    lw=1.4,
                    label=label,
                    color=_FALLBACK[i % len(_FALLBACK)],
                )
            if logy:
                ax.set_yscale("log")
            ax.set_title(title)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.legend(loc="best")
        return to_svg(fig)


_LAB = (
    "SIGMOID_BAND",
    "activation_figure",
    "depth_profile_figure",
    "global_norm_figure",
    "heatmap_grid_figure",
    "histogram_figure",
    "loss_figure",
)


def __getattr__(name: str) -> Any:
    """The lab's figures under their old path (``plots.activation_figure``), from :mod:`~gradsentry.report.lab_plots`."""
    if name in _LAB:
        from gradsentry.report import lab_plots

        return getattr(lab_plots, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
