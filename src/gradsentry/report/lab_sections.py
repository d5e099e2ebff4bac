"""The sections of the lab's HTML report: what each MLP experiment shows, in words and figures, and the
chapters beyond MLPs (:mod:`gradsentry.lab.chapters`)."""

from __future__ import annotations

import math
from typing import Any

from gradsentry import _taxonomy
from gradsentry.report import lab_plots
from gradsentry.report.page import embed_svg, fmt


def pct(x: float) -> str:
    return "NaN" if not math.isfinite(x) else f"{100 * x:.1f}%"


def _get(result: Any, name: str) -> Any:
    return next((r for r in result.runs if r.name == name), None)


def nonfinite_note(r: Any) -> str:
    return f"NaN/inf from step {r.first_nonfinite_step}" if r.diverged else ""


def mlp_sections(result: Any) -> list[dict[str, Any]]:
    """The MLP experiments' sections (id, heading, paragraphs, figures) of the lab report."""
    cfg = result.config
    depth = cfg.get("depth", "?")
    sections: list[dict[str, Any]] = []

    bound = 0.25 ** int(depth) if isinstance(depth, int) else math.nan
    sections.append(
        {
            "id": "why",
            "heading": "Why gradients vanish: the activation's derivative",
            "paragraphs": [
                "Backpropagation multiplies the gradient, layer after layer, by each activation's derivative and "
                "by the weights. The sigmoid's derivative is at most 0.25 (at x = 0), so through "
                f"{depth} sigmoid layers the derivatives alone shrink the gradient by a factor of up to "
                f"0.25^{depth} = {fmt(bound)}, unless the weights make up for it. tanh's derivative peaks at 1 and "
                "ReLU's is exactly 1 wherever the unit is active, so with those the weights' scale decides.",
            ],
            "figures": [
                embed_svg(
                    lab_plots.activation_figure(),
                    "fig-activations",
                    "Sigmoid, tanh and ReLU with their derivatives",
                    "Each activation (solid) and its derivative (dashed) with the derivative's maximum marked. "
                    f"Green band: the sigmoid's non-saturated region |x| < {lab_plots.SIGMOID_BAND:.1f}, where "
                    f"sigmoid(x) stays between {_taxonomy.SIGMOID_SATURATION:g} and {1 - _taxonomy.SIGMOID_SATURATION:g}.",
                )
            ],
        }
    )

    if result.runs:
        ratios = "; ".join(
            f"{r.title}: {fmt(r.first_last_rms_ratio_init)}"
            for r in result.runs
            if r.family == "vanishing" or r.name == "exploding"
        )
        sections.append(
            {
                "id": "depth-init",
                "heading": "Gradient flow over depth at initialisation",
                "paragraphs": [
                    "Each line is one variant's per-layer gradient norm at step 0, before any update, from the first "
                    "layer (next to the input) to the output head. A line that falls towards the left is a vanishing "
                    "gradient: the first layers receive almost nothing to learn from. First/last-layer gradient RMS "
                    f"ratios at init: {ratios}.",
                ],
                "figures": [
                    embed_svg(
                        lab_plots.depth_profile_figure(result.runs, "init"),
                        "fig-depth-init",
                        "Per-layer gradient norm against depth at initialisation, every variant",
                        "Gradient L2 norm per layer at step 0 (log scale). Solid lines: activation, init and "
                        "architecture variants; dashed: the oversized-init ReLU run and its fixes (same weights "
                        "at step 0, so their lines coincide).",
                    )
                ],
            }
        )
        acc = "; ".join(
            f"{r.title}: {pct(r.test_accuracy)}" + (" (diverged)" if r.diverged else "") for r in result.runs
        )
        sections.append(
            {
                "id": "depth-final",
                "heading": "Gradient flow over depth after training",
                "paragraphs": [
                    "The same measurement at the last logged step with finite gradients. Test accuracy after "
                    f"training (chance is 10%): {acc}.",
                ],
                "figures": [
                    embed_svg(
                        lab_plots.depth_profile_figure(result.runs, "final"),
                        "fig-depth-final",
                        "Per-layer gradient norm against depth after training, every variant",
                        "Gradient L2 norm per layer at the end of training (log scale); runs that diverged "
                        "are shown at their last finite logged step.",
                    )
                ],
            }
        )

    no_bn, bn = _get(result, "sigmoid_default"), _get(result, "sigmoid_batchnorm")
    if no_bn is not None or bn is not None:
        paras = [
            "Histograms of the sigmoid's input (the pre-activation) in the first, a middle and the last hidden "
            "block, at step 0 (filled) and at the end of training (outlined); the green band is the "
            f"non-saturated region |x| < {lab_plots.SIGMOID_BAND:.1f}.",
        ]
        for r in (no_bn, bn):
            if r is None or not r.histograms:
                continue
            parts = []
            for h in r.histograms:
                s0 = getattr(h, "sample_std_init", None)
                if s0 is not None:
                    parts.append(f"block {h.block}: {fmt(s0)}")
            if parts:
                paras.append(
                    f"{r.title}: spread of one unit's pre-activation across the examples of a batch (standard "
                    f"deviation, mean over units) at step 0 — "
                    + "; ".join(parts)
                    + ". "
                    + (
                        "When it is tiny, every input gives the same value deep in the network: the signal about "
                        "the input, and with it the gradient, has vanished even though the units are not saturated."
                        if r.name == "sigmoid_default"
                        else "Batch normalization re-standardizes every unit over the batch, so each block sees an "
                        "input-dependent signal of unit scale and the gradient keeps its size on the way back."
                    )
                )
        sections.append(
            {
                "id": "histograms",
                "heading": "Pre-activations with and without batch normalization",
                "paragraphs": paras,
                "figures": [
                    embed_svg(
                        lab_plots.histogram_figure(no_bn, bn),
                        "fig-histograms",
                        "Pre-activation histograms with and without batch normalization",
                        "Density of the sigmoid's input (log scale) per hidden block; values beyond the "
                        f"plotted range fall in the end bins. Shaded: |x| < {lab_plots.SIGMOID_BAND:.1f}.",
                    )
                ],
            }
        )

    exploding = [r for r in result.runs if r.family == "exploding"]
    if exploding:
        paras = []
        base = _get(result, "exploding")
        if base is not None:
            g = base.global_norm
            head = ", ".join(f"{fmt(x)}" for x in g[:4])
            paras.append(
                f"ReLU with He init scaled by {fmt(cfg.get('oversized_gain'))}: each layer multiplies the signal by "
                f"about that factor, so the output and the gradients grow geometrically with depth. Global gradient "
                f"norm of the first steps: {head}"
                + (
                    f"; the loss and gradients are NaN/inf from step {base.first_nonfinite_step} on."
                    if base.diverged
                    else "."
                )
            )
        for r in exploding:
            if r.name == "exploding":
                continue
            outcome = (
                f"diverged (NaN/inf from step {r.first_nonfinite_step})"
                if r.diverged
                else f"trains to {pct(r.test_accuracy)} test accuracy"
            )
            paras.append(f"{r.title}: {outcome}.")
        wd = _get(result, "exploding_wd")
        if wd is not None:
            paras.append(
                "Weight decay is not enough on its own here: it shrinks the weights by a factor (1 − lr·λ) per step, "
                "far too slowly against an explosion that happens within the first steps."
                if wd.diverged
                else "Weight decay kept this run finite here, but it is a slow pull on the weights rather than a bound on "
                "the gradient: compare its accuracy with the clipping runs."
            )
        sections.append(
            {
                "id": "exploding",
                "heading": "Exploding gradients, and what stops them",
                "paragraphs": paras,
                "figures": [
                    embed_svg(
                        lab_plots.global_norm_figure(exploding, cfg.get("clip_norm")),
                        "fig-global",
                        "Global gradient norm per step for the exploding run and each fix",
                        "Global gradient norm (all parameters, before any fix) at every step, log scale. "
                        "An X marks the first step whose loss or gradient was NaN/inf; the run stops there.",
                    )
                ],
            }
        )

    if result.runs:
        sections.append(
            {
                "id": "heatmaps",
                "heading": "Per-layer gradient norm over time",
                "paragraphs": [
                    "log10 of each Linear layer's gradient norm (rows: first layer at the top, head at the bottom) at "
                    "every logged step, all panels on one colour scale. Dark top rows are layers that never receive a "
                    "useful gradient."
                ],
                "figures": [
                    embed_svg(
                        lab_plots.heatmap_grid_figure(result.runs),
                        "fig-heatmaps",
                        "Heat maps of log10 gradient norm, layer by step, for every variant",
                        "Shared colour scale; magenta cells are NaN/inf.",
                    )
                ],
            }
        )
        sections.append(
            {
                "id": "loss",
                "heading": "Training loss",
                "paragraphs": [
                    "Training cross-entropy per step (moving average over 10 steps); the dotted line is "
                    "chance level, ln 10 ≈ 2.30 nats."
                ],
                "figures": [
                    embed_svg(
                        lab_plots.loss_figure(result.runs),
                        "fig-loss",
                        "Training loss per step",
                        "Left: activation, init and architecture variants. Right: the exploding run and "
                        "its fixes (a diverged run's line ends at its first NaN).",
                    )
                ],
            }
        )
    return sections


def chapter_sections(chapters: dict[str, Any]) -> list[dict[str, Any]]:
    """The sections of the chapters beyond MLPs, in the order given."""
    from gradsentry.lab.chapters import chapter_sections as sections_of

    out: list[dict[str, Any]] = []
    for name, data in chapters.items():
        out.extend(sections_of(name, data))
    return out


__all__ = ["chapter_sections", "mlp_sections", "nonfinite_note", "pct"]
