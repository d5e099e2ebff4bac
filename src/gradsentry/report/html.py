"""Self-contained HTML reports: the lab report and the report of any logged gradsentry run.

Rendering uses jinja2 with autoescaping on, so every string taken from a run (layer names, metadata,
finding texts) is escaped. Figures are SVG documents embedded as ``data:`` URIs in ``<img>`` elements:
the page needs no network access, runs no script, and an SVG inside ``<img>`` cannot run one either.
The shared pieces are in :mod:`gradsentry.report.page`, the lab's sections in
:mod:`gradsentry.report.lab_sections` (their public names are re-exported here).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from gradsentry._version import __version__
from gradsentry.records import Finding, LayerInfo, Run
from gradsentry.report import plots
from gradsentry.report.lab_sections import chapter_sections, mlp_sections, nonfinite_note, pct
from gradsentry.report.page import FigureView, embed_svg, env, finding_view, fmt, fmt_evidence
from gradsentry.report.text import severity_css, severity_rank

if TYPE_CHECKING:
    from gradsentry.diagnosis.series_rules import RunSignals

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
    meta_rows = [(str(k), fmt_evidence(v)) for k, v in meta.items() if k not in ("activations", "config")]
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
    return env().get_template("run.html.j2").render(**ctx)


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
                "acc": pct(r.test_accuracy),
                "acc_class": "good" if r.test_accuracy > 0.85 else ("bad" if r.test_accuracy < 0.3 else ""),
                "diverged": nonfinite_note(r),
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
    settings = [(k, fmt_evidence(v)) for k, v in cfg.items()]
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
        "sections": (mlp_sections(result) if result.runs or not chapters else [])
        + chapter_sections(chapters),
        "findings": [
            {"name": r.name, "title": r.title, "cards": [finding_view(f) for f in r.findings]}
            for r in result.runs
        ],
        "log_every": cfg.get("log_every", "?"),
        "settings": settings,
        "files": [r.jsonl for r in result.runs if r.jsonl],
    }
    return env().get_template("lab.html.j2").render(**ctx)


__all__ = ["FigureView", "embed_svg", "finding_view", "fmt", "render_lab_report", "render_run_report"]
