"""Series rules for exploding gradients: spikes and jumps of the global norm (judged by what the loss
did next), sustained growth, loss divergence, and the learning-rate jump named as a cause."""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any

import numpy as np

from gradsentry.diagnosis import signals as sg
from gradsentry.diagnosis.run_signals import RuleContext, RunSignals
from gradsentry.records import Finding


def _judge(sig: RunSignals, c: RuleContext, index: int, step: int, factor: float) -> dict[str, Any] | None:
    """Harm of a norm event at ``sig.steps[index]``: None when it did none (the loss kept improving)."""
    t = c.t
    bad = sig.first_bad_index()
    leads = bad is not None and index <= bad <= index + t.nonfinite_link_window
    ls, lv = sig.loss_points()
    harmed = sg.loss_harmed(ls, lv, step, t)
    big = factor >= t.spike_error_factor
    if not (leads or harmed is None or harmed):
        return None  # the loss was logged around it and did not rise: absorbed (clipped), whatever its size
    outcome = sg.loss_outcome(ls, lv, step, t) if ls.size else {"outcome": "unknown"}
    # without any loss the size decides; with one, what the loss did
    severe = leads or outcome["outcome"] == "diverged" or (big and harmed is None)
    return {
        "leads_to_nonfinite": leads,
        "loss_harmed": harmed,
        "loss": outcome,
        "error": severe,
        "lr_jump": _lr_jump(sig, step),
    }


LR_JUMP_FACTOR = 3.0
"""A learning rate at least this many times its median over the earlier logged points is a jump worth
naming as the cause of a spike (a schedule's warm-up rises smoothly, a few percent per step)."""


def _lr_jump(sig: RunSignals, step: int) -> dict[str, Any] | None:
    """The learning rate raised just before ``step`` (at most 3 logged points earlier), if it was."""
    keep = np.isfinite(sig.lr) & (sig.lr > 0)
    ls, lr = sig.steps[keep], sig.lr[keep]
    upto = int(np.searchsorted(ls, step, side="right"))
    if upto < 2:
        return None
    for j in range(max(1, upto - 4), upto):
        before = float(np.median(lr[:j]))
        if lr[j] >= LR_JUMP_FACTOR * before:
            return {
                "step": int(ls[j]),
                "from": sg.rnd(before),
                "to": sg.rnd(float(lr[j])),
                "factor": sg.rnd(float(lr[j]) / before),
            }
    return None


def _events_finding(
    sig: RunSignals, c: RuleContext, events: list[dict[str, Any]], pattern: str
) -> list[Finding]:
    """An ``exploding`` finding from the harmful spike or jump events, and an ``info`` ``norm_spike``
    finding for the events that did no harm (the loss kept improving: clipped or absorbed)."""
    t = c.t
    kept, harmless = [], []
    for e in events:
        start = int(np.searchsorted(sig.steps, e["first_step"]))  # judged from where the event starts
        judged = _judge(sig, c, start, int(e["first_step"]), float(e["ratio"]))
        if judged is not None:
            kept.append({**{k: v for k, v in e.items() if k != "index"}, **judged})
        else:
            harmless.append({k: v for k, v in e.items() if k != "index"})
    out: list[Finding] = []
    if harmless:
        top = max(harmless, key=lambda e: e["ratio"])
        out.append(
            Finding(
                "norm_spike",
                "info",
                [e["step"] for e in harmless[: t.max_listed]],
                [],
                {
                    "pattern": pattern,
                    "events_count": len(harmless),
                    "largest_step": top["step"],
                    "largest_norm": top["value"],
                    "largest_ratio": top["ratio"],
                    "events": harmless[: t.max_listed],
                },
                f"{len(harmless)} gradient-norm {pattern}(s) that did no harm: the loss kept improving after each "
                f"(the largest {top['ratio']:.3g}x its reference level at step {top['step']}). Clipping or the "
                "optimizer absorbed them; not a problem on its own.",
                [],
            )
        )
    if not kept:
        return out
    first, top = kept[0], max(kept, key=lambda e: e["ratio"])
    error = any(e["error"] for e in kept)
    listed = kept[: t.max_listed]
    ev: dict[str, Any] = {
        "pattern": pattern,
        "events_count": len(kept),
        "first_step": first["first_step"],
        "peak_step": first["step"],
        "first_norm": first["value"],
        "first_ratio": first["ratio"],
        "reference_norm": first["median"],
        "largest_step": top["step"],
        "largest_norm": top["value"],
        "largest_ratio": top["ratio"],
        "leads_to_nonfinite": any(e["leads_to_nonfinite"] for e in kept),
        "loss_outcome": first["loss"].get("outcome", "unknown"),
        "events": [{k: v for k, v in e.items() if k != "error"} for e in listed],
    }
    if pattern == "spike":
        ev.update({"largest_z": top["z"], "z_threshold": t.spike_z, "window": t.spike_window})
        how = (
            f"{first['ratio']:.3g} times its median over the previous logged points (robust z-score "
            f"{first['z']:.3g}, limit {t.spike_z:g})"
        )
    else:
        ev["jump_factor"] = t.jump_factor
        how = (
            f"{first['ratio']:.3g} times the level of the first logged point(s) ({first['median']:.3g}), too "
            "early in the run for a z-score: judged by the jump test"
        )
    outcome = first["loss"].get("outcome", "unknown")
    harm = {
        "diverged": " The loss did not recover: it stays above twice its level before.",
        "partial": " The loss only partly recovered.",
        "recovered": " The loss rose and then recovered.",
    }.get(outcome, "")
    if ev["leads_to_nonfinite"]:
        harm += " A NaN/inf followed."
    jump = first.get("lr_jump")
    if jump is not None:
        ev["lr_jump"] = jump
        harm += (
            f" The learning rate had just been raised from {jump['from']:.3g} to {jump['to']:.3g} "
            f"({jump['factor']:.3g}x) at step {jump['step']}: that is the cause."
        )
    expl = (
        f"At step {first['first_step']} the global gradient norm jumped (to {first['value']:.3g} at step "
        f"{first['step']}), {how}; "
        f"{len(kept)} such event(s) in all, the largest {top['ratio']:.3g}x at step {top['step']}.{harm} An "
        "optimizer step taken with such a gradient moves the weights much further than usual and can undo "
        "training or overflow into NaN/inf."
    )
    steps = [e["first_step"] for e in listed]
    early = pattern == "jump"
    out.append(
        Finding(
            "exploding",
            "error" if error else "warning",
            steps,
            [],
            ev,
            expl,
            c.advice(
                "exploding",
                sig,
                first["first_step"],
                early=early or jump is not None or ev["loss_outcome"] == "diverged",
            ),
        )
    )
    return out


def _growth_harm(sig: RunSignals, c: RuleContext, g: dict[str, Any]) -> dict[str, Any] | None:
    """Harm of a growth segment: NaN/inf after it, or a loss that did not improve over it."""
    t = c.t
    i0 = int(np.searchsorted(sig.steps, g["start_step"]))
    i1 = int(np.searchsorted(sig.steps, g["end_step"]))
    bad = sig.first_bad_index()
    leads = bad is not None and i0 <= bad <= i1 + t.nonfinite_link_window
    ls, lv = sig.loss_points()
    seg = lv[(ls >= g["start_step"]) & (ls <= g["end_step"]) & np.isfinite(lv)]
    if seg.size >= 2:
        k = max(1, seg.size // 5)
        first, last = float(np.median(seg[:k])), float(np.median(seg[-k:]))
        improving = last < first
        diverged = first > 0 and last > t.divergence_factor * first
    else:
        improving, diverged, first, last = False, False, math.nan, math.nan
    if improving and not leads:
        return None
    return {
        "leads_to_nonfinite": leads,
        "loss_at_start": sg.rnd(first),
        "loss_at_end": sg.rnd(last),
        "error": leads or diverged,
    }


def growth_rule(sig: RunSignals, c: RuleContext) -> Finding | None:
    """Sustained exponential growth of the global norm that did harm (see :func:`signals.find_growth`)."""
    steps, vals = sig.finite_positive("grad")
    g = sg.find_growth(steps, vals, c.t)
    if g is None:
        return None
    judged = _growth_harm(sig, c, g)
    if judged is None:
        return None
    ev = {"pattern": "growth", **{k: v for k, v in g.items() if not k.endswith("_index")}}
    ev.update({k: v for k, v in judged.items() if k != "error"})
    ev["first_step"] = g["start_step"]
    expl = (
        f"The global gradient norm grew steadily from {g['start_norm']:g} at step {g['start_step']} to "
        f"{g['end_norm']:g} at step {g['end_step']}: fitted rate {g['rate_per_step']:.3g} per step "
        f"(x{g['factor_per_100_steps']:g} per 100 steps, doubling every {g['doubling_steps']:g} steps, "
        f"R^2 {g['r2']:.2f}) while the loss did not improve. Growth like this means the updates feed back "
        "into larger gradients (a learning rate too high for the curvature, weights growing without bound); "
        "left alone it ends in NaN/inf."
    )
    return Finding(
        "exploding",
        "error" if judged["error"] else "warning",
        [g["start_step"], g["end_step"]],
        [],
        ev,
        expl,
        c.advice("exploding", sig, g["start_step"]),
    )


def _norm_growth(sig: RunSignals, lo_step: int, hi_step: int) -> float | None:
    """How many times the largest finite norm in ``[lo_step, hi_step]`` exceeds the norm at ``lo_step``."""
    gs, gv = sig.finite_positive("grad")
    seg = gv[(gs >= lo_step) & (gs <= hi_step)]
    before = gv[gs <= lo_step]
    if seg.size == 0:
        return None
    ref = float(before[-1]) if before.size else float(seg[0])
    return float(seg.max() / ref)


def _beyond_noise(head: np.ndarray, best: float, tail: float, k: int) -> bool:
    """Is a tail median ``tail`` above the best ``k``-point median ``best`` by more than batch noise allows?

    The noise is :func:`~gradsentry.diagnosis.signals.log_noise` of the points before the tail. The median of
    ``k`` points has standard error ``sqrt(pi / 2) * sigma / sqrt(k)`` (Gaussian noise); the two medians
    compared differ by ``sqrt(2)`` times that, and the best is the lowest of many windows, so the rise must
    exceed 3 such errors (one-sided p ~ 0.001) on top of ``divergence_factor``.
    """
    sigma = sg.log_noise(head)  # 0 without a log scale to judge noise on: the factor alone decides
    se = math.sqrt(math.pi / 2.0) * sigma / math.sqrt(k)
    windows = max(1, head.size // k)  # the best is the lowest of this many independent windows
    z = NormalDist().inv_cdf(1.0 - 0.001 / windows)
    return math.log(tail / best) > z * math.sqrt(2.0) * se


def divergence_rules(sig: RunSignals, c: RuleContext, have_exploding: bool) -> list[Finding]:
    """The loss rising many-fold from its start (early) or from its best level (late), clipped or not."""
    t = c.t
    ls, lv = sig.loss_points()
    fin = np.isfinite(lv)
    if ls.size < 2 or not fin[0] or lv[0] <= 0:
        return []
    out: list[Finding] = []

    def kind_for(growth: float | None) -> str:  # the gradient norm rose with the loss: exploding
        return "exploding" if growth is not None and growth >= t.spike_min_factor else "loss_divergence"

    # early: within the first spike_min_history loss points
    n_early = min(ls.size, t.spike_min_history)
    start = float(lv[0])
    # finite losses only: a NaN/inf loss is the nonfinite rule's (a NaN batch is not a learning rate).
    # One logged loss is one batch: in a small-batch run one batch can be 10x another (a fine-tune at
    # batch 8 from 0.23 to 2.6), so the rise over the first point must also exceed the run's batch noise:
    # 3.09 * sqrt(2) * sigma for two single points (one-sided p 0.001 per point; the points tested share
    # the first point's deviation, and all 7 together exceed it by chance 0.6 % of the time, simulated
    # for Gaussian noise)
    z = 3.09
    noise = sg.log_noise(lv[fin & (lv > 0)])
    need = max(t.early_divergence_factor, math.exp(min(z * math.sqrt(2.0) * noise, 700.0)))
    early = [i for i in range(1, n_early) if fin[i] and lv[i] >= need * start]
    if early:
        i = early[0]
        peak_i = max(range(1, n_early), key=lambda j: lv[j] if fin[j] else math.inf)
        tail = np.where(fin, lv, np.inf)[-min(t.divergence_tail, max(1, ls.size - i)) :]
        tail_med = float(np.median(tail))
        stays = not tail_med < start  # it never came back below its start (non-finite counts as above)
        growth = _norm_growth(sig, int(ls[0]), int(ls[peak_i]))
        ev: dict[str, Any] = {
            "pattern": "divergence",
            "early": True,
            "first_step": int(ls[i]),
            "start_loss": sg.rnd(start),
            "loss_at_onset": sg.rnd(float(lv[i])),
            "peak_loss": sg.rnd(float(np.max(np.where(fin[:n_early], lv[:n_early], np.inf)))),
            "peak_step": int(ls[peak_i]),
            "tail_loss_median": sg.rnd(tail_med),
            "tail_ratio": sg.rnd(tail_med / start),
            "norm_growth": sg.rnd(growth) if growth is not None else None,
            "factor": t.early_divergence_factor,
            "loss_noise": sg.rnd(noise),
            "required_factor": sg.rnd(need),
        }
        norm_text = (
            f" The gradient norm rose {growth:.3g}x over the same steps (pre-clip)."
            if growth is not None and growth > 1
            else ""
        )
        out.append(
            Finding(
                kind_for(growth),
                "error" if stays else "warning",
                [int(s) for s in ls[i:n_early][: t.max_listed]],
                [],
                ev,
                f"The loss diverged in the first logged steps: from {start:.4g} at step {int(ls[0])} to "
                f"{float(lv[i]):.4g} at step {int(ls[i])} (at least {need:.3g}x its start)"
                + (
                    ", and it ends non-finite."
                    if not math.isfinite(tail_med)
                    else f", and it stays at {tail_med:.4g}, {tail_med / start:.3g}x its start."
                    if stays
                    else ", then came back below its start."
                )
                + norm_text
                + (
                    " The learning rate is far too high for this model (clipping, if on, does not prevent it)."
                    if stays
                    else " The learning rate is too high for the first steps of this model: a warm-up (or a "
                    "lower rate) avoids the excursion."
                ),
                c.advice("exploding", sig, int(ls[i]), early=True),
            )
        )
        return out
    if have_exploding:
        return out
    # late: the loss stays far above its best level. Like is compared with like: the best level is the
    # lowest median of k consecutive points before the tail, the tail's level the median of its last k
    # points. A narrower window's minimum is an extreme of the batch noise (a near-converged loss whose
    # batches range 0.004-0.17 has 5-point medians down to a third of its level), so a stationary loss
    # read against it would "diverge"; with equal windows it cannot by noise alone
    s, v = ls[fin], lv[fin]
    k = min(t.divergence_tail, max(2, v.size // 5))
    if v.size < max(6, 2 * k):
        return out
    m = sg.rolling_median(v, t.smooth_window)
    head = sg.window_medians(v[: v.size - k], k)
    j = int(np.argmin(head))
    best = float(head[j])
    b = j + int(np.argmin(m[j : j + k]))  # the lowest smoothed point of the best window
    start_level = float(m[0])
    tail_med = float(np.median(v[-k:]))
    lost = tail_med >= best + 0.25 * (start_level - best) if start_level > best else True
    if best <= 0 or tail_med <= t.divergence_factor * best or not lost:
        return out
    if not _beyond_noise(v[: v.size - k], best, tail_med, k):
        return out
    above = np.flatnonzero(m[b:] > t.divergence_factor * best)
    onset = int(s[b + int(above[0])]) if above.size else int(s[-k])
    growth = _norm_growth(sig, int(s[b]), int(s[-1]))
    ev = {
        "pattern": "divergence",
        "early": False,
        "first_step": onset,
        "best_loss": sg.rnd(best),
        "best_step": int(s[b]),
        "tail_loss_median": sg.rnd(tail_med),
        "tail_ratio": sg.rnd(tail_med / best),
        "tail_points": k,
        "norm_growth": sg.rnd(growth) if growth is not None else None,
        "factor": t.divergence_factor,
    }
    out.append(
        Finding(
            kind_for(growth),
            "error",
            [onset],
            [],
            ev,
            f"The loss rose from its best level {best:.4g} (step {int(s[b])}) and stays at {tail_med:.4g} over the "
            f"last {k} points ({tail_med / best:.3g} times), from step {onset} on: training diverged."
            + (
                f" The gradient norm rose {growth:.3g}x since the best step." if growth and growth > 1 else ""
            ),
            c.advice("exploding", sig, onset),
        )
    )
    return out
