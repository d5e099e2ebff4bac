"""Rules over the run's series: the global gradient norm and the loss (and what a loss scaler skipped).

The same rules judge a live Monitor's records and any other tool's log, so the two cannot disagree. Each
rule takes a :class:`RunSignals` and returns findings whose ``steps`` and ``evidence`` carry the logged
step numbers and values, so a user can check every claim against the log.

Kinds: ``nonfinite``, ``hidden_nonfinite`` (a loss of exactly 0.0 logged beside a NaN norm: the HF
Trainer's ``logging_nan_inf_filter``), ``skipped_steps``, ``zero_grad_norm``, ``exploding`` (patterns
``spike``, ``jump``, ``growth``, ``divergence``), ``vanishing`` (patterns ``collapse``, ``stalled``), and,
only when no gradient norm was logged, ``loss_spike``, ``loss_divergence`` and ``no_grad_norm`` (info).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import numpy as np

from gradsentry.diagnosis import signals as sg
from gradsentry.diagnosis.thresholds import Thresholds
from gradsentry.records import Finding, Remedy
from gradsentry.remedies_catalog import CATALOG, RemedyContext, remedies_for

__all__ = ["RunSignals", "series_findings"]


@dataclass
class RunSignals:
    """The series every rule reads, as numpy arrays; built from a log's Series or a Monitor's records.

    Attributes:
        steps: [N] every logged step (int64, increasing).
        loss: [N] the loss at each step, NaN where not logged (see ``has_loss``).
        has_loss: [N] True where a loss was logged.
        grad: [N] the global gradient L2 norm (pre-clip, same units as the gradient), NaN where not logged.
        has_grad: [N] True where a norm was logged.
        lr: [N] the learning rate, NaN where not logged.
        skipped: steps a loss scaler or guard skipped (from the log's overflow lines or remedy actions).
        meta: what the run says about its set-up (``optimizer``, ``max_grad_norm``, ``lr``).
    """

    steps: np.ndarray
    loss: np.ndarray
    has_loss: np.ndarray
    grad: np.ndarray
    has_grad: np.ndarray
    lr: np.ndarray
    skipped: list[int] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_lists(
        cls,
        steps: list[int],
        loss: list[float | None],
        grad_norm: list[float | None],
        lr: list[float | None],
        skipped: list[int] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> RunSignals:
        def col(values: list[float | None]) -> tuple[np.ndarray, np.ndarray]:
            arr = np.array(values, dtype=np.float64)  # None becomes NaN
            has = np.fromiter((v is not None for v in values), dtype=bool, count=len(values))
            return arr, has

        lo, hl = col(loss)
        g, hg = col(grad_norm)
        r, _ = col(lr)
        return cls(
            np.asarray(steps, dtype=np.int64), lo, hl, g, hg, r, sorted(skipped or []), dict(meta or {})
        )

    def __len__(self) -> int:
        return int(self.steps.size)

    # Derived once (the arrays are not changed after construction): every rule and every event reads them.

    @cached_property
    def hidden(self) -> np.ndarray:
        """[N] a loss of exactly 0.0 logged beside a non-finite gradient norm (a hidden non-finite loss)."""
        return self.has_loss & (self.loss == 0.0) & self.has_grad & ~np.isfinite(self.grad)

    @cached_property
    def _clean_loss(self) -> tuple[np.ndarray, np.ndarray]:
        keep = self.has_loss & ~self.hidden
        return self.steps[keep], self.loss[keep]

    def loss_points(self) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of the logged losses (NaN/inf kept), hidden non-finite ones left out."""
        return self._clean_loss

    def grad_points(self) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of the logged gradient norms (NaN/inf kept)."""
        return self.steps[self.has_grad], self.grad[self.has_grad]

    def finite_positive(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of the finite, positive points of ``"grad"`` or ``"loss"``."""
        values = self.grad if name == "grad" else self.loss
        has = self.has_grad if name == "grad" else self.has_loss & ~self.hidden
        keep = has & np.isfinite(values) & (values > 0)
        return self.steps[keep], values[keep]

    @cached_property
    def _first_bad(self) -> int | None:
        bad = (self.has_grad & ~np.isfinite(self.grad)) | (self.has_loss & ~np.isfinite(self.loss))
        bad |= self.hidden
        i = np.flatnonzero(bad)
        return int(i[0]) if i.size else None

    def first_bad_index(self) -> int | None:
        """Index of the first step with a non-finite norm or loss (hidden ones included)."""
        return self._first_bad

    def lr_at(self, step: int) -> float | None:
        """The last learning rate logged at or before ``step`` (or the run's stated one)."""
        keep = np.isfinite(self.lr) & (self.steps <= step)
        if keep.any():
            return float(self.lr[np.flatnonzero(keep)[-1]])
        first = np.flatnonzero(np.isfinite(self.lr))
        if first.size:
            return float(self.lr[first[0]])
        value = self.meta.get("lr")
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


@dataclass
class RuleContext:
    """What the series rules share: thresholds and the facts that shape the advice."""

    t: Thresholds
    remedy: RemedyContext = field(default_factory=RemedyContext)

    def run_monitor(self) -> list[Remedy]:
        """Advice to record the run with a Monitor, unless it was (its per-layer records exist)."""
        if self.remedy.monitored:
            return []
        return [
            Remedy(
                "run gradsentry's Monitor to see which layers' gradients vanish", "gradsentry.Monitor(model)"
            )
        ]

    def advice(self, kind: str, sig: RunSignals, step: int | None = None, **changes: Any) -> list[Remedy]:
        lr = sig.lr_at(step) if step is not None else None
        if step is not None and "early" not in changes and len(sig):
            # a problem in the first logged points: the learning rate is the first suspect
            changes["early"] = int(np.searchsorted(sig.steps, step)) < self.t.spike_min_history
        ctx = replace(self.remedy, lr=lr if lr is not None else self.remedy.lr, **changes)
        return remedies_for(kind, ctx)


def _r(key: str) -> Remedy:
    return CATALOG[key].make()


# ---------------------------------------------------------------- non-finite values


def nonfinite_rules(sig: RunSignals, c: RuleContext) -> list[Finding]:
    """``nonfinite``, ``hidden_nonfinite`` and ``skipped_steps`` (NaN/inf norms or losses, scaler skips)."""
    t = c.t
    steps, loss, grad = sig.steps, sig.loss, sig.grad
    hidden = sig.hidden
    loss_nf = sig.has_loss & ~np.isfinite(loss)
    grad_nf = sig.has_grad & ~np.isfinite(grad)
    out: list[Finding] = []
    out += _scaler_skips(sig, c)
    if not loss_nf.any() and not grad_nf.any():
        return out
    finite_loss_nf_grad = grad_nf & sig.has_loss & np.isfinite(loss) & (loss != 0.0)
    ev: dict[str, Any] = {
        "nonfinite_loss_points": int(loss_nf.sum()),
        "nonfinite_grad_norm_points": int(grad_nf.sum()),
        "logged_points": len(sig),
    }
    firsts = []
    if loss_nf.any():
        i = int(np.argmax(loss_nf))
        ev["first_nonfinite_loss_step"], ev["first_nonfinite_loss"] = int(steps[i]), float(loss[i])
        firsts.append(int(steps[i]))
    if grad_nf.any():
        i = int(np.argmax(grad_nf))
        ev["first_nonfinite_grad_norm_step"], ev["first_nonfinite_grad_norm"] = int(steps[i]), float(grad[i])
        firsts.append(int(steps[i]))
    first = min(firsts)
    ev["first_step"] = first
    fin_before = np.flatnonzero(sig.has_grad & np.isfinite(grad) & (steps < first))
    ev["last_finite_grad_norm_before"] = None
    if fin_before.size:
        j = int(fin_before[-1])
        ev["last_finite_grad_norm_before"] = sg.rnd(float(grad[j]))
        ev["last_finite_grad_norm_step"] = int(steps[j])
    skipped: list[tuple[int, int]] = [
        (a, b)
        for a, b in sg.runs(finite_loss_nf_grad)
        if b - a >= t.skipped_min_run and abs(sg.thirds_change(loss[a:b])) <= t.flat_loss_rel
    ]
    longest = max((b - a for a, b in sg.runs(grad_nf)), default=0)
    ev["longest_nonfinite_grad_norm_run"] = longest
    isolated_only = (
        not loss_nf.any()
        and not hidden.any()
        and not skipped
        and bool(np.all(finite_loss_nf_grad[grad_nf]))
        and longest < t.skipped_min_run
        and bool(np.all(np.isinf(grad[grad_nf])))  # overflow (inf), never NaN: a NaN is a real fault
        and not _loss_rose_after(sig, first, c)
    )
    nf_steps = [int(s) for s in steps[loss_nf | grad_nf][: t.max_listed]]
    skipped_set = set(sig.skipped)
    guarded = (
        bool(skipped_set)
        and all(int(x) in skipped_set for x in steps[loss_nf | grad_nf])
        and bool(np.isfinite(grad[-1]) if sig.has_grad[-1] else True)
        and bool(np.isfinite(loss[-1]) if sig.has_loss[-1] else True)
        and not _loss_rose_after(sig, first, c)
    )
    ev["skipped_by_guard"] = guarded
    if guarded:
        n_nf = int((loss_nf | grad_nf).sum())
        expl = (
            f"{n_nf} logged step(s) held NaN/inf (first at step {first}), and each was skipped (a guard such "
            "as gradsentry.NonFiniteGuard, or a loss scaler, left the weights untouched): training went on "
            "with finite values. The cause is still worth finding (a bad batch, an overflow)."
        )
        out.append(
            Finding(
                "nonfinite",
                "warning",
                nf_steps,
                [],
                ev,
                expl,
                c.advice("nonfinite", sig, first, guarded=True),
            )
        )
        return out
    if isolated_only:
        expl = (
            f"{int(grad_nf.sum())} of {len(sig)} logged gradient norms are non-finite (first at step {first}) "
            "while the loss stays finite and keeps improving. With fp16 these are overflow steps a GradScaler "
            "skipped, harmless if rare; in bf16/fp32 a non-finite norm reaches the weights (clipping by a NaN "
            "norm makes every gradient NaN)."
        )
        sev = "warning"
    else:
        parts = []
        if loss_nf.any():
            parts.append(f"loss {float(loss[loss_nf][0])} at step {ev['first_nonfinite_loss_step']}")
        if grad_nf.any():
            parts.append(
                f"gradient norm {float(grad[grad_nf][0])} at step {ev['first_nonfinite_grad_norm_step']}"
            )
        expl = (
            f"At step {first} the first non-finite value appears ({'; '.join(parts)}); "
            f"{int((loss_nf | grad_nf).sum())} of {len(sig)} logged points are non-finite. An optimizer step "
            "with NaN/inf gradients writes NaN into the weights, after which training cannot recover."
        )
        sev = "error"
    out.append(Finding("nonfinite", sev, nf_steps, [], ev, expl, c.advice("nonfinite", sig, first)))
    if hidden.any():
        hs = [int(s) for s in steps[hidden]]
        out.append(
            Finding(
                "hidden_nonfinite",
                "error",
                hs[: t.max_listed],
                [],
                {
                    "steps_with_zero_loss_and_nonfinite_grad_norm": len(hs),
                    "first_step": hs[0],
                    "grad_norm_at_first": float(grad[hidden][0]),
                    "loss_at_first": 0.0,
                },
                f"At {len(hs)} logged step(s), first {hs[0]}, the loss is exactly 0.0 while the gradient norm "
                "is non-finite: the loss was non-finite and the logger (the HF Trainer's "
                "logging_nan_inf_filter) hid it. This is not convergence.",
                [
                    Remedy(
                        "set logging_nan_inf_filter=False in TrainingArguments so the log shows the real loss"
                    ),
                    _r("guard"),
                    _r("check_numerics"),
                ],
            )
        )
    if skipped:
        a, b = max(skipped, key=lambda r: r[1] - r[0])
        out.append(
            Finding(
                "skipped_steps",
                "error",
                [int(s) for s in steps[a:b][: t.max_listed]],
                [],
                {
                    "nonfinite_grad_norm_run_points": b - a,
                    "run_first_step": int(steps[a]),
                    "run_last_step": int(steps[b - 1]),
                    "points_in_all_runs": sum(r[1] - r[0] for r in skipped),
                    "loss_relative_change": sg.rnd(sg.thirds_change(loss[a:b])),
                },
                f"The gradient norm is non-finite on {b - a} consecutive logged steps "
                f"({int(steps[a])}..{int(steps[b - 1])}) while the loss stays finite and flat: a loss scaler is "
                "skipping every step, the model is not training.",
                [
                    _r("check_numerics"),
                    Remedy(
                        "find the layer that overflows in fp16 (gradsentry.Monitor(model, locate_nonfinite=True)); "
                        "train in bf16 or lower the initial loss scale"
                    ),
                    _r("guard"),
                ],
            )
        )
    return out


def _loss_rose_after(sig: RunSignals, step: int, c: RuleContext) -> bool:
    """The loss after ``step`` ended above ``divergence_factor`` times its level before (not improving)."""
    ls, lv = sig.loss_points()
    res = sg.loss_outcome(ls, lv, step, c.t)
    return res["outcome"] == "diverged"


def _scaler_skips(sig: RunSignals, c: RuleContext) -> list[Finding]:
    """Steps a loss scaler said it skipped (overflow lines): a problem when they persist to the end."""
    if not sig.skipped or len(sig) == 0:
        return []
    t = c.t
    skipped = np.asarray(sig.skipped, dtype=np.int64)
    span_last = int(sig.steps[-1])
    tail_from = int(sig.steps[max(0, len(sig) - t.divergence_tail)])
    tail = skipped[skipped >= tail_from]
    tail_steps = max(1, span_last - tail_from + 1)
    total_steps = max(1, span_last - int(min(sig.steps[0], skipped[0])) + 1)
    frac_tail = tail.size / tail_steps
    frac_all = skipped.size / total_steps
    persistent = frac_tail > 0.5 or frac_all > 0.5
    ev = {
        "skipped_steps": int(skipped.size),
        "first_skipped_step": int(skipped[0]),
        "last_skipped_step": int(skipped[-1]),
        "fraction_of_steps": sg.rnd(frac_all),
        "fraction_of_last_steps": sg.rnd(frac_tail),
    }
    if not persistent:
        return [
            Finding(
                "skipped_steps",
                "info",
                [int(s) for s in skipped[: t.max_listed]],
                [],
                ev,
                f"{skipped.size} step(s) were skipped (a loss scaler's overflow, or a NaN/inf guard; first at "
                f"step {int(skipped[0])}); occasional skips (an fp16 scale calibrating, a rare bad batch) are "
                "harmless.",
                [],
            )
        ]
    return [
        Finding(
            "skipped_steps",
            "error",
            [int(s) for s in skipped[: t.max_listed]],
            [],
            ev,
            f"A loss scaler skipped {skipped.size} step(s) on gradient overflow, {frac_tail:.0%} of the last "
            "logged steps: the gradients overflow on nearly every step, so the model is barely training "
            "(the scale keeps falling; 'Current loss scale already at minimum' ends such runs).",
            [
                _r("check_numerics"),
                Remedy(
                    "find the layer that overflows in fp16 (gradsentry.Monitor(model, locate_nonfinite=True)); "
                    "train in bf16, or lower the learning rate if the overflow started after a spike"
                ),
                _r("lower_lr_warmup"),
            ],
        )
    ]


def zero_rule(sig: RunSignals, c: RuleContext) -> list[Finding]:
    """Gradient norms of exactly 0.0: no gradient reached any parameter (not vanishing)."""
    gs, gv = sig.grad_points()
    zero = gv == 0.0
    if not zero.any():
        return []
    zs = [int(x) for x in gs[zero]]
    frac = len(zs) / gv.size
    what = (
        f"every logged gradient norm is exactly 0 ({len(zs)} points)"
        if len(zs) == gv.size
        else f"{len(zs)} of {gv.size} logged gradient norms are exactly 0 (first at step {zs[0]})"
    )
    return [
        Finding(
            "zero_grad_norm",
            "error" if frac >= 0.5 else "warning",
            zs[: c.t.max_listed],
            [],
            {
                "zero_points": len(zs),
                "logged_points": int(gv.size),
                "first_step": zs[0],
                "fraction": sg.rnd(frac),
            },
            what.capitalize()
            + ": no gradient reached any parameter (every unit dead, everything frozen, a detached graph, or a "
            "logger writing 0 for skipped steps). This is not vanishing: vanishing gradients are small, not "
            "exactly zero.",
            [
                _r("leaky"),
                Remedy("check requires_grad on the parameters and that the optimizer holds them"),
                Remedy("check the loss is computed from the model output without .detach()/.item()"),
            ],
        )
    ]


# ---------------------------------------------------------------- exploding: spikes, jumps, growth, divergence


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
    # finite losses only: a NaN/inf loss is the nonfinite rule's (a NaN batch is not a learning rate)
    early = [i for i in range(1, n_early) if fin[i] and lv[i] >= t.early_divergence_factor * start]
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
                f"{float(lv[i]):.4g} at step {int(ls[i])} (at least {t.early_divergence_factor:g}x its start)"
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
    # late: the loss stays far above its best level
    s, v = ls[fin], lv[fin]
    k = min(t.divergence_tail, max(2, v.size // 5))
    if v.size < max(6, 2 * k):
        return out
    m = sg.rolling_median(v, t.smooth_window)
    head = m[: v.size - k]
    b = int(np.argmin(head))
    best = float(head[b])
    start_level = float(m[0])
    tail_med = float(np.median(v[-k:]))
    lost = tail_med >= best + 0.25 * (start_level - best) if start_level > best else True
    if best <= 0 or tail_med <= t.divergence_factor * best or not lost:
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


# ---------------------------------------------------------------- vanishing: collapse, stall


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
                Remedy("check that the learning rate is not ~0 and that the parameters are in the optimizer"),
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
            Remedy("check that the learning-rate schedule did not decay to ~0"),
        ],
    )


# ---------------------------------------------------------------- loss only


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
                Remedy(
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
                Remedy(
                    "log the global gradient norm (pre-clip) to see whether spikes start in the gradients"
                ),
                _r("zclip"),
                _r("lower_lr_warmup"),
            ],
        )
    )
    return out


# ---------------------------------------------------------------- all together


def series_findings(sig: RunSignals, c: RuleContext) -> list[Finding]:
    """Every series rule over ``sig``, in a fixed order (unsorted; the caller sorts)."""
    findings = nonfinite_rules(sig, c)
    if not sig.has_grad.any():
        findings += loss_only_rules(sig, c)
        findings += divergence_rules(sig, c, have_exploding=False)
        if not any(f.kind == "loss_divergence" for f in findings):
            findings += vanishing_rules(sig, c)  # only the stall can be seen without a norm
        return findings
    findings += zero_rule(sig, c)
    gs, gv = sig.finite_positive("grad")
    events = _events_finding(sig, c, sg.find_jumps(gs, gv, c.t), "jump")
    events += _events_finding(sig, c, sg.find_spikes(gs, gv, c.t), "spike")
    growth = growth_rule(sig, c)
    findings += [f for f in events if f.kind != "exploding"]
    exploding = [f for f in events if f.kind == "exploding"] + ([growth] if growth is not None else [])
    diverged = any(f.evidence.get("loss_outcome") == "diverged" or f.severity == "error" for f in exploding)
    findings += exploding
    findings += divergence_rules(sig, c, have_exploding=diverged)
    if not any(f.kind in ("exploding", "zero_grad_norm") for f in findings):
        findings += vanishing_rules(sig, c)
    return findings
