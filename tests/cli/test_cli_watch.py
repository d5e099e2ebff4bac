"""``gradsentry watch``: the incremental reader, --once, and the live view in a pseudo-terminal."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import gradsentry as gs
from gradsentry.cli import main
from gradsentry.logs.follow import JsonlFollower
from gradsentry.logs.run_jsonl import read_jsonl

SRC = str(Path(__file__).resolve().parents[2] / "src")
ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


def _train(
    path: Path, *, lr: float, steps: int, pause: float = 0.0, start: int = 0, resume: bool = False
) -> None:
    """A real Monitor with a real JsonlSink on a small MLP (SGD at ``lr=3`` explodes to NaN by step 6)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    with gs.Monitor(model, optimizer=opt, sinks=[gs.JsonlSink(path, resume=resume)]) as mon:
        for step in range(start, start + steps):
            loss = (model(x) - y).pow(2).mean()
            loss.backward()
            mon.step(loss=loss, step=step)
            opt.step()
            opt.zero_grad()
            time.sleep(pause)


def test_follower_reads_only_complete_lines_and_matches_the_reader(tmp_path: Path) -> None:
    full = tmp_path / "full.jsonl"
    _train(full, lr=3.0, steps=12)
    data = full.read_bytes()
    growing = tmp_path / "growing.jsonl"
    follower = JsonlFollower(growing, window=4, sample=2)  # a small window: older records are absorbed
    with pytest.raises(FileNotFoundError):
        follower.poll()
    growing.write_bytes(b"")
    assert follower.poll() == 0 and not follower.started
    cuts = sorted({len(data) // 7 * k for k in range(1, 7)} | {data.index(b"\n") + 5})
    seen_steps = []
    written = 0
    for cut in [*cuts, len(data)]:
        with growing.open("ab") as fh:  # the writer appends a piece, possibly half a line
            fh.write(data[written:cut])
        written = cut
        follower.poll()
        assert follower.offset == data.rfind(b"\n", 0, cut) + 1  # a half-written line is left for later
        seen_steps.append(follower.scanner.steps)
    assert seen_steps == sorted(seen_steps) and seen_steps[-1] == 12
    assert follower.finished  # the findings line closes the run
    whole = read_jsonl(full)
    got = follower.run()
    assert got is not None
    assert [r.to_dict() for r in got.window] == [r.to_dict() for r in whole.records[-4:]]
    every_record = gs.diagnose(whole.records, layers=whole.header.layers, meta=whole.header.meta)
    # older records kept as a sample of 2: the same findings, from the same first steps
    assert [(f.kind, f.severity, f.steps[0]) for f in follower.findings()] == [
        (f.kind, f.severity, f.steps[0]) for f in every_record
    ]
    wide = JsonlFollower(growing)  # a window holding every record: exactly the full verdict
    wide.poll()
    as_text = [json.dumps(f.to_dict(), sort_keys=True) for f in every_record]  # NaN evidence compares as text
    assert [json.dumps(f.to_dict(), sort_keys=True) for f in wide.findings()] == as_text
    growing.write_bytes(data[: data.index(b"\n") + 1])  # replaced by a shorter file: read again
    follower.poll()
    assert follower.restarts == 1 and follower.scanner.steps == 0 and follower.started


def test_resumed_run_header(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    _train(path, lr=0.01, steps=6)
    follower = JsonlFollower(path)
    follower.poll()
    assert follower.finished and follower.scanner.resumed_at is None
    _train(path, lr=0.01, steps=4, start=4, resume=True)  # restarted from a checkpoint at step 4
    follower.poll()
    run = follower.run()
    assert run is not None and follower.scanner.resumed_at == 4
    assert [r.step for r in run.records] == [0, 1, 2, 3, 4, 5, 6, 7]
    assert follower.finished


def test_once_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    healthy, exploding = tmp_path / "healthy.jsonl", tmp_path / "exploding.jsonl"
    _train(healthy, lr=0.01, steps=20)
    _train(exploding, lr=3.0, steps=12)
    assert main(["watch", str(healthy), "--once"]) == 0
    out = capsys.readouterr().out
    assert "20 logged steps (0..19)" in out and "largest gradient norms, step 19" in out
    assert main(["watch", str(exploding), "--once"]) == 1
    out = capsys.readouterr().out
    assert "nonfinite" in out and "12 logged steps" in out
    assert main(["watch", str(tmp_path / "nope.jsonl"), "--once"]) == 2
    assert main(["watch", str(tmp_path / "nope.jsonl"), "--no-wait"]) == 2
    assert "nope.jsonl: no such file" in capsys.readouterr().err
    (tmp_path / "other.jsonl").write_text('{"loss": 1}\n')
    assert main(["watch", str(tmp_path / "other.jsonl"), "--once"]) == 2
    assert "other.jsonl:1: not a gradsentry header" in capsys.readouterr().err
    assert main(["watch", str(healthy), "--interval", "0"]) == 2
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert main(["watch", str(tmp_path / "empty.jsonl"), "--once"]) == 2
    assert "empty.jsonl: empty file, no gradsentry header" in capsys.readouterr().err
    (tmp_path / "cut.jsonl").write_bytes(b'{"gradsentry":1,"kind":"hea')  # killed writing its header
    assert main(["watch", str(tmp_path / "cut.jsonl"), "--once"]) == 2
    err = capsys.readouterr().err.replace("\n", " ")
    assert "cut.jsonl: 27 bytes and no complete line" in err and "empty file" not in err


def _read_all(fd: int, sink: bytearray, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # the child closed the terminal
            return
        if not chunk:
            return
        sink.extend(chunk)


def _wait_for(pattern: bytes, sink: bytearray, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = ANSI.sub(b"", bytes(sink))
        if re.search(pattern, text):
            return text
        time.sleep(0.05)
    raise AssertionError(
        f"{pattern!r} never appeared; screen so far:\n{ANSI.sub(b'', bytes(sink))[-3000:]!r}"
    )


def test_live_view_in_a_pseudo_terminal(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 90, 160, 0, 0))  # rows, columns
    before = termios.tcgetattr(slave)
    env = {**os.environ, "PYTHONPATH": SRC, "TERM": "xterm-256color", "COLUMNS": "160", "LINES": "90"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gradsentry", "watch", str(path), "--interval", "0.2"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        start_new_session=True,
    )
    screen = bytearray()
    stop = threading.Event()
    reader = threading.Thread(target=_read_all, args=(master, screen, stop), daemon=True)
    reader.start()
    writer = threading.Thread(target=_train, args=(path,), kwargs={"lr": 3.0, "steps": 40, "pause": 0.1})
    try:
        _wait_for(rb"waiting for .*run\.jsonl to appear", screen, 120)  # started before the file exists
        writer.start()
        _wait_for(rb"nonfinite", screen, 120)  # a finding appears while the run goes on
        text = _wait_for(rb"40 logged steps", screen, 120)
        counts = [int(n) for n in re.findall(rb"(\d+) logged steps", text)]
        assert counts == sorted(counts) and len(set(counts)) >= 3, counts  # the count grew on screen
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C, as the terminal sends it to the foreground group
        assert proc.wait(timeout=60) == 0
        assert termios.tcgetattr(slave) == before  # the terminal's modes are as they were
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        writer.join(timeout=60)
        time.sleep(0.2)
        stop.set()
        os.close(slave)
        reader.join(timeout=5)
        os.close(master)
    raw = bytes(screen)
    assert raw.rfind(b"\x1b[?25h") > raw.rfind(b"\x1b[?25l") >= 0  # the cursor was shown again
    assert b"Traceback" not in raw and b"Aborted" not in raw
