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

from gradsentry.diagnosis import signals as sg
from gradsentry.diagnosis.rules_exploding import _events_finding, divergence_rules, growth_rule
from gradsentry.diagnosis.rules_nonfinite import nonfinite_rules, zero_rule
from gradsentry.diagnosis.rules_vanishing import loss_only_rules, vanishing_rules
from gradsentry.diagnosis.run_signals import RuleContext, RunSignals
from gradsentry.records import Finding

__all__ = ["RuleContext", "RunSignals", "series_findings"]


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
