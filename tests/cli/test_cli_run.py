"""``gradsentry run``: unmodified training scripts in a subprocess, checked against their own numbers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gradsentry.cli import main
from gradsentry.logs.run_jsonl import read_jsonl

SRC = str(Path(__file__).resolve().parents[2] / "src")

# A plain training script: it knows nothing of gradsentry. It writes its own global gradient norms,
# taken with torch's clip_grad_norm_(..., inf) just before optimizer.step(), for the test to compare.
SCRIPT = """
import json, sys, torch
torch.manual_seed(0)
lr, out, steps, ending = float(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
model = torch.nn.Sequential(
    torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1)
)
opt = torch.optim.SGD(model.parameters(), lr=lr)
x, y = torch.randn(64, 8), torch.randn(64, 1)
norms, losses = [], []
for step in range(steps):
    loss = (model(x) - y).pow(2).mean()
    loss.backward()
    norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))))
    losses.append(float(loss))
    opt.step()
    opt.zero_grad()
json.dump({"norms": norms, "losses": losses, "argv0": sys.argv[0]}, open(out, "w"))
print("script done")
if ending == "exit3":
    sys.exit(3)
if ending == "raise":
    raise RuntimeError("the script failed on purpose")
"""


def _in_folder_with_env(monkeypatch: pytest.MonkeyPatch, folder: Path, env: dict[str, str]) -> None:
    """Work in ``folder`` with exactly ``env`` of the GRADSENTRY_* settings (none from the outside)."""
    monkeypatch.chdir(folder)
    for key in ("GRADSENTRY_EVERY", "GRADSENTRY_DIR", "GRADSENTRY_DISABLE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def _run(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "PYTHONPATH": SRC, **(env or {})}
    for key in ("GRADSENTRY_EVERY", "GRADSENTRY_DIR", "GRADSENTRY_DISABLE"):
        if env is None or key not in env:
            full.pop(key, None)
    return subprocess.run(
        [sys.executable, "-m", "gradsentry", "run", *args],
        cwd=tmp_path,
        env=full,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "train.py"
    path.write_text(SCRIPT)
    return path


def _only_log(directory: Path) -> Path:
    logs = sorted(directory.glob("train-*.jsonl"))
    assert len(logs) == 1, logs
    return logs[0]


def _same_norms(logged: list[float], own: list[float]) -> None:
    """Finite norms equal within rtol 1e-6 (torch's float32 norm against the Monitor's float64 sum);
    non-finite ones at the same steps."""
    assert len(logged) == len(own)
    for step, (a, b) in enumerate(zip(logged, own, strict=True)):
        if math.isfinite(b):
            assert a == pytest.approx(b, rel=1e-6), step
        else:
            assert not math.isfinite(a), step


def test_diverging_script_is_recorded_and_diagnosed(tmp_path: Path, script: Path) -> None:
    out = tmp_path / "own.json"
    proc = _run(tmp_path, "--dir", "runs", "train.py", "3.0", str(out), "30", "end")
    assert proc.returncode == 0, proc.stderr
    assert "script done" in proc.stdout
    own = json.loads(out.read_text())
    assert own["argv0"] == "train.py"  # sys.argv as `python train.py ...` sets it
    run = read_jsonl(_only_log(tmp_path / "runs"))
    assert [r.step for r in run.records] == list(range(30))
    _same_norms([r.global_norm for r in run.records], own["norms"])
    assert any(not math.isfinite(n) for n in own["norms"])  # the lr really diverged
    assert [layer.name for layer in run.header.layers] == ["0", "2", "4"]
    assert all(r.loss is None for r in run.records)  # the model returns predictions, not the loss
    kinds = {(f.kind, f.severity) for f in run.findings}
    assert ("nonfinite", "error") in kinds and ("exploding", "error") in kinds
    assert "nonfinite" in proc.stderr and "monitoring Sequential, stepped by SGD" in proc.stderr


def test_healthy_script_has_no_problem(tmp_path: Path, script: Path) -> None:
    out = tmp_path / "own.json"
    proc = _run(tmp_path, "--dir", "runs", "train.py", "0.01", str(out), "40", "end")
    assert proc.returncode == 0, proc.stderr
    run = read_jsonl(_only_log(tmp_path / "runs"))
    _same_norms([r.global_norm for r in run.records], json.loads(out.read_text())["norms"])
    assert [f for f in run.findings if f.severity != "info"] == []
    assert "healthy: no finding" in proc.stderr


def test_exit_code_and_traceback_pass_through(tmp_path: Path, script: Path) -> None:
    out = tmp_path / "own.json"
    proc = _run(tmp_path, "--dir", "a", "train.py", "0.01", str(out), "3", "exit3")
    assert proc.returncode == 3, proc.stderr
    assert len(read_jsonl(_only_log(tmp_path / "a")).records) == 3
    proc = _run(tmp_path, "--dir", "b", "train.py", "0.01", str(out), "3", "raise")
    assert proc.returncode == 1
    tb = proc.stderr
    assert "Traceback (most recent call last):" in tb
    assert 'train.py", line' in tb and "RuntimeError: the script failed on purpose" in tb
    assert "runpy" not in tb and "gradsentry/runscript.py" not in tb  # as `python train.py` prints it
    assert read_jsonl(_only_log(tmp_path / "b")).findings is not None


def test_stop_on_nonfinite_stops_before_the_bad_step(tmp_path: Path, script: Path) -> None:
    out = tmp_path / "own.json"
    proc = _run(tmp_path, "--dir", "runs", "--stop-on", "nonfinite", "train.py", "3.0", str(out), "30", "end")
    assert proc.returncode == 1, proc.stderr
    assert not out.exists()  # the script never reached its end
    run = read_jsonl(_only_log(tmp_path / "runs"))
    assert not math.isfinite(run.records[-1].global_norm)
    assert all(math.isfinite(r.global_norm) for r in run.records[:-1])
    assert f"stopped the script at step {run.records[-1].step}" in proc.stderr


def test_environment_configuration(tmp_path: Path, script: Path) -> None:
    out = tmp_path / "own.json"
    env = {"GRADSENTRY_EVERY": "3", "GRADSENTRY_DIR": str(tmp_path / "envdir")}
    proc = _run(tmp_path, "train.py", "0.01", str(out), "10", "end", env=env)
    assert proc.returncode == 0, proc.stderr
    assert [r.step for r in read_jsonl(_only_log(tmp_path / "envdir")).records] == [0, 3, 6, 9]
    proc = _run(
        tmp_path, "--every", "5", "train.py", "0.01", str(out), "10", "end", env=env
    )  # the option wins
    logs = sorted((tmp_path / "envdir").glob("train-*.jsonl"), key=lambda p: p.stat().st_mtime)
    assert len(logs) == 2 and [r.step for r in read_jsonl(logs[-1]).records] == [0, 5]
    proc = _run(tmp_path, "train.py", "0.01", str(out), "3", "exit3", env={**env, "GRADSENTRY_DISABLE": "1"})
    assert proc.returncode == 3 and "script done" in proc.stdout
    assert len(list((tmp_path / "envdir").glob("*.jsonl"))) == 2  # untouched: no new log
    assert "gradsentry run" not in proc.stderr


@pytest.mark.parametrize(
    ("env", "argv", "message"),
    [
        (
            {"GRADSENTRY_EVERY": "often"},
            ["train.py"],
            "GRADSENTRY_EVERY must be an integer >= 1, got 'often'",
        ),
        ({"GRADSENTRY_EVERY": "0"}, ["train.py"], "GRADSENTRY_EVERY must be an integer >= 1"),
        ({"GRADSENTRY_DISABLE": "maybe"}, ["train.py"], "GRADSENTRY_DISABLE must be 1/true/yes/on"),
        ({}, ["--every", "0", "train.py"], "--every must be an integer >= 1"),
        ({}, ["--stop-on", "loss", "train.py"], "--stop-on must be 'nonfinite'"),
        ({}, ["missing.py"], "'missing.py': no such script file"),
    ],
    ids=["every-text", "every-zero", "disable-word", "every-option", "stop-on", "missing"],
)
def test_bad_settings_exit_2(
    tmp_path: Path,
    script: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    argv: list[str],
    message: str,
) -> None:
    _in_folder_with_env(monkeypatch, tmp_path, env)
    assert main(["run", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "gradsentry-runs").exists()


@pytest.mark.parametrize(
    ("env", "argv", "message"),
    [
        ({"GRADSENTRY_DIR": "taken"}, ["train.py"], "GRADSENTRY_DIR=taken is a file, not a folder"),
        ({"GRADSENTRY_DIR": "taken/sub"}, ["train.py"], "cannot create GRADSENTRY_DIR=taken/sub: "),
        ({}, ["--dir", "taken", "train.py"], "--dir taken is a file, not a folder"),
        ({}, ["train.py"], "gradsentry-runs (the default run folder; set --dir or GRADSENTRY_DIR"),
        ({}, ["scripts"], "'scripts' is a directory, not a script"),
    ],
    ids=["env-file", "env-under-file", "option-file", "default-file", "script-dir"],
)
def test_a_run_folder_or_script_that_cannot_be_used_names_where_it_came_from(
    tmp_path: Path,
    script: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    argv: list[str],
    message: str,
) -> None:
    """GRADSENTRY_DIR set to a file said "cannot create --dir" (the user never passed --dir), and a
    folder given as the script said "no such script file". Nothing is run and the file is kept."""
    _in_folder_with_env(monkeypatch, tmp_path, env)
    (tmp_path / "taken").write_text("keep me", encoding="utf-8")
    (tmp_path / "gradsentry-runs").write_text("keep me too", encoding="utf-8")
    (tmp_path / "scripts").mkdir()
    assert main(["run", *argv]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert message in err and err.startswith("error: ")
    assert "--dir" not in err or "--dir" in argv or "set --dir" in err
    assert (tmp_path / "taken").read_text(encoding="utf-8") == "keep me"
    assert (tmp_path / "gradsentry-runs").read_text(encoding="utf-8") == "keep me too"
    assert not (tmp_path / "out.json").exists()  # the script did not run
