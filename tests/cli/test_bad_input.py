"""Bad input found by a fresh-eyes tester: each case gets a clear result, never a traceback."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import gradsentry as gs
from gradsentry.cli import main

TARGETS = """
import sys
import torch
from torch import nn


def frozen():
    m = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    m.requires_grad_(False)
    return m


class _Detached(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(x).detach()


def detached():
    return _Detached()


def half():
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).to(torch.float16)


def bf16():
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).to(torch.bfloat16)


def chatty():
    print("hello from the factory")
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


def exits():
    sys.exit(3)
"""


@pytest.fixture
def targets(tmp_path: Path) -> Path:
    path = tmp_path / "targets_for_bad_input.py"
    path.write_text(TARGETS)
    return path


def test_remedies_accept_a_single_tensor_like_torch() -> None:
    w = torch.randn(5, 5, requires_grad=True)
    w.grad = torch.full((5, 5), 40.0)
    twin = w.detach().clone().requires_grad_(True)
    twin.grad = w.grad.clone()
    result = gs.ClipGlobalNorm(1.0)(w)
    expected = torch.nn.utils.clip_grad_norm_(twin, 1.0)
    assert result.to_dict()["norm_before"] == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(w.grad, twin.grad, rtol=1e-6, atol=0)
    w.grad[0, 0] = math.nan
    assert gs.NonFiniteGuard()(w).skip is True and w.grad is None


@pytest.mark.parametrize("factory", ["frozen", "detached"])
def test_check_without_any_gradient_is_bad_input(targets: Path, factory: str, capsys) -> None:
    assert main(["check", f"{targets}:{factory}", "--input-shape", "8"]) == 2
    assert "no gradient to check" in capsys.readouterr().err


@pytest.mark.parametrize("factory", ["half", "bf16"])
def test_check_casts_the_input_to_a_low_precision_model(targets: Path, factory: str, capsys) -> None:
    assert main(["check", f"{targets}:{factory}", "--input-shape", "8", "--json"]) in (0, 1)
    report = json.loads(capsys.readouterr().out)
    assert all(math.isfinite(row["grad_norm"]) and row["grad_norm"] > 0 for row in report["rows"])


def test_check_json_is_not_corrupted_by_prints_in_user_code(targets: Path, capsys) -> None:
    assert main(["check", f"{targets}:chatty", "--input-shape", "8", "--json"]) == 0
    captured = capsys.readouterr()
    json.loads(captured.out)  # parses: the print went to stderr
    assert "hello from the factory" in captured.err


def test_check_factory_that_exits_and_oversized_inputs_are_bad_input(targets: Path, capsys) -> None:
    assert main(["check", f"{targets}:exits"]) == 2
    assert main(["check", f"{targets}:chatty", "--input-shape", "100000,100000"]) == 2
    assert "smaller shape" in capsys.readouterr().err
    assert main(["check", f"{targets}:chatty", "--input-shape", "8", "--seed", str(2**70)]) == 2
    assert main(["lab", "--quick", "--seed", str(2**70)]) == 2


def _hf_state(tmp_path: Path) -> Path:
    path = tmp_path / "trainer_state.json"
    history = [
        {"step": s, "loss": 2.0 - 0.01 * s, "grad_norm": 1.0, "learning_rate": 1e-3} for s in range(30)
    ]
    path.write_text(json.dumps({"log_history": history, "global_step": 30}))
    return path


def test_analyze_plot_to_an_unwritable_path_is_bad_input(tmp_path: Path, capsys) -> None:
    log = _hf_state(tmp_path)
    (tmp_path / "d.png").mkdir()
    assert main(["analyze", str(log), "--plot", str(tmp_path / "d.png")]) == 2
    assert "cannot write --plot" in capsys.readouterr().err


def test_analyze_tags_on_a_fixed_key_format_are_bad_input(tmp_path: Path, capsys) -> None:
    assert main(["analyze", str(_hf_state(tmp_path)), "--grad-tag", "nope"]) == 2
    assert "fixed keys" in capsys.readouterr().err


def test_analyze_on_a_gradsentry_run_applies_the_per_layer_rules(tmp_path: Path, capsys) -> None:
    model = nn.Sequential(*[m for _ in range(12) for m in (nn.Linear(16, 16), nn.Sigmoid())])
    path = tmp_path / "run.jsonl"
    with gs.Monitor(model, sinks=[gs.JsonlSink(path)]) as mon:
        for _ in range(5):
            loss = model(torch.randn(8, 16)).pow(2).mean()
            loss.backward()
            mon.step(loss=loss)
            model.zero_grad()
    assert main(["analyze", str(path), "--json"]) == 1
    kinds = {f["kind"] for f in json.loads(capsys.readouterr().out)["findings"]}
    assert "vanishing" in kinds


def test_check_reports_an_unused_layer_as_without_gradient() -> None:
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(8, 4)
            self.unused = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    report = gs.check_model(Unused(), input_shape=(8,))
    rows = {r.name: r for r in report.rows}
    assert rows["used"].has_grad and rows["used"].grad_norm > 0
    assert not rows["unused"].has_grad


def test_monitor_step_without_any_gradient_warns_once(caplog) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    mon = gs.Monitor(model)
    with caplog.at_level("WARNING", logger="gradsentry"):
        rec = mon.step()
        mon.step()
    assert rec is not None and not any(layer.has_grad for layer in rec.layers)
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "after loss.backward()" in caplog.records[0].message


def test_empty_cli_inputs_are_bad_usage(tmp_path: Path, capsys) -> None:
    assert main(["analyze", ""]) == 2
    assert "PATH is empty" in capsys.readouterr().err
    assert main(["lab", "--variants", " , ", "--out", str(tmp_path / "lab")]) == 2
    assert "--variants is empty" in capsys.readouterr().err
    assert not (tmp_path / "lab").exists()


def test_report_to_a_non_html_file_is_bad_usage(tmp_path: Path, capsys) -> None:
    log = tmp_path / "run.jsonl"
    model = nn.Sequential(nn.Linear(4, 2))
    with gs.Monitor(model, sinks=[gs.JsonlSink(log)]) as mon:
        model(torch.randn(3, 4)).sum().backward()
        mon.step()
    assert main(["report", str(log), "--out", str(tmp_path / "r.png")]) == 2
    assert "must end in .html" in capsys.readouterr().err
    assert not (tmp_path / "r.png").exists()
    assert main(["report", str(log), "--out", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").read_text().lstrip().lower().startswith("<!doctype html")


def test_lsuv_on_a_single_sample_is_a_clear_error() -> None:
    from gradsentry.remedies.init import lsuv

    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="1 sample per output unit"):
        lsuv(model, torch.randn(1, 8))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_sparse_embedding_gradients_are_measured_as_their_dense_equivalent() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50_000, 16, sparse=True), nn.Flatten(), nn.Linear(64, 2))
    x = torch.randint(0, 50_000, (8, 4))
    with gs.Monitor(model) as mon:
        model(x).sum().backward()
        model(x).sum().backward()  # repeated indices: the sparse gradient holds duplicates
        rec = mon.step()
    assert rec is not None
    dense = model[0].weight.grad.to_dense().double()
    emb = rec.layers[0]
    assert emb.grad_norm == pytest.approx(dense.norm().item(), rel=1e-6)
    assert emb.grad_max_abs == pytest.approx(dense.abs().max().item(), rel=1e-6)
    assert emb.numel == 50_000 * 16 and emb.nonfinite == 0


def test_nan_in_a_sparse_gradient_is_counted() -> None:
    model = nn.Sequential(nn.Embedding(1000, 4, sparse=True), nn.Flatten(), nn.Linear(8, 2))
    with gs.Monitor(model) as mon:
        model(torch.tensor([[1, 2]])).sum().backward()
        model[0].weight.grad._values()[0, 0] = math.nan
        rec = mon.step()
    assert rec is not None
    assert math.isnan(rec.layers[0].grad_norm) and rec.layers[0].nonfinite == 1


def test_remedies_on_sparse_gradients_are_a_clear_error() -> None:
    model = nn.Sequential(nn.Embedding(1000, 4, sparse=True), nn.Flatten(), nn.Linear(8, 2))
    model(torch.tensor([[1, 2]])).sum().backward()
    with pytest.raises(TypeError, match="need dense gradients"):
        gs.ClipGlobalNorm(1.0)(model.parameters())


def test_an_error_on_a_logged_step_does_not_stop_logging() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), 0.1)
    mon = gs.Monitor(model, optimizer=opt, remedy=gs.ClipGlobalNorm(1.0, error_if_nonfinite=True))
    for s in range(8):
        loss = model(torch.randn(16, 4)).pow(2).mean()
        loss.backward()
        if s == 3:
            model[0].weight.grad[0, 0] = math.nan
        try:
            mon.step(loss=loss)
            opt.step()
        except gs.remedies.clip.NonFiniteGradientError:
            assert s == 3
        opt.zero_grad()
    with pytest.raises(ValueError, match="scalar loss"):
        model(torch.randn(2, 4)).sum().backward()
        mon.step(loss=torch.ones(2))
    model(torch.randn(2, 4)).sum().backward()
    mon.step(loss=1.0)
    assert [r.step for r in mon.records] == [0, 1, 2, 4, 5, 6, 7, 9]
    assert mon.records[-2].layers[0].update_ratio is not None  # the optimizer hook was re-armed


def test_vanishing_gradients_below_float32_squares_are_measured_exactly() -> None:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(30):
        layers += [nn.Linear(64, 64), nn.Sigmoid()]
    model = nn.Sequential(*layers, nn.Linear(64, 10))
    with gs.Monitor(model) as mon:
        nn.functional.cross_entropy(model(torch.randn(128, 64)), torch.randint(0, 10, (128,))).backward()
        rec = mon.step()
    assert rec is not None
    modules = dict(model.named_modules())
    for layer in rec.layers:
        ref = math.sqrt(sum(p.grad.double().pow(2).sum().item() for p in modules[layer.name].parameters()))
        assert ref > 0 and layer.grad_norm == pytest.approx(ref, rel=1e-6)  # first layer ~1e-26
    assert rec.layers[0].grad_norm < 1e-20


def test_a_finite_gradient_with_a_norm_beyond_float32_squares_is_not_nonfinite() -> None:
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    guard = gs.NonFiniteGuard()
    with gs.Monitor(model) as mon:
        model(torch.randn(2, 16)).sum().backward()
        model[0].weight.grad.mul_(1e19)  # every entry finite; the float32 sum of squares overflows
        rec = mon.step(loss=1.0)
        assert rec is not None
        ref = model[0].weight.grad.double().pow(2).sum() + model[0].bias.grad.double().pow(2).sum()
        assert rec.layers[0].grad_norm == pytest.approx(math.sqrt(ref.item()), rel=1e-6)
        assert rec.layers[0].nonfinite == 0 and math.isfinite(rec.global_norm)
        assert not [f for f in mon.diagnose() if f.kind == "nonfinite"]
        result = guard(model.parameters())
        assert not result.skip and model[0].weight.grad is not None
        opt.step()


def _small_run(path: Path) -> Path:
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    with gs.Monitor(model, sinks=[gs.JsonlSink(path)]) as mon:
        for _ in range(3):
            model(torch.randn(3, 4)).sum().backward()
            mon.step(loss=1.0)
    return path


@pytest.mark.parametrize("arg", ["", ".", "/", "/dev/zero"])
def test_report_on_a_non_file_is_bad_usage(arg: str, capsys) -> None:
    assert main(["report", arg]) == 2
    assert "error:" in capsys.readouterr().err


def test_analyze_on_a_device_file_is_bad_usage(capsys) -> None:
    assert main(["analyze", "/dev/zero", "--format", "jsonl"]) == 2
    assert "not a regular file" in capsys.readouterr().err


def test_a_failed_report_write_keeps_the_previous_report(tmp_path: Path, monkeypatch, capsys) -> None:
    log = _small_run(tmp_path / "run.jsonl")
    out = tmp_path / "r.html"
    assert main(["report", str(log), "--out", str(out)]) == 0
    good = out.read_text()

    def full_disk(self: Path, *args: object, **kwargs: object) -> int:
        Path.write_bytes(self, b"<!doctype html><html><body>trunc")  # what a cut write leaves behind
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    assert main(["report", str(log), "--out", str(out)]) == 2
    assert "No space left" in capsys.readouterr().err
    monkeypatch.undo()
    assert out.read_text() == good
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_steps_beyond_64_bits_and_malformed_findings_are_bad_input(tmp_path: Path, capsys) -> None:
    state = tmp_path / "trainer_state.json"
    history = [{"step": 10**25 + i, "loss": 1.0, "grad_norm": 1.0} for i in range(20)]
    state.write_text(json.dumps({"log_history": history, "global_step": 20}))
    assert main(["analyze", str(state)]) == 2
    assert "out of range" in capsys.readouterr().err
    log = _small_run(tmp_path / "run.jsonl")
    with log.open("a") as f:
        f.write(json.dumps({"kind": "findings", "findings": 5}) + "\n")
    assert main(["analyze", str(log)]) == 2
    assert "'findings' must be a list" in capsys.readouterr().err


def test_monitor_arguments_out_of_range_are_clear_errors() -> None:
    model = nn.Sequential(nn.Linear(4, 2), nn.Tanh())
    for kwargs in (
        {"histogram_bins": -3},
        {"histogram_bins": 4, "histogram_range": -2.0},
        {"histogram_bins": 4, "histogram_range": math.inf},
        {"histogram_range": 0.0},
        {"max_records": -1},
    ):
        with pytest.raises(ValueError, match=r"histogram|max_records"):
            gs.Monitor(model, **kwargs)
    with pytest.raises(TypeError, match="complex"):
        gs.Monitor(nn.Linear(3, 3, dtype=torch.complex64))


def test_a_layer_frozen_mid_run_has_no_gradient_not_a_zero_gradient() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with gs.Monitor(model) as mon:
        for step in range(3):
            if step == 2:
                model[0].requires_grad_(False)
            model(torch.randn(3, 4)).sum().backward()
            rec = mon.step()
            model.zero_grad(set_to_none=False)  # the frozen layer keeps a zero .grad
    assert rec is not None
    assert [layer.has_grad for layer in rec.layers] == [False, True]


def test_step_before_the_first_forward_does_not_fix_the_layer_order() -> None:
    class HeadFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(4, 2)
            self.body = nn.Linear(4, 4)
            self.stem = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(self.stem(x)))

    model = HeadFirst()
    with gs.Monitor(model) as mon:
        mon.step()  # too early: no forward pass yet
        model(torch.randn(3, 4)).sum().backward()
        rec = mon.step()
    assert rec is not None
    assert [layer.name for layer in rec.layers] == ["stem", "body", "head"]


def test_metadata_json_cannot_write_is_kept_as_text(tmp_path: Path) -> None:
    import numpy as np

    path = tmp_path / "run.jsonl"
    model = nn.Sequential(nn.Linear(4, 2))
    meta = {"obj": object(), "where": tmp_path, "lr": np.float32(0.5)}
    with gs.Monitor(model, sinks=[gs.JsonlSink(path)], meta=meta) as mon:
        model(torch.randn(3, 4)).sum().backward()
        mon.step()
    run = gs.read_jsonl(path)
    assert len(run.records) == 1
    assert run.header.meta["where"] == str(tmp_path) and run.header.meta["lr"] == 0.5


@pytest.mark.parametrize("losses", [[-5.0 + 0.01 * s for s in range(12)], [0.0] * 6 + [1e-12] * 6])
def test_rollback_does_not_take_negative_or_zero_losses_for_divergence(losses: list[float]) -> None:
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rb = gs.Rollback(model, opt, every=1)
    for value in losses:
        out = model(torch.randn(2, 4)).sum() * 0 + value
        out.backward()
        assert not rb(model.parameters(), loss=out).skip
        opt.step()
        opt.zero_grad()


def test_rollback_still_catches_a_spike_of_a_negative_loss() -> None:
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rb = gs.Rollback(model, opt, every=1, loss_factor=10.0)
    for s in range(10):
        value = -5.0 + 0.01 * s if s < 9 else 60.0  # 65 above a median of -4.96: > 9 x 4.96
        out = model(torch.randn(2, 4)).sum() * 0 + value
        out.backward()
        result = rb(model.parameters(), loss=out)
        assert result.skip == (s == 9)
        opt.step()
        opt.zero_grad()


def test_layers_that_run_on_alternate_steps_are_not_stalled() -> None:
    class Alternating(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 8)
            self.head = nn.Linear(8, 2)
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return self.head(torch.tanh((self.a if self.calls % 2 else self.b)(x)))

    torch.manual_seed(0)
    model = Alternating()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with gs.Monitor(model, optimizer=opt) as mon:
        for _ in range(12):
            nn.functional.cross_entropy(model(torch.randn(16, 8)), torch.randint(0, 2, (16,))).backward()
            mon.step()
            opt.step()
            opt.zero_grad(set_to_none=True)
        findings = mon.diagnose()
    assert "stalled_layer" not in [f.kind for f in findings]
    ratios = {layer.name: layer.update_ratio for layer in mon.records[-1].layers}
    assert ratios["head"] is not None and ratios["head"] > 0
    # each branch either has no gradient now or was not updated by the last optimizer step: no ratio
    # (it was a 0.0 that read as a stalled layer)
    assert ratios["a"] is None and ratios["b"] is None


def test_analyze_judges_early_points_by_the_jump_test(tmp_path: Path, capsys) -> None:
    history = [
        {"step": s, "loss": 2.0 - 0.01 * s if s < 6 else 9.0, "grad_norm": 1e6 if s == 5 else 1.0}
        for s in range(40)
    ]
    state = tmp_path / "trainer_state.json"
    state.write_text(json.dumps({"log_history": history, "global_step": 40}))
    assert main(["analyze", str(state), "--json"]) == 1  # a 1e6x jump at step 5: judged, not "too early"
    out = json.loads(capsys.readouterr().out)
    jumps = [f for f in out["findings"] if f["evidence"].get("pattern") == "jump"]
    assert [(f["kind"], f["steps"]) for f in jumps] == [("exploding", [5])]
    one = tmp_path / "one" / "trainer_state.json"
    one.parent.mkdir()
    one.write_text(json.dumps({"log_history": history[:1], "global_step": 1}))
    assert main(["analyze", str(one), "--json"]) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert any("only one finite gradient norm" in n for n in notes)


@pytest.mark.parametrize("damage", ["cut", "flip"])
def test_a_damaged_tensorboard_file_is_read_up_to_the_damage_and_says_so(tmp_path: Path, damage: str) -> None:
    from torch.utils.tensorboard import SummaryWriter

    from gradsentry.logs.tensorboard import read_tensorboard

    writer = SummaryWriter(str(tmp_path / "run"))
    for s in range(100):
        writer.add_scalar("train/grad_norm", math.nan if s == 70 else 1.0, s)
        writer.add_scalar("train/loss", 1.0, s)
    writer.close()
    (event,) = (tmp_path / "run").iterdir()
    data = bytearray(event.read_bytes())
    if damage == "cut":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    event.write_bytes(bytes(data))
    series = read_tensorboard(tmp_path / "run")
    assert 0 < len(series.steps) < 70
    kind = "truncated record" if damage == "cut" else "corrupt record"
    assert any(f"reading stopped at a {kind}" in n for n in series.notes)


def test_ragged_csv_bom_prefixed_jsonl_and_a_file_as_output_directory(tmp_path: Path, capsys) -> None:
    ragged = tmp_path / "metrics.csv"
    ragged.write_text("step,loss,grad_norm\n1,2\n2,3,4,5,6\n3\n")
    assert main(["analyze", str(ragged)]) == 2
    assert "2 cells for 3 header columns" in capsys.readouterr().err
    log = _small_run(tmp_path / "run.jsonl")
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + log.read_bytes())
    assert len(gs.read_jsonl(bom).records) == 3
    assert main(["analyze", str(bom), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "jsonl"
    (tmp_path / "afile").write_text("x")
    assert main(["report", str(log), "--out", str(tmp_path / "afile" / "r.html")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err


def test_a_remedy_run_by_the_monitor_names_the_monitors_layers() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with gs.Monitor(model, remedy=gs.NonFiniteGuard()) as mon:
        model(torch.randn(3, 4)).sum().backward()
        model[2].weight.grad[0, 0] = math.nan
        rec = mon.step(loss=1.0)
    assert rec is not None and rec.actions[0]["skipped"]
    assert rec.actions[0]["layers"] == ["2"]  # was "param[2]"
    # outside the Monitor, a remedy without model= still falls back to positions
    model(torch.randn(3, 4)).sum().backward()
    model[0].bias.grad[0] = math.inf
    assert gs.NonFiniteGuard()(model.parameters()).to_dict()["layers"] == ["param[1]"]


def test_check_with_an_empty_target_names_the_target(capsys) -> None:
    assert main(["check", ""]) == 2
    assert "TARGET is empty" in capsys.readouterr().err
