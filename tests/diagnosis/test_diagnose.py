"""Tests of gradsentry.diagnose on hand-made StepRecords whose expected findings are derived by hand."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradsentry.diagnose import Thresholds, diagnose, diagnose_series
from gradsentry.diagnosis.advice import CATALOG, RemedyContext, remedies_for
from gradsentry.records import ActivationStats, Finding, LayerInfo, LayerStats, StepRecord

# ------------------------------------------------------------------------------------------------------------
# Builders


def layer(
    i: int,
    norm: float,
    *,
    numel: int = 100,
    has_grad: bool = True,
    update_ratio: float | None = None,
    nonfinite: int = 0,
    name: str | None = None,
) -> LayerStats:
    return LayerStats(
        name=name if name is not None else f"l{i}",
        depth=i,
        numel=numel,
        grad_norm=norm,
        grad_rms=norm / math.sqrt(numel) if numel else 0.0,
        grad_max_abs=abs(norm),
        nonfinite=nonfinite,
        weight_norm=1.0,
        update_ratio=update_ratio,
        has_grad=has_grad,
    )


def record(step: int, norms: Sequence[float], **kw: object) -> StepRecord:
    layers = [layer(i, n) for i, n in enumerate(norms)]
    total = math.sqrt(sum(n * n for n in norms))
    return StepRecord(step=step, global_norm=total, layers=layers, **kw)  # type: ignore[arg-type]


def noisy_run(
    steps: int, n_layers: int, seed: int, sigma: float = 0.3, decay: float = 300.0, lognormal: bool = True
) -> list[StepRecord]:
    """Healthy SGD-like norms: slowly decaying level with 30 % multiplicative noise per layer."""
    rng = np.random.default_rng(seed)
    out = []
    for s in range(steps):
        base = 2.0 * math.exp(-s / decay)
        if lognormal:
            norms = [base * math.exp(sigma * rng.standard_normal()) for _ in range(n_layers)]
        else:
            norms = [base * abs(1 + sigma * rng.standard_normal()) for _ in range(n_layers)]
        out.append(record(s, norms))
    return out


def kinds(findings: list[Finding]) -> list[str]:
    return [f.kind for f in findings]


# ------------------------------------------------------------------------------------------------------------
# Edge cases


def test_empty_records_give_no_findings() -> None:
    assert diagnose([]) == []


def test_single_healthy_record_and_record_without_layers() -> None:
    assert diagnose([record(0, [1.0, 0.5, 0.8])]) == []
    assert diagnose([StepRecord(step=0, global_norm=1.0)]) == []


def test_single_nonfinite_record() -> None:
    (f,) = diagnose([StepRecord(step=3, global_norm=math.inf)])
    assert (f.kind, f.severity, f.steps, f.layers) == ("nonfinite", "error", [3], [])


def test_records_are_sorted_by_step_and_accept_any_sequence() -> None:
    recs = [record(s, [1.0, 1.0]) for s in range(30)]
    recs[20] = record(20, [1e4, 1e4])
    shuffled = tuple(reversed(recs))
    (f,) = diagnose(shuffled)
    assert f.steps == [20]


def test_bad_input_types_raise_clear_errors() -> None:
    with pytest.raises(TypeError, match=r"expects StepRecord objects, got dict at position 0"):
        diagnose([{"step": 0, "global_norm": 1.0}])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"sequence of StepRecord, got a single StepRecord"):
        diagnose(StepRecord(step=0, global_norm=1.0))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"thresholds must be a gradsentry Thresholds, got dict"):
        diagnose([], thresholds={"spike_z": 3})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"layers must be LayerInfo objects, got str"):
        diagnose([record(0, [1.0])], layers=["fc"])  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"records": None},
            r"diagnose\(records=\.\.\.\) expects a sequence of StepRecord, got NoneType; pass Monitor\.records",
        ),
        ({"records": 3}, r"diagnose\(records=\.\.\.\) expects a sequence of StepRecord, got int"),
        (
            {"records": "run.jsonl"},
            r"StepRecord, got str; pass Monitor\.records or gradsentry\.read_jsonl\(path\)\.records$",
        ),
        ({"records": {"step": 0}}, r"diagnose\(records=\.\.\.\) expects a sequence of StepRecord, got dict"),
        ({"records": [], "layers": 3}, r"diagnose\(layers=\.\.\.\) expects None or a sequence of LayerInfo"),
        ({"records": [], "meta": ["adam"]}, r"diagnose\(meta=\.\.\.\) expects None or a dict .*got list"),
    ],
)
def test_a_wrong_argument_type_is_a_type_error_naming_it(kwargs: dict, message: str) -> None:
    """`diagnose(None)` raised "'NoneType' object is not iterable" (`layers=3` the same for int,
    `meta=[...]` an AttributeError) from inside the detector core."""
    with pytest.raises(TypeError, match=message):
        diagnose(**kwargs)


def test_diagnose_series_of_a_non_series_is_a_type_error() -> None:
    """`diagnose_series(None)` raised "'NoneType' object has no attribute 'steps'"."""
    with pytest.raises(
        TypeError, match=r"diagnose_series\(series=\.\.\.\) expects a gradsentry\.logs\.Series"
    ):
        diagnose_series(None)  # type: ignore[arg-type]


def test_nan_values_do_not_crash_statistics() -> None:
    """NaN RMS, NaN update ratios and NaN activation fractions are skipped by every statistic."""
    recs = []
    for s in range(40):
        layers = [layer(i, 10.0 ** (i - 5)) for i in range(6)]  # ratio 1e-5: vanishing
        layers[2].grad_rms = math.nan
        layers[3].update_ratio = math.nan
        layers[4].update_ratio = 1e-3
        acts = [ActivationStats("a", "Sigmoid", 0, 0.0, 1.0, saturated_frac=math.nan, dead_frac=None)]
        recs.append(StepRecord(step=s, global_norm=1.0, layers=layers, activations=acts, loss=None))
    found = diagnose(recs)
    assert kinds(found) == ["vanishing"]
    # l2's NaN RMS is left out of the fit: the slope is the fit over the other five layers.
    x = np.array([0, 1, 3, 4, 5], dtype=float)
    y = np.log10(np.array([10.0 ** (i - 5) / 10.0 for i in (0, 1, 3, 4, 5)]))
    assert found[0].evidence["log10_rms_slope_per_layer"] == pytest.approx(np.polyfit(x, y, 1)[0], rel=1e-9)


# ------------------------------------------------------------------------------------------------------------
# Vanishing


def geometric_profile(n_layers: int, decades_per_layer: float, last_norm: float = 1.0) -> list[float]:
    """Gradient norms growing by ``decades_per_layer`` per layer from input (0) to output (n-1)."""
    return [last_norm * 10.0 ** (-(n_layers - 1 - i) * decades_per_layer) for i in range(n_layers)]


def test_vanishing_fires_with_hand_derived_ratio_and_slope() -> None:
    # 10 layers, 0.5 decades per layer: first/last RMS ratio = 10^(-4.5) = 3.16e-5 (< 1e-3, > 1e-6: warning).
    rng = np.random.default_rng(0)
    recs, ratios, slopes = [], [], []
    for s in range(12):
        norms = [n * math.exp(0.1 * rng.standard_normal()) for n in geometric_profile(10, 0.5)]
        recs.append(record(s, norms))
        logs = np.log10(np.array(norms) / 10.0)  # rms = norm / sqrt(100)
        ratios.append(norms[0] / norms[-1])
        slopes.append(np.polyfit(np.arange(10, dtype=float), logs, 1)[0])
    (f,) = diagnose(recs)
    assert (f.kind, f.severity) == ("vanishing", "warning")
    assert f.steps == list(range(12))
    ev = f.evidence
    assert ev["first_last_rms_ratio_median"] == pytest.approx(statistics.median(ratios), rel=1e-9)
    assert ev["first_last_rms_ratio_first_step"] == pytest.approx(ratios[0], rel=1e-9)
    assert ev["log10_rms_slope_per_layer"] == pytest.approx(statistics.median(slopes), rel=1e-9)
    assert ev["log10_rms_slope_first_step"] == pytest.approx(slopes[0], rel=1e-9)
    assert ev["log10_rms_slope_per_layer"] == pytest.approx(0.5, abs=0.05)  # the profile's 0.5 decades/layer
    assert ev["first_layer"] == "l0" and ev["last_layer"] == "l9"
    assert ev["smallest_rms_layers"][0] == "l0"
    # Layers whose median RMS is < 1e-3 of the last layer's: l0..l3 (-4.5, -4, -3.5, -3.0 decades ± noise).
    assert f.layers[:3] == ["l0", "l1", "l2"]
    assert set(f.layers) <= {"l0", "l1", "l2", "l3"}
    assert ev["steps_fraction"] == 1.0


def test_vanishing_is_an_error_below_one_in_a_million() -> None:
    # 20 layers, 0.8 decades per layer: ratio 10^(-15.2), like a 20-layer sigmoid MLP at default init.
    recs = [record(s, geometric_profile(20, 0.8)) for s in range(5)]
    (f,) = diagnose(recs)
    assert (f.kind, f.severity) == ("vanishing", "error")
    assert f.evidence["first_last_rms_ratio_median"] == pytest.approx(10.0**-15.2, rel=1e-9)
    assert f.evidence["log10_rms_slope_per_layer"] == pytest.approx(0.8, rel=1e-9)
    assert f.remedies[0].action == CATALOG["residual"].action  # no saturating activation seen


def test_vanishing_silent_on_healthy_3_layer_mlp() -> None:
    assert diagnose(noisy_run(200, 3, seed=1)) == []


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vanishing_silent_on_20_layer_he_init_profile(seed: int) -> None:
    """He-init ReLU nets keep per-layer gradient RMS within O(0.1..10) of the last layer: a random walk of
    ±0.05 decades per layer, plus per-step noise; the first/last ratio stays far from 1e-3."""
    rng = np.random.default_rng(seed)
    profile = 10.0 ** np.cumsum(rng.uniform(-0.05, 0.05, size=20))
    recs = [record(s, list(profile * np.exp(0.2 * rng.standard_normal(20)))) for s in range(50)]
    ratios = [r.layers[0].grad_rms / r.layers[-1].grad_rms for r in recs]
    assert min(ratios) > 0.05 and max(ratios) < 20  # the premise: O(0.1..10)
    assert diagnose(recs) == []


def test_frozen_layers_do_not_trigger_vanishing() -> None:
    # Two frozen input layers report zero gradients (has_grad False); the trainable rest is flat.
    recs = []
    for s in range(10):
        layers = [layer(0, 0.0, has_grad=False), layer(1, 0.0, has_grad=False)]
        layers += [layer(i, 1.0) for i in range(2, 6)]
        recs.append(StepRecord(step=s, global_norm=2.0, layers=layers))
    assert diagnose(recs) == []
    # The same frozen layers with tiny (not zero) figures are still ignored.
    for r in recs:
        r.layers[0].grad_norm = r.layers[0].grad_rms = 1e-12
    assert diagnose(recs) == []


def test_vanishing_needs_a_majority_of_steps() -> None:
    bad, good = geometric_profile(6, 1.0), [1.0] * 6  # ratio 1e-5 vs 1
    recs = [record(s, bad if s < 4 else good) for s in range(10)]  # 40 % of steps
    assert diagnose(recs) == []
    recs = [record(s, bad if s < 6 else good) for s in range(10)]  # 60 % of steps
    (f,) = diagnose(recs)
    assert f.kind == "vanishing" and f.steps == [0, 1, 2, 3, 4, 5]
    assert f.evidence["steps_fraction"] == pytest.approx(0.6)
    # Exactly half is not a majority; lowering sustained_fraction makes it one.
    recs = [record(s, bad if s < 5 else good) for s in range(10)]
    assert diagnose(recs) == []
    assert kinds(diagnose(recs, sustained_fraction=0.4)) == ["vanishing"]


def test_vanishing_threshold_override() -> None:
    recs = [record(s, geometric_profile(10, 0.5)) for s in range(5)]  # ratio 10^-4.5
    assert kinds(diagnose(recs)) == ["vanishing"]
    assert diagnose(recs, vanishing_ratio=1e-5, vanishing_error_ratio=1e-7) == []
    assert diagnose(recs, thresholds=Thresholds(vanishing_ratio=1e-5, vanishing_error_ratio=1e-7)) == []
    (f,) = diagnose(recs, vanishing_error_ratio=1e-4)
    assert f.severity == "error"


def test_layer_info_depth_takes_precedence() -> None:
    # The records carry no depth (all 0); LayerInfo orders them in reverse name order.
    names = ["out", "mid", "inp"]
    infos = [
        LayerInfo("inp", "Linear", 0, 10),
        LayerInfo("mid", "Linear", 1, 10),
        LayerInfo("out", "Linear", 2, 10),
    ]
    norms = {"inp": 1e-6, "mid": 1e-3, "out": 1.0}
    recs = [
        StepRecord(step=s, global_norm=1.0, layers=[layer(0, norms[n], name=n) for n in names])
        for s in range(3)
    ]
    assert diagnose(recs) == []  # all at depth 0: no depth profile to judge
    (f,) = diagnose(recs, layers=infos)
    assert f.kind == "vanishing"
    assert (f.evidence["first_layer"], f.evidence["last_layer"]) == ("inp", "out")
    assert f.evidence["first_last_rms_ratio_median"] == pytest.approx(1e-6, rel=1e-12)
    assert f.evidence["log10_rms_slope_per_layer"] == pytest.approx(3.0, rel=1e-12)


def test_vanishing_remedies_are_tailored() -> None:
    recs = [record(s, geometric_profile(8, 1.0)) for s in range(3)]
    plain = diagnose(recs)[0].remedies
    assert plain[0].action == CATALOG["residual"].action
    for r in recs:
        r.activations = [ActivationStats("act0", "Sigmoid", 0, 0.0, 1.0, saturated_frac=0.1)]
    sig = diagnose(recs)[0]
    assert sig.remedies[0].api == "gradsentry.reinit(model, 'he')"
    assert "saturating activations" in sig.explanation
    for r in recs:
        r.activations = []
    infos = [LayerInfo(f"l{i}", "BatchNorm1d" if i == 3 else "Linear", i, 10) for i in range(8)]
    normed = diagnose(recs, layers=infos)[0].remedies
    assert normed[0].action == CATALOG["residual"].action
    assert normed[-1].action == CATALOG["normalization"].action


# ------------------------------------------------------------------------------------------------------------
# Exploding: spikes


def spike_run(seed: int = 0, at: int = 60, scale: float = 1e4, steps: int = 100) -> list[StepRecord]:
    rng = np.random.default_rng(seed)
    out = []
    for s in range(steps):
        norms = [abs(1.0 + 0.25 * rng.standard_normal()) for _ in range(3)]
        if s == at:
            norms = [n * scale for n in norms]
        out.append(record(s, norms))
    return out


def test_loss_scaled_1e4_at_one_step_is_exploding_at_that_step_only() -> None:
    recs = spike_run()
    (f,) = diagnose(recs)
    assert (f.kind, f.severity, f.steps) == ("exploding", "error", [60])
    ev = f.evidence
    assert ev["pattern"] == "spike" and ev["first_step"] == 60 and not ev["leads_to_nonfinite"]
    # Independent recomputation of the robust z-score of ln norm against the 20 previous steps.
    logs = np.log([r.global_norm for r in recs])
    hist = logs[40:60]
    med = np.median(hist)
    sigma = max(1.4826 * np.median(np.abs(hist - med)), 0.05)
    (event,) = ev["events"]
    assert event["z"] == pytest.approx((logs[60] - med) / sigma, rel=1e-5)
    assert ev["reference_norm"] == pytest.approx(np.exp(med), rel=1e-5)
    assert ev["first_ratio"] == pytest.approx(recs[60].global_norm / np.exp(med), rel=1e-5)
    assert ev["first_ratio"] > 1e3
    assert set(f.layers) == {"l0", "l1", "l2"}  # every layer spiked
    assert f.remedies[0].api == "gradsentry.ClipGlobalNorm(max_norm=1.0)"


def test_spike_names_the_layer_that_spiked_most() -> None:
    recs = spike_run()
    rng = np.random.default_rng(5)
    # Layer l2 carries the spike (x1e3); the others barely move (x1.05).
    recs[60] = record(60, [abs(1 + 0.25 * rng.standard_normal()) * 1.05, 1.0, 1e3])
    (f,) = diagnose(recs)
    assert f.steps == [60] and f.layers == ["l2"]
    lz, lr = f.evidence["layer_z"], f.evidence["layer_ratio"]
    assert next(iter(lz)) == "l2" and lz["l2"] > 6 and lz["l1"] < 6
    # Independent recomputation of l2's z-score and ratio (ln units, MAD floor 0.05).
    hist = np.log([r.layers[2].grad_norm for r in recs[40:60]])
    med = np.median(hist)
    scale = max(1.4826 * np.median(np.abs(hist - med)), 0.05)
    assert lz["l2"] == pytest.approx((math.log(1e3) - med) / scale, rel=1e-9)
    assert lr["l2"] == pytest.approx(1e3 / math.exp(med), rel=1e-9)


def test_moderate_spike_is_a_warning_and_min_factor_override() -> None:
    recs = spike_run(scale=20.0)
    (f,) = diagnose(recs)
    assert (f.kind, f.severity, f.steps) == ("exploding", "warning", [60])
    assert diagnose(recs, spike_min_factor=50.0) == []
    assert diagnose(recs, spike_z=1e6) == []
    assert diagnose(recs, spike_error_factor=10.0)[0].severity == "error"


def test_early_spike_is_judged_by_the_jump_test() -> None:
    recs = spike_run(at=5)  # only 5 earlier points, fewer than spike_min_history=8: no z-score yet
    (f,) = diagnose(recs)
    assert (f.kind, f.evidence["pattern"], f.steps, f.severity) == ("exploding", "jump", [5], "error")
    ref = float(np.median([r.global_norm for r in recs[:5]]))
    assert f.evidence["first_ratio"] == pytest.approx(recs[5].global_norm / ref, rel=1e-5)
    assert diagnose(recs, jump_factor=1e5) == []  # below the jump factor: nothing judged
    assert diagnose(recs, spike_min_history=5)[0].evidence["pattern"] == "spike"
    small = spike_run(at=5, scale=10.0)  # 10x at the start, no loss to show harm: under jump_factor=20
    assert diagnose(small) == []


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("lognormal", [True, False], ids=["lognormal", "gaussian"])
def test_healthy_noisy_sgd_gives_no_findings(seed: int, lognormal: bool) -> None:
    # One layer only: the global norm carries the full 30 % noise (no averaging over layers).
    assert diagnose(noisy_run(400, 1, seed=seed, sigma=0.3, lognormal=lognormal)) == []


def test_spike_then_nonfinite_is_an_error_and_reorders_nonfinite_remedies() -> None:
    recs = spike_run(scale=20.0)
    recs[62] = StepRecord(
        step=62, global_norm=math.nan, layers=[layer(i, math.nan, nonfinite=5) for i in range(3)]
    )
    found = diagnose(recs)
    assert kinds(found) == ["exploding", "nonfinite"]  # both errors; the spike came first
    assert found[0].severity == "error" and found[0].evidence["leads_to_nonfinite"]
    nf = found[1]
    assert nf.evidence["preceded_by_exploding"] is True
    assert [r.api for r in nf.remedies[:2]] == [
        "gradsentry.NonFiniteGuard()",
        "gradsentry.ClipGlobalNorm(max_norm=1.0)",
    ]
    # Outside the link window the spike stays a warning.
    assert diagnose(recs, nonfinite_link_window=1)[1].severity == "warning"


# ------------------------------------------------------------------------------------------------------------
# Exploding: growth and update ratio


def test_sustained_growth_is_exploding_with_fitted_rate() -> None:
    # Noise-free geometric growth 1.1x per step for 80 steps: every 50-step window grows by 1.1^40
    # (median of the last 10 minus median of the first 10 is 40 steps apart).
    recs = [record(s, [1.1**s]) for s in range(80)]
    (f,) = diagnose(recs)
    assert (f.kind, f.evidence["pattern"]) == ("exploding", "growth")
    start, end = f.evidence["start_step"], f.evidence["end_step"]
    assert (start, end) == (0, 79)  # noise-free: the whole run is one steady rise
    fit = np.polyfit(
        np.arange(start, end + 1, dtype=float), np.log([1.1**s for s in range(start, end + 1)]), 1
    )
    assert f.evidence["rate_per_step"] == pytest.approx(fit[0], rel=1e-9)
    assert math.exp(f.evidence["rate_per_step"]) == pytest.approx(1.1, rel=1e-9)
    assert f.evidence["r2"] == pytest.approx(1.0)
    assert f.layers == ["l0"] and f.evidence["layer_growth"]["l0"] > 10


def test_slow_rise_is_not_growth() -> None:
    # The norm rises 3x over 400 steps with 25 % noise: not exploding.
    rng = np.random.default_rng(3)
    recs = [record(s, [3.0 ** (s / 400) * math.exp(0.25 * rng.standard_normal())]) for s in range(400)]
    assert diagnose(recs) == []


def test_growth_factor_override() -> None:
    recs = [record(s, [1.02 ** (s / 2)]) for s in range(80)]  # 1.02^39.5 = 2.2x in all: silent by default
    assert diagnose(recs) == []
    (f,) = diagnose(recs, growth_factor=2.0)
    assert f.evidence["fitted_growth"] == pytest.approx(1.02**39.5, rel=1e-5)


def test_update_ratio_above_limit_on_most_steps_is_exploding() -> None:
    recs = []
    for s in range(10):
        layers = [layer(i, 1.0, update_ratio=1e-3) for i in range(3)]
        if s >= 4:  # 6 of 10 logged steps: sustained
            layers[1].update_ratio = 0.5 if s == 4 else 0.2
        recs.append(StepRecord(step=s, global_norm=math.sqrt(3), layers=layers))
    (f,) = diagnose(recs)
    assert (f.kind, f.severity, f.steps, f.layers) == ("exploding", "warning", [4, 5, 6, 7, 8, 9], ["l1"])
    ev = f.evidence
    assert (ev["pattern"], ev["max_update_ratio"], ev["max_update_ratio_step"]) == ("update_ratio", 0.5, 4)
    assert diagnose(recs, update_ratio_max=0.6) == []


def test_transient_update_ratio_is_silent_unless_the_update_outgrew_the_weights() -> None:
    recs = []
    for s in range(10):
        layers = [layer(i, 1.0, update_ratio=1e-3) for i in range(3)]
        if s in (1, 2):  # an early head catching up: 2 of 10 steps at 0.2-0.3
            layers[2].update_ratio = 0.3
        recs.append(StepRecord(step=s, global_norm=math.sqrt(3), layers=layers))
    assert diagnose(recs) == []
    recs[6].layers[0].update_ratio = 2.5  # one update 2.5x the weights' norm: enough on its own
    (f,) = diagnose(recs)
    assert (f.steps, f.layers, f.evidence["max_update_ratio"]) == ([6], ["l0"], 2.5)


def _with_loss(recs: list[StepRecord], losses: Sequence[float]) -> list[StepRecord]:
    for r, loss in zip(recs, losses, strict=True):
        r.loss = loss
    return recs


def test_spike_while_the_loss_keeps_falling_is_not_exploding() -> None:
    norms = [1.0] * 40
    norms[25] = 8.0  # 8x: above spike_min_factor, below spike_error_factor
    falling = [2.0 * 0.97**s for s in range(40)]
    (info,) = diagnose(_with_loss([record(s, [n]) for s, n in enumerate(norms)], falling))
    assert (info.kind, info.severity, info.steps) == ("norm_spike", "info", [25])  # kept, not a problem
    hurt = falling[:]
    hurt[26] = 5.0  # the loss jumps right after the spike: harm done
    (f,) = diagnose(_with_loss([record(s, [n]) for s, n in enumerate(norms)], hurt))
    assert (f.kind, f.steps) == ("exploding", [25])
    (f,) = diagnose([record(s, [n]) for s, n in enumerate(norms)])  # no loss recorded: the norm decides
    assert f.steps == [25]


def test_norm_growth_while_the_loss_falls_is_not_exploding() -> None:
    norms = [0.5 * 1.06**s for s in range(60)]  # 0.5 -> 15: 30-fold
    falling = [2.0 * 0.98**s for s in range(60)]
    assert diagnose(_with_loss([record(s, [n]) for s, n in enumerate(norms)], falling)) == []
    flat = [2.0] * 60
    (f,) = diagnose(_with_loss([record(s, [n]) for s, n in enumerate(norms)], flat))
    assert (f.kind, f.evidence["pattern"]) == ("exploding", "growth")


# ------------------------------------------------------------------------------------------------------------
# Non-finite


def test_nonfinite_names_layer_and_step() -> None:
    recs = [record(s, [1.0, 1.0, 1.0]) for s in range(10)]
    recs[7].layers[1] = layer(1, math.nan, nonfinite=12)
    recs[7].global_norm = math.nan
    (f,) = diagnose(recs)
    assert (f.kind, f.severity, f.steps, f.layers) == ("nonfinite", "error", [7], ["l1"])
    assert f.evidence["first_step"] == 7 and f.evidence["layer_nonfinite_counts"] == {"l1": 12}
    assert f.evidence["preceded_by_exploding"] is False
    assert f.remedies[0].api == "gradsentry.NonFiniteGuard()"


def test_nonfinite_layers_deepest_first_and_origin() -> None:
    recs = [record(s, [1.0] * 4) for s in range(6)]
    for s in (3, 4):
        recs[s].layers[0] = layer(0, math.inf, nonfinite=1)
        recs[s].layers[2] = layer(2, math.nan, nonfinite=0)  # norm NaN even if the count was not taken
        recs[s].global_norm = math.nan
    (f,) = diagnose(recs)
    assert f.steps == [3, 4] and f.layers == ["l2", "l0"]
    assert "origin" not in f.evidence
    recs[4].nonfinite_origin = "l0"
    (f,) = diagnose(recs)
    assert f.layers == ["l0", "l2"] and f.evidence["origin"] == "l0"


def test_nonfinite_loss_with_finite_gradients() -> None:
    recs = [record(s, [1.0, 1.0], loss=0.5) for s in range(4)]
    recs[2].loss = math.inf
    (f,) = [x for x in diagnose(recs) if x.kind == "nonfinite"]
    assert f.steps == [2] and f.layers == [] and f.severity == "error"
    assert f.evidence["loss_only"] is True and f.evidence["first_nonfinite_loss"] == math.inf


def test_frozen_layer_cannot_hold_nonfinite() -> None:
    recs = [record(s, [1.0, 1.0]) for s in range(4)]
    recs[1].layers.append(layer(2, math.nan, has_grad=False))
    assert diagnose(recs) == []


# ------------------------------------------------------------------------------------------------------------
# Saturation, dead units, stalled layers


def act_run(attr: str, values: Sequence[float], act_type: str = "Sigmoid") -> list[StepRecord]:
    out = []
    for s, v in enumerate(values):
        a = ActivationStats("act1", act_type, 1, 0.0, 5.0, **{attr: v})
        healthy = ActivationStats("act0", act_type, 0, 0.0, 1.0, **{attr: 0.05})
        out.append(StepRecord(step=s, global_norm=1.0, activations=[healthy, a]))
    return out


def test_saturation_on_most_steps() -> None:
    values = [0.8, 0.9, 0.2, 0.7, 0.85, 0.3, 0.95, 0.75, 0.1, 0.6]  # > 0.5 on 7 of 10 steps
    (f,) = diagnose(act_run("saturated_frac", values))
    assert (f.kind, f.severity, f.layers) == ("saturation", "warning", ["act1"])
    assert f.steps == [0, 1, 3, 4, 6, 7, 9]
    assert f.evidence["median_fraction"]["act1"] == pytest.approx(statistics.median(values))
    assert f.evidence["steps_fraction"]["act1"] == pytest.approx(0.7)
    assert f.remedies[0].api == "gradsentry.reinit(model, 'he')"


def test_saturation_silent_when_not_sustained_and_override() -> None:
    values = [0.8, 0.9, 0.2, 0.7, 0.1, 0.3, 0.2, 0.2, 0.1, 0.1]  # 3 of 10
    recs = act_run("saturated_frac", values)
    assert diagnose(recs) == []
    assert kinds(diagnose(recs, saturated_frac=0.15)) == ["saturation"]


def test_dead_units() -> None:
    recs = act_run("dead_frac", [0.6] * 5, act_type="ReLU")
    (f,) = diagnose(recs)
    assert (f.kind, f.layers, f.steps) == ("dead_units", ["act1"], [0, 1, 2, 3, 4])
    assert f.evidence["worst_median_fraction"] == pytest.approx(0.6)
    assert diagnose(recs, dead_frac=0.6) == []  # strictly more than the limit


def stall_run(stalled: float, others: float, steps: int = 10) -> list[StepRecord]:
    out = []
    for s in range(steps):
        layers = [layer(i, 1.0, update_ratio=others) for i in range(4)]
        layers[2].update_ratio = stalled
        out.append(StepRecord(step=s, global_norm=2.0, layers=layers))
    return out


def test_stalled_layer() -> None:
    (f,) = diagnose(stall_run(1e-8, 1e-3))
    assert (f.kind, f.layers, f.steps) == ("stalled_layer", ["l2"], list(range(10)))
    assert f.evidence["median_update_ratio"] == {"l2": 1e-8}
    assert f.evidence["model_median_update_ratio"] == pytest.approx(1e-3)


def test_stalled_layer_silent_cases() -> None:
    assert diagnose(stall_run(1e-7, 1e-5)) == []  # model median only 100x higher
    assert diagnose(stall_run(0.0, 1e-7)) == []  # the whole model barely moves, not one layer
    assert diagnose(stall_run(1e-5, 1e-2)) == []  # layer above the 1e-6 limit
    assert kinds(diagnose(stall_run(1e-5, 1e-2), stalled_ratio=1e-4)) == ["stalled_layer"]
    # A frozen layer (no gradient) reporting a zero update is not stalled.
    recs = stall_run(1e-3, 1e-3)
    for r in recs:
        r.layers.append(layer(9, 0.0, has_grad=False, update_ratio=0.0))
    assert diagnose(recs) == []


# ------------------------------------------------------------------------------------------------------------
# Ordering, thresholds, remedies, serialisation


def test_findings_sorted_by_severity_then_first_step() -> None:
    recs = [record(s, geometric_profile(6, 1.0)) for s in range(30)]  # vanishing warning (1e-5) from step 0
    for r in recs:
        r.activations = [ActivationStats("a", "Tanh", 0, 0.0, 1.0, saturated_frac=0.9)]  # saturation from 0
    for r in recs[25:]:
        r.global_norm = math.inf  # nonfinite error from 25 to the end (the weights are poisoned)
    found = diagnose(recs)
    assert kinds(found) == ["nonfinite", "vanishing", "saturation"]  # stable order on equal first steps
    assert [f.severity for f in found] == ["error", "warning", "warning"]
    assert all(f.steps[0] == 0 for f in found[1:])


def test_threshold_validation_messages() -> None:
    with pytest.raises(ValueError, match=r"unknown threshold\(s\) spike_zz; valid names: .*spike_z"):
        diagnose([], spike_zz=3.0)
    with pytest.raises(ValueError, match=r"threshold spike_z must be > 0, got -1"):
        Thresholds(spike_z=-1)
    with pytest.raises(ValueError, match=r"threshold growth_factor must be a finite number, got nan"):
        Thresholds(growth_factor=math.nan)
    with pytest.raises(ValueError, match=r"spike_window counts logged points and must be an int, got 20.5"):
        Thresholds(spike_window=20.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"dead_frac is a fraction and must be < 1"):
        Thresholds(dead_frac=1.5)
    with pytest.raises(ValueError, match=r"growth_factor is a factor and must be > 1"):
        Thresholds(growth_factor=0.5)
    with pytest.raises(ValueError, match=r"spike_min_history \(30\) must not exceed spike_window \(20\)"):
        Thresholds(spike_min_history=30)
    with pytest.raises(ValueError, match=r"vanishing_error_ratio .* must not exceed vanishing_ratio"):
        Thresholds(vanishing_error_ratio=1e-2)
    with pytest.raises(ValueError, match=r"growth_min_points must be at least 3"):
        Thresholds(growth_min_points=2)
    with pytest.raises(dataclasses.FrozenInstanceError, match="spike_z"):
        Thresholds().spike_z = 3.0  # type: ignore[misc]
    t = Thresholds().replace(spike_z=7.5)
    assert t.spike_z == 7.5 and Thresholds().spike_z == 6.0


def test_remedies_catalog() -> None:
    for kind in ("vanishing", "exploding", "nonfinite", "saturation", "dead_units", "stalled_layer"):
        rs = remedies_for(kind)
        assert rs and all(r.action for r in rs)
        assert len({r.action for r in rs}) == len(rs)  # no duplicates
    apis = {r.api for k in ("vanishing", "exploding", "nonfinite") for r in remedies_for(k, RemedyContext())}
    assert {"gradsentry.ClipGlobalNorm(max_norm=1.0)", "gradsentry.ZClip()", "gradsentry.AGC(0.01)"} <= apis
    assert "arXiv:1211.5063" in (remedies_for("exploding")[0].reference or "")
    # Fresh objects: changing one does not change the catalogue.
    remedies_for("exploding")[0].action = "changed"
    assert remedies_for("exploding")[0].action == CATALOG["clip_global"].action
    with pytest.raises(ValueError, match=r"unknown finding kind 'melting'"):
        remedies_for("melting")


def test_findings_round_trip_through_json() -> None:
    recs = spike_run()
    recs[90] = StepRecord(
        step=90, global_norm=math.nan, layers=[layer(0, math.nan, nonfinite=1)], loss=math.nan
    )
    found = diagnose(recs)
    assert kinds(found) == ["exploding", "nonfinite"]
    for f in found:
        again = Finding.from_dict(json.loads(json.dumps(f.to_dict())))
        assert (again.kind, again.steps, again.layers, again.remedies) == (
            f.kind,
            f.steps,
            f.layers,
            f.remedies,
        )


# ------------------------------------------------------------------------------------------------------------
# Properties


@settings(max_examples=25, deadline=None)
@given(
    scale=st.floats(min_value=1e-6, max_value=1e6),
    seed=st.integers(min_value=0, max_value=10_000),
    spike_at=st.integers(min_value=10, max_value=59),
)
def test_findings_do_not_depend_on_gradient_units(scale: float, seed: int, spike_at: int) -> None:
    """Multiplying every gradient by a constant (e.g. a loss weight) changes no finding (relative rules)."""
    base = spike_run(seed=seed, at=spike_at, steps=60)
    scaled = [record(r.step, [x.grad_norm * scale for x in r.layers]) for r in base]
    a, b = diagnose(base), diagnose(scaled)
    assert [(f.kind, f.steps, f.layers) for f in a] == [(f.kind, f.steps, f.layers) for f in b]
    assert [f.steps for f in a] == [[spike_at]]
