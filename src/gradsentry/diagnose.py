"""Diagnosis: turn step records into findings (vanishing, exploding, non-finite, saturation, dead units...).

Each rule is a small pure function over plain :class:`~gradsentry.records.StepRecord` objects, so diagnosis
works the same on a live :class:`Monitor`'s history and on a JSONL file read back later. Every threshold is a
named, documented field of :class:`Thresholds` (with its source) and can be overridden by keyword::

    findings = diagnose(records, layers=header.layers, spike_z=8.0)

Statistics skip NaN/inf values (they are the business of the ``nonfinite`` rule) and never raise on them.
Layers whose gradient is None (``has_grad=False``: frozen or unused) are left out of the gradient rules, so a
frozen layer is never read as a vanishing gradient.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gradsentry.records import (
    SEVERITY_ORDER,
    ActivationStats,
    Finding,
    LayerInfo,
    LayerStats,
    StepRecord,
)
from gradsentry.remedies_catalog import (
    NORMALIZATION_LAYERS,
    SATURATING_ACTIVATIONS,
    RemedyContext,
    remedies_for,
)

__all__ = ["Thresholds", "diagnose"]

logger = logging.getLogger("gradsentry")

_MAD_TO_SIGMA = 1.4826
"""Scale turning a median absolute deviation into a standard deviation for Gaussian data (1 / Φ⁻¹(3/4))."""

_TOP = 5
"""How many layers the evidence lists name at most (display only)."""


@dataclass(frozen=True)
class Thresholds:
    """Every threshold the diagnosis rules use, with its source; override any of them by keyword.

    "Logged steps" are the records passed to :func:`diagnose` (one per ``Monitor.step`` that logged), so
    windows count records, not optimizer steps.

    Attributes:
        vanishing_ratio: the first layer's gradient RMS divided by the last layer's below which gradients
            vanish (dimensionless). Source: gradsentry's specification ("falls by > 1e3 from the last layer to the first");
            healthy deep ReLU nets with He init stay within O(0.1..10) (He et al. 2015, arXiv:1502.01852).
        vanishing_error_ratio: ratio below which vanishing is an error rather than a warning: the first
            layer then learns a million times slower than the last; a 20-layer sigmoid MLP at PyTorch's
            default init is far below it (Glorot & Bengio 2010).
        sustained_fraction: a condition counts as sustained when it holds on more than this fraction of the
            logged steps that measure it (gradsentry's specification: "on most logged steps"); reasoning: a majority vote.
        spike_window: number of trailing logged steps whose median and MAD define the "recent level" of the
            global gradient norm. Reasoning: long enough for a robust median, short enough to follow the
            decay of the norm during training (ZClip warms up over 25 steps, Kumar et al. 2025).
        spike_min_history: fewest finite earlier logged steps needed before a spike can be judged.
        spike_z: robust z-score (``(log10 g - median) / (1.4826 * MAD)`` over the window) above which the
            global norm has spiked. Source: modified z-score (Iglewicz & Hoaglin 1993, who flag 3.5); 6 is
            used here because gradient norms are heavy-tailed and a diagnosis should not cry wolf.
        spike_min_factor: the spike must also be at least this many times the window's median norm, so
            that a small jump in a nearly constant norm (MAD ≈ 0), or a lucky draw of SGD noise with an
            underestimated MAD, is not called exploding. Reasoning: with 30 % log-normal noise a 5x jump
            is a 5.4-sigma event; at 3x, 2 % of simulated healthy 500-step runs were flagged, at 5x none
            of 300.
        spike_error_factor: a spike at least this many times the recent median is an error, not a warning: one
            such step moves the weights two orders of magnitude further than usual. Reasoning.
        robust_sigma_floor: smallest robust standard deviation of log10 norms (decades) used in z-scores,
            which keeps z finite when the norm is constant. Reasoning: 0.001 decades is a 0.2 % change.
        growth_window: number of logged steps over which sustained growth of the global norm is measured.
        growth_min_points: fewest logged steps for a (possibly shorter) growth window at the start of a run.
        growth_factor: growth of the global norm over a window (median of its last fifth over the median of
            its first fifth) above which the norm is exploding. Source: gradsentry's specification ("grows by > 10x over a
            window"). Medians make one isolated spike unable to trigger it.
        update_ratio_max: update-to-weight ratio ``||Δw|| / ||w||`` above which a step changes a layer far too
            much. Source: the CS231n rule of thumb (Karpathy) that about 1e-3 is healthy; 0.1 is 100x that.
            Caveat: a layer whose weights start at zero (LoRA B matrices, zero-initialised heads) has large
            ratios for its first steps by construction.
        update_ratio_any_step: update-to-weight ratio above which a single logged step is enough (the update
            was as large as the weights themselves); between ``update_ratio_max`` and this, the ratio must be
            exceeded on more than ``sustained_fraction`` of a layer's logged steps. Reasoning: early in
            training, a zero- or small-initialised head routinely takes a few updates of 0.2-0.3 of its norm
            while the run trains well (seen in the lab's residual and AGC runs).
        loss_harm_factor: a spike or growth of the global norm is reported only when it did harm: the loss
            within ``loss_harm_window`` logged steps rose above this factor times its median before the
            event (for growth: the loss at the end of the window is not below the loss at its start), or a
            NaN/inf followed, or the spike is at least ``spike_error_factor``. A norm that grows while the loss
            keeps falling is a network leaving its flat initial region, not an explosion (seen in the lab's
            20-layer ReLU + He run: 0.55 -> 5 while accuracy rose to 94 %). Runs with no loss recorded are
            judged on the norm alone.
        loss_harm_window: logged steps after a spike in which the loss is checked for harm.
        nonfinite_link_window: an exploding finding followed by a non-finite gradient within this many logged
            steps is an error (it led to the NaN/inf). Reasoning.
        saturated_frac: fraction in [0, 1] of a bounded activation's outputs in its flat region above which
            the layer is saturated. Source: gradsentry's specification ("> 50% of a layer's units").
        dead_frac: fraction in [0, 1] of a ReLU-family activation's units that are zero on the whole batch
            above which the layer has dead units. Source: gradsentry's specification; graphyco's dead-neuron flag also uses 0.5.
        stalled_ratio: update-to-weight ratio below which a layer is not learning. Source: gradsentry's specification; 1e-6 is
            1000x below the CS231n healthy 1e-3.
        stalled_gap: the model's median update-to-weight ratio must be at least this many times the layer's
            (and itself at least ``stalled_ratio``) for the layer to count as stalled, not the whole model.
            Source: gradsentry's specification.
    """

    vanishing_ratio: float = 1e-3
    vanishing_error_ratio: float = 1e-6
    sustained_fraction: float = 0.5
    spike_window: int = 20
    spike_min_history: int = 8
    spike_z: float = 6.0
    spike_min_factor: float = 5.0
    spike_error_factor: float = 100.0
    robust_sigma_floor: float = 1e-3
    growth_window: int = 50
    growth_min_points: int = 10
    growth_factor: float = 10.0
    update_ratio_max: float = 0.1
    update_ratio_any_step: float = 1.0
    loss_harm_factor: float = 1.5
    loss_harm_window: int = 5
    nonfinite_link_window: int = 20
    saturated_frac: float = 0.5
    dead_frac: float = 0.5
    stalled_ratio: float = 1e-6
    stalled_gap: float = 1e3

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"threshold {f.name} must be a finite number, got {value!r}")
            if value <= 0:
                raise ValueError(f"threshold {f.name} must be > 0, got {value!r}")
        for name in ("sustained_fraction", "saturated_frac", "dead_frac"):
            if getattr(self, name) >= 1:
                raise ValueError(
                    f"threshold {name} is a fraction and must be < 1, got {getattr(self, name)!r}"
                )
        if self.vanishing_error_ratio > self.vanishing_ratio:
            raise ValueError(
                f"vanishing_error_ratio ({self.vanishing_error_ratio!r}) must not exceed vanishing_ratio "
                f"({self.vanishing_ratio!r})"
            )
        for name in (
            "spike_window",
            "spike_min_history",
            "growth_window",
            "growth_min_points",
            "nonfinite_link_window",
            "loss_harm_window",
        ):
            if not isinstance(getattr(self, name), int):
                raise ValueError(
                    f"threshold {name} counts logged steps and must be an int, got {getattr(self, name)!r}"
                )
        if self.spike_min_history > self.spike_window:
            raise ValueError(
                f"spike_min_history ({self.spike_min_history}) must not exceed spike_window "
                f"({self.spike_window})"
            )
        if self.growth_min_points < 6:
            raise ValueError(
                f"growth_min_points must be at least 6 (two groups of 3), got {self.growth_min_points}"
            )
        if self.growth_min_points > self.growth_window:
            raise ValueError(
                f"growth_min_points ({self.growth_min_points}) must not exceed growth_window "
                f"({self.growth_window})"
            )
        for name in (
            "spike_min_factor",
            "spike_error_factor",
            "growth_factor",
            "stalled_gap",
            "loss_harm_factor",
        ):
            if getattr(self, name) <= 1:
                raise ValueError(f"threshold {name} is a factor and must be > 1, got {getattr(self, name)!r}")

    def replace(self, **overrides: Any) -> Thresholds:
        """Return a copy with some thresholds changed.

        Args:
            **overrides: threshold names and their new values.

        Returns:
            A new, validated :class:`Thresholds`.

        Raises:
            ValueError: on an unknown name (the message lists the valid ones) or an invalid value.
        """
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(
                f"unknown threshold(s) {', '.join(unknown)}; valid names: {', '.join(sorted(names))}"
            )
        return dataclasses.replace(self, **overrides)


# ------------------------------------------------------------------------------------------------------------
# Small helpers


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


def _robust_z(x: float, history: Sequence[float], floor: float) -> tuple[float, float, float]:
    """Robust z-score of ``x`` against ``history``: returns ``(z, median, sigma)``, sigma = 1.4826 * MAD."""
    med = statistics.median(history)
    mad = statistics.median(abs(h - med) for h in history)
    sigma = max(_MAD_TO_SIGMA * mad, floor)
    return (x - med) / sigma, med, sigma


def _fmt_names(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(n or "<root>" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


@dataclass
class _Context:
    records: list[StepRecord]
    t: Thresholds
    depth: dict[str, int]
    types: dict[str, str]
    activation_types: set[str]
    nonfinite_idx: list[int] = field(default_factory=list)

    def layer_depth(self, layer: LayerStats) -> int:
        return self.depth.get(layer.name, layer.depth)

    @property
    def saturating(self) -> bool:
        return bool((self.activation_types | set(self.types.values())) & SATURATING_ACTIVATIONS)

    @property
    def has_normalization(self) -> bool:
        return bool(set(self.types.values()) & NORMALIZATION_LAYERS)


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


# ------------------------------------------------------------------------------------------------------------
# Rules


def _vanishing(ctx: _Context) -> Finding | None:
    """Gradient RMS falling with depth towards the input by more than ``vanishing_ratio``, on most steps."""
    t = ctx.t
    ratios: list[float] = []
    slopes: list[float] = []
    flagged: list[int] = []
    rel_log: dict[str, list[float]] = {}
    first_pair: tuple[str, str] | None = None
    for rec in ctx.records:
        pairs = sorted(
            ((ctx.layer_depth(layer), layer) for layer in rec.layers if _usable_grad(layer)), key=_first
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
    remedies = remedies_for(
        "vanishing", RemedyContext(saturating=ctx.saturating, has_normalization=ctx.has_normalization)
    )
    return Finding("vanishing", severity, flagged, implicated, evidence, explanation, remedies)


def _finite_norm_series(ctx: _Context) -> tuple[list[int], list[float]]:
    """Indices into ctx.records and log10 global norms of the records with a finite, positive global norm."""
    idx = [i for i, rec in enumerate(ctx.records) if math.isfinite(rec.global_norm) and rec.global_norm > 0]
    return idx, [math.log10(ctx.records[i].global_norm) for i in idx]


def _layer_logs(rec: StepRecord) -> dict[str, float]:
    return {
        layer.name: math.log10(layer.grad_norm)
        for layer in rec.layers
        if layer.has_grad and math.isfinite(layer.grad_norm) and layer.grad_norm > 0
    }


def _leads_to_nonfinite(ctx: _Context, first_index: int) -> bool:
    return any(first_index <= j <= first_index + ctx.t.nonfinite_link_window for j in ctx.nonfinite_idx)


def _finite_losses(ctx: _Context, lo: int, hi: int) -> list[float]:
    """Finite recorded losses of ``ctx.records[lo:hi]`` (indices clipped to the run)."""
    recs = ctx.records[max(0, lo) : max(0, hi)]
    return [r.loss for r in recs if r.loss is not None and math.isfinite(r.loss)]


def _spike_harmed_loss(ctx: _Context, i: int) -> bool:
    """True when the loss rose after the spike at record ``i``, or no loss was recorded to tell."""
    t = ctx.t
    before = _finite_losses(ctx, i - t.spike_window, i)
    after = _finite_losses(ctx, i, i + t.loss_harm_window + 1)
    if len(before) < 3 or not after:
        return True  # no loss to judge by: the norm alone decides
    base = statistics.median(before)
    return max(after) > t.loss_harm_factor * base if base > 0 else max(after) > base


def _growth_harmed_loss(ctx: _Context, lo: int, hi: int) -> bool:
    """True when the loss did not improve over records ``lo..hi`` (or was not recorded)."""
    losses = _finite_losses(ctx, lo, hi + 1)
    if len(losses) < 6:
        return True
    k = max(3, len(losses) // 5)
    return statistics.median(losses[-k:]) >= statistics.median(losses[:k])


def _spikes(ctx: _Context) -> Finding | None:
    """Global norm far above its recent level: robust z-score over a trailing window of finite steps."""
    t = ctx.t
    idx, logs = _finite_norm_series(ctx)
    hits: list[tuple[int, float, float, float]] = []  # (position in idx, z, median, factor)
    for j in range(len(logs)):
        history = logs[max(0, j - t.spike_window) : j]
        if len(history) < t.spike_min_history:
            continue
        z, med, _ = _robust_z(logs[j], history, t.robust_sigma_floor)
        factor = 10.0 ** (logs[j] - med)
        if z > t.spike_z and factor >= t.spike_min_factor:
            harmful = (
                factor >= t.spike_error_factor
                or _leads_to_nonfinite(ctx, idx[j])
                or _spike_harmed_loss(ctx, idx[j])
            )
            if harmful:
                hits.append((j, z, med, factor))
    if not hits:
        return None
    first_j, first_z, first_med, first_factor = hits[0]
    peak = max(hits, key=lambda h: h[3])
    # Per-layer robust z-scores of log10 gradient norm at the first spike: where it started.
    window = [_layer_logs(ctx.records[idx[k]]) for k in range(max(0, first_j - t.spike_window), first_j)]
    at_spike = _layer_logs(ctx.records[idx[first_j]])
    layer_z: dict[str, float] = {}
    for name, value in at_spike.items():
        history = [w[name] for w in window if name in w]
        if len(history) >= t.spike_min_history:
            layer_z[name] = _robust_z(value, history, t.robust_sigma_floor)[0]
    ranked = sorted(layer_z, key=lambda n: -layer_z[n])
    spiked = [n for n in ranked if layer_z[n] > t.spike_z]
    steps = [ctx.records[idx[h[0]]].step for h in hits]
    leads = _leads_to_nonfinite(ctx, idx[first_j])
    severity = "error" if leads or peak[3] >= t.spike_error_factor else "warning"
    first_step = steps[0]
    evidence: dict[str, Any] = {
        "trigger": "spike",
        "spike_steps": steps,
        "first_spike_step": first_step,
        "first_spike_norm": ctx.records[idx[first_j]].global_norm,
        "first_spike_median_before": 10.0**first_med,
        "first_spike_factor": first_factor,
        "first_spike_z": first_z,
        "max_spike_step": ctx.records[idx[peak[0]]].step,
        "max_spike_factor": peak[3],
        "layer_z": {n: layer_z[n] for n in ranked[:_TOP]},
        "spiked_layers": spiked,
        "leads_to_nonfinite": leads,
        "z_threshold": t.spike_z,
        "window": t.spike_window,
    }
    where = f" The layers that spiked most were {_fmt_names(ranked)}." if ranked else ""
    explanation = (
        f"At step {first_step} the global gradient norm jumped to {evidence['first_spike_norm']:.3g}, "
        f"{first_factor:.3g} times its median over the previous {t.spike_window} logged steps "
        f"(robust z-score {first_z:.1f}, limit {t.spike_z:g}); {len(steps)} logged step(s) spiked in "
        f"all.{where} "
        "An optimizer step taken with such a gradient moves the weights much further than usual and can undo "
        "training or overflow into NaN/inf."
    )
    layers = spiked or ranked[:3]
    ctxr = RemedyContext(saturating=ctx.saturating, has_normalization=ctx.has_normalization)
    return Finding(
        "exploding", severity, steps, layers, evidence, explanation, remedies_for("exploding", ctxr)
    )


def _growth(ctx: _Context) -> Finding | None:
    """Global norm growing more than ``growth_factor``-fold over a window (medians of first/last fifth)."""
    t = ctx.t
    idx, logs = _finite_norm_series(ctx)
    limit = math.log10(t.growth_factor)
    hits: list[tuple[int, int, float]] = []  # (start j, end j, log10 growth)
    for end in range(t.growth_min_points - 1, len(logs)):
        start = max(0, end - t.growth_window + 1)
        window = logs[start : end + 1]
        k = max(3, len(window) // 5)
        growth = statistics.median(window[-k:]) - statistics.median(window[:k])
        if growth > limit and (
            _leads_to_nonfinite(ctx, idx[end]) or _growth_harmed_loss(ctx, idx[start], idx[end])
        ):
            hits.append((start, end, growth))
    if not hits:
        return None
    start, end, growth = max(hits, key=lambda h: h[2])
    steps_w = [ctx.records[idx[j]].step for j in range(start, end + 1)]
    slope = _ls_slope([float(x) for x in steps_w], logs[start : end + 1])
    k = max(3, (end - start + 1) // 5)
    layer_windows = [_layer_logs(ctx.records[idx[j]]) for j in range(start, end + 1)]
    layer_growth: dict[str, float] = {}
    for name in layer_windows[-1]:
        series = [w[name] for w in layer_windows if name in w]
        if len(series) >= 2 * k:
            layer_growth[name] = 10.0 ** (statistics.median(series[-k:]) - statistics.median(series[:k]))
    ranked = sorted(layer_growth, key=lambda n: -layer_growth[n])
    steps = [ctx.records[idx[h[1]]].step for h in hits]
    leads = _leads_to_nonfinite(ctx, idx[hits[0][1]])
    factor = 10.0**growth
    evidence: dict[str, Any] = {
        "trigger": "growth",
        "growth_factor": factor,
        "growth_rate_per_step": 10.0**slope,
        "growth_window_steps": [steps_w[0], steps_w[-1]],
        "first_growth_step": steps[0],
        "layer_growth": {n: layer_growth[n] for n in ranked[:_TOP]},
        "leads_to_nonfinite": leads,
        "factor_threshold": t.growth_factor,
        "window": t.growth_window,
    }
    where = f" It grew most in {_fmt_names(ranked)}." if ranked else ""
    explanation = (
        f"Between steps {steps_w[0]} and {steps_w[-1]} the global gradient norm grew {factor:.3g}-fold "
        f"(limit {t.growth_factor:g}), about {10.0**slope:.4g}x per optimizer step on a least-squares fit of "
        f"log10 norm.{where} Sustained growth like this usually means the learning rate is too high for the "
        "current curvature or the weights are growing without bound; left alone it ends in NaN/inf."
    )
    layers = [n for n in ranked if layer_growth[n] > t.growth_factor] or ranked[:3]
    severity = "error" if leads else "warning"
    ctxr = RemedyContext(saturating=ctx.saturating, has_normalization=ctx.has_normalization)
    return Finding(
        "exploding", severity, steps, layers, evidence, explanation, remedies_for("exploding", ctxr)
    )


def _update_ratio(ctx: _Context) -> Finding | None:
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
        "trigger": "update_ratio",
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
    ctxr = RemedyContext(saturating=ctx.saturating, has_normalization=ctx.has_normalization)
    return Finding(
        "exploding", severity, steps, ranked, evidence, explanation, remedies_for("exploding", ctxr)
    )


def _nonfinite(ctx: _Context, after_spike: bool) -> Finding | None:
    """The first step with a non-finite gradient (or loss), the layers holding it (deepest first)."""
    if not ctx.nonfinite_idx:
        return None
    first = ctx.records[ctx.nonfinite_idx[0]]
    holding = [
        layer
        for layer in first.layers
        if layer.has_grad and (layer.nonfinite > 0 or not math.isfinite(layer.grad_norm))
    ]
    holding.sort(key=lambda layer: -ctx.layer_depth(layer))
    names = [layer.name for layer in holding]
    origin = next(
        (ctx.records[i].nonfinite_origin for i in ctx.nonfinite_idx if ctx.records[i].nonfinite_origin),
        None,
    )
    if origin is not None and origin in names:
        names = [origin] + [n for n in names if n != origin]
    grad_bad = _grad_bad(first)
    evidence: dict[str, Any] = {
        "first_step": first.step,
        "nonfinite_steps": len(ctx.nonfinite_idx),
        "steps_logged": len(ctx.records),
        "global_norm": first.global_norm,
        "layer_nonfinite_counts": {layer.name: layer.nonfinite for layer in holding},
        "loss": first.loss,
        "loss_only": not grad_bad,
        "preceded_by_exploding": after_spike,
    }
    if origin is not None:
        evidence["origin"] = origin
    if grad_bad:
        where = f" in {_fmt_names(names)} (deepest first)" if names else ""
        what = f"the gradient first became non-finite (NaN/inf){where}"
    else:
        what = f"the loss became non-finite ({first.loss!r}) while the gradients were still finite"
    origin_text = (
        f" The first module to produce a non-finite value was {origin or '<root>'}." if origin else ""
    )
    spike_text = (
        " The gradient norm had spiked or grown just before, so it most likely overflowed."
        if after_spike
        else ""
    )
    explanation = (
        f"At step {first.step} {what}; {len(ctx.nonfinite_idx)} of {len(ctx.records)} logged steps are "
        "non-finite."
        f"{origin_text}{spike_text} An optimizer step with NaN/inf gradients writes NaN into the weights, "
        "after "
        "which training cannot recover."
    )
    steps = [ctx.records[i].step for i in ctx.nonfinite_idx]
    return Finding(
        "nonfinite",
        "error",
        steps,
        names,
        evidence,
        explanation,
        remedies_for("nonfinite", RemedyContext(after_spike=after_spike)),
    )


def _activation_rule(ctx: _Context, kind: str, attr: str, limit: float) -> Finding | None:
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
        explanation = (
            f"In {label} more than {limit:.0%} of the outputs sit in the flat region of the activation on "
            "most "
            f"logged steps (median {flagged[top]:.0%} in {top or '<root>'}, a {types.get(top, 'bounded')} "
            "activation). There the derivative is close to zero, so almost no gradient flows back through "
            "these "
            "units; pre-activations are too large, usually from the initialization scale or a high learning "
            "rate."
        )
    else:
        explanation = (
            f"In {label} more than {limit:.0%} of the units output zero for every sample of the batch on "
            "most "
            f"logged steps (median {flagged[top]:.0%} in {top or '<root>'}). A dead ReLU unit gets no "
            "gradient and "
            "cannot recover, so the layer's capacity is lost; large updates early in training are the usual "
            "cause."
        )
    return Finding(kind, "warning", sorted(steps), ranked, evidence, explanation, remedies_for(kind))


def _stalled(ctx: _Context) -> Finding | None:
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


# ------------------------------------------------------------------------------------------------------------
# Entry point


def _check_records(records: Iterable[StepRecord]) -> list[StepRecord]:
    if isinstance(records, StepRecord | str | bytes):
        raise TypeError(f"diagnose expects a sequence of StepRecord, got a single {type(records).__name__}")
    out = list(records)
    for i, rec in enumerate(out):
        if not isinstance(rec, StepRecord):
            raise TypeError(
                f"diagnose expects StepRecord objects, got {type(rec).__name__} at position {i}; "
                "use StepRecord.from_dict(...) or gradsentry.read_jsonl(path) to load plain dicts"
            )
    return sorted(out, key=lambda r: r.step)


def diagnose(
    records: Sequence[StepRecord],
    layers: Sequence[LayerInfo] | None = None,
    thresholds: Thresholds | None = None,
    **overrides: Any,
) -> list[Finding]:
    """Diagnose vanishing/exploding/non-finite gradients, saturation, dead units and stalled layers.

    Rules (each documented with its thresholds in :class:`Thresholds`):

    - ``vanishing``: the first layer's gradient RMS is below ``vanishing_ratio`` times the last layer's on
      most logged steps; the least-squares slope of log10 RMS over depth (decades per layer) is reported.
    - ``exploding``: a robust z-score spike of the global gradient norm over a trailing window; or growth by
      more than ``growth_factor`` over a window; or an update-to-weight ratio above ``update_ratio_max``.
      One finding per trigger, with the layers that spiked (or grew) most.
    - ``nonfinite``: the first step with a NaN/inf gradient or loss, and the layers holding it, deepest first.
    - ``saturation`` / ``dead_units``: more than half of an activation's units saturated / dead on most steps.
    - ``stalled_layer``: a layer's update-to-weight ratio stays below ``stalled_ratio`` while the model's
      median is ``stalled_gap`` times higher.

    Args:
        records: logged step records (any order; sorted by step here). Empty gives no findings.
        layers: the model's layers (e.g. ``Monitor.layers`` or ``RunHeader.layers``); their depth and type
            take precedence over the records' and their types tailor the remedies. Optional.
        thresholds: a :class:`Thresholds`; the defaults when None.
        **overrides: individual thresholds to change, e.g. ``spike_z=8.0``.

    Returns:
        Findings sorted by severity (errors first), then by first step. Each carries its steps, layers (most
        implicated first), evidence numbers, a plain-words explanation and ranked remedies.

    Raises:
        TypeError: if ``records`` holds something other than :class:`StepRecord`, or ``thresholds`` is not a
            :class:`Thresholds`.
        ValueError: on an unknown threshold name or an invalid threshold value.

    Example:
        >>> from gradsentry.records import StepRecord
        >>> diagnose([StepRecord(step=0, global_norm=float("nan"))])[0].kind
        'nonfinite'
    """
    if thresholds is not None and not isinstance(thresholds, Thresholds):
        raise TypeError(f"thresholds must be a gradsentry Thresholds, got {type(thresholds).__name__}")
    t = (thresholds or Thresholds()).replace(**overrides) if overrides else (thresholds or Thresholds())
    recs = _check_records(records)
    if not recs:
        return []
    infos = list(layers or [])
    for info in infos:
        if not isinstance(info, LayerInfo):
            raise TypeError(f"layers must be LayerInfo objects, got {type(info).__name__}")
    activation_types = {
        act.type for rec in recs for act in rec.activations if isinstance(act, ActivationStats)
    }
    ctx = _Context(
        records=recs,
        t=t,
        depth={info.name: info.depth for info in infos},
        types={info.name: info.type for info in infos},
        activation_types=activation_types,
    )
    ctx.nonfinite_idx = [i for i, rec in enumerate(recs) if _step_bad(rec)]
    findings: list[Finding] = []
    exploding = [f for f in (_spikes(ctx), _growth(ctx), _update_ratio(ctx)) if f is not None]
    findings.extend(exploding)
    first_bad_step = recs[ctx.nonfinite_idx[0]].step if ctx.nonfinite_idx else None
    after_spike = first_bad_step is not None and any(
        f.steps and f.steps[0] <= first_bad_step for f in exploding
    )
    for finding in (
        _nonfinite(ctx, after_spike),
        _vanishing(ctx),
        _activation_rule(ctx, "saturation", "saturated_frac", t.saturated_frac),
        _activation_rule(ctx, "dead_units", "dead_frac", t.dead_frac),
        _stalled(ctx),
    ):
        if finding is not None:
            findings.append(finding)
    findings.sort(key=lambda f: (-SEVERITY_ORDER.get(f.severity, 0), f.steps[0] if f.steps else math.inf))
    logger.debug("diagnose: %d records, %d findings", len(recs), len(findings))
    return findings
