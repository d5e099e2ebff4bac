"""Attribution of series findings to layers: which layers carry a global-norm spike or growth, and where a
NaN/inf first appeared, from the Monitor's per-layer records (filled into the findings' evidence)."""

from __future__ import annotations

import math
import statistics

from gradsentry.diagnosis.layer_rules import _TOP, LayerContext, _fmt_names, _grad_bad, _robust_z
from gradsentry.records import Finding, StepRecord

__all__ = ["attribute"]


def _layer_logs(rec: StepRecord) -> dict[str, float]:
    return {
        layer.name: math.log(layer.grad_norm)
        for layer in rec.layers
        if layer.has_grad and math.isfinite(layer.grad_norm) and layer.grad_norm > 0
    }


def _index_of(ctx: LayerContext, step: int) -> int | None:
    for i, rec in enumerate(ctx.records):
        if rec.step == step:
            return i
    return None


def _spike_layers(ctx: LayerContext, f: Finding) -> None:
    """Per-layer robust z-scores of ln(gradient norm) at the first event: where it started."""
    i = _index_of(ctx, int(f.evidence.get("first_step", f.steps[0] if f.steps else -1)))
    if i is None:
        return
    t = ctx.t
    window = [_layer_logs(ctx.records[k]) for k in range(max(0, i - t.spike_window), i)]
    at = _layer_logs(ctx.records[i])
    layer_z: dict[str, float] = {}
    ratio: dict[str, float] = {}
    for name, value in at.items():
        history = [w[name] for w in window if name in w]
        if history:
            layer_z[name] = _robust_z(value, history, t.mad_floor)
            ratio[name] = math.exp(value - statistics.median(history))
    ranked = sorted(ratio, key=lambda n: -ratio[n])
    if not ranked:
        return
    f.layers = [n for n in ranked if ratio[n] >= t.spike_min_factor][:_TOP] or ranked[:3]
    f.evidence["layer_ratio"] = {n: ratio[n] for n in ranked[:_TOP]}
    f.evidence["layer_z"] = {n: layer_z[n] for n in ranked[:_TOP]}
    f.explanation += f" The layers whose gradient grew most at that step: {_fmt_names(f.layers)}."


def _growth_layers(ctx: LayerContext, f: Finding) -> None:
    lo, hi = f.steps[0], f.steps[-1]
    windows = [_layer_logs(r) for r in ctx.records if lo <= r.step <= hi]
    if len(windows) < 2:
        return
    k = max(1, len(windows) // 5)
    growth: dict[str, float] = {}
    for name in windows[-1]:
        series = [w[name] for w in windows if name in w]
        if len(series) >= 2 * k:
            growth[name] = math.exp(statistics.median(series[-k:]) - statistics.median(series[:k]))
    ranked = sorted(growth, key=lambda n: -growth[n])
    if ranked:
        f.layers = [n for n in ranked if growth[n] > ctx.t.growth_factor][:_TOP] or ranked[:3]
        f.evidence["layer_growth"] = {n: growth[n] for n in ranked[:_TOP]}
        f.explanation += f" It grew most in {_fmt_names(f.layers)}."


def _nonfinite_layers(ctx: LayerContext, f: Finding) -> None:
    """The layers holding the first NaN/inf (deepest first) and the module where it first appeared."""
    if not ctx.nonfinite_idx:
        return
    first = ctx.records[ctx.nonfinite_idx[0]]
    holding = [
        layer
        for layer in first.layers
        if layer.has_grad and (layer.nonfinite > 0 or not math.isfinite(layer.grad_norm))
    ]
    holding.sort(key=lambda layer: -ctx.layer_depth(layer))
    names = [layer.name for layer in holding]
    origin = next(
        (ctx.records[i].nonfinite_origin for i in ctx.nonfinite_idx if ctx.records[i].nonfinite_origin), None
    )
    if origin is not None and origin in names:
        names = [origin] + [n for n in names if n != origin]
    f.layers = names
    f.evidence["layer_nonfinite_counts"] = {layer.name: layer.nonfinite for layer in holding}
    f.evidence["loss_only"] = not _grad_bad(first)
    if origin is not None:
        f.evidence["origin"] = origin
        f.explanation += f" The first module to produce a non-finite value was {origin or '<root>'}."
    if names:
        order = (
            "the origin first, then deepest first"
            if origin is not None and origin in names
            else "deepest first"
        )
        f.explanation += f" The first non-finite gradient is in {_fmt_names(names)} ({order})."


def attribute(findings: list[Finding], ctx: LayerContext) -> None:
    """Name the layers behind the series findings (in place): spikes, jumps, growth, the first NaN/inf."""
    for f in findings:
        pattern = f.evidence.get("pattern")
        if f.kind == "exploding" and pattern in ("spike", "jump"):
            _spike_layers(ctx, f)
        elif f.kind == "exploding" and pattern == "growth":
            _growth_layers(ctx, f)
        elif f.kind == "nonfinite":
            _nonfinite_layers(ctx, f)
