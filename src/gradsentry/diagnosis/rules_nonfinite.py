"""Series rules for non-finite values: NaN/inf gradients or losses, a loss hidden by the HF Trainer's
NaN filter, steps a loss scaler or guard skipped, and an all-zero gradient norm."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gradsentry.diagnosis import signals as sg
from gradsentry.diagnosis.run_signals import RuleContext, RunSignals, _r
from gradsentry.diagnosis.thresholds import Thresholds
from gradsentry.records import Advice, Finding


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
    nonfinite = loss_nf | grad_nf
    rose = _loss_rose_after(sig, first, c)
    isolated_only = (
        not loss_nf.any()
        and not hidden.any()
        and not skipped
        and bool(np.all(finite_loss_nf_grad[grad_nf]))
        and longest < t.skipped_min_run
        and bool(np.all(np.isinf(grad[grad_nf])))  # overflow (inf), never NaN: a NaN is a real fault
        and not rose
    )
    nf_steps = [int(s) for s in steps[nonfinite][: t.max_listed]]
    skipped_set = set(sig.skipped)
    guarded = (
        bool(skipped_set)
        and all(int(x) in skipped_set for x in steps[nonfinite])
        and bool(np.isfinite(grad[-1]) if sig.has_grad[-1] else True)
        and bool(np.isfinite(loss[-1]) if sig.has_loss[-1] else True)
        and not rose
    )
    ev["skipped_by_guard"] = guarded
    after = 0 if guarded or rose else _finite_after(sig, nonfinite, t.skipped_min_run)
    ev["finite_points_after_last_nonfinite"] = after
    if guarded or after:
        n_nf = int(nonfinite.sum())
        if guarded:
            expl = (
                f"{n_nf} logged step(s) held NaN/inf (first at step {first}), and each was skipped (a guard "
                "such as gradsentry.NonFiniteGuard, or a loss scaler, left the weights untouched): training "
                "went on with finite values. The cause is still worth finding (a bad batch, an overflow)."
            )
        else:
            expl = (
                f"{n_nf} logged step(s) held NaN/inf (first at step {first}), then the {after} logged steps "
                "after the last of them are finite and the loss did not diverge: those steps never reached "
                "the weights (a NaN weight makes every later loss NaN), so a loss scaler or a guard skipped "
                "them. An fp16 GradScaler whose initial scale is too high overflows like this on its first "
                f"steps while the scale falls (longest run here: {longest} logged steps). The cause is still "
                "worth finding (an overflow, a bad batch)."
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
            f"{int(nonfinite.sum())} of {len(sig)} logged points are non-finite. An optimizer step "
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
                    Advice(
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
                    Advice(
                        "find the layer that overflows in fp16 (gradsentry.Monitor(model, locate_nonfinite=True)); "
                        "train in bf16 or lower the initial loss scale"
                    ),
                    _r("guard"),
                ],
            )
        )
    return out


def _finite_after(sig: RunSignals, nonfinite: np.ndarray, min_points: int) -> int:
    """How many logged points follow the last non-finite one when all of them are finite (loss and norm,
    where logged) and there are at least ``min_points``, else 0; 0 too when a loss was hidden as 0.0.

    A non-finite gradient that reaches the weights is absorbing: every later loss and gradient norm is
    NaN (without a rollback). So such a finite tail, with a loss that did not diverge (checked by the
    caller), shows that the non-finite steps were skipped (an fp16 GradScaler calibrating its scale, a
    guard) even where the log does not say so."""
    if sig.hidden.any():
        return 0
    last = int(np.flatnonzero(nonfinite)[-1])
    tail_ok = ~sig.has_loss[last + 1 :] | np.isfinite(sig.loss[last + 1 :])
    tail_ok &= ~sig.has_grad[last + 1 :] | np.isfinite(sig.grad[last + 1 :])
    n_after = len(sig) - last - 1
    return n_after if n_after >= min_points and tail_ok.all() else 0


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
                Advice(
                    "find the layer that overflows in fp16 (gradsentry.Monitor(model, locate_nonfinite=True)); "
                    "train in bf16, or lower the learning rate if the overflow started after a spike"
                ),
                _r("lower_lr_warmup"),
            ],
        )
    ]


def _converged(sig: RunSignals, t: Thresholds) -> np.ndarray:
    """[N] the loss logged at the step is at most ``converged_loss_frac`` times its start (>= 0).

    A gradient of exactly 0 cannot lower a loss: a network no gradient reaches keeps its loss (the dead
    ReLU net stays at ln 10). A zero logged beside a loss that fell to a thousandth of its start is a
    minimum reached (an exact fit), or a norm below the log's printed precision (TorchTitan, llm.c and
    mmengine print 4 decimals: ``0.0000`` is any norm under 5e-5), the same reason
    :func:`~gradsentry.diagnosis.rules_vanishing.vanishing_rules` does not call a collapse at convergence
    vanishing.
    """
    _, lv = sig.loss_points()
    fin = lv[np.isfinite(lv)]
    start = float(np.median(fin[: min(5, fin.size)])) if fin.size else math.nan
    if not start > 0:
        return np.zeros(len(sig), dtype=bool)
    loss = np.where(sig.has_loss & ~sig.hidden, sig.loss, np.nan)
    with np.errstate(invalid="ignore"):
        return (loss >= 0) & (loss <= t.converged_loss_frac * start)


def zero_rule(sig: RunSignals, c: RuleContext) -> list[Finding]:
    """Gradient norms of exactly 0.0: no gradient reached any parameter (not vanishing).

    Zeros logged where the loss has converged (see :func:`_converged`) are left out: expected there.
    """
    zero_all = sig.has_grad & (sig.grad == 0.0) & ~_converged(sig, c.t)
    gs, gv = sig.steps[sig.has_grad], sig.grad[sig.has_grad]
    zero = zero_all[sig.has_grad]
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
                Advice("check requires_grad on the parameters and that the optimizer holds them"),
                Advice("check the loss is computed from the model output without .detach()/.item()"),
            ],
        )
    ]
