"""Self-contained HTML reports: the lab report and the report of any logged gradsentry run.

Rendering uses jinja2 with autoescaping on, so every string taken from a run (layer names, metadata,
finding texts) is escaped. Figures are SVG documents embedded as ``data:`` URIs in ``<img>`` elements:
the page needs no network access, runs no script, and an SVG inside ``<img>`` cannot run one either.
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

from gradsentry._extras import requires_extra
from gradsentry._version import __version__
from gradsentry.records import Finding, LayerInfo, Run
from gradsentry.report import plots
from gradsentry.report.text import SEVERITY_LOOK, severity_css, severity_rank

with requires_extra("report", "the HTML report"):
    import jinja2

if TYPE_CHECKING:
    from gradsentry.diagnosis.series_rules import RunSignals

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
def _env() -> jinja2.Environment:
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


def _fmt_evidence(value: Any, limit: int = 8) -> str:
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
        "evidence": [(str(k), _fmt_evidence(v)) for k, v in finding.evidence.items()],
        "remedies": [{"action": r.action, "api": r.api, "reference": r.reference} for r in finding.remedies],
    }


# ---------------------------------------------------------------------------------------------------- any run


def render_run_report(
    run: Run,
    *,
    title: str | None = None,
    findings: Sequence[Finding] | None = None,
    signals: RunSignals | None = None,
) -> str:
    """Render the HTML report of one logged run (e.g. read with :func:`gradsentry.read_jsonl`).

    The page shows gradient flow over depth (per-layer gradient norm at a few logged steps), the global
    gradient norm and loss over time, a heat map layer x step of log10 gradient norm, and the findings
    with their evidence and remedies.

    Args:
        run: the run (header, step records, stored findings).
        title: page title (default: from the header's metadata).
        findings: findings to show; default: the findings stored with the run, or, if none were stored,
            :func:`gradsentry.diagnose` over its records.
        signals: the whole run's series when ``run.records`` are only the records kept of a long run
            (:func:`gradsentry.logs.run_jsonl.scan_jsonl`): the counts (logged steps, non-finite steps) and
            the diagnosis then cover every step, and the page says the plots show the records kept.

    Returns:
        The HTML document as a string (UTF-8 text, no external resources).
    """
    meta = dict(run.header.meta)
    if findings is None:
        findings = list(run.findings)
        if not findings and run.records:
            from gradsentry.diagnose import diagnose

            findings = diagnose(run.records, layers=run.header.layers, meta=meta, signals=signals)
    name = meta.get("variant") or meta.get("model") or "run"
    page_title = title or f"gradsentry report: {name}"
    figures: list[FigureView] = []
    if run.records:
        figures = [
            embed_svg(
                plots.run_depth_figure(run),
                "fig-depth",
                "Per-layer gradient norm against depth",
                "Gradient L2 norm of each layer (x: depth order, first = next to the input) at a few logged "
                "steps, first (dark blue) to last (yellow). A line falling towards the left means gradients "
                "vanish on their way back to the input; lines rising over time mean they grow.",
            ),
            embed_svg(
                plots.run_time_figure(run),
                "fig-time",
                "Global gradient norm and loss over time",
                "Left: the global gradient norm (all parameters together) at each logged step, log scale; "
                "NaN/inf steps are marked. Right: the training loss.",
            ),
            embed_svg(
                plots.run_heatmap_figure(run),
                "fig-heat",
                "Heat map of log gradient norm per layer and step",
                "log10 of each layer's gradient norm (rows: layers in depth order; columns: logged steps). "
                "Dark rows are layers that receive almost no gradient; magenta cells are NaN/inf.",
            ),
        ]
    if signals is not None:  # counts over every step of the run, not only the records kept
        steps = signals.steps.tolist()
        bad_mask = ~np.isfinite(signals.grad) | (signals.has_loss & ~np.isfinite(signals.loss))
        bad = signals.steps[bad_mask].tolist()
    else:
        steps = [r.step for r in run.records]
        bad = [
            r.step for r in run.records if not r.finite or (r.loss is not None and not math.isfinite(r.loss))
        ]
    meta_rows = [(str(k), _fmt_evidence(v)) for k, v in meta.items() if k not in ("activations", "config")]
    layer_rows = []
    if run.records:
        first, last = run.records[0], run.records[-1]
        firsts = {ls.name: ls for ls in first.layers}
        lasts = {ls.name: ls for ls in last.layers}
        infos = sorted(run.header.layers, key=lambda i: i.depth) or [
            LayerInfo(ls.name, "", ls.depth, ls.numel) for ls in sorted(first.layers, key=lambda x: x.depth)
        ]
        for info in infos:
            a, b = firsts.get(info.name), lasts.get(info.name)
            layer_rows.append(
                {
                    "depth": info.depth,
                    "name": info.name or "<root>",
                    "type": info.type,
                    "params": info.params,
                    "first": fmt(a.grad_norm) if a is not None and a.has_grad else "no gradient",
                    "last": fmt(b.grad_norm) if b is not None and b.has_grad else "no gradient",
                    "update": fmt(b.update_ratio) if b is not None else "–",
                }
            )
    ctx = {
        "version": __version__,
        "severity_css": severity_css(),
        "title": page_title,
        "subtitle": "Gradient flow of a logged run, recorded by gradsentry.Monitor.",
        "n_records": len(steps),
        "n_plotted": len(run.records) if signals is not None and len(run.records) < len(steps) else None,
        "step_range": f"{steps[0]}–{steps[-1]}" if steps else "",
        "n_layers": len(run.header.layers) or (len(run.records[0].layers) if run.records else 0),
        "n_nonfinite": len(bad),
        "first_nonfinite": bad[0] if bad else None,
        "meta": meta_rows,
        "layers": layer_rows,
        "first_step": steps[0] if steps else None,
        "last_step": steps[-1] if steps else None,
        "figures": figures,
        "findings": [finding_view(f) for f in findings],
    }
    return _env().get_template("run.html.j2").render(**ctx)


# ---------------------------------------------------------------------------------------------------- the lab


def _pct(x: float) -> str:
    return "NaN" if not math.isfinite(x) else f"{100 * x:.1f}%"


def _get(result: Any, name: str) -> Any:
    return next((r for r in result.runs if r.name == name), None)


def _nonfinite_note(r: Any) -> str:
    return f"NaN/inf from step {r.first_nonfinite_step}" if r.diverged else ""


def _sections(result: Any) -> list[dict[str, Any]]:
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
                    plots.activation_figure(),
                    "fig-activations",
                    "Sigmoid, tanh and ReLU with their derivatives",
                    "Each activation (solid) and its derivative (dashed) with the derivative's maximum marked. "
                    "Green band: the sigmoid's non-saturated region |x| < 4.6, where sigmoid(x) stays between "
                    "0.01 and 0.99.",
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
                        plots.depth_profile_figure(result.runs, "init"),
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
            f"{r.title}: {_pct(r.test_accuracy)}" + (" (diverged)" if r.diverged else "") for r in result.runs
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
                        plots.depth_profile_figure(result.runs, "final"),
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
            "non-saturated region |x| < 4.6.",
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
                        plots.histogram_figure(no_bn, bn),
                        "fig-histograms",
                        "Pre-activation histograms with and without batch normalization",
                        "Density of the sigmoid's input (log scale) per hidden block; values beyond the "
                        f"plotted range fall in the end bins. Shaded: |x| < {plots.SIGMOID_BAND}.",
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
                else f"trains to {_pct(r.test_accuracy)} test accuracy"
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
                        plots.global_norm_figure(exploding, cfg.get("clip_norm")),
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
                        plots.heatmap_grid_figure(result.runs),
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
                        plots.loss_figure(result.runs),
                        "fig-loss",
                        "Training loss per step",
                        "Left: activation, init and architecture variants. Right: the exploding run and "
                        "its fixes (a diverged run's line ends at its first NaN).",
                    )
                ],
            }
        )
    return sections


def _chapter_sections(chapters: dict[str, Any]) -> list[dict[str, Any]]:
    from gradsentry.lab.chapters import chapter_sections

    out: list[dict[str, Any]] = []
    for name, data in chapters.items():
        out.extend(chapter_sections(name, data))
    return out


def render_lab_report(result: Any) -> str:
    """Render the lab's HTML report from a :class:`gradsentry.lab.LabResult`.

    Args:
        result: the lab result (from :func:`gradsentry.lab.run_lab` or :func:`gradsentry.lab.read_results`).

    Returns:
        One self-contained HTML document (figures embedded as SVG, no network, no script).
    """
    cfg = result.config
    data = result.data
    chapters: dict[str, Any] = dict(getattr(result, "chapters", None) or {})
    overview = []
    for r in result.runs:
        kinds: dict[str, str] = {}
        for f in r.findings:
            k, s = str(f.get("kind", "")), str(f.get("severity", "warning"))
            if severity_rank(s) >= severity_rank(kinds.get(k, "info")):
                kinds[k] = s
        overview.append(
            {
                "name": r.name,
                "title": r.title,
                "shows": r.shows,
                "ratio": fmt(r.first_last_rms_ratio_init),
                "acc": _pct(r.test_accuracy),
                "acc_class": "good" if r.test_accuracy > 0.85 else ("bad" if r.test_accuracy < 0.3 else ""),
                "diverged": _nonfinite_note(r),
                "findings": list(kinds.items()),
                "time": f"{r.time_s:.1f} s",
            }
        )
    subtitle = (
        f"{data.get('name', 'digits')}: {data.get('n_train', '?')} training and {data.get('n_test', '?')} test images "
        f"of 8x8 pixels, 10 classes. Deep MLPs of {cfg.get('depth')} hidden blocks x {cfg.get('width')} units, "
        f"SGD (lr {fmt(cfg.get('lr'))}, momentum {fmt(cfg.get('momentum'))}, cosine decay), batch "
        f"{cfg.get('batch_size')}, {cfg.get('epochs')} epochs, seed {cfg.get('seed')}; "
        f"{len(result.runs)} runs in {result.wall_time_s:.1f} s."
        + (
            " Chapters beyond MLPs: "
            + ", ".join(f"{v.get('title', k)} ({v.get('time_s', 0):.1f} s)" for k, v in chapters.items())
            + "."
            if chapters
            else ""
        )
    )
    settings = [(k, _fmt_evidence(v)) for k, v in cfg.items()]
    settings += [(f"environment: {k}", str(v)) for k, v in result.environment.items()]
    ctx = {
        "version": __version__,
        "severity_css": severity_css(),
        "title": "gradsentry lab: vanishing and exploding gradients, reproduced and fixed",
        "subtitle": subtitle,
        "overview_intro": (
            "Every variant trains the same network shape on the same data with the same optimizer, "
            "mini-batches and budget; only the activation, the initialisation, the architecture or the fix "
            "differs. The ratio column divides the first layer's gradient RMS by the last layer's at step 0 "
            "(1 = gradients keep their size through the network). Findings are shown exactly as "
            "gradsentry.diagnose reports them; their evidence and remedies are listed further down."
        ),
        "overview": overview,
        "sections": (_sections(result) if result.runs or not chapters else []) + _chapter_sections(chapters),
        "findings": [
            {"name": r.name, "title": r.title, "cards": [finding_view(f) for f in r.findings]}
            for r in result.runs
        ],
        "log_every": cfg.get("log_every", "?"),
        "settings": settings,
        "files": [r.jsonl for r in result.runs if r.jsonl],
    }
    return _env().get_template("lab.html.j2").render(**ctx)
