"""Real ``kill -9`` of a training process at seeded random points, mid-write included.

The child (fault_child.py) writes JSONL, CSV and TensorBoard logs and Rollback snapshots. For every kill:
every complete JSONL record reads back equal to the uninterrupted run's, and the killed log's verdict is
the uninterrupted run's on the same steps; the CSV's complete rows are the reference's first rows; the
TensorBoard events on disk read back as a prefix of the reference's; every snapshot under its final name
loads, and a restart (a new Rollback on the directory) leaves no temporary file and restores the newest.
Children are forked from a forkserver that has PyTorch imported, so each run starts in milliseconds.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import multiprocessing as mp
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fault_child
import pytest

pytestmark = [pytest.mark.faults, pytest.mark.slow]

KILLS = 24
SEED = 16


def _records(path: Path) -> list[dict[str, Any]]:
    import gradsentry as gs

    out = []
    for rec in gs.read_jsonl(path).records:
        d = rec.to_dict()
        d.pop("overhead")  # wall-clock dependent
        out.append(d)
    return out


def _verdict(records: list[dict[str, Any]], path: Path) -> str:
    import gradsentry as gs
    from gradsentry.records import StepRecord

    header = gs.read_jsonl(path).header
    found = gs.diagnose([StepRecord.from_dict(r) for r in records], header.layers, meta=header.meta)
    return json.dumps([f.to_dict() for f in found], default=str)


def _csv_rows(path: Path) -> list[list[str]]:
    text = path.read_text()
    complete = text[: text.rfind("\n") + 1] if "\n" in text else ""
    return list(csv.reader(complete.splitlines()))


def _tb_steps(path: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing import event_accumulator

    files = sorted(path.glob("events.out.tfevents.*"))
    if not files:
        return {}
    acc = event_accumulator.EventAccumulator(str(files[0]), size_guidance={"scalars": 0})
    acc.Reload()
    if "gradsentry/global_norm" not in acc.Tags()["scalars"]:
        return {}
    return {e.step: e.value for e in acc.Scalars("gradsentry/global_norm")}


@pytest.fixture(scope="module")
def ctx() -> Iterator[Any]:
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["fault_child"])
    saved = dict(os.environ)
    os.environ["GRADSENTRY_FAULT_WARMUP"] = "1"  # the forkserver runs two steps on import (fault_child)
    # the forkserver does not apply our sys.path (CPython 3.11): it finds fault_child through PYTHONPATH
    here = str(Path(__file__).resolve().parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    try:
        yield context
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _run(ctx: Any, out: Path, kill_after: tuple[int, float] | None) -> int | None:
    """Run the child; with ``kill_after=(step, delay)`` SIGKILL it ``delay`` s after it finished ``step``.
    Returns the steps it finished, None when it ended before the kill."""
    progress = ctx.Value("i", 0, lock=False)
    proc = ctx.Process(target=fault_child.train, args=(str(out), progress))
    proc.start()
    try:
        if kill_after is None:
            proc.join(120)
            assert proc.exitcode == 0
            return fault_child.STEPS
        step, delay = kill_after
        deadline = time.monotonic() + 60
        while progress.value < step and proc.is_alive() and time.monotonic() < deadline:
            time.sleep(0.0005)
        time.sleep(delay)
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
        if proc.exitcode != -signal.SIGKILL:
            assert proc.exitcode == 0, proc.exitcode
            return None  # it finished first: not a kill
        return progress.value
    finally:
        if proc.is_alive():
            proc.kill()


def test_kill_9_at_random_points_loses_no_complete_record(ctx: Any, tmp_path: Path) -> None:
    from gradsentry.remedies.rollback import Rollback, load_snapshot

    ref_dir = tmp_path / "reference"
    t0 = time.monotonic()
    _run(ctx, ref_dir, None)
    step_time = (time.monotonic() - t0) / fault_child.STEPS
    reference = _records(ref_dir / "run.jsonl")
    assert len(reference) == fault_child.STEPS
    ref_rows = _csv_rows(ref_dir / "run.csv")
    ref_tb = _tb_steps(ref_dir / "tb")
    rng = random.Random(SEED)
    seen_steps = []
    k = tries = 0
    while k < KILLS:
        tries += 1
        assert tries < 3 * KILLS, "the runs keep finishing before their kill"
        out = tmp_path / f"run{tries}"
        step = rng.randrange(1, fault_child.STEPS - 4)
        done = _run(ctx, out, (step, rng.uniform(0, 1.5 * step_time)))
        if done is None:
            continue
        k += 1
        # JSONL: complete records equal the reference's, the verdict too
        jsonl = out / "run.jsonl"
        got = _records(jsonl)
        seen_steps.append(len(got))
        assert len(got) >= done - 1, (k, len(got), done)  # the sink writes before step() returns
        assert json.dumps(got, default=str) == json.dumps(reference[: len(got)], default=str), k
        if got:
            assert _verdict(got, jsonl) == _verdict(reference[: len(got)], ref_dir / "run.jsonl"), k
        # CSV: complete rows are the reference's first rows
        rows = _csv_rows(out / "run.csv")
        assert rows == ref_rows[: len(rows)], k
        # TensorBoard: whatever reached the disk is the reference's
        tb = _tb_steps(out / "tb")
        assert sorted(tb) == list(range(len(tb))), k
        assert all(ref_tb[s] == v or (math.isnan(v) and math.isnan(ref_tb[s])) for s, v in tb.items()), k
        # Rollback: every snapshot under its final name loads; a restart cleans up and restores the newest
        snaps = sorted((out / "rollback").glob("snapshot-*.pt"))
        for snap in snaps:
            load_snapshot(snap)
        import torch
        from torch import nn

        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        again = Rollback(model, opt, every=5, keep=2, directory=out / "rollback")
        assert not list((out / "rollback").glob(".*.tmp")), k
        assert len(again.snapshot_steps) <= 2
        if snaps:
            assert again.restore() == again.snapshot_steps[-1]
    # the kills fell all over the run
    assert len(set(seen_steps)) >= 8, seen_steps
