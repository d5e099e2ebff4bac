"""``gradsentry check``: the library function, target loading, the CLI and its exit codes."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from check_targets import TokenEncoder, mlp, small_mlp
from gradsentry import theory
from gradsentry.check import InputFitError, check_model, digits_batch
from gradsentry.cli import main
from gradsentry.cli.targets import TargetError, load_factory, load_model

TARGETS = str(Path(__file__).resolve().parents[1] / "check_targets.py")


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
    assert _first_dev(report) < 0.5


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
    # log-slope: least squares of log10 RMS over depth, over the hidden layers (the head left out)
    rms = [r.grad_rms for r in report.rows]
    n = len(rms) - 1
    xs, ys = list(range(n)), [math.log10(v) for v in rms[:-1]]
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((a - mx) * (b - my) for a, b in zip(xs, ys, strict=True)) / sum((a - mx) ** 2 for a in xs)
    assert report.log_slope == pytest.approx(slope, rel=1e-9)
    assert report.head == "6"
    assert report.first_last_ratio == pytest.approx(rms[0] / rms[-1])
    # per-example gradient RMS: one float64 backward per example (no vmap), weights and biases together
    sq = {name: 0.0 for name, _ in linears}
    for i in range(x.shape[0]):
        ref.zero_grad()
        nn.functional.cross_entropy(ref(x[i : i + 1].double()), y[i : i + 1]).backward()
        for name, m in linears:
            sq[name] += float(m.weight.grad.pow(2).sum() + m.bias.grad.pow(2).sum())
    for row, (name, m) in zip(report.rows, linears, strict=True):
        expected = math.sqrt(sq[name] / (x.shape[0] * (m.weight.numel() + m.bias.numel())))
        assert row.example_rms == pytest.approx(expected, rel=1e-4)
    # predicted RMS: the theory's whole-layer per-example profile anchored at the last layer
    pred = theory.predict(model, example_input=x)
    scale = report.rows[-1].example_rms / pred.layers[-1].grad_rms
    for row, lp in zip(report.rows, pred.layers, strict=True):
        assert row.predicted_rms == pytest.approx(lp.grad_rms * scale, rel=1e-9)
    devs = [abs(math.log10(r.predicted_rms / r.example_rms)) for r in report.rows]  # type: ignore[operator]
    assert report.theory_max_dev == pytest.approx(max(devs), rel=1e-9)


def _first_dev(report) -> float:  # type: ignore[no-untyped-def]
    first = report.rows[0]
    return abs(math.log10(first.predicted_rms / first.example_rms))  # type: ignore[no-any-return]


def test_theory_column_tracks_the_measured_profile_on_sigmoid() -> None:
    torch.manual_seed(1)
    x, y = digits_batch(64, seed=1)
    report = check_model(mlp("sigmoid"), x, targets=y)
    first = report.rows[0]
    # 17 decades of vanishing, predicted within half a decade at the first layer
    assert first.example_rms < 1e-14
    assert _first_dev(report) < 0.5 and report.theory_max_dev < 0.5  # type: ignore[operator]


def _xavier_relu(depth: int) -> nn.Sequential:
    model = mlp("relu", depth=depth)
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return model


@pytest.mark.parametrize("seed", [0, 1])
def test_prediction_includes_bias_gradients_on_a_30_layer_xavier_relu_net(seed: int) -> None:
    # ReLU with Xavier init (n Var[w] = 1): the input shrinks by sqrt(2) per layer, the backward signal too;
    # a weight entry's gradient (signal x input) stays flat, a bias entry's (the signal) falls 4.5 decades,
    # and with the input at 2^-15 the bias entries dominate the layer's gradient
    torch.manual_seed(seed)
    model = _xavier_relu(30)
    x, y = digits_batch(32, seed=seed)
    report = check_model(model, x, targets=y)
    first, last = report.rows[0], report.rows[-1]
    measured = math.log10(first.example_rms / last.example_rms)  # type: ignore[operator]
    assert measured < -3.0
    assert abs(math.log10(first.predicted_rms / last.predicted_rms) - measured) < 0.5  # type: ignore[operator]
    assert report.theory_max_dev < 0.5  # type: ignore[operator]
    # the weight-only prediction is flat: it is not what the table measures
    pred = theory.predict(model, example_input=x)
    assert abs(math.log10(pred.layers[0].weight_grad_rms / pred.layers[-1].weight_grad_rms)) < 0.5
    # the same from the paper's formulas in float64: bias entries' share of the first layer's squared
    # gradient is n_b / (n_b + n_w E[x^2]); E[x^2] of the digits ~ 0.19, so the weights dominate there,
    # while at layer 30 E[x^2] = q_1 2^-29 / 2 and the bias entries dominate
    m2_in = float(x.double().pow(2).mean())
    q30 = m2_in * 2.0**-29
    assert pred.layers[-1].input_rms == pytest.approx(math.sqrt(q30 / 2), rel=0.5)


def test_slope_leaves_out_the_output_head_on_an_exactly_flat_profile() -> None:
    # a linear chain of orthogonal 64x64 layers, zero biases: ||A^T (sum_n d_n x_n^T) B^T|| is the same
    # for every hidden layer (A, B orthogonal), so the hidden profile is exactly flat; the 64->10 head is not
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(64, 64) for _ in range(12)] + [nn.Linear(64, 10)]
    for m in layers:
        nn.init.orthogonal_(m.weight)
        nn.init.zeros_(m.bias)
    model = nn.Sequential(*layers)
    x, y = digits_batch(32)
    report = check_model(model, x, targets=y)
    hidden = [r.grad_rms for r in report.rows[:-1]]
    assert max(hidden) / min(hidden) == pytest.approx(1.0, abs=1e-4)
    assert report.head == "12"
    assert abs(report.log_slope) < 1e-5  # type: ignore[arg-type]
    # fitting the head too (the old rule) reports a slope where there is none
    logs = np.log10([r.grad_rms for r in report.rows])
    assert abs(float(np.polyfit(np.arange(len(logs)), logs, 1)[0])) > 0.01


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
            assert report.theory is not None and "no prediction" in report.theory
            assert not report.problems, [f.kind for f in report.problems]
            ratios[norm_first].append(_ffn_ratio(report))
    assert max(ratios[True]) < 0.6, ratios  # pre-LN: early layers get larger gradients (NormFormer)
    assert min(ratios[False]) > 0.8, ratios  # post-LN: no fall with depth


def test_attention_out_proj_sits_in_its_block_and_the_head_is_last() -> None:
    # nn.MultiheadAttention reads out_proj.weight without calling out_proj: forward hooks never see it
    torch.manual_seed(0)
    report = check_model(TokenEncoder(norm_first=False, layers=3), input_shape=(16,), batch_size=4)
    names = [r.name for r in report.rows]
    assert names[-1] == "out" and report.head == "out"
    for i in range(3):
        attn = names.index(f"encoder.layers.{i}.self_attn")
        assert names[attn + 1] == f"encoder.layers.{i}.self_attn.out_proj"
    assert [r.depth for r in report.rows] == list(range(len(names)))


@pytest.mark.parametrize("norm_first", [True, False])
def test_block_profile_names_the_ln_placement_with_independent_gradients(norm_first: bool) -> None:
    torch.manual_seed(0)
    model = TokenEncoder(norm_first=norm_first)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (8, 16), generator=gen)
    targets = torch.randint(0, 64, (8, 16), generator=gen)
    report = check_model(model, tokens, targets=targets)
    b = report.blocks
    assert b is not None and b.container == "encoder.layers" and b.blocks == 12
    assert b.norm_placement == ("pre" if norm_first else "post")
    # the per-block norms against a float64 copy of the model
    ref = TokenEncoder(norm_first=norm_first).double()
    ref.load_state_dict(model.state_dict())
    logits = ref(tokens)
    nn.functional.cross_entropy(logits.reshape(-1, 64), targets.reshape(-1)).backward()
    for i, layer in enumerate(ref.encoder.layers):
        g = torch.cat([layer.linear2.weight.grad.flatten(), layer.linear2.bias.grad.flatten()])
        assert b.norms["linear2"][i] == pytest.approx(float(g.norm()), rel=1e-4)
    assert b.ratios["linear2"] == pytest.approx(b.norms["linear2"][-1] / b.norms["linear2"][0], rel=1e-12)
    found = [f for f in report.findings if f.kind == "gradient_concentration"]
    assert len(found) == 1 and found[0].severity == "info" and not report.problems
    assert found[0].evidence["norm_placement"] == b.norm_placement
    assert found[0].evidence["last_first_ratio"] == b.ratio
    # pre-LN: the gradient falls towards the output (NormFormer); post-LN: it does not (Xiong et al. 2020)
    if norm_first:
        assert b.ratio < 0.6 and "NormFormer" in found[0].explanation
    else:
        assert b.ratio > 0.8 and "warm-up" in found[0].explanation


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


def test_package_in_the_current_directory_imports_as_with_python_m(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's `gradsentry check mypkg.models:make_mlp`, run beside an uninstalled package: the
    console script's sys.path does not hold the current directory, so it said 'module not found'."""
    pkg = tmp_path / "mypkg_for_check_cwd"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text("from torch import nn\n\ndef make_mlp():\n    return nn.Linear(4, 2)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert main(["check", "mypkg_for_check_cwd.models:make_mlp", "--input-shape", "4", "--loss", "sum"]) == 0
    assert str(tmp_path) not in sys.path  # put back as it was


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
    # used to be an AttributeError from deep inside, and "the input of shape  does not fit"
    with pytest.raises(TypeError, match=r"check_model expects an nn.Module, got str"):
        check_model("small_mlp", input_shape=(64,))  # type: ignore[arg-type]
    with pytest.raises(InputFitError, match=r"the input \(int: a batch is a tensor or a tuple of them\)"):
        check_model(small_mlp(), 16)
    with pytest.raises(ValueError, match=r"digits batch size must be in \[1, 1797\]"):
        digits_batch(0)


def test_dead_units_are_not_judged_on_a_batch_of_one() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(32, 32), nn.ReLU())], nn.Linear(32, 4))
    one = check_model(model, input_shape=(32,), batch_size=1)
    assert [f.kind for f in one.findings if f.kind == "dead_units"] == []
    row = next(r for r in one.rows if r.dead_frac is not None)
    assert row.dead_frac > 0.3  # about half of a ReLU layer is zero on any one example: chance, not death
    many = check_model(model, input_shape=(32,), batch_size=64)
    assert [f.kind for f in many.findings if f.kind == "dead_units"] == []


FACTORIES_WITH_ARGS = """
from torch import nn


def positional(width, depth=2):
    return nn.Linear(width, width)


def keyword_only(*, width):
    return nn.Linear(width, width)


class Net(nn.Module):
    def __init__(self, n, **kwargs):
        super().__init__()
        self.fc = nn.Linear(n, n)

    def forward(self, x):
        return self.fc(x)


def defaults(width=4, *args, **kwargs):
    return nn.Linear(width, width)
"""


@pytest.mark.parametrize(
    ("factory", "names"), [("positional", "width"), ("keyword_only", "width"), ("Net", "n")]
)
def test_a_factory_with_required_arguments_is_bad_usage_naming_them(
    tmp_path: Path, factory: str, names: str, capsys
) -> None:
    """The error used to be the TypeError of the call, placed inside gradsentry ("missing 1 required
    positional argument: 'width' (at targets.py:120)")."""
    path = tmp_path / "factories.py"
    path.write_text(FACTORIES_WITH_ARGS, encoding="utf-8")
    assert main(["check", f"{path}:{factory}", "--input-shape", "4"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"the factory {factory} in {path} takes required arguments ({names}); give a factory" in err
    assert "with defaults" in err or "all have defaults" in err
    assert "targets.py" not in err
    assert main(["check", f"{path}:defaults", "--input-shape", "4", "--loss", "sum"]) == 0
