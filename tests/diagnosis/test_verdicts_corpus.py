"""The trust benchmark's corpus (benchmarks/verdicts): labels well formed, every run present, the
label checks of the generator reject a wrong label, and the benchmark scores a run."""

from __future__ import annotations

import csv
import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VERDICTS = ROOT / "benchmarks" / "verdicts"
LABELS = VERDICTS / "labels.tsv"
FORMATS = {
    "hf_state",
    "hf_console",
    "lightning_csv",
    "tensorboard",
    "lightning_dir",
    "jsonl",
    "mmengine_text",
    "steplines",
}
KINDS = {"healthy", "exploding", "nonfinite", "vanishing", "zero_grad_norm"}


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def rows() -> list[dict[str, str]]:
    with LABELS.open(encoding="utf-8") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def test_labels_cover_the_issue(rows: list[dict[str, str]]) -> None:
    assert list(rows[0])[:7] == ["run", "format", "path", "expected_exit", "kind", "first_bad_step", "cause"]
    assert len(rows) >= 40
    assert sum(r["kind"] == "healthy" for r in rows) >= 15
    assert {r["format"] for r in rows} == FORMATS
    assert {r["kind"] for r in rows} == KINDS
    for r in rows:
        healthy = r["kind"] == "healthy"
        assert r["expected_exit"] == ("0" if healthy else "1"), r["run"]
        assert (r["first_bad_step"] == "-") == healthy, r["run"]
        assert (VERDICTS / "runs" / r["path"]).exists(), r["path"]
    mk = _load("make_corpus", VERDICTS / "make_corpus.py")
    assert sorted(s.name for s in mk.corpus()) == sorted(r["run"] for r in rows)


def test_corpus_is_small() -> None:
    size = sum(f.stat().st_size for f in (VERDICTS / "runs").rglob("*") if f.is_file())
    assert size < 5e6


def test_label_checks_reject_wrong_labels() -> None:
    mk = _load("make_corpus", VERDICTS / "make_corpus.py")
    falling = [(s, 2.3 * 0.98**s, 0.5) for s in range(50)]
    assert mk.verify(mk.Spec("x", "jsonl", "healthy", ""), falling)[0] is None
    with pytest.raises(AssertionError):  # a loss that falls is not an exploding run
        mk.verify(mk.Spec("x", "jsonl", "exploding", "", onset=20), falling)
    with pytest.raises(AssertionError):  # a spike in a healthy control
        mk.verify(mk.Spec("x", "jsonl", "healthy", ""), [*falling[:30], (30, 0.5, 40.0), *falling[31:]])
    nan = [*falling[:10], (10, math.nan, math.nan), *((s, math.nan, math.nan) for s in range(11, 20))]
    assert mk.verify(mk.Spec("x", "jsonl", "nonfinite", ""), nan)[0] == 10
    diverging = [*falling[:20], *((s, 2.3 * 10, 30.0) for s in range(20, 50))]
    assert mk.verify(mk.Spec("x", "jsonl", "exploding", "", onset=20), diverging)[0] == 20


def test_benchmark_scores_a_run(capsys: pytest.CaptureFixture[str]) -> None:
    vd = _load("verdicts_bench", ROOT / "benchmarks" / "verdicts.py")
    rc = vd.main(["--run", "jsonl-nan_batch_mlp", "--verbose"])
    out = capsys.readouterr().out
    assert "jsonl-nan_batch_mlp" in out and "Monitor floors" in out
    assert rc in (0, 1)
    assert vd.tolerance([0, 5, 10, 15, 100]) == 10.0


def test_the_labeled_corpus_meets_the_trust_floors() -> None:
    """Issue 12's floors on the 72 real runs: recall >= 95 % with the right kind, no false alarm on the
    healthy controls, every file read; the Monitor's own diagnose() on the JSONL runs likewise."""
    vd = _load("verdicts_bench", ROOT / "benchmarks" / "verdicts.py")
    labels = vd.read_labels()
    analyze = [vd.run_analyze(label) for label in labels]
    ok, text = vd.floors(analyze)
    assert ok, text
    monitor = [vd.run_monitor(label) for label in labels if label.format == "jsonl"]
    ok, text = vd.floors(monitor)
    assert ok, text
