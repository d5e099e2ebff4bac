"""Every text output against its golden file (``tests/golden/``; ``pytest --update-golden`` rewrites).

A changed table, message or JSON field shows up here as a diff to review, not as a silent change."""

from __future__ import annotations

from pathlib import Path

import pytest

from golden import assert_golden, normalize
from gradsentry.cli import main

ROOT = Path(__file__).resolve().parents[2]
RUNS = Path("benchmarks/verdicts/runs")  # relative to ROOT, the working directory of these tests, so that
TARGETS = Path(
    "tests/check_targets.py"
)  # the outputs (and their line wrapping) do not depend on the clone's path

# one run per reader and per verdict kind
ANALYZED = [
    "hf_state-deep_sigmoid/trainer_state.json",
    "hf_console-lr5_adamw_clip1/console.log",
    "hf_state-ok_warmup/trainer_state.json",
    "mmengine_text-nan_batch",
    "steplines-titan_spike",
    "tensorboard-lr_jump_x1000",
    "lightning_csv-dead_relu",
    "jsonl-spike_mlp",
]


@pytest.fixture(autouse=True)
def _fixed_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "120")
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.chdir(ROOT)


def _target(run: str) -> Path:
    path = RUNS / run
    if (ROOT / path).is_dir():
        files = sorted(p.relative_to(ROOT) for p in (ROOT / path).iterdir() if p.name != "README.md")
        return files[0] if len(files) == 1 else path
    return path


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out + ("\n[stderr]\n" + out.err if out.err.strip() else "")


@pytest.mark.parametrize("run", ANALYZED)
def test_analyze_text_and_json(
    run: str, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _target(run)
    name = run.split("/")[0]
    code, text = _cli(capsys, "analyze", str(path))
    assert_golden(request, f"analyze/{name}.txt", normalize(f"exit {code}\n{text}"))
    code, text = _cli(capsys, "analyze", str(path), "--json")
    assert_golden(request, f"analyze/{name}.json", normalize(f"exit {code}\n{text}"))


def test_analyze_bad_input(request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]) -> None:
    lines = []
    for path in (Path("missing.log"), Path("tests/fixtures/loglines/not_a_training_log.log")):
        code, text = _cli(capsys, "analyze", str(path))
        lines.append(f"$ analyze {path.name}\nexit {code}\n{text}")
    assert_golden(request, "analyze/bad_input.txt", normalize("\n".join(lines)))


@pytest.mark.parametrize(
    "args",
    [
        ("small_mlp", "--input-shape", "64"),
        ("mlp", "--input-shape", "64"),
        ("relu20_he", "--data", "digits"),
    ],
    ids=["small_mlp", "sigmoid_mlp", "relu20_he"],
)
def test_check_table_and_json(
    args: tuple[str, ...], request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    target, *rest = args
    code, text = _cli(capsys, "check", f"{TARGETS}:{target}", *rest)
    assert_golden(request, f"check/{request.node.callspec.id}.txt", normalize(f"exit {code}\n{text}"))
    code, text = _cli(capsys, "check", f"{TARGETS}:{target}", *rest, "--json")
    assert_golden(request, f"check/{request.node.callspec.id}.json", normalize(f"exit {code}\n{text}"))


def test_finding_text(request: pytest.FixtureRequest) -> None:
    from gradsentry import analyze_log

    lines = []
    for run in ANALYZED:
        analysis = analyze_log(_target(run))
        lines.append(f"## {run.split('/')[0]}")
        lines += [str(f) for f in analysis.findings] or ["(no finding)"]
    assert_golden(request, "finding_text.txt", normalize("\n".join(lines)))


def test_lab_table(
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(
        "COLUMNS", "400"
    )  # no wrapping of the report's path, whatever the temporary folder's length
    argv = ["lab", "--quick", "--variants", "sigmoid_default,relu_he", "--depth", "4", "--width", "8"]
    code, text = _cli(capsys, *argv, "--epochs", "1", "--out", str(tmp_path / "lab"))
    assert_golden(request, "lab_table.txt", normalize(f"exit {code}\n{text}", tmp_path, squeeze=True))
