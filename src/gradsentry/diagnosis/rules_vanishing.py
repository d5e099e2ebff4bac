"""Series rules for vanishing gradients (a collapsing norm, a stalled loss) and, when no gradient norm
was logged at all, the loss-only rules."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gradsentry.diagnosis import signals as sg
from gradsentry.diagnosis.run_signals import RuleContext, RunSignals, _r
from gradsentry.records import Advice, Finding


def vanishing_rules(sig: RunSignals, c: RuleContext) -> list[Finding]:
    """A gradient norm collapsed while the loss is flat, or a loss that never improved (stalled)."""
    t = c.t
    out: list[Finding] = []
    steps, vals = sig.finite_positive("grad")
    ls, lv = sig.loss_points()
    keep = np.isfinite(lv)
    ls, lv = ls[keep], lv[keep]
    n = vals.size
    k = min(t.divergence_tail, max(3, n // 5))
    if n >= max(t.spike_min_history, 2 * k):
        m = sg.rolling_median(np.log(vals), t.smooth_window)
        p = int(np.argmax(m[: n - k]))
        tail_level = float(np.median(np.log(vals[-k:])))
        drop = float(m[p]) - tail_level
        if drop >= math.log(t.vanish_factor):
            after = np.flatnonzero(m[p:] < m[p] - drop / 2)
            ci = p + int(after[0]) if after.size else n - k
            f = _collapse(sig, c, steps, m, p, ci, tail_level, drop, k, ls, lv)
            if f is not None:
                out.append(f)
    if out or lv.size < t.stall_min_points:
        return out
    sm = sg.rolling_median(lv, t.smooth_window)
    start = float(np.median(lv[: min(3, lv.size)]))
    if start <= 0:
        return out
    level = float(np.median(lv))
    # a loss at ln K, the cross-entropy of guessing among K classes; only for K <= 20, where the values
    # ln K lie further apart than the 1 % tolerance (above, every level is near some ln K)
    classes = round(math.exp(level)) if 0 < level < math.log(20.5) else 0
    chance = classes >= 2 and abs(level - math.log(classes)) <= 0.01 * math.log(classes)
    # away from chance a flat loss is weaker evidence: ask for a longer, flatter run
    flat = t.flat_loss_rel if chance else t.flat_loss_rel / 2
    min_points = t.stall_min_points if chance else 3 * t.stall_min_points
    never_improved = float(sm.min()) >= (1.0 - flat) * start
    if lv.size < min_points or not never_improved or abs(sg.thirds_change(lv)) > flat:
        return out
    if sg.trend_t(lv) < -3.0:
        return out  # falling steadily, however slowly: a low learning rate, not a stall
    ev: dict[str, Any] = {
        "pattern": "stalled",
        "first_step": int(ls[0]),
        "loss_start": sg.rnd(start),
        "loss_median": sg.rnd(level),
        "loss_min": sg.rnd(float(sm.min())),
        "loss_relative_change": sg.rnd(sg.thirds_change(lv)),
        "points": int(lv.size),
    }
    if chance:
        ev["chance_level_classes"] = classes
    chance_text = (
        f" {level:.4g} is ln({classes}), the cross-entropy of guessing among {classes} classes: the model has "
        "learned nothing."
        if chance
        else ""
    )
    out.append(
        Finding(
            "vanishing",
            "warning",
            [int(ls[0])],
            [],
            ev,
            f"The loss never improved over {lv.size} logged points: it stays at about {level:.4g} (start "
            f"{start:.4g}, best {float(sm.min()):.4g}).{chance_text} Training has stalled; vanishing gradients "
            "(saturating activations, a poor init in a deep net) are the usual cause, a learning rate of ~0 "
            "or frozen parameters the others. gradsentry's Monitor shows which layers' gradients vanish.",
            [
                *c.run_monitor(),
                *c.advice("vanishing", sig, int(ls[0])),
                Advice("check that the learning rate is not ~0 and that the parameters are in the optimizer"),
            ],
        )
    )
    return out


def _collapse(
    sig: RunSignals,
    c: RuleContext,
    steps: np.ndarray,
    m: np.ndarray,
    p: int,
    ci: int,
    tail_level: float,
    drop: float,
    k: int,
    ls: np.ndarray,
    lv: np.ndarray,
) -> Finding | None:
    t = c.t
    ev: dict[str, Any] = {
        "pattern": "collapse",
        "first_step": int(steps[ci]),
        "peak_step": int(steps[p]),
        "peak_norm": sg.rnd(math.exp(m[p])),
        "collapse_step": int(steps[ci]),
        "final_norm": sg.rnd(math.exp(tail_level)),
        "drop_factor": sg.rnd(math.exp(drop)),
        "tail_points": k,
    }
    seg = lv[ls >= steps[ci]]
    if seg.size >= 3:
        start_level = float(np.median(lv[: max(1, min(5, lv.size))]))
        rel = sg.thirds_change(seg)
        last = float(np.median(seg[-max(1, seg.size // 3) :]))
        ev.update(
            {
                "loss_fraction_of_start": sg.rnd(last / start_level) if start_level > 0 else None,
                "loss_relative_change": sg.rnd(rel),
                "loss_last": sg.rnd(last),
                "loss_start": sg.rnd(start_level),
            }
        )
        if start_level > 0 and abs(last) <= t.converged_loss_frac * start_level:
            return None  # converged: a vanishing gradient is expected at a minimum
        if abs(rel) > t.flat_loss_rel:
            return None  # the loss still moves: training is progressing
        expl = (
            f"The gradient norm fell {math.exp(drop):.3g}x from {math.exp(m[p]):g} (step {int(steps[p])}) to "
            f"{math.exp(tail_level):g} while the loss stayed flat at about {last:.4g} ({rel * 100:+.2g} % from "
            f"step {int(steps[ci])}; {start_level:.4g} at the start): training has stalled (vanishing "
            "gradients). If this loss is the best the task allows, this is convergence instead."
        )
    else:
        ev["loss_relative_change"] = None
        expl = (
            f"The gradient norm fell {math.exp(drop):.3g}x from {math.exp(m[p]):g} (step {int(steps[p])}) to "
            f"{math.exp(tail_level):g}; no loss was logged over the collapse, so convergence cannot be told "
            "from a stall."
        )
    return Finding(
        "vanishing",
        "warning",
        [int(steps[ci])],
        [],
        ev,
        expl,
        [
            *c.run_monitor(),
            *c.advice("vanishing", sig, int(steps[ci])),
            Advice("check that the learning-rate schedule did not decay to ~0"),
        ],
    )


def loss_only_rules(sig: RunSignals, c: RuleContext) -> list[Finding]:
    """No gradient norm logged: loss spikes (robust z of ``ln(loss)``) and an info finding saying so."""
    t = c.t
    out = [
        Finding(
            "no_grad_norm",
            "info",
            [],
            [],
            {},
            "No gradient norm was logged: only the loss is analysed (non-finite values, spikes, divergence). "
            "Log the pre-clip global norm to diagnose exploding or vanishing gradients.",
            [
                Advice(
                    "HF: grad_norm is logged by default with logging_steps; Lightning: log "
                    "lightning.pytorch.utilities.grad_norm in on_before_optimizer_step; or use "
                    "gradsentry.Monitor with a JsonlSink"
                )
            ],
        )
    ]
    steps, vals = sig.finite_positive("loss")
    spikes = sg.find_spikes(steps, vals, t)
    if not spikes:
        return out
    ls, lv = sig.loss_points()
    for e in spikes:
        e["loss"] = sg.loss_outcome(ls, lv, e["step"], t)
    top = max(spikes, key=lambda e: e["ratio"])
    listed = spikes[: t.max_listed]
    out.append(
        Finding(
            "loss_spike",
            "warning",
            [e["step"] for e in listed],
            [],
            {
                "spikes": len(spikes),
                "first_step": spikes[0]["step"],
                "largest_spike_step": top["step"],
                "largest_spike_loss": top["value"],
                "largest_spike_ratio": top["ratio"],
                "events": [{k: v for k, v in e.items() if k != "index"} for e in listed],
            },
            f"{len(spikes)} loss spike(s); the largest at step {top['step']}: {top['value']:g}, "
            f"{top['ratio']:.3g} times the rolling median (robust z {top['z']:.3g}). No gradient norm was "
            "logged, so its cause cannot be seen here.",
            [
                Advice(
                    "log the global gradient norm (pre-clip) to see whether spikes start in the gradients"
                ),
                _r("zclip"),
                _r("lower_lr_warmup"),
            ],
        )
    )
    return out
