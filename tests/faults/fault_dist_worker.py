"""Per-rank fault scenarios for tests/faults/test_fault_dist.py (2 gloo processes on CPU).

Reuses the helpers of ``tests/dist_worker.py``; each rank writes ``rank{r}.json`` with the
measurements of every scenario (or ``{"error": traceback}``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import dist_worker as W


def ddp_local_nan(rank: int, out: Path) -> dict[str, Any]:
    """DDP, a NaN written into rank 1's gradient after DDP's all-reduce: rank 0 (the writer) must
    record it, name the layer, and write it to its JSONL."""
    import gradsentry as gs
    from gradsentry.sinks import JsonlSink

    model = nn.parallel.DistributedDataParallel(W.make_model())
    opt = torch.optim.SGD(model.parameters(), lr=W.LR)
    records = []
    sink = JsonlSink(out / f"ddp_nan{rank}.jsonl")
    with gs.Monitor(model, optimizer=opt, locate_nonfinite=True, sinks=[sink]) as mon:
        for step in range(3):
            W._step(model, rank)
            if step == 1 and rank == 1:
                model.module[2].weight.grad[0, 0] = math.nan
            records.append(mon.step().to_dict())
            opt.zero_grad()  # no update: the NaN must not reach the weights (step 2 is healthy)
    return {"records": records}


def ddp_forward_nan(rank: int, out: Path) -> dict[str, Any]:
    """DDP, an inf in rank 1's input: every rank's record names the module where it appeared."""
    import gradsentry as gs

    model = nn.parallel.DistributedDataParallel(W.make_model())
    with gs.Monitor(model, locate_nonfinite=True) as mon:
        x, y = W.local_batch(rank)
        if rank == 1:
            x = x.clone()
            x[0, 0] = math.inf
        nn.functional.cross_entropy(model(x), y).backward()
        rec = mon.step()
    return {"record": rec.to_dict()}


SCENARIOS: dict[str, Callable[[int, Path], dict[str, Any]]] = {
    "ddp_local_nan": ddp_local_nan,
    "ddp_forward_nan": ddp_forward_nan,
}


def main(rank: int, rendezvous: str, out_dir: str, names: list[str]) -> None:
    """Entry point of one spawned rank."""
    W.serve(rank, rendezvous, out_dir, names, SCENARIOS, 20)
