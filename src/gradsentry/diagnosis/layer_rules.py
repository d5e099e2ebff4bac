"""Per-layer rules: what only the Monitor's per-layer records can show, on the same footing as the series.

Vanishing by depth (first- vs last-layer gradient RMS), update-to-weight ratio, saturated and dead units,
stalled layers (the attribution of series findings to layers is :mod:`~gradsentry.diagnosis.attribution`). Statistics skip NaN/inf values (those are the ``nonfinite`` rule's business) and never raise on them.
Layers whose gradient is None (``has_grad=False``: frozen or unused) are left out of the gradient rules.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from gradsentry import _taxonomy
from gradsentry.diagnosis.advice import (
    SATURATING_ACTIVATIONS,
    RemedyContext,
    remedies_for,
)
from gradsentry.diagnosis.signals import MAD_TO_SIGMA, rolling_median
from gradsentry.diagnosis.thresholds import Thresholds
from gradsentry.records import Finding, LayerStats, StepRecord

__all__ = ["LayerContext", "layer_findings"]

_TOP = 5
"""How many layers the evidence lists name at most (display only)."""


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _first(pair: tuple[int, LayerStats]) -> int:
    return pair[0]


def _ls_slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of y over x (same as ``numpy.polyfit(x, y, 1)[0]``); x must not be constant."""
    mx = math.fsum(x) / len(x)
    my = math.fsum(y) / len(y)
    sxx = math.fsum((a - mx) ** 2 for a in x)
    return math.fsum((a - mx) * (b - my) for a, b in zip(x, y, strict=True)) / sxx


def _robust_z(x: float, history: Sequence[float], floor: float) -> float:
    """Robust z-score of ``x`` against ``history`` (sigma = 1.4826 * MAD, at least ``floor``)."""
    med = statistics.median(history)
    mad = statistics.median(abs(h - med) for h in history)
    return (x - med) / max(MAD_TO_SIGMA * mad, floor)


def _fmt_names(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(n or "<root>" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


@dataclass
class LayerContext:
    records: list[StepRecord]
    t: Thresholds
    depth: dict[str, int]
    types: dict[str, str]
    activation_types: set[str]
    nonfinite_idx: list[int] = field(default_factory=list)
    remedy: RemedyContext = field(default_factory=RemedyContext)
    saturation_band: dict[str, float] = field(default_factory=dict)
    """The bands the saturated fractions were measured with (the run header's ``meta["saturation"]``);
    empty: the thresholds' own."""

    def layer_depth(self, layer: LayerStats) -> int:
        return self.depth.get(layer.name, layer.depth)

    @property
    def saturating(self) -> bool:
        return bool((self.activation_types | set(self.types.values())) & SATURATING_ACTIVATIONS)

    @property
    def has_normalization(self) -> bool:
        return any(_taxonomy.is_normalization(t) for t in self.types.values())

    def advice_context(self, **changes: Any) -> RemedyContext:
        """The run's remedy context with what the layers show (saturating activations, normalization)."""
        return replace(
            self.remedy, saturating=self.saturating, has_normalization=self.has_normalization, **changes
        )


def _leads_to_nonfinite(ctx: LayerContext, first_index: int) -> bool:
    return any(first_index <= j <= first_index + ctx.t.nonfinite_link_window for j in ctx.nonfinite_idx)


EMBEDDING_LAYERS = frozenset({"Embedding", "EmbeddingBag"})
"""Lookup tables: a batch touches only the rows of its tokens, so their per-entry gradient RMS is
diluted by every untouched row (a 50,000-token vocabulary reads 1e-3 of a dense layer's) and says
nothing about the gradient flowing back through depth; the depth-profile rules leave them out."""


def _profile_layer(ctx: LayerContext, layer: LayerStats) -> bool:
    """A layer the first/last-layer gradient profile reads: a usable gradient, not a lookup table."""
    return _usable_grad(layer) and ctx.types.get(layer.name, "") not in EMBEDDING_LAYERS


def _usable_grad(layer: LayerStats) -> bool:
    """A layer whose gradient RMS can be read on a log scale: it has a gradient, elements, finite RMS > 0."""
    return layer.has_grad and layer.numel > 0 and _finite(layer.grad_rms) and layer.grad_rms > 0


def _grad_bad(rec: StepRecord) -> bool:
    if not math.isfinite(rec.global_norm):
        return True
    return any(
        layer.has_grad and (layer.nonfinite > 0 or not math.isfinite(layer.grad_norm)) for layer in rec.layers
    )


def _step_bad(rec: StepRecord) -> bool:
    return _grad_bad(rec) or (rec.loss is not None and not math.isfinite(rec.loss))


def _vanishing(ctx: LayerContext) -> Finding | None:
    """Gradient RMS falling with depth towards the input by more than ``vanishing_ratio``, on most steps."""
    t = ctx.t
    ratios: list[float] = []
    slopes: list[float] = []
    flagged: list[int] = []
    rel_log: dict[str, list[float]] = {}
    first_pair: tuple[str, str] | None = None
    for rec in ctx.records:
        pairs = sorted(
            ((ctx.layer_depth(layer), layer) for layer in rec.layers if _profile_layer(ctx, layer)),
            key=_first,
        )
        if len(pairs) < 2 or pairs[0][0] == pairs[-1][0]:
            continue
        usable = [layer for _, layer in pairs]
        logs = [math.log10(layer.grad_rms) for layer in usable]
        ratio = usable[0].grad_rms / usable[-1].grad_rms
        ratios.append(ratio)
        slopes.append(_ls_slope([float(d) for d, _ in pairs], logs))
        if first_pair is None:
            first_pair = (usable[0].name, usable[-1].name)
        if ratio < t.vanishing_ratio:
            flagged.append(rec.step)
        for layer, value in zip(usable, logs, strict=True):
            rel_log.setdefault(layer.name, []).append(value - logs[-1])
    if not ratios or len(flagged) / len(ratios) <= t.sustained_fraction:
        return None
    assert first_pair is not None
    median_ratio = statistics.median(ratios)
    median_slope = statistics.median(slopes)
    med_rel = {name: statistics.median(values) for name, values in rel_log.items()}
    by_smallest = sorted(med_rel, key=lambda n: med_rel[n])
    implicated = [n for n in by_smallest if med_rel[n] < math.log10(t.vanishing_ratio)] or by_smallest[:1]
    severity = "error" if median_ratio < t.vanishing_error_ratio else "warning"
    evidence: dict[str, Any] = {
        "first_last_rms_ratio_median": median_ratio,
        "first_last_rms_ratio_first_step": ratios[0],
        "log10_rms_slope_per_layer": median_slope,
        "log10_rms_slope_first_step": slopes[0],
        "first_layer": first_pair[0],
        "last_layer": first_pair[1],
        "smallest_rms_layers": by_smallest[:3],
        "steps_fraction": len(flagged) / len(ratios),
        "steps_evaluated": len(ratios),
        "threshold": t.vanishing_ratio,
    }
    per_layer = 10.0 ** (-median_slope)
    cause = (
        " The model uses saturating activations (Sigmoid/Tanh): their derivative is at most 0.25 (sigmoid) "
        "or 1 "
        "(tanh) and near zero when saturated, so the signal shrinks at every layer."
        if ctx.saturating
        else ""
    )
    explanation = (
        f"On {len(flagged)} of {len(ratios)} logged steps the gradient reaching the first layer "
        f"({first_pair[0] or '<root>'}) is less than {t.vanishing_ratio:g} times the gradient at the last "
        "layer "
        f"({first_pair[1] or '<root>'}); the median ratio of their RMS is {median_ratio:.2e}. Going back "
        "towards "
        f"the input, the gradient RMS shrinks by a factor of about {per_layer:.3g} per layer "
        f"({median_slope:.3f} decades per layer), so the early layers barely learn.{cause}"
    )
    remedies = remedies_for("vanishing", ctx.advice_context())
    return Finding("vanishing", severity, flagged, implicated, evidence, explanation, remedies)


def _forward_std_ratio(rec: StepRecord) -> tuple[float, str, str] | None:
    """Last over first watched activation's pre-activation std on one record (forward order), with their
    names; None when fewer than two activations have a finite std > 0."""
    acts = sorted((a for a in rec.activations if _finite(a.pre_std) and a.pre_std > 0), key=lambda a: a.depth)
    if len(acts) < 2:
        return None
    return acts[-1].pre_std / acts[0].pre_std, acts[0].name, acts[-1].name


def _first_last_ratio(ctx: LayerContext, rec: StepRecord) -> tuple[float, list[LayerStats]] | None:
    pairs = sorted(
        ((ctx.layer_depth(layer), layer) for layer in rec.layers if _profile_layer(ctx, layer)), key=_first
    )
    if len(pairs) < 2 or pairs[0][0] == pairs[-1][0]:
        return None
    usable = [layer for _, layer in pairs]
    return usable[0].grad_rms / usable[-1].grad_rms, usable


def _stalled_at_init(ctx: LayerContext) -> Finding | None:
    """Vanishing at the first logged step (first/last gradient RMS or the forward signal) and a loss that
    never fell by more than ``stall_loss_gain``: the run stalled at init (He et al. 2015, Fig. 3)."""
    t = ctx.t
    recs = [r for r in ctx.records if r.loss is not None and math.isfinite(r.loss)]
    if len(recs) < t.stall_min_points:
        return None
    first = ctx.records[0]
    grad = _first_last_ratio(ctx, first)
    fwd = _forward_std_ratio(first)
    by_grad = grad is not None and grad[0] < t.vanishing_ratio
    by_fwd = fwd is not None and fwd[0] < t.forward_collapse_ratio
    if not (by_grad or by_fwd):
        return None
    loss = np.array([float(r.loss) for r in recs])  # type: ignore[arg-type]
    start = float(np.median(loss[: min(3, loss.size)]))
    best = float(rolling_median(loss, t.smooth_window).min())
    if start <= 0 or best < (1.0 - t.stall_loss_gain) * start:
        return None
    level = float(np.median(loss[-max(1, loss.size // 3) :]))
    classes = round(math.exp(level)) if level < 20 else 0
    chance = classes >= 2 and abs(level - math.log(classes)) <= 0.01 * math.log(classes)
    last = _first_last_ratio(ctx, ctx.records[-1])
    last_fwd = _forward_std_ratio(ctx.records[-1])
    implicated: list[str] = []
    if grad is not None:
        usable = grad[1]
        top = usable[-1].grad_rms
        implicated = [layer.name for layer in usable if layer.grad_rms / top < t.vanishing_ratio]
        implicated = implicated or [usable[0].name]
    evidence: dict[str, Any] = {
        "pattern": "stalled_init",
        "first_step": first.step,
        "first_last_rms_ratio_init": grad[0] if grad is not None else None,
        "first_last_rms_ratio_last_step": last[0] if last is not None else None,
        "forward_std_ratio_init": fwd[0] if fwd is not None else None,
        "forward_std_ratio_last_step": last_fwd[0] if last_fwd is not None else None,
        "first_activation": fwd[1] if fwd is not None else None,
        "last_activation": fwd[2] if fwd is not None else None,
        "loss_start": start,
        "loss_best": best,
        "loss_end": level,
        "loss_gain": 1.0 - best / start,
        "points": int(loss.size),
        "threshold": t.vanishing_ratio,
        "forward_threshold": t.forward_collapse_ratio,
        "loss_gain_threshold": t.stall_loss_gain,
    }
    if chance:
        evidence["chance_level_classes"] = classes
    parts = []
    if by_grad and grad is not None:
        parts.append(
            f"the gradient reaching the first layer ({grad[1][0].name or '<root>'}) was {grad[0]:.2e} times "
            f"the last layer's ({grad[1][-1].name or '<root>'}), under {t.vanishing_ratio:g}"
        )
    if by_fwd and fwd is not None:
        parts.append(
            f"the forward signal collapsed: the pre-activation std of {fwd[2]} was {fwd[0]:.2e} times that of "
            f"{fwd[1]}, under {t.forward_collapse_ratio:g}"
        )
    later = ""
    if last is not None and last[0] >= t.vanishing_ratio:
        later = (
            f" Later steps drift above the threshold (first/last ratio {last[0]:.2e} at step "
            f"{ctx.records[-1].step}), but the loss shows that the early layers never learned."
        )
    chance_text = (
        f" {level:.4g} is ln({classes}), the cross-entropy of guessing among {classes} classes."
        if chance
        else ""
    )
    explanation = (
        f"At the first logged step (step {first.step}) "
        + "; and ".join(parts)
        + ". The loss then never fell "
        f"by more than {t.stall_loss_gain:.0%} of its start over {loss.size} logged points (start {start:.4g}, "
        f"best {best:.4g}, end {level:.4g}).{chance_text} The network stalled at init: a deep net whose "
        "init shrinks the signal at every layer (He et al. 2015: a 30-layer ReLU net with Xavier init does "
        f"not learn; Glorot & Bengio 2010 for sigmoid nets).{later}"
    )
    severity = "error"
    remedies = remedies_for("vanishing", ctx.advice_context())
    return Finding("vanishing", severity, [first.step], implicated, evidence, explanation, remedies)


def _update_ratio(ctx: LayerContext) -> Finding | None:
    """A layer's update-to-weight ratio above ``update_ratio_max`` on most of its logged steps, or above
    ``update_ratio_any_step`` on any one."""
    t = ctx.t
    per_layer: dict[str, list[tuple[int, int, float]]] = {}  # name -> [(record index, step, ratio)]
    for i, rec in enumerate(ctx.records):
        for layer in rec.layers:
            r = layer.update_ratio
            if layer.has_grad and r is not None and _finite(r):
                per_layer.setdefault(layer.name, []).append((i, rec.step, r))
    worst: dict[str, float] = {}
    worst_step: dict[str, int] = {}
    hit_index: dict[int, int] = {}  # record index -> step
    for name, series in per_layer.items():
        over = [(i, step, r) for i, step, r in series if r > t.update_ratio_max]
        sustained = len(over) > t.sustained_fraction * len(series)
        big = [(i, step, r) for i, step, r in over if r > t.update_ratio_any_step]
        flagged = over if sustained else big
        if not flagged:
            continue
        _, step_w, r_w = max(flagged, key=lambda h: h[2])
        worst[name], worst_step[name] = r_w, step_w
        hit_index.update({i: step for i, step, _ in flagged})
    if not worst:
        return None
    steps = [hit_index[i] for i in sorted(hit_index)]
    first_index = min(hit_index)
    ranked = sorted(worst, key=lambda n: -worst[n])
    top = ranked[0]
    leads = _leads_to_nonfinite(ctx, first_index)
    evidence: dict[str, Any] = {
        "pattern": "update_ratio",
        "first_step": steps[0],
        "update_ratio_steps": steps,
        "max_update_ratio": worst[top],
        "max_update_ratio_layer": top,
        "max_update_ratio_step": worst_step[top],
        "layer_max_update_ratio": {n: worst[n] for n in ranked[:_TOP]},
        "leads_to_nonfinite": leads,
        "update_ratio_limit": t.update_ratio_max,
        "update_ratio_any_step": t.update_ratio_any_step,
    }
    explanation = (
        f"On {len(steps)} logged step(s), starting at step {steps[0]}, an optimizer step changed a layer's "
        f"weights by more than {t.update_ratio_max:g} of their norm (on most of its logged steps, or by more "
        f"than {t.update_ratio_any_step:g} at once); the largest update-to-weight ratio was "
        f"{worst[top]:.3g} in {top or '<root>'} at step {worst_step[top]}. About 1e-3 is healthy: updates "
        "this "
        "large overwrite what the layer has learned and usually precede divergence."
    )
    severity = "error" if leads else "warning"
    return Finding(
        "exploding",
        severity,
        steps,
        ranked,
        evidence,
        explanation,
        remedies_for("exploding", ctx.advice_context()),
    )


def _activation_rule(ctx: LayerContext, kind: str, attr: str, limit: float) -> Finding | None:
    """More than ``limit`` of a layer's units saturated (or dead) on most logged steps that measure it."""
    series: dict[str, list[tuple[int, float]]] = {}
    types: dict[str, str] = {}
    for rec in ctx.records:
        for act in rec.activations:
            value = getattr(act, attr)
            if _finite(value):
                series.setdefault(act.name, []).append((rec.step, float(value)))
                types[act.name] = act.type
    flagged: dict[str, float] = {}
    fractions: dict[str, float] = {}
    steps: set[int] = set()
    for name, values in series.items():
        hits = [s for s, v in values if v > limit]
        frac = len(hits) / len(values)
        if frac > ctx.t.sustained_fraction:
            flagged[name] = statistics.median(v for _, v in values)
            fractions[name] = frac
            steps.update(hits)
    if not flagged:
        return None
    ranked = sorted(flagged, key=lambda n: -flagged[n])
    top = ranked[0]
    evidence: dict[str, Any] = {
        "median_fraction": {n: flagged[n] for n in ranked},
        "steps_fraction": {n: fractions[n] for n in ranked},
        "worst_layer": top,
        "worst_median_fraction": flagged[top],
        "limit": limit,
    }
    label = _fmt_names(ranked)
    if kind == "saturation":
        band = {
            "sigmoid": float(ctx.saturation_band.get("sigmoid", ctx.t.sigmoid_saturation)),
            "tanh": float(ctx.saturation_band.get("tanh", ctx.t.tanh_saturation)),
        }
        evidence["band"] = band
        kind_top = types.get(top, "bounded")
        row = _taxonomy.ACTIVATION_TABLE.get(kind_top)
        rule = row.saturation if row is not None else None
        where = (
            f"outputs below {band['sigmoid']:g} or above {1 - band['sigmoid']:g}"
            if rule == "sigmoid_band"
            else f"|output| above {1 - band['tanh']:g}"
            if rule == "tanh_band"
            else "the flat region of the activation"
        )
        explanation = (
            f"In {label}, more than {limit:.0%} of the outputs sit in the flat region of the activation on "
            f"most logged steps (median {flagged[top]:.0%} in {top or '<root>'}, a {kind_top} activation: "
            f"{where}). There the derivative is close to zero, so almost no gradient flows back through "
            "these units; pre-activations are too large, usually from the initialization scale or a high "
            "learning rate, or the layer was pushed to an asymptote early in training (Glorot & Bengio "
            "2010)."
        )
    else:
        explanation = (
            f"In {label}, more than {limit:.0%} of the units output zero for every sample of the batch on "
            "most "
            f"logged steps (median {flagged[top]:.0%} in {top or '<root>'}). A dead ReLU unit gets no "
            "gradient and "
            "cannot recover, so the layer's capacity is lost; large updates early in training are the usual "
            "cause."
        )
    return Finding(kind, "warning", sorted(steps), ranked, evidence, explanation, remedies_for(kind))


def _stalled(ctx: LayerContext) -> Finding | None:
    """A layer whose update-to-weight ratio stays below ``stalled_ratio``; the model's median far higher."""
    t = ctx.t
    per_layer: dict[str, list[tuple[int, float, float]]] = {}
    for rec in ctx.records:
        ratios = [
            (layer.name, float(layer.update_ratio))
            for layer in rec.layers
            if layer.has_grad and layer.update_ratio is not None and math.isfinite(layer.update_ratio)
        ]
        if len(ratios) < 2:
            continue
        median = statistics.median(r for _, r in ratios)
        for name, r in ratios:
            per_layer.setdefault(name, []).append((rec.step, r, median))
    flagged: dict[str, float] = {}
    model_median: dict[str, float] = {}
    steps: set[int] = set()
    for name, entries in per_layer.items():
        hits = [
            s
            for s, r, med in entries
            if r < t.stalled_ratio and med >= max(t.stalled_gap * r, t.stalled_ratio)
        ]
        if len(hits) / len(entries) > t.sustained_fraction:
            flagged[name] = statistics.median(r for _, r, _ in entries)
            model_median[name] = statistics.median(med for _, _, med in entries)
            steps.update(hits)
    if not flagged:
        return None
    ranked = sorted(flagged, key=lambda n: flagged[n])
    top = ranked[0]
    evidence: dict[str, Any] = {
        "median_update_ratio": {n: flagged[n] for n in ranked},
        "model_median_update_ratio": model_median[top],
        "stalled_ratio": t.stalled_ratio,
        "gap": t.stalled_gap,
    }
    explanation = (
        f"{_fmt_names(ranked)} barely change{'s' if len(ranked) == 1 else ''}: the median update-to-weight "
        "ratio of "
        f"{top or '<root>'} is {flagged[top]:.2e} (limit {t.stalled_ratio:g}) while the model's median is "
        f"{model_median[top]:.2e}, at least {t.stalled_gap:g} times higher. The layer is not learning; its "
        "parameters "
        "may be missing from the optimizer, have a zero learning rate, or receive a vanishing gradient."
    )
    return Finding(
        "stalled_layer",
        "warning",
        sorted(steps),
        ranked,
        evidence,
        explanation,
        remedies_for("stalled_layer"),
    )


def layer_findings(ctx: LayerContext) -> list[Finding]:
    """Every per-layer rule (vanishing by depth or stalled at init, update ratio, saturation, dead units,
    stalled layers)."""
    t = ctx.t
    stalled = _stalled_at_init(ctx)  # the more specific verdict when the loss shows the stall
    found = [
        stalled if stalled is not None else _vanishing(ctx),
        _update_ratio(ctx),
        _activation_rule(ctx, "saturation", "saturated_frac", t.saturated_frac),
        _activation_rule(ctx, "dead_units", "dead_frac", t.dead_frac),
        _stalled(ctx),
    ]
    return [f for f in found if f is not None]
