"""The lab on a reduced but still deep configuration: outcomes, recomputed numbers, files and the CLI."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from gradsentry import read_jsonl
from gradsentry.cli import main
from gradsentry.lab import (
    VARIANTS,
    LabConfig,
    LabResult,
    ProgressEvent,
    read_results,
    run_lab,
    write_outputs,
)
from gradsentry.lab.data import load_digits
from gradsentry.lab.experiments import build_variant_model
from gradsentry.lab.models import build_mlp
from gradsentry.lab.results import first_last_rms_ratio
from gradsentry.records import LayerStats, StepRecord

# Depth 12 instead of 20 and 12 epochs instead of 40 keep this file at a few CPU seconds; the oversized
# init gain is raised to 1.5 so that the shallower network still explodes.
TEST_CONFIG = LabConfig(
    depth=12,
    width=64,
    epochs=12,
    lr=0.02,
    oversized_gain=1.5,
    log_every=4,
    variants=(
        "sigmoid_default",
        "relu_he",
        "sigmoid_residual",
        "sigmoid_batchnorm",
        "exploding",
        "exploding_clip",
    ),
)
STEPS_PER_EPOCH = math.ceil(1437 / TEST_CONFIG.batch_size)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> tuple[LabResult, Path, list[ProgressEvent]]:
    out = tmp_path_factory.mktemp("lab")
    events: list[ProgressEvent] = []
    result = run_lab(TEST_CONFIG, out_dir=out, progress=events.append)
    write_outputs(result, out)
    return result, out, events


def _kinds(run: Any) -> set[str]:
    return {f["kind"] for f in run.findings}


# ------------------------------------------------------------------------------------------------ outcomes


def test_sigmoid_default_init_vanishes(lab: tuple[LabResult, Path, list[ProgressEvent]]) -> None:
    r = lab[0].run("sigmoid_default")
    assert r.first_last_rms_ratio_init < 1e-6
    vanishing = [f for f in r.findings if f["kind"] == "vanishing"]
    assert vanishing and vanishing[0]["severity"] == "error"
    assert vanishing[0]["layers"][0] == "blocks.0.fc"
    assert r.test_accuracy < 0.3


def test_fixes_do_not_vanish_and_train(lab: tuple[LabResult, Path, list[ProgressEvent]]) -> None:
    fixes = [lab[0].run(n) for n in ("relu_he", "sigmoid_residual", "sigmoid_batchnorm")]
    for r in fixes:
        assert "vanishing" not in _kinds(r), r.name
        assert r.first_last_rms_ratio_init > 1e-3, r.name
        assert not r.diverged
    assert sum(r.test_accuracy > 0.85 for r in fixes) >= 2, [r.test_accuracy for r in fixes]


def test_exploding_is_diagnosed_with_its_step(lab: tuple[LabResult, Path, list[ProgressEvent]]) -> None:
    r = lab[0].run("exploding")
    # the exploding family's Monitor logs every step, so the global norm is recorded at every step run
    assert r.logged_steps == list(range(r.steps_run)) and r.schedule["every"] == 1
    # independent: the first step whose loss or global norm (both recorded every step) is not finite
    bad = [
        s for s, (g, lo) in enumerate(zip(r.global_norm, r.loss, strict=True)) if not math.isfinite(g * lo)
    ]
    assert bad and r.first_nonfinite_step == bad[0]
    # the global norm grows by orders of magnitude before it turns NaN/inf
    assert r.global_norm[bad[0] - 1] > 100 * r.global_norm[0]
    kinds = _kinds(r)
    assert kinds & {"exploding", "nonfinite"}
    nonfinite = next(f for f in r.findings if f["kind"] == "nonfinite")
    first_logged_bad = min(s for s in r.logged_steps if s >= bad[0])
    assert nonfinite["steps"][0] == first_logged_bad
    assert r.stopped_at == first_logged_bad and r.steps_run == first_logged_bad + 1


def test_global_norm_clipping_rescues_the_exploding_run(
    lab: tuple[LabResult, Path, list[ProgressEvent]],
) -> None:
    base, clip = lab[0].run("exploding"), lab[0].run("exploding_clip")
    assert clip.global_norm[0] == pytest.approx(base.global_norm[0], rel=1e-6)  # same weights at step 0
    assert not clip.diverged and clip.steps_run == TEST_CONFIG.epochs * STEPS_PER_EPOCH
    assert clip.test_accuracy > 0.85
    assert not (_kinds(clip) & {"nonfinite"})


# ------------------------------------------------------------------------------------------------ numbers


@pytest.mark.parametrize("name", ["sigmoid_default", "relu_he", "sigmoid_batchnorm"])
def test_init_gradients_match_float64_recomputation(
    lab: tuple[LabResult, Path, list[ProgressEvent]], name: str
) -> None:
    """Rebuild the variant's model and first batch, backprop in float64, compare per-layer norms."""
    r = lab[0].run(name)
    data = load_digits()
    torch.manual_seed(TEST_CONFIG.seed)
    model = build_variant_model(VARIANTS[name], TEST_CONFIG).double()
    perm = torch.randperm(1437, generator=torch.Generator().manual_seed(TEST_CONFIG.seed))
    idx = perm[: TEST_CONFIG.batch_size]
    loss = nn.functional.cross_entropy(model(data.x_train[idx].double()), data.y_train[idx])
    loss.backward()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    norms = [math.sqrt(sum(float(p.grad.pow(2).sum()) for p in m.parameters())) for m in linears]
    assert r.layer_names == [f"blocks.{i}.fc" for i in range(TEST_CONFIG.depth)] + ["head"]
    for got, want, layer in zip(r.grad_norm_init, norms, r.layer_names, strict=True):
        assert got == pytest.approx(want, rel=2e-3), layer
    assert r.loss[0] == pytest.approx(loss.item(), rel=1e-5)
    numel = [sum(p.numel() for p in m.parameters()) for m in linears]
    rms_ratio = (norms[0] / math.sqrt(numel[0])) / (norms[-1] / math.sqrt(numel[-1]))
    assert r.first_last_rms_ratio_init == pytest.approx(rms_ratio, rel=5e-3)


def test_first_last_rms_ratio_skips_layers_without_gradient() -> None:
    def ls(name: str, depth: int, rms: float, has_grad: bool = True) -> LayerStats:
        return LayerStats(name, depth, 4 if has_grad else 0, 2 * rms, rms, rms, 0, 1.0, has_grad=has_grad)

    rec = StepRecord(0, 1.0, [ls("c", 2, 5.0), ls("a", 0, 0.0), ls("b", 1, 1e-3), ls("d", 3, 1.0, False)])
    assert first_last_rms_ratio(rec) == pytest.approx(1e-3 / 5.0)  # "a" has RMS 0, "d" no gradient
    assert math.isnan(first_last_rms_ratio(StepRecord(0, 1.0, [ls("a", 0, 1.0)])))


def test_batchnorm_histograms_are_standardized(lab: tuple[LabResult, Path, list[ProgressEvent]]) -> None:
    r = lab[0].run("sigmoid_batchnorm")
    n = TEST_CONFIG.batch_size * TEST_CONFIG.width
    assert [h.block for h in r.histograms] == [0, TEST_CONFIG.depth // 2, TEST_CONFIG.depth - 1]
    for h in r.histograms:
        assert h.init is not None and h.final is not None
        assert sum(h.init) == pytest.approx(n)  # every value counted (the end bins take the tails)
        # batch norm at init (gamma=1, beta=0): unbiased std over the batch = sqrt(B/(B-1) * var/(var+eps))
        assert h.sample_std_init == pytest.approx(math.sqrt(128 / 127), abs=5e-3)
        assert 0.0 <= h.saturated_frac_init <= 1.0
    deep = lab[0].run("sigmoid_default").histograms[-1]
    assert deep.sample_std_init is not None and deep.sample_std_init < 1e-4  # the input signal is gone


def test_progress_events(lab: tuple[LabResult, Path, list[ProgressEvent]]) -> None:
    events = lab[2]
    total = TEST_CONFIG.epochs * STEPS_PER_EPOCH
    for i, name in enumerate(TEST_CONFIG.variants):
        mine = [e for e in events if e.variant == name]
        assert all(e.index == i and e.count == len(TEST_CONFIG.variants) and e.total == total for e in mine)
        assert [e.done for e in mine] == [False] * (len(mine) - 1) + [True]
        steps = [e.step for e in mine]
        assert steps == sorted(steps) and steps[-1] == lab[0].run(name).steps_run


# ------------------------------------------------------------------------------------------------ files


def test_results_json_schema_and_values(lab: tuple[LabResult, Path, list[ProgressEvent]]) -> None:
    result, out, _ = lab

    def no_constants(name: str) -> float:
        raise AssertionError(f"results.json must be strict JSON, found {name}")

    raw = json.loads((out / "results.json").read_text(), parse_constant=no_constants)
    assert raw["gradsentry_lab"] == 1
    assert set(raw) == {"gradsentry_lab", "config", "runs", "data", "environment", "wall_time_s"}
    assert raw["config"]["depth"] == 12 and raw["data"]["n_train"] == 1437 and raw["data"]["n_test"] == 360
    documented = {
        "name", "title", "shows", "family", "spec", "layer_names", "monitored_layers",
        "first_last_rms_ratio_init", "grad_norm_init", "grad_norm_final", "final_step", "logged_steps",
        "grad_norm_by_step", "global_norm", "loss", "total_steps", "steps_run", "stopped_at",
        "first_nonfinite_step", "test_accuracy", "train_accuracy", "findings", "histograms", "time_s", "jsonl",
        "schedule",
    }  # fmt: skip
    for run_raw, run in zip(raw["runs"], result.runs, strict=True):
        assert set(run_raw) == documented
        assert run_raw["test_accuracy"] == run.test_accuracy
        assert len(run_raw["grad_norm_by_step"]) == len(run.layer_names)
        assert all(len(row) == len(run.logged_steps) for row in run_raw["grad_norm_by_step"])
        assert len(run_raw["loss"]) == run.steps_run and len(run_raw["global_norm"]) == len(run.logged_steps)
        assert (out / run_raw["jsonl"]).is_file()
    exploding = raw["runs"][TEST_CONFIG.variants.index("exploding")]
    assert "NaN" in exploding["global_norm"] or "Infinity" in exploding["global_norm"]
    back = read_results(out / "results.json")
    for a, b in zip(back.runs, result.runs, strict=True):
        assert a.name == b.name and a.first_nonfinite_step == b.first_nonfinite_step
        assert all(
            (x == y) or (math.isnan(x) and math.isnan(y))
            for x, y in zip(a.global_norm, b.global_norm, strict=True)
        )
        assert a.histograms == b.histograms


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def test_jsonl_records_match_the_results(lab: tuple[LabResult, Path, list[ProgressEvent]]) -> None:
    """Every trace of results.json is the Monitor's records' values, as written in the run's JSONL."""
    result, out, _ = lab
    for r in result.runs:
        run = read_jsonl(out / f"runs/{r.name}.jsonl")
        assert run.header.meta["variant"] == r.name
        assert run.header.meta["schedule"] == r.schedule
        assert [rec.step for rec in run.records] == r.logged_steps
        assert [x.name for x in run.header.layers] == r.monitored_layers
        for i, rec in enumerate(run.records):
            assert _same(rec.global_norm, r.global_norm[i])
            row = [rec.layer(name).grad_norm for name in r.layer_names]
            col = [r.grad_norm_by_step[j][i] for j in range(len(r.layer_names))]
            assert all(_same(a, b) for a, b in zip(row, col, strict=True))
        assert r.grad_norm_init == [run.records[0].layer(n).grad_norm for n in r.layer_names]
        final = next(rec for rec in run.records if rec.step == r.final_step)
        assert r.grad_norm_final == [final.layer(n).grad_norm for n in r.layer_names]
        for (
            h
        ) in r.histograms:  # the histograms are the Monitor's activation records at step 0 / the last step
            first = next(a for a in run.records[0].activations if a.name == h.layer)
            assert first.histogram is not None and h.init == first.histogram["counts"]
            assert h.edges == first.histogram["edges"] and h.saturated_frac_init == first.saturated_frac
            if h.final is not None:
                last = next(a for a in run.records[-1].activations if a.name == h.layer)
                assert run.records[-1].step == r.total_steps - 1
                assert last.histogram is not None and h.final == last.histogram["counts"]
        # kept only at the steps shown: 80 bins per activation per logged step would bloat the file
        assert all(a.histogram is None for rec in run.records[1:-1] for a in rec.activations)
        assert [f.kind for f in run.findings] == [f["kind"] for f in r.findings]


def test_report_html_is_self_contained(lab: tuple[LabResult, Path, list[ProgressEvent]]) -> None:
    html = (lab[1] / "report.html").read_text()
    low = html.lower()
    assert "<script" not in low and "http://" not in low.replace("http://www.w3.org", "")
    assert "https://" not in low and "<link" not in low
    assert low.count('<img src="data:image/svg+xml;base64,') == 7
    for r in lab[0].runs:
        assert r.title in html


# ------------------------------------------------------------------------------------------------ config


def test_config_validation_names_the_valid_variants() -> None:
    with pytest.raises(
        ValueError, match=r"unknown variant\(s\) 'nope'; valid: sigmoid_default, tanh_default"
    ):
        run_lab(LabConfig(variants=("relu_he", "nope")))
    with pytest.raises(ValueError, match="depth must be an integer >= 2"):
        LabConfig(depth=1).validate()
    with pytest.raises(ValueError, match="lr must be a positive finite number"):
        LabConfig(lr=float("nan")).validate()
    assert LabConfig.from_dict(LabConfig.quick().to_dict()) == LabConfig.quick()


def test_models_layers_and_residual_forward() -> None:
    m = build_mlp(depth=3, width=64, activation="sigmoid", residual=True, batchnorm=True)
    names = [n for n, mod in m.named_modules() if isinstance(mod, (nn.Linear, nn.BatchNorm1d))]
    assert names == [
        "blocks.0.fc",
        "blocks.0.bn",
        "blocks.1.fc",
        "blocks.1.bn",
        "blocks.2.fc",
        "blocks.2.bn",
        "head",
    ]
    m.eval()
    x = torch.rand(5, 64)
    h = x
    for b in m.hidden_blocks():  # reference: h + sigmoid(bn(fc(h))) (the input width is also 64)
        h = h + torch.sigmoid(b.bn(b.fc(h)))  # type: ignore[misc]
    torch.testing.assert_close(m(x), m.head(h))


def test_he_and_oversized_init_scale() -> None:
    torch.manual_seed(0)
    he = build_mlp(depth=4, width=256, activation="relu", init="he")
    torch.manual_seed(0)
    big = build_mlp(depth=4, width=256, activation="relu", init="oversized", init_gain=1.5)
    w = he.hidden_blocks()[1].fc.weight
    assert w.detach().std().item() == pytest.approx(math.sqrt(2 / 256), rel=0.03)  # 65,536 draws: ~0.3% noise
    torch.testing.assert_close(big.hidden_blocks()[1].fc.weight, 1.5 * w)
    assert he.hidden_blocks()[1].fc.bias.detach().abs().max().item() == 0.0


def test_digits_split_is_fixed_and_stratified() -> None:
    d = load_digits()
    assert d.x_train.shape == (1437, 64) and d.x_test.shape == (360, 64)
    assert float(d.x_train.min()) == 0.0 and float(d.x_train.max()) == 1.0
    from sklearn.datasets import load_digits as sk

    y = torch.from_numpy(sk().target)
    for c in range(10):  # stratified: each class's test share matches its overall share within one example
        assert abs(int((d.y_test == c).sum()) - 0.2 * int((y == c).sum())) <= 1


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_unknown_variant_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["lab", "--variants", "relu_he,bogus", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "unknown variant(s) 'bogus'" in err and "exploding_clip" in err
    assert not (tmp_path / "o").exists()


def test_cli_unwritable_out_exits_2_before_training(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    assert main(["lab", "--quick", "--out", str(blocker / "out")]) == 2
    err = capsys.readouterr().err
    assert "cannot write to the output folder" in err and "file.txt" in err


@pytest.fixture(scope="module")
def small_cli_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, Path]:
    out = tmp_path_factory.mktemp("cli") / "lab"
    argv = ["lab", "--quick", "--variants", "sigmoid_default,exploding", "--depth", "4", "--width", "8"]
    capture = io.StringIO()
    with contextlib.redirect_stdout(capture):
        code = main([*argv, "--epochs", "1", "--out", str(out)])
    return code, capture.getvalue(), out


def test_cli_lab_small_run_writes_everything(small_cli_run: tuple[int, str, Path]) -> None:
    code, printed, out = small_cli_run
    assert code == 0
    assert "report.html" in printed and "sigmoid_default" in printed
    result = read_results(out / "results.json")
    assert [r.name for r in result.runs] == ["sigmoid_default", "exploding"]
    assert result.config["depth"] == 4 and result.config["epochs"] == 1
    assert (out / "report.html").stat().st_size > 10_000
    assert read_jsonl(out / "runs/exploding.jsonl").records


def test_cli_bad_option_value_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lab", "--depth", "1"]) == 2
    assert "--depth" in capsys.readouterr().err


def test_cli_report_renders_a_lab_run(
    lab: tuple[LabResult, Path, list[ProgressEvent]], small_cli_run: tuple[int, str, Path], tmp_path: Path
) -> None:
    target = tmp_path / "sig.html"
    assert main(["report", str(lab[1] / "runs/sigmoid_default.jsonl"), "--out", str(target)]) == 0
    html = target.read_text()
    assert html.count("data:image/svg+xml;base64,") == 3 and "vanishing" in html
    # a lab's results.json re-renders the lab report (next to it by default)
    results = small_cli_run[2] / "results.json"
    assert main(["report", str(results)]) == 0
    assert results.with_suffix(".html").read_text().count("data:image/svg+xml;base64,") == 7


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("this is not json\n", "not valid JSON"),
        ('{"kind": "step", "step": 0}\n', "not a gradsentry header"),
        ('{"gradsentry": 1, "kind": "header", "layers": [], "meta": {}}\n{"kind": "step"}\n', "missing"),
        ("", "empty file"),
    ],
    ids=["not-json", "no-header", "bad-step", "empty"],
)
def test_cli_report_malformed_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, message: str
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    assert main(["report", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and message in err
    assert not (tmp_path / "bad.html").exists()


def test_cli_report_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path / "nope.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
