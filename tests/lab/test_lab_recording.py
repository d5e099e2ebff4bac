"""The lab records through the Monitor: its schedule in the header, its traces equal to the records and to
float64 recomputations, and ``analyze`` of a lab run's JSONL judging it as the lab's Monitor did."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from gradsentry import analyze_log, read_jsonl
from gradsentry.lab import VARIANTS, LabConfig, run_lab
from gradsentry.lab.chapters import attention, cnn
from gradsentry.lab.chapters.common import train
from gradsentry.lab.data import load_digits
from gradsentry.lab.experiments import build_variant_model, run_variant, variant_schedule
from gradsentry.lab.recording import DENSE_STEPS, Schedule, group_norms, layer_norms

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TINY = LabConfig(depth=3, width=8, epochs=2, log_every=3, hist_bins=16, hist_range=6.0)
REL = 1e-6  # the Monitor sums float32 gradient squares in float64: far inside this on a tiny model


def _norm64(params: list[torch.Tensor]) -> float:
    """L2 norm of the gradients of ``params`` accumulated in float64."""
    return math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in params if p.grad is not None))


def test_schedule_is_the_monitors_and_is_in_the_header(tmp_path: Path) -> None:
    steps_per_epoch = math.ceil(1437 / TINY.batch_size)
    total = TINY.epochs * steps_per_epoch
    for name in ("sigmoid_default", "exploding_clip"):
        path = tmp_path / f"{name}.jsonl"
        r = run_variant(VARIANTS[name], TINY, jsonl_path=path)
        every = 1 if VARIANTS[name].family == "exploding" else TINY.log_every
        expected = sorted({*range(0, total, every), *range(min(DENSE_STEPS, total)), total - 1})
        assert r.logged_steps == expected, name  # independent of Schedule: spelled out here
        header = read_jsonl(path).header
        assert header.meta["every"] == every  # the Monitor's own key
        assert header.meta["schedule"] == {
            "every": every,
            "dense_first": DENSE_STEPS,
            "last_step": total - 1,
            "histogram_steps": [0, total - 1],
            "text": f"every {every} step(s), each of the first {DENSE_STEPS} and the last ({total - 1})",
        }
        assert r.schedule == header.meta["schedule"] == variant_schedule(VARIANTS[name], TINY, total).meta()


def test_schedule_also_log_and_grid() -> None:
    s = Schedule(every=5, total=40, dense=3)
    assert [c for c in range(40) if s.also_log(c)] == [0, 1, 2, 39]
    assert [c for c in range(12) if s.regular(c)] == [0, 5, 10]
    assert s.histogram_steps == (0, 39)


@pytest.mark.parametrize("name", ["sigmoid_default", "sigmoid_batchnorm", "exploding_clip"])
def test_mlp_profile_and_histogram_equal_float64_recomputation(name: str) -> None:
    """The step-0 depth profile and pre-activation histograms, recomputed outside the Monitor."""
    r = run_variant(VARIANTS[name], TINY)
    data = load_digits()
    torch.manual_seed(TINY.seed)
    model = build_variant_model(VARIANTS[name], TINY)
    pre: dict[str, torch.Tensor] = {}
    for i, block in enumerate(model.hidden_blocks()):
        block.act.register_forward_hook(
            lambda m, a, o, i=i: pre.__setitem__(f"blocks.{i}.act", a[0].detach())
        )
    idx = torch.randperm(1437, generator=torch.Generator().manual_seed(TINY.seed))[: TINY.batch_size]
    nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    want = [_norm64(list(m.parameters())) for m in linears]
    assert r.grad_norm_init == pytest.approx(want, rel=REL)
    assert r.global_norm[0] == pytest.approx(_norm64(list(model.parameters())), rel=REL)
    for h in r.histograms:
        x = pre[h.layer].double().clamp(-TINY.hist_range, TINY.hist_range).numpy()
        counts, edges = np.histogram(x, bins=TINY.hist_bins, range=(-TINY.hist_range, TINY.hist_range))
        assert h.edges == pytest.approx(edges.tolist(), abs=1e-6)
        assert h.init is not None and sum(h.init) == x.size
        assert np.abs(np.asarray(h.init) - counts).sum() <= 2, h.layer  # a value on a bin edge may move
        if VARIANTS[name].activation == "sigmoid":  # the Monitor's default band: |x| > ln 99
            assert h.saturated_frac_init == pytest.approx(float((np.abs(x) > math.log(99)).mean()), abs=1e-6)
        else:
            assert h.saturated_frac_init is None  # ReLU is unbounded: no saturation


def _reference_train(model: nn.Module, groups: list[str], log_every: int) -> tuple[dict[str, Any], Any, dict]:
    """Train ``model`` with the chapters' loop; return the result, the recorder and, for each logged step,
    the float64 norms of the parameters under each group name computed from ``.grad`` (by name)."""
    d = load_digits()
    n = 192  # a few batches keep it fast
    seen: dict[int, list[float]] = {}
    total = math.ceil(n / 64) * 2
    sched = Schedule(every=log_every, total=total)

    def after(step: int) -> None:
        if sched.regular(step) or sched.also_log(step):
            named = list(model.named_parameters())
            seen[step] = [_norm64([p for q, p in named if q == g or q.startswith(g + ".")]) for g in groups]

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    res, recorder = train(
        model,
        d.x_train[:n],
        d.y_train[:n],
        d.x_test[:32],
        d.y_test[:32],
        optimizer=opt,
        epochs=2,
        batch_size=64,
        seed=0,
        log_every=log_every,
        after_backward=after,
    )
    return res, recorder, seen


def test_cnn_depth_profile_equals_float64_recomputation() -> None:
    torch.manual_seed(0)
    model = cnn.DeepCNN(depth=3, channels=4, arch="batchnorm")
    layers = ["stem", "convs.0", "convs.1", "convs.2", "head"]
    res, recorder, seen = _reference_train(model, layers, log_every=2)
    assert [r.step for r in recorder.records] == sorted(seen) == res["logged_steps"]
    for rec in recorder.records:
        assert layer_norms(rec, layers) == pytest.approx(seen[rec.step], rel=REL), rec.step
    assert res["global_norm"] == [r.global_norm for r in recorder.records]


def test_attention_block_norms_equal_float64_recomputation_by_name() -> None:
    """Blocks from the Monitor's layers equal the norm of every parameter under the block's name,
    ``self_attn.in_proj_weight`` and ``self_attn.out_proj`` (used without a module call) included."""
    torch.manual_seed(0)
    model = attention.DigitTransformer(layers=2, d_model=8, heads=2, norm_first=False)
    blocks = ["encoder.layers.0", "encoder.layers.1"]
    _, recorder, seen = _reference_train(model, blocks, log_every=3)
    names = {ls.name for ls in recorder.records[0].layers}
    assert {"encoder.layers.0.self_attn", "encoder.layers.0.self_attn.out_proj"} <= names
    for rec in recorder.records:
        assert group_norms(rec, blocks) == pytest.approx(seen[rec.step], rel=REL), rec.step


def _verdict(findings: list[Any]) -> list[tuple[str, str, list[int], list[str]]]:
    return [(f.kind, f.severity, list(f.steps), list(f.layers)) for f in findings]


@pytest.fixture(scope="module")
def lab_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    out = tmp_path_factory.mktemp("labrec")
    cfg = LabConfig.quick(depth=4, width=8, epochs=2, chapters=("mlp",))
    return run_lab(cfg, out_dir=out), out


def test_analyze_of_each_mlp_jsonl_gives_the_labs_findings(lab_run: tuple[Any, Path]) -> None:
    """Same verdict (kind, severity, steps, layers of every finding) live and from the file."""
    result, out = lab_run
    assert len(result.runs) == len(VARIANTS)
    for r in result.runs:
        assert r.jsonl is not None
        got = analyze_log(out / r.jsonl).findings
        want = [(f["kind"], f["severity"], f["steps"], f["layers"]) for f in r.findings]
        assert _verdict(got) == want, r.name
        assert [f.evidence for f in got] == [f["evidence"] for f in r.findings], r.name


def test_analyze_of_chapter_jsonl_gives_the_chapters_findings(tmp_path: Path) -> None:
    from gradsentry.lab.chapters import rnn

    data = rnn.run(quick=True, variants=("tanh", "exploding", "exploding_clip"), runs_dir=tmp_path)
    for name, r in data["runs"].items():
        path = tmp_path / "rnn" / f"{name}.jsonl"
        assert r["jsonl"] == f"runs/rnn/{name}.jsonl" and path.is_file()
        run = read_jsonl(path)
        assert run.header.meta["chapter"] == "rnn" and run.header.meta["variant"] == name
        assert run.header.meta["every"] == (1 if r["family"] == "exploding" else 4)
        assert [rec.step for rec in run.records] == r["logged_steps"]
        assert [rec.global_norm for rec in run.records] == r["global_norm"]
        got = analyze_log(path).findings
        assert _verdict(got) == [(f["kind"], f["severity"], f["steps"], f["layers"]) for f in r["findings"]]
    # the exploding trace is step by step, so its largest norm is the largest of all steps run
    ex = data["runs"]["exploding"]
    assert ex["logged_steps"] == list(range(ex["steps_run"]))


def test_recorder_keeps_records_when_the_file_fails(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from gradsentry.lab.recording import LabRecorder
    from gradsentry.records import ActivationStats, RunHeader, StepRecord

    hist = {"edges": [-1.0, 0.0, 1.0], "counts": [3.0, 1.0]}
    recs = [
        StepRecord(s, 1.0, activations=[ActivationStats("a", "Tanh", 0, 0.0, 1.0, histogram=hist)])
        for s in range(3)
    ]
    rec = LabRecorder(tmp_path / "run.jsonl", histogram_steps=(0, 2))
    rec.open(RunHeader())

    def full_disk(record: StepRecord) -> None:
        raise OSError(28, "No space left on device")

    assert rec._file is not None
    rec._file.sink.write = full_disk  # type: ignore[attr-defined]
    for r in recs:
        rec.write(r)
    rec.close()
    assert [r.step for r in rec.records] == [0, 1, 2]
    assert [r.activations[0].histogram for r in rec.records] == [hist, None, hist]
    assert recs[1].activations[0].histogram == hist  # the Monitor's own record is not modified
    assert "No space left" in caplog.text
