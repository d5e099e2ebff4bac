"""Detectors over logged series; evidence numbers re-derived independently (numpy, float64)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradsentry.analyze import AnalyzeThresholds, analyze_log, detect, loglinear_fit
from gradsentry.logs import Series

N = 300
STEPS = np.arange(N) * 10


def series(grad: np.ndarray | None, loss: np.ndarray | None, steps: np.ndarray = STEPS) -> Series:
    n = len(steps)

    def col(x: np.ndarray | None) -> list[float | None]:
        return [None] * n if x is None else [float(v) for v in x]

    return Series(steps=[int(s) for s in steps], loss=col(loss), grad_norm=col(grad), lr=[None] * n)


def healthy(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    grad = 2.0 * np.exp(rng.normal(0.0, 0.25, N))
    loss = 2.3 * np.exp(-np.arange(N) / 80) + 0.3 + rng.normal(0.0, 0.02, N)
    return grad, loss


def kinds(findings: list) -> list[str]:
    return sorted(f.kind + (":" + f.evidence["pattern"] if "pattern" in f.evidence else "") for f in findings)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_healthy_run_has_no_finding(seed: int) -> None:
    assert detect(series(*healthy(seed))) == []


def test_high_but_stable_and_slowly_decaying_norms_are_not_spikes() -> None:
    grad, loss = healthy()
    assert detect(series(grad * 50.0, loss)) == []  # far above a typical max_grad_norm of 1.0: pre-clip, fine
    decay = grad * 100.0 * np.exp(-np.arange(N) / 150)  # 100 -> ~13 over the run
    assert detect(series(decay, loss)) == []
    # a heavy-tailed but stationary norm (Student-t noise in log space) is not a spike either
    rng = np.random.default_rng(7)
    assert detect(series(2.0 * np.exp(0.2 * rng.standard_t(5, N)), loss)) == []


def test_spike_evidence_and_recovery() -> None:
    grad, loss = healthy()
    grad[150] = 80.0
    loss[151:154] *= 3.0  # a brief loss bump that recovers
    f = detect(series(grad, loss))
    assert kinds(f) == ["exploding:spike"]
    ev = f[0].evidence
    assert f[0].steps == [1500] and ev["largest_step"] == 1500 and ev["largest_norm"] == 80.0
    ref = np.log(grad[130:150])  # the spike_window=20 points before the spike
    med = np.median(ref)
    scale = max(1.4826 * np.median(np.abs(ref - med)), 0.05)
    assert ev["events"][0]["median"] == pytest.approx(math.exp(med), rel=1e-5)
    assert ev["largest_z"] == pytest.approx((math.log(80.0) - med) / scale, rel=1e-5)
    assert ev["largest_ratio"] == pytest.approx(80.0 / math.exp(med), rel=1e-5)
    outcome = ev["events"][0]["loss"]
    assert outcome["outcome"] == "recovered"
    assert outcome["pre_loss"] == pytest.approx(float(np.median(loss[130:150])), rel=1e-5)
    assert f[0].severity == "warning"  # harmed the loss, which recovered
    assert outcome["tail_loss_median"] == pytest.approx(float(np.median(loss[-20:])), rel=1e-5)


def test_spike_then_loss_divergence() -> None:
    grad, loss = healthy()
    grad[150] = 80.0
    loss[150:] = 6.0 + np.random.default_rng(1).normal(0, 0.05, N - 150)
    f = detect(series(grad, loss))
    assert kinds(f) == ["exploding:spike"]  # one finding: the spike, and what the loss did after it
    assert f[0].severity == "error" and f[0].steps == [1500]
    out = f[0].evidence["events"][0]["loss"]
    pre = float(np.median(loss[130:150]))
    tail = float(np.median(loss[-20:]))
    assert out["outcome"] == "diverged" and f[0].evidence["loss_outcome"] == "diverged"
    assert out["pre_loss"] == pytest.approx(pre, rel=1e-5)
    assert out["tail_ratio"] == pytest.approx(tail / pre, rel=1e-5)


def test_sustained_growth_rate_matches_polyfit() -> None:
    grad, loss = healthy()
    true_rate = 0.004  # ln units per step (steps are 10 apart)
    grad[100:] = grad[100:] * np.exp(true_rate * (STEPS[100:] - STEPS[100]))
    assert detect(series(grad, loss)) == []  # the loss keeps falling: a net leaving its flat start
    loss[100:] = loss[100] * np.exp(0.002 * np.arange(N - 100))  # the loss creeps up instead: harm
    f = detect(series(grad, loss))
    assert kinds(f) == ["exploding:growth"]
    ev = f[0].evidence
    a = int(np.searchsorted(STEPS, ev["start_step"]))
    b = int(np.searchsorted(STEPS, ev["end_step"]))
    assert STEPS[a] == ev["start_step"] and STEPS[b] == ev["end_step"]
    slope, _ = np.polyfit(STEPS[a : b + 1].astype(float), np.log(grad[a : b + 1]), 1)
    assert ev["rate_per_step"] == pytest.approx(slope, rel=1e-9)
    assert ev["rate_per_step"] == pytest.approx(true_rate, rel=0.05)
    assert 1000 <= ev["start_step"] <= 1300 and ev["end_step"] == STEPS[-1]
    assert ev["factor_per_100_steps"] == pytest.approx(math.exp(100 * slope), rel=1e-5)
    assert "gradsentry.ClipGlobalNorm(max_norm=1.0)" in [r.api for r in f[0].remedies]  # the shared catalogue
    assert ev["doubling_steps"] == pytest.approx(math.log(2) / slope, rel=1e-5)


def test_loglinear_fit_against_polyfit_with_huge_steps() -> None:
    rng = np.random.default_rng(3)
    steps = np.array([0, 5, 9, 20, 10**9, 10**9 + 7, 2 * 10**9], dtype=np.int64)
    vals = np.exp(1e-9 * steps + rng.normal(0, 0.01, steps.size))
    rate, icpt, r2 = loglinear_fit(steps, vals)
    slope, intercept = np.polyfit(steps.astype(float), np.log(vals), 1)
    assert rate == pytest.approx(slope, rel=1e-6) and icpt == pytest.approx(intercept, abs=1e-6)
    resid = np.log(vals) - (slope * steps + intercept)
    assert r2 == pytest.approx(1 - resid.var() / np.log(vals).var(), rel=1e-6)


def test_vanishing_collapse_with_flat_loss() -> None:
    grad, _ = healthy()
    rng = np.random.default_rng(4)
    grad[100:] = grad[100:] * np.exp(-0.05 * np.arange(200))
    loss = 2.3 + rng.normal(0, 0.005, N)  # stuck at chance level
    f = detect(series(grad, loss))
    assert kinds(f) == ["vanishing:collapse"]
    ev = f[0].evidence
    assert ev["final_norm"] == pytest.approx(math.exp(np.median(np.log(grad[-20:]))), rel=1e-5)
    assert ev["drop_factor"] > 100
    assert abs(ev["loss_relative_change"]) < 0.05


def test_collapse_with_converging_or_falling_loss_is_not_vanishing() -> None:
    grad, _ = healthy()
    grad[100:] = grad[100:] * np.exp(-0.05 * np.arange(200))
    converged = 2.3 * np.exp(-np.arange(N) / 10)  # the loss goes to ~0: a minimum, gradients vanish there
    assert detect(series(grad, converged)) == []
    falling = 2.3 - 1.5 * np.arange(N) / N  # still learning
    assert detect(series(grad, falling)) == []


def test_vanishing_without_loss_says_so() -> None:
    grad, _ = healthy()
    grad[100:] = grad[100:] * np.exp(-0.05 * np.arange(200))
    f = detect(series(grad, None))
    assert kinds(f) == ["vanishing:collapse"]
    assert f[0].evidence["loss_relative_change"] is None and "no loss" in f[0].explanation


@pytest.mark.parametrize(("zeros", "severity"), [(N, "error"), (5, "warning")])
def test_zero_grad_norm_is_not_vanishing(zeros: int, severity: str) -> None:
    grad, loss = healthy()
    grad[:zeros] = 0.0
    if zeros == N:
        loss = 2.3 + np.random.default_rng(0).normal(0, 0.01, N)  # nothing trains
    f = detect(series(grad, loss))
    assert kinds(f) == ["zero_grad_norm"]
    assert f[0].severity == severity
    assert f[0].evidence["zero_points"] == zeros and f[0].evidence["first_step"] == 0
    assert "not vanishing" in f[0].explanation


def test_hidden_nonfinite_is_reported_never_convergence() -> None:
    grad, loss = healthy()
    grad[200:] = np.nan
    loss[200:] = 0.0  # the HF Trainer's NaN filter logs 0.0
    res = detect(series(grad, loss))
    assert kinds(res) == ["hidden_nonfinite", "nonfinite"]
    nf = next(x for x in res if x.kind == "nonfinite")
    assert nf.severity == "error" and nf.evidence["first_nonfinite_grad_norm_step"] == 2000
    assert nf.evidence["last_finite_grad_norm_step"] == 1990
    hid = next(x for x in res if x.kind == "hidden_nonfinite")
    assert hid.evidence["first_step"] == 2000
    assert hid.evidence["steps_with_zero_loss_and_nonfinite_grad_norm"] == 100
    assert "not convergence" in hid.explanation


def test_skipped_steps_flat_loss() -> None:
    grad, loss = healthy()
    grad[180:] = np.inf
    loss[180:] = 1.0 + np.random.default_rng(5).normal(0, 0.005, N - 180)
    res = detect(series(grad, loss))
    assert kinds(res) == ["nonfinite", "skipped_steps"]
    sk = next(x for x in res if x.kind == "skipped_steps")
    assert sk.evidence["run_first_step"] == 1800 and sk.evidence["run_last_step"] == STEPS[-1]
    assert sk.evidence["nonfinite_grad_norm_run_points"] == N - 180


def test_isolated_overflows_with_falling_loss_are_a_warning() -> None:
    grad, loss = healthy()
    grad[[40, 130, 260]] = np.inf
    res = detect(series(grad, loss))
    assert kinds(res) == ["nonfinite"]
    assert res[0].severity == "warning" and res[0].evidence["nonfinite_grad_norm_points"] == 3
    assert res[0].steps == [400, 1300, 2600]


def test_nonfinite_norms_without_loss_are_an_error() -> None:
    grad, _ = healthy()
    grad[250:] = np.nan
    res = detect(series(grad, None))
    assert kinds(res) == ["nonfinite"] and res[0].severity == "error"
    assert res[0].evidence["longest_nonfinite_grad_norm_run"] == N - 250
    assert res[0].evidence["first_nonfinite_grad_norm_step"] == 2500


def test_nonfinite_loss_first_step() -> None:
    grad, loss = healthy()
    loss[222:] = np.nan
    grad[225:] = np.nan
    res = detect(series(grad, loss))
    nf = [x for x in res if x.kind == "nonfinite"]
    assert len(nf) == 1 and nf[0].severity == "error"
    assert nf[0].evidence["first_nonfinite_loss_step"] == 2220
    assert nf[0].evidence["first_nonfinite_grad_norm_step"] == 2250
    assert nf[0].evidence["nonfinite_loss_points"] == N - 222


def test_loss_only_run() -> None:
    _, loss = healthy()
    res = detect(series(None, loss))
    assert kinds(res) == ["no_grad_norm"] and res[0].severity == "info"
    loss[200] = 40.0
    res = detect(series(None, loss))
    assert kinds(res) == ["loss_spike", "no_grad_norm"]
    sp = next(x for x in res if x.kind == "loss_spike")
    assert sp.evidence["largest_spike_step"] == 2000 and sp.evidence["largest_spike_loss"] == 40.0


def test_slow_loss_divergence_without_spike() -> None:
    grad, _ = healthy()
    loss = np.concatenate([np.linspace(2.3, 0.5, 150), np.linspace(0.5, 2.0, 150)])
    res = detect(series(grad, loss))
    assert kinds(res) == ["loss_divergence:divergence"]  # the norm did not rise: not called exploding
    ev = res[0].evidence
    assert ev["best_step"] == pytest.approx(1500, abs=30)
    assert ev["tail_loss_median"] == pytest.approx(float(np.median(loss[-20:])), rel=1e-5)


def test_huge_step_gap() -> None:
    grad, loss = healthy()
    steps = STEPS.copy()
    steps[150:] += 10**12  # a restart with a wrong step counter
    grad[200] = 90.0
    loss[201:204] *= 3.0  # the spike did harm
    res = detect(series(grad, loss, steps))
    assert kinds(res) == ["exploding:spike"] and res[0].steps == [int(steps[200])]
    grad2, _ = healthy()
    grad2[100:] = grad2[100:] * np.exp(0.04 * np.arange(200))
    res = detect(series(grad2, 2.0 + 0.0 * loss, steps))  # a flat loss: the growth is harmful
    growth = next(x for x in res if x.evidence.get("pattern") == "growth")
    a = int(np.flatnonzero(steps == growth.evidence["start_step"])[0])
    b = int(np.flatnonzero(steps == growth.evidence["end_step"])[0])
    slope, _ = np.polyfit(steps[a : b + 1].astype(float), np.log(grad2[a : b + 1]), 1)
    assert growth.evidence["rate_per_step"] == pytest.approx(slope, rel=1e-6)


def test_thresholds_are_overridable_and_validated() -> None:
    grad, loss = healthy()
    grad[150] = 80.0
    loss[151:154] *= 3.0
    assert kinds(detect(series(grad, loss))) == ["exploding:spike"]
    assert detect(series(grad, loss), spike_z=100.0) == []
    assert kinds(detect(series(grad, loss), AnalyzeThresholds(spike_min_factor=50.0))) == []
    with pytest.raises(ValueError, match="spike_z must be > 0"):
        AnalyzeThresholds(spike_z=0)
    with pytest.raises(ValueError, match="unknown threshold"):
        detect(series(grad, loss), not_a_threshold=1)


def test_analyze_log_end_to_end(tmp_path: Path) -> None:
    grad, loss = healthy()
    grad[120] = 60.0
    loss[121:124] *= 3.0  # the spike did harm
    grad[250:] = np.nan
    loss[250:] = 0.0
    entries = []
    for i in range(N):
        entries.append(
            {
                "loss": float(loss[i]),
                "grad_norm": float(grad[i]),
                "learning_rate": 1e-4,
                "step": int(STEPS[i]),
                "epoch": i / N,
            }
        )
        if i % 40 == 0:
            entries.append({"eval_loss": 1.0, "step": int(STEPS[i]), "epoch": i / N})
    p = tmp_path / "trainer_state.json"
    p.write_text(json.dumps({"log_history": entries}))
    res = analyze_log(p)
    assert not res.healthy
    assert kinds(res.findings) == ["exploding:spike", "hidden_nonfinite", "nonfinite"]
    d = json.loads(json.dumps(res.to_dict(), allow_nan=False))
    assert d["format"] == "hf" and d["summary"]["points"] == N
    assert d["summary"]["loss"]["nonfinite"] == 50  # the hidden 0.0 losses count as non-finite
    assert d["summary"]["loss"]["min"] == pytest.approx(float(loss[:250].min()))
    assert d["findings"][0]["kind"] in {"nonfinite", "hidden_nonfinite"}


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(1e-6, 1e6), sigma=st.floats(0.01, 0.5))
def test_findings_are_scale_invariant_and_spikes_found(seed: int, scale: float, sigma: float) -> None:
    """Findings never depend on the norm's unit (judged against the run's own history), and a 1000x spike
    in a stationary log-normal norm is found at any scale, even with the loss unharmed."""
    rng = np.random.default_rng(seed)
    grad = np.exp(rng.normal(0.0, sigma, N))
    grad[200] *= 1000.0  # >= spike_error_factor above the median even at sigma 0.5: reported without harm
    loss = 2.0 * np.exp(-np.arange(N) / 80) + 0.5 + rng.normal(0, 0.01, N)

    def summary(fs: list) -> list[tuple[str, list[int]]]:
        return [(f.kind, f.steps) for f in fs]

    base = detect(series(grad, loss))
    assert summary(detect(series(grad * scale, loss))) == summary(base)
    spikes = [f for f in base if f.evidence.get("pattern") == "spike"]
    assert len(spikes) == 1 and 2000 in spikes[0].steps


@pytest.mark.parametrize("seed", range(20))
def test_no_false_spike_in_stationary_noise(seed: int) -> None:
    """The defaults flag about 0.1 % of 300-point runs of sigma-0.25 noise (measured on 1000 seeds)."""
    rng = np.random.default_rng(1000 + seed)
    grad = np.exp(rng.normal(0.0, 0.25, N))
    loss = 2.0 * np.exp(-np.arange(N) / 80) + 0.5 + rng.normal(0, 0.01, N)
    assert detect(series(grad, loss)) == []


def test_plot_edge_cases(tmp_path: Path) -> None:
    from gradsentry.report.series_plot import plot_series

    _, loss = healthy()
    s = series(None, loss)
    assert plot_series(s, detect(s), tmp_path / "loss_only.svg").read_text().lstrip().startswith("<?xml")
    s = series(np.full(N, np.nan), None)
    assert plot_series(s, detect(s), tmp_path / "all_nan.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match=r"plot file must end in \.png, \.svg, \.html"):
        plot_series(s, [], tmp_path / "x.jpg")


@pytest.mark.parametrize("path", [3, None, b"run.jsonl", ["run.jsonl"]])
def test_a_path_of_the_wrong_type_is_a_type_error_naming_it(path: object) -> None:
    """`analyze_log(3)` raised "expected str, bytes or os.PathLike object, not int" from pathlib, as did
    load_series and read_jsonl; each now names its own argument."""
    import gradsentry as gs
    from gradsentry.logs import load_series

    name = type(path).__name__
    with pytest.raises(TypeError, match=rf"^analyze_log\(path=\.\.\.\) expects a file path .*, got {name}$"):
        analyze_log(path)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=rf"^load_series\(path=\.\.\.\) expects a file path .*, got {name}$"):
        load_series(path)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=rf"^read_jsonl\(path=\.\.\.\) expects a file path .*, got {name}$"):
        gs.read_jsonl(path)  # type: ignore[arg-type]


def test_tags_of_the_wrong_type_are_a_type_error(tmp_path: Path) -> None:
    """`analyze_log(path, tags=3)` raised "'int' object has no attribute 'items'"."""
    log = tmp_path / "metrics.csv"
    log.write_text("step,loss\n0,1.0\n1,0.9\n", encoding="utf-8")
    with pytest.raises(TypeError, match=r"analyze_log\(tags=\.\.\.\) expects None or a dict .*got int"):
        analyze_log(log, tags=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"analyze_log\(tags=\.\.\.\) expects None or a dict .*got dict"):
        analyze_log(log, tags={"loss": 3})  # type: ignore[dict-item]
