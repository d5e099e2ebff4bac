"""On disk, through the crashes it exists for: Rollback snapshots across restarts, killed writes and a
full disk; the sinks on a full disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import gradsentry as gs
from gradsentry.remedies.rollback import load_snapshot

pytestmark = pytest.mark.faults

SRC = str(Path(gs.__file__).resolve().parents[1])


def _setup() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def _good_steps(rb: gs.Rollback, model: nn.Module, opt: torch.optim.Optimizer, n: int) -> None:
    for _ in range(n):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        loss.backward()
        rb(list(model.parameters()), loss=loss)
        opt.step()
        opt.zero_grad()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_new_rollback_takes_over_the_snapshots_on_disk(tmp_path: Path) -> None:
    model, opt = _setup()
    first = gs.Rollback(model, opt, every=1, keep=2, directory=tmp_path)
    _good_steps(first, model, opt, 5)
    assert first.snapshot_steps == [3, 4]
    saved = {k: v.clone() for k, v in load_snapshot(tmp_path / "snapshot-00000004.pt")["model"].items()}
    # the process dies; a new one builds a fresh model and a new Rollback on the same directory
    model, opt = _setup()
    again = gs.Rollback(model, opt, every=1, keep=2, directory=tmp_path)
    assert again.snapshot_steps == [3, 4]
    assert again.restore() == 4  # it was "diverged before the first snapshot"
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k])
    _good_steps(again, model, opt, 1)  # numbering goes on: the newest name holds the newest step
    assert again.snapshot_steps == [4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snapshot-00000004.pt", "snapshot-00000005.pt"]


def test_restart_removes_killed_writes_and_prunes_beyond_keep(tmp_path: Path) -> None:
    model, opt = _setup()
    many = gs.Rollback(model, opt, every=1, keep=10, directory=tmp_path)
    _good_steps(many, model, opt, 5)
    dead = tmp_path / f".snapshot-00000005.pt.{_dead_pid()}.tmp"
    dead.write_bytes(b"PK\x03\x04 half a snapshot")
    mine = tmp_path / f".snapshot-00000006.pt.{os.getpid()}.tmp"
    mine.write_bytes(b"PK\x03\x04")
    alive = tmp_path / f".snapshot-00000007.pt.{os.getppid()}.tmp"  # a live writer: left alone
    alive.write_bytes(b"PK\x03\x04")
    restarted = gs.Rollback(model, opt, every=1, keep=2, directory=tmp_path)
    assert restarted.snapshot_steps == [3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        alive.name,
        "snapshot-00000003.pt",
        "snapshot-00000004.pt",
    ]


def test_snapshot_is_fsynced_before_the_rename(tmp_path: Path, monkeypatch) -> None:
    model, opt = _setup()
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync:" + os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1])
        real_fsync(fd)

    def replace(a: object, b: object) -> None:
        events.append("replace")
        real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    gs.Rollback(model, opt, directory=tmp_path).snapshot()
    tmp_name = f".snapshot-00000000.pt.{os.getpid()}.tmp"
    assert events[:2] == [f"fsync:{tmp_name}", "replace"]
    assert events[2] == f"fsync:{tmp_path.name}"  # then the directory, so the rename is durable


FULL_DISK = textwrap.dedent(
    """
    import json, math, resource, signal, sys
    import torch
    from torch import nn
    import gradsentry as gs
    from gradsentry.remedies.rollback import load_snapshot

    directory = sys.argv[1]
    torch.manual_seed(0)
    model = nn.Linear(64, 64)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    rb = gs.Rollback(model, opt, every=1, keep=1, directory=directory)
    out = {}

    def step(bad=False):
        loss = model(torch.randn(8, 64)).pow(2).mean()
        loss.backward()
        if bad:
            model.weight.grad[0, 0] = math.nan
        res = rb(list(model.parameters()), loss=loss)
        opt.step()
        opt.zero_grad()
        return res.to_dict()

    step()  # step 0 is written while the disk has room
    before = load_snapshot(directory + "/snapshot-00000000.pt")["model"]
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write over the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # the "disk" is now full
    out["good"] = step()  # step 1: its snapshot cannot be written
    out["failed"] = rb.failed_snapshots
    out["steps"] = rb.snapshot_steps
    out["old_ok"] = load_snapshot(directory + "/snapshot-00000000.pt")["step"]
    out["rescue"] = step(bad=True)  # diverges: restores the step-0 snapshot
    out["restored"] = all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    print(json.dumps(out))
    """
)


def test_a_full_disk_keeps_the_old_snapshot_and_warns(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(tmp_path)], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["failed"] == 1 and out["steps"] == [0] and out["old_ok"] == 0
    assert out["good"]["snapshot"] is False and not out["good"]["skipped"]
    assert out["rescue"]["skipped"] and out["rescue"]["restored_step"] == 0 and out["restored"]
    assert "could not write the snapshot of step 1" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snapshot-00000000.pt"]  # no temp file left


SINKS_FULL_DISK = textwrap.dedent(
    """
    import json, os, resource, signal, sys
    import torch
    from torch import nn
    import gradsentry as gs
    from gradsentry.sinks import CsvSink, JsonlSink

    out = sys.argv[1]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    sinks = [JsonlSink(out + "/run.jsonl"), CsvSink(out + "/run.csv")]
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    with gs.Monitor(model, sinks=sinks) as mon:
        for step in range(30):
            if step == 5:  # the disk fills up: no file may grow past 4 KB from here
                resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
            model(torch.randn(4, 8)).pow(2).mean().backward()
            mon.step(loss=float(step))
            model.zero_grad()
        kept = [r.to_dict() for r in mon.records]
    for r in kept:
        r.pop("overhead")
    print(json.dumps({"steps": mon.step_count, "records": kept}))
    """
)


def test_a_full_disk_disables_the_sinks_keeps_training_and_every_complete_line(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-c", SINKS_FULL_DISK, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["steps"] == 30 and len(out["records"]) == 30  # training and the Monitor went on
    assert "sink JsonlSink failed" in proc.stderr and "sink CsvSink failed" in proc.stderr
    assert os.path.getsize(tmp_path / "run.jsonl") <= 4096
    run = gs.read_jsonl(tmp_path / "run.jsonl")  # a cut last line is skipped
    got = [r.to_dict() for r in run.records]
    for r in got:
        r.pop("overhead")
    assert 5 <= len(got) < 30
    assert json.dumps(got) == json.dumps(out["records"][: len(got)])
    rows = (tmp_path / "run.csv").read_text().splitlines()
    complete = [r for r in rows[1:] if r.count(",") == 12]
    assert len(complete) >= 2 * 5 - 1  # two layers per step, the rows before the limit
