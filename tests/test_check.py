"""``gradsentry check``: the library function, target loading, the CLI and its exit codes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from check_targets import TokenEncoder, mlp, small_mlp
from gradsentry import theory
from gradsentry.check import (
    InputFitError,
    TargetError,
    check_model,
    digits_batch,
    load_factory,
    load_model,
)
from gradsentry.cli import main

TARGETS = str(Path(__file__).with_name("check_targets.py"))


def _run_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict]:
    code = main(["check", *args, "--json"])

    def strict(token: str) -> float:
        raise AssertionError(f"non-standard JSON token {token}")

    return code, json.loads(capsys.readouterr().out, parse_constant=strict)


def test_sigmoid_mlp_vanishes_and_lsuv_fixes_it(capsys: pytest.CaptureFixture[str]) -> None:
    code, report = _run_json(capsys, f"{TARGETS}:sigmoid20", "--data", "digits")
    assert code == 1
    kinds = [f["kind"] for f in report["findings"]]
    assert "vanishing" in kinds
    assert report["first_last_ratio"] < 1e-12  # ~1e-17 measured
    code, report = _run_json(capsys, f"{TARGETS}:sigmoid20", "--data", "digits", "--fix", "lsuv")
    assert code == 0
    assert "vanishing" in [f["kind"] for f in report["findings"]]  # the table before the fix
    after = report["fixed"]
    assert not [f for f in after["findings"] if f["kind"] in ("vanishing", "exploding")]
    assert after["first_last_ratio"] > 1e-2
    assert len(report["fix_report"]) == 21 and all(x["converged"] for x in report["fix_report"])


def test_relu_he_mlp_is_healthy(capsys: pytest.CaptureFixture[str]) -> None:
    code, report = _run_json(capsys, f"{TARGETS}:relu20_he", "--data", "digits", "--batch", "32")
    assert code == 0
    assert report["theory"] is None and all(r["predicted_rms"] is not None for r in report["rows"])
    # the text output renders the same report
    assert main(["check", f"{TARGETS}:relu20_he", "--data", "digits"]) == 0
    out = capsys.readouterr().out
    assert "healthy: no finding" in out and "predicted" in out


def test_oversized_relu_init_is_exploding_by_size() -> None:
    from check_targets import relu20_oversized

    report = check_model(relu20_oversized(), input_shape=(64,), batch_size=32)
    assert [f.kind for f in report.problems] == ["exploding"]
    # ReLU is positively homogeneous: the weight-gradient profile stays flat, the size explodes (2^20 ~ 1e6)
    assert 1e-2 < report.first_last_ratio < 1e2  # type: ignore[operator]
    median_rel = sorted(r.rel_grad for r in report.rows)[len(report.rows) // 2]  # type: ignore[type-var]
    assert report.problems[0].evidence["median_rel_grad"] == pytest.approx(median_rel)
    assert median_rel > 1e3
    # --fix he repairs it
    fixed = check_model(relu20_oversized(), input_shape=(64,), batch_size=32, fix="he")
    assert fixed.problems and not fixed.final.problems


def test_chaotic_tanh_is_exploding_towards_the_input() -> None:
    from check_targets import tanh20_chaotic

    report = check_model(tanh20_chaotic(), input_shape=(64,), batch_size=32)
    assert [f.kind for f in report.problems] == ["exploding"]
    assert report.first_last_ratio > 1e3  # type: ignore[operator]
    assert report.problems[0].evidence["first_last_rms_ratio"] == report.first_last_ratio
    # the mean-field prediction (chi ~ 2.9 per layer) lands within half a decade at the first layer
    first = report.rows[0]
    assert abs(math.log10(first.predicted_rms / first.grad_rms)) < 0.5  # type: ignore[operator]


def test_nan_gradients_at_init_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    code, report = _run_json(capsys, f"{TARGETS}:overflowing", "--input-shape", "64")
    assert code == 1
    assert "nonfinite" in [f["kind"] for f in report["findings"]]
    assert report["rows"][0]["grad_norm"] == "NaN"  # strict JSON: the NaN is kept as a string


def test_table_numbers_against_an_independent_computation() -> None:
    model = small_mlp()
    x, y = digits_batch(48, seed=3)
    report = check_model(model, x, targets=y, loss="ce")
    # recompute the loss and the gradients on a copy, in float64
    ref = small_mlp()
    ref.load_state_dict(model.state_dict())
    ref = ref.double()
    loss = nn.functional.cross_entropy(ref(x.double()), y)
    loss.backward()
    assert report.loss == pytest.approx(float(loss.detach()), rel=1e-5)
    linears = [(n, m) for n, m in ref.named_children() if isinstance(m, nn.Linear)]
    assert [r.name for r in report.rows] == [n for n, _ in linears]
    for row, (_, m) in zip(report.rows, linears, strict=True):
        g = torch.cat([m.weight.grad.flatten(), m.bias.grad.flatten()])
        w = torch.cat([m.weight.detach().flatten(), m.bias.detach().flatten()])
        assert row.grad_norm == pytest.approx(float(g.norm()), rel=1e-4)
        assert row.grad_rms == pytest.approx(float(g.norm()) / math.sqrt(g.numel()), rel=1e-4)
        assert row.rel_grad == pytest.approx(float(g.norm() / w.norm()), rel=1e-4)
        assert row.params == g.numel()
    assert [r.activation for r in report.rows] == ["Tanh", "Tanh", "Tanh", None]
    tanh_out = torch.tanh(ref[0](x.double()))
    assert report.rows[0].saturated_frac == pytest.approx(
        float((tanh_out.abs() > 0.99).double().mean()), abs=1e-6
    )
    # log-slope: least squares of log10 RMS over depth
    rms = [r.grad_rms for r in report.rows]
    n = len(rms)
    xs, ys = list(range(n)), [math.log10(v) for v in rms]
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((a - mx) * (b - my) for a, b in zip(xs, ys, strict=True)) / sum((a - mx) ** 2 for a in xs)
    assert report.log_slope == pytest.approx(slope, rel=1e-9)
    assert report.first_last_ratio == pytest.approx(rms[0] / rms[-1])
    # predicted RMS: the theory's profile anchored at the last layer
    pred = theory.predict(model, example_input=x)
    scale = report.rows[-1].grad_rms / pred.layers[-1].weight_grad_rms
    for row, lp in zip(report.rows, pred.layers, strict=True):
        assert row.predicted_rms == pytest.approx(lp.weight_grad_rms * scale, rel=1e-9)


def test_theory_column_tracks_the_measured_profile_on_sigmoid() -> None:
    torch.manual_seed(1)
    x, y = digits_batch(64, seed=1)
    report = check_model(mlp("sigmoid"), x, targets=y)
    first = report.rows[0]
    # 17 decades of vanishing, predicted within half a decade at the first layer
    assert first.grad_rms < 1e-14
    assert abs(math.log10(first.predicted_rms) - math.log10(first.grad_rms)) < 0.5  # type: ignore[arg-type]


def _ffn_ratio(report) -> float:  # type: ignore[no-untyped-def]
    ffn = [r for r in report.rows if r.name.endswith(".linear2")]
    assert len(ffn) == 12
    return ffn[-1].grad_norm / ffn[0].grad_norm  # type: ignore[no-any-return]


@pytest.mark.slow
@pytest.mark.parametrize("xavier", [False, True])
def test_transformer_pre_ln_vs_post_ln_contrast(xavier: bool) -> None:
    # 12 layers, d_model 128, 8 x 16 random tokens, cross-entropy on random next tokens.
    # Measured last/first FFN output-weight gradient norm (seeds 0, 1, 2):
    #   default init: pre-LN 0.28 0.29 0.27, post-LN 1.12 1.42 0.92
    #   Xavier init:  pre-LN 0.41 0.38 0.36, post-LN 0.82 1.20 1.23
    ratios: dict[bool, list[float]] = {True: [], False: []}
    for seed in range(3):
        for norm_first in (True, False):
            torch.manual_seed(seed)
            model = TokenEncoder(norm_first=norm_first, xavier=xavier)
            report = check_model(model, input_shape=(16,), batch_size=8, seed=seed)
            assert report.theory is not None and "outside the mean-field chain" in report.theory
            assert not report.problems, [f.kind for f in report.problems]
            ratios[norm_first].append(_ffn_ratio(report))
    assert max(ratios[True]) < 0.6, ratios  # pre-LN: early layers get larger gradients (NormFormer)
    assert min(ratios[False]) > 0.8, ratios  # post-LN: no fall with depth


def test_transformer_through_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    code, report = _run_json(capsys, f"{TARGETS}:preln", "--input-shape", "16", "--batch", "8")
    assert code == 0
    assert report["input_shape"] == [8, 16]
    assert _ffn_ratio(type("R", (), {"rows": [type("Row", (), r) for r in report["rows"]]})) < 0.6


def test_gpt2_from_config_runs_through_check(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    code, report = _run_json(capsys, f"{TARGETS}:gpt2_tiny", "--input-shape", "16", "--batch", "2")
    assert code == 0, report["findings"]
    names = {r["name"]: r for r in report["rows"]}
    assert names["transformer.h.3.mlp.c_proj"]["type"] == "Conv1D"
    assert names["transformer.wte"]["grad_norm"] > 0  # tied with lm_head: counted once, at the embedding
    assert "lm_head" not in names
    assert report["theory"] is not None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nope/missing.py:build", "--input-shape", "4"], "TARGET file not found"),
        (["no_such_pkg_xyz.models:build", "--input-shape", "4"], "TARGET module not found"),
        (["justaname", "--input-shape", "4"], "TARGET must look like"),
        (["{t}:nope", "--input-shape", "4"], "has no attribute 'nope'"),
        (["{t}:not_a_module", "--input-shape", "4"], "returned a int, not a torch.nn.Module"),
        (["{t}:broken_factory", "--input-shape", "4"], "RuntimeError: factory exploded on purpose"),
        (["{t}:sigmoid20", "--input-shape", "10"], "layer '0' (Linear) rejected it"),
        (["{t}:sigmoid20", "--input-shape", "3,x"], "--input-shape must be positive integers"),
        (["{t}:sigmoid20", "--input-shape", "64", "--loss", "hinge"], "--loss must be one of"),
        (["{t}:sigmoid20", "--input-shape", "64", "--fix", "magic"], "--fix must be one of"),
        (["{t}:sigmoid20", "--data", "mnist"], "--data must be 'digits'"),
        (["{t}:sigmoid20"], "give --input-shape"),
        (["{t}:sigmoid20", "--data", "digits", "--batch", "0"], "--batch must be >= 1"),
        (["{t}:sigmoid20", "--data", "digits", "--input-shape", "3,8,8"], "gives 64 features"),
        (["{t}:small_mlp", "--input-shape", "64", "--loss", "mse"], None),  # fits: exit 0, see below
    ],
)
def test_bad_targets_and_shapes_exit_2(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str | None
) -> None:
    code = main(["check", *[a.replace("{t}", TARGETS) for a in args]])
    err = capsys.readouterr().err
    if message is None:
        assert code == 0, err
        return
    assert code == 2
    assert message in err.replace("\n", " "), err


def test_import_errors_are_shown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad_import = tmp_path / "bad_import.py"
    bad_import.write_text("import not_a_real_module_xyz\n")
    syntax = tmp_path / "syntax.py"
    syntax.write_text("def build(:\n")
    sibling = tmp_path / "helper_mod_for_check.py"
    sibling.write_text("from torch import nn\n\ndef make():\n    return nn.Linear(4, 2)\n")
    uses_sibling = tmp_path / "uses_sibling.py"
    uses_sibling.write_text(
        "from __future__ import annotations\nfrom dataclasses import dataclass\n"
        "from helper_mod_for_check import make\n\n@dataclass\nclass Config:\n    width: int = 4\n\n"
        "def build():\n    return make()\n"
    )
    assert main(["check", f"{bad_import}:build", "--input-shape", "4"]) == 2
    assert "ModuleNotFoundError: No module named 'not_a_real_module_xyz'" in capsys.readouterr().err
    assert main(["check", f"{syntax}:build", "--input-shape", "4"]) == 2
    assert "SyntaxError" in capsys.readouterr().err
    # a file may import its siblings and define dataclasses (it is registered in sys.modules)
    assert main(["check", f"{uses_sibling}:build", "--input-shape", "4", "--loss", "sum"]) == 0


def test_library_errors() -> None:
    with pytest.raises(TargetError, match=r"TARGET must look like"):
        load_factory("no-colon")
    with pytest.raises(TargetError, match=r"has no attribute 'missing'"):
        load_factory(f"{TARGETS}:missing")
    with pytest.raises(TargetError, match=r"importing os.path failed|has no attribute"):
        load_factory("os.path:does_not_exist")
    assert isinstance(load_model(f"{TARGETS}:small_mlp"), nn.Module)
    assert load_factory("check_targets:small_mlp") is small_mlp
    nested = nn.Sequential(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), nn.Linear(6, 2))
    with pytest.raises(InputFitError, match=r"layer '1' \(Linear\) rejected it: RuntimeError"):
        check_model(nested, input_shape=(4,))
    x, y = digits_batch(8)
    with pytest.raises(InputFitError, match=r"labels up to 9 do not fit"):
        check_model(nn.Sequential(nn.Linear(64, 5)), x, targets=y)
    with pytest.raises(ValueError, match=r"unknown loss 'l1'"):
        check_model(small_mlp(), x, loss="l1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"needs a batch or an input_shape"):
        check_model(small_mlp())
    with pytest.raises(ValueError, match=r"digits batch size must be in \[1, 1797\]"):
        digits_batch(0)
