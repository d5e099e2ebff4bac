"""The lab's figures (activations, gradient flow over depth, global norm, loss, pre-activation histograms,
heat maps of every variant), drawn with the shared style of :mod:`gradsentry.report.plots` and returned as
SVG text; :mod:`gradsentry.report.lab_sections` embeds them."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from typing import Any

import numpy as np

from gradsentry import _taxonomy
from gradsentry._extras import requires_extra
from gradsentry.report.plots import (
    _colorbar,
    _figure,
    _finite_positive,
    _heat,
    _log_matrix,
    _shared_norm,
    to_svg,
    variant_color,
)

with requires_extra("report", "the HTML report"):
    from matplotlib.axes import Axes

SIGMOID_BAND = _taxonomy.SIGMOID_SATURATION_X
"""``|x|`` below which the sigmoid is not saturated: ``ln 99 ≈ 4.6`` (``sigmoid(4.6) ≈ 0.99``), the
Monitor's default band (:data:`gradsentry._taxonomy.SIGMOID_SATURATION`)."""


def activation_figure() -> str:
    """Sigmoid, tanh and ReLU with their derivatives; each derivative's maximum is marked.

    The sigmoid's derivative peaks at 0.25 (x = 0), so every sigmoid layer shrinks the backward signal
    by at least 4x; tanh's peaks at 1; ReLU's is 1 for every x > 0. The sigmoid's non-saturated band
    ``|x| < 4.6`` is shaded.
    """
    x = np.linspace(-7, 7, 701)
    sig = 1 / (1 + np.exp(-x))
    funcs = [
        ("sigmoid", sig, sig * (1 - sig), (0.0, 0.25), r"$\sigma'(0)=0.25$"),
        ("tanh", np.tanh(x), 1 - np.tanh(x) ** 2, (0.0, 1.0), r"$\tanh'(0)=1$"),
        ("ReLU", np.maximum(x, 0), (x > 0).astype(float), None, r"ReLU$'(x)=1$ for $x>0$"),
    ]
    with _figure(10, 3.2, left=0.5, right=0.15, bottom=0.55, top=0.35, wspace=0.22) as fig:
        axes = fig.subplots(1, 3)
        for ax, (name, f, df, peak, label) in zip(axes, funcs, strict=True):
            if name == "sigmoid":
                ax.axvspan(-SIGMOID_BAND, SIGMOID_BAND, color="#2ca02c", alpha=0.08, lw=0)
                ax.text(
                    0,
                    -0.07,
                    f"not saturated: |x| < {SIGMOID_BAND:.1f}",
                    ha="center",
                    va="bottom",
                    fontsize=8,
                    color="#2a7a2a",
                )
            ax.plot(x, f, color="#1f77b4", lw=2, label=name)
            ax.plot(x, df, color="#d62728", lw=2, ls="--", label="derivative")
            if peak is not None:
                ax.plot(*peak, marker="o", color="#d62728", ms=7, zorder=5)
                ax.annotate(
                    label,
                    peak,
                    xytext=(14, 10 if name == "sigmoid" else -4),
                    textcoords="offset points",
                    fontsize=9,
                    color="#d62728",
                    arrowprops={"arrowstyle": "-", "color": "#d62728", "lw": 0.8},
                )
            else:
                ax.plot(x[x > 0], df[x > 0], color="#d62728", lw=3.5, alpha=0.5)
                ax.text(3.5, 1.12, label, ha="center", fontsize=9, color="#d62728")
            ax.set_title(name)
            ax.set_xlabel("pre-activation x")
            ax.set_xlim(-7, 7)
            ax.set_ylim(-1.15 if name == "tanh" else -0.1, 1.45 if name != "ReLU" else 2.0)
            ax.legend(loc="upper left")
        return to_svg(fig)


def _depth_axis(ax: Axes, layer_names: Sequence[str]) -> None:
    n = len(layer_names)
    step = max(1, n // 10)
    ticks = list(range(0, n, step))
    if n - 1 not in ticks:
        ticks.append(n - 1)
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(i) if i < n - 1 else "head" for i in ticks])
    ax.set_xlabel("layer depth (0 = first layer, next to the input)")


def depth_profile_figure(runs: Sequence[Any], which: str = "init", title: str | None = None) -> str:
    """Per-layer gradient norm vs depth for every run on one log axis.

    Args:
        runs: lab :class:`~gradsentry.lab.results.VariantResult` objects.
        which: ``"init"`` (step 0) or ``"final"`` (last finite logged step).
        title: figure title.
    """
    with _figure(10, 4.6, right=3.6) as fig:
        ax = fig.subplots()
        longest: list[str] = []
        skipped = []
        for i, r in enumerate(runs):
            values = r.grad_norm_init if which == "init" else r.grad_norm_final
            y = _finite_positive(values)
            if np.all(np.isnan(y)) or (which == "final" and r.diverged and r.final_step == 0):
                skipped.append(r.title)
                continue
            label = r.title
            if which == "final" and r.diverged:
                label += f" (diverged; step {r.final_step})"
            style = "-" if r.family == "vanishing" else "--"
            ax.plot(
                range(len(y)), y, style, marker="o", ms=3, lw=1.8, color=variant_color(r.name, i), label=label
            )
            if len(r.layer_names) > len(longest):
                longest = list(r.layer_names)
        ax.set_yscale("log")
        ax.set_ylabel("gradient L2 norm of the layer")
        _depth_axis(ax, longest or ["head"])
        ax.set_title(title or ("At initialisation (step 0)" if which == "init" else "After training"))
        if skipped:
            ax.text(
                1.02,
                0.0,
                textwrap.fill("Not shown (no finite gradient after step 0): " + "; ".join(skipped), 50),
                transform=ax.transAxes,
                va="bottom",
                fontsize=8,
                color="#555555",
            )
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))
        return to_svg(fig)


def global_norm_figure(runs: Sequence[Any], clip_norm: float | None = None, zoom_steps: int = 40) -> str:
    """Global gradient norm per step (before any fix) for the exploding run and its fixes, log axis.

    Left: the first ``zoom_steps`` steps, where an explosion from the initialisation happens, with a
    marker per step; right: the whole run. A run that turned NaN/inf gets an ``X`` at its first
    non-finite step, drawn above the highest finite value.
    """
    finite_max = [
        float(np.nanmax(y)) for y in (_finite_positive(r.global_norm) for r in runs) if np.isfinite(y).any()
    ]
    top = max(finite_max, default=1.0) * 4
    with _figure(10, 4.6, bottom=1.25, wspace=0.12) as fig:
        zoom, full = fig.subplots(1, 2, sharey=True)
        for ax, last in ((zoom, zoom_steps), (full, None)):
            for i, r in enumerate(runs):
                y = _finite_positive(r.global_norm)[:last]
                color = variant_color(r.name, i)
                ax.plot(
                    np.arange(len(y)),
                    y,
                    lw=1.2 if last else 0.9,
                    alpha=0.9,
                    color=color,
                    marker="o" if last else None,
                    ms=2.5,
                    label=r.title if last else None,
                )
                s = r.first_nonfinite_step
                if s is not None and (last is None or s < last):
                    ax.plot([s], [top], marker="X", ms=10, color=color, mec="white", zorder=6)
            if clip_norm is not None:
                ax.axhline(clip_norm, color="#0f7f8c", lw=1, ls=":")
            ax.set_yscale("log")
            ax.set_xlabel("optimizer step")
        diverged = [
            f"{r.title}: step {r.first_nonfinite_step}" for r in runs if r.first_nonfinite_step is not None
        ]
        if diverged:
            zoom.text(
                0.98,
                0.97,
                "X = first NaN/inf\n" + "\n".join(diverged),
                transform=zoom.transAxes,
                ha="right",
                va="top",
                fontsize=8,
                bbox={"fc": "white", "ec": "#cccccc", "lw": 0.6},
            )
        if clip_norm is not None:
            full.text(
                0.99,
                clip_norm,
                f"clipping threshold {clip_norm:g} ",
                transform=full.get_yaxis_transform(),
                ha="right",
                va="bottom",
                fontsize=8,
                color="#0f7f8c",
            )
        zoom.set_xlim(-1, zoom_steps)
        zoom.set_title(f"First {zoom_steps} steps")
        full.set_title("Whole run")
        zoom.set_ylabel("global gradient L2 norm (before the fix)")
        fig.legend(loc="lower center", ncols=3, bbox_to_anchor=(0.5, 0.0))
        return to_svg(fig)


def loss_figure(runs: Sequence[Any]) -> str:
    """Training loss per step for every run (moving average over 10 steps), in two panels by family."""
    fams = [f for f in ("vanishing", "exploding") if any(r.family == f for r in runs)]
    with _figure(10, 3.6, wspace=0.08) as fig:
        axes = np.atleast_1d(fig.subplots(1, len(fams), sharey=True))
        for ax, fam in zip(axes, fams, strict=True):
            for i, r in enumerate(runs):
                if r.family != fam:
                    continue
                y = np.asarray(r.loss, dtype=float)
                y = np.where(np.isfinite(y), y, np.nan)
                k = 10
                if len(y) >= k:
                    kernel = np.ones(k) / k
                    y = np.convolve(np.nan_to_num(y, nan=np.nan), kernel, mode="valid")
                ax.plot(np.arange(len(y)), y, lw=1.4, color=variant_color(r.name, i), label=r.title)
            ax.axhline(math.log(10), color="#999999", lw=0.8, ls=":")
            ax.text(
                0.99,
                math.log(10),
                "chance: ln 10",
                transform=ax.get_yaxis_transform(),
                ha="right",
                va="bottom",
                fontsize=8,
                color="#777777",
            )
            ax.set_yscale("log")
            ax.set_xlabel("optimizer step")
            ax.set_title(
                "activation, init and architecture" if fam == "vanishing" else "exploding and its fixes"
            )
            ax.legend(loc="upper right", fontsize=7.5, frameon=True, framealpha=0.9, edgecolor="none")
        axes[0].set_ylabel("training cross-entropy (nats)")
        return to_svg(fig)


def histogram_figure(without: Any, with_bn: Any) -> str:
    """Pre-activation histograms of hidden blocks, without and with batch normalization.

    Rows: the two runs; columns: the histogrammed blocks (first, middle, last). Step 0 is filled, the
    last step is outlined; the sigmoid's non-saturated band ``|x| < 4.6`` is shaded.
    """
    rows = [r for r in (without, with_bn) if r is not None and r.histograms]
    ncols = max(len(r.histograms) for r in rows)
    with _figure(10, 2.4 * len(rows) + 1.0, top=0.6, wspace=0.18, hspace=0.45) as fig:
        axes = np.atleast_2d(fig.subplots(len(rows), ncols, sharex=True, squeeze=False))
        for row, r in enumerate(rows):
            for col, h in enumerate(r.histograms):
                ax = axes[row, col]
                edges = np.asarray(h.edges)
                width = np.diff(edges)
                ax.axvspan(-SIGMOID_BAND, SIGMOID_BAND, color="#2ca02c", alpha=0.08, lw=0)
                for key, kw in (
                    ("init", {"fill": True, "alpha": 0.55, "color": variant_color(r.name)}),
                    ("final", {"fill": False, "color": "#222222", "lw": 1.1}),
                ):
                    counts = getattr(h, key)
                    if counts is None:
                        continue
                    c = np.asarray(counts, dtype=float)
                    dens = c / max(c.sum(), 1.0) / width
                    label = "step 0" if key == "init" else "end of training"
                    # one artist per histogram (a bar per bin is ~50x slower to draw and to embed)
                    ax.stairs(
                        np.where(dens > 0, dens, np.nan) if key == "final" else dens,
                        edges,
                        baseline=1e-4 if key == "init" else None,
                        label=label,
                        **kw,
                    )
                sat0 = h.saturated_frac_init
                sat1 = h.saturated_frac_final
                note = f"|x|>{SIGMOID_BAND:.1f}: {sat0:.0%} at step 0" if sat0 is not None else ""
                if sat1 is not None:
                    note += f", {sat1:.0%} at the end"
                ax.text(
                    0.02,
                    0.96,
                    note,
                    transform=ax.transAxes,
                    fontsize=7.5,
                    va="top",
                    color="#333333",
                    bbox={"fc": "white", "ec": "none", "alpha": 0.85, "pad": 1.5},
                )
                ax.set_title(f"{r.title}: block {h.block}", fontsize=9.5)
                ax.set_yscale("log")
                lo, hi = ax.get_ylim()
                ax.set_ylim(lo, hi * 20)  # head room for the note
                if row == len(rows) - 1:
                    ax.set_xlabel("pre-activation x (input of the sigmoid)")
                if col == 0:
                    ax.set_ylabel("density")
            for col in range(len(r.histograms), ncols):
                axes[row, col].set_visible(False)
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper right", ncols=2, fontsize=8)
        return to_svg(fig)


def heatmap_grid_figure(runs: Sequence[Any]) -> str:
    """Small multiples: log10 per-layer gradient norm, layer (rows) x logged step (columns), per run.

    All panels share one colour scale; NaN/inf cells are magenta.
    """
    mats = []
    for r in runs:
        m = _log_matrix(r.grad_norm_by_step)
        m = np.where(np.isneginf(m), np.nan, m)
        mats.append(m)
    norm = _shared_norm(mats)
    ncols = 3 if len(runs) > 4 else max(1, len(runs))
    nrows = math.ceil(len(runs) / ncols)
    with _figure(10, 2.1 * nrows + 0.9, left=0.6, right=1.3, top=0.5, wspace=0.12, hspace=0.75) as fig:
        axes = np.atleast_2d(fig.subplots(nrows, ncols, squeeze=False))
        im = None
        for k, (r, m) in enumerate(zip(runs, mats, strict=True)):
            ax = axes[k // ncols, k % ncols]
            im = _heat(ax, m, r.logged_steps, r.layer_names, norm)
            ax.set_title(textwrap.fill(r.title, 34), fontsize=8.5)
            ax.grid(False)
            n = len(r.layer_names)
            ax.set_yticks([0, n - 1])
            ax.set_yticklabels(["first", "head"], fontsize=7.5)
            ax.tick_params(axis="x", labelsize=7.5)
            if k // ncols == nrows - 1:
                ax.set_xlabel("step", fontsize=8.5)
        for k in range(len(runs), nrows * ncols):
            axes[k // ncols, k % ncols].set_visible(False)
        if im is not None:
            _colorbar(fig, im, "log10 gradient L2 norm\n(magenta: NaN/inf)", 1.3)
        return to_svg(fig)


__all__ = [
    "SIGMOID_BAND",
    "activation_figure",
    "depth_profile_figure",
    "global_norm_figure",
    "heatmap_grid_figure",
    "histogram_figure",
    "loss_figure",
]
