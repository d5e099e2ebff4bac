"""The training run the kill suite kills (tests/faults/test_fault_kill.py).

A small MLP trained with SGD, every step logged to a JSONL, a CSV and a TensorBoard sink, a Rollback
snapshotting into a directory every few steps (it also rescues a NaN injected at ``NAN_STEP``). All of it
is deterministic (seeded data, one thread), so an uninterrupted run is the reference for every killed one.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

STEPS = 40
NAN_STEP = 17


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, 8, generator=g), torch.randn(16, 1, generator=g)


def train(out: str, progress: Any = None, steps: int = STEPS) -> None:
    """Train, logging under ``out``; ``progress.value`` (a shared int) is set to each finished step."""
    import gradsentry as gs
    from gradsentry.sinks import CsvSink, JsonlSink, TensorBoardSink

    torch.set_num_threads(1)
    torch.manual_seed(0)
    root = Path(out)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rollback = gs.Rollback(model, opt, every=5, keep=2, directory=root / "rollback")
    sinks = [
        JsonlSink(root / "run.jsonl"),
        CsvSink(root / "run.csv"),
        TensorBoardSink(root / "tb", flush_secs=1),
    ]
    with gs.Monitor(model, optimizer=opt, remedy=rollback, sinks=sinks) as mon:
        for step in range(steps):
            x, y = batch(step)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            if step == NAN_STEP:
                model[2].weight.grad[0, 0] = math.nan
            mon.step(loss=loss)
            opt.step()
            opt.zero_grad()
            if progress is not None:
                progress.value = step + 1


if os.environ.get("GRADSENTRY_FAULT_WARMUP") == "1":  # in the forkserver: import what a run needs, once
    import tempfile

    with tempfile.TemporaryDirectory() as warm:
        train(warm, steps=2)
