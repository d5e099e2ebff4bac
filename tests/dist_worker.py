"""Per-rank scenarios for tests/monitor/test_distributed.py (2 gloo processes on CPU, spawned by the test).

Each rank runs every scenario in order and writes ``rank{r}.json`` into the output folder: for each
scenario either its measurements or ``{"error": traceback}``. The parent process computes the
single-process references and asserts. One spawn serves all scenarios (starting Python + torch in
two fresh processes is most of the cost); the scenario that kills a rank runs last.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import json
import math
import os
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

WORLD = 2
BATCH = 16  # the full batch; each rank trains on BATCH // WORLD rows
LR = 0.1


def make_model() -> nn.Sequential:
    """Odd widths, so FSDP2 shards unevenly (7 rows → 4 + 3, 3 rows → 2 + 1)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 3))


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = 3 * torch.randn(BATCH, 6, generator=g)  # large inputs: some tanh units saturate
    return x, torch.randint(0, 3, (BATCH,), generator=g)


def local_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = make_data()
    n = BATCH // WORLD
    return x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]


@contextlib.contextmanager
def count_all_reduce() -> Iterator[list[str]]:
    """Record every ``torch.distributed.all_reduce`` call (its op) made inside the block."""
    calls: list[str] = []
    original = dist.all_reduce

    def wrapped(tensor: torch.Tensor, op: Any = dist.ReduceOp.SUM, *args: Any, **kwargs: Any) -> Any:
        calls.append({dist.ReduceOp.SUM: "sum", dist.ReduceOp.MAX: "max"}.get(op, str(op)))
        return original(tensor, op, *args, **kwargs)

    dist.all_reduce = wrapped  # type: ignore[assignment]
    try:
        yield calls
    finally:
        dist.all_reduce = original


class Branchy(nn.Module):
    """A forward whose path depends on the rank: rank 0 goes through Tanh, rank 1 through Sigmoid."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.a, self.b, self.out = nn.Linear(6, 5), nn.Tanh(), nn.Sigmoid(), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.out(self.a(h) if dist.get_rank() == 0 else self.b(h))


def _step(model: nn.Module, rank: int) -> torch.Tensor:
    x, y = local_batch(rank)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return loss


def ddp(rank: int, out: Path) -> dict[str, Any]:
    import gradsentry as gs
    from gradsentry.sinks import JsonlSink

    model = nn.parallel.DistributedDataParallel(make_model())
    res: dict[str, Any] = {}
    with gs.Monitor(model, sync_local=False) as mon:
        loss = _step(model, rank)
        with count_all_reduce() as calls:
            rec = mon.step(loss=loss)
        res["no_sync"] = {"record": rec.to_dict(), "calls": calls, "local_loss": float(loss)}
    model.zero_grad()
    with gs.Monitor(model, sinks=[JsonlSink(out / f"ddp_sink{rank}.jsonl")]) as mon:
        loss = _step(model, rank)
        with count_all_reduce() as calls:
            rec = mon.step(loss=loss)
        res["sync"] = {"record": rec.to_dict(), "calls": calls, "rank": mon.rank}
    return res


def _fsdp_model(mesh: Any = None) -> nn.Sequential:
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def hsdp(rank: int, out: Path) -> dict[str, Any]:
    """HSDP on a (replicate=2, shard=1) mesh: each rank holds a full replica as a DTensor with
    placements (Replicate(), Shard(0)); each element must be counted once, not twice."""
    from torch.distributed.device_mesh import init_device_mesh

    import gradsentry as gs

    mesh = init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("replicate", "shard"))
    model = _fsdp_model(mesh)
    with gs.Monitor(model, activations=False) as mon:
        loss = _step(model, rank)
        with count_all_reduce() as calls:
            rec = mon.step(loss=loss)
        placements = [str(p) for p in next(model.parameters()).placements]  # type: ignore[attr-defined]
        return {"record": rec.to_dict(), "calls": calls, "placements": placements}


def fsdp(rank: int, out: Path) -> dict[str, Any]:
    import gradsentry as gs
    from gradsentry import _dist

    model = _fsdp_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    res: dict[str, Any] = {"records": [], "calls": []}
    with gs.Monitor(model, optimizer=opt) as mon:
        res["sharded"] = mon._dist is not None and mon._dist.sharded
        for _ in range(2):
            loss = _step(model, rank)
            with count_all_reduce() as calls:
                rec = mon.step(loss=loss)
            res["records"].append(rec.to_dict())
            res["calls"].append(calls)
            assert mon.last_norms is not None
            res["last_norms"] = mon.last_norms[1].tolist()
            opt.step()
            opt.zero_grad()
        loss = _step(model, rank)
        grads = [p.grad for p in model.parameters()]
    # the lean mode: gradients read once, one all_reduce(SUM)
    lean = gs.Monitor(model, max_abs=False, weight_norms=False, activations=False)
    with count_all_reduce() as calls:
        res["lean"] = {"record": lean.step(loss=loss).to_dict(), "calls": calls}
    lean.close()
    res["global_per_tensor"] = _dist.global_per_tensor_norms(grads).tolist()
    res["global_max_abs"] = _dist.global_per_tensor_norms(grads, math.inf).tolist()
    res["global_l1"] = _dist.global_per_tensor_norms(grads, 1.0).tolist()
    res["global_sq"] = float(_dist.global_sq_norm(grads))
    res["local_numel"] = [p.to_local().numel() for p in model.parameters()]  # type: ignore[attr-defined]
    return res


def ddp_branches(rank: int, out: Path) -> dict[str, Any]:
    """Ranks running different activation modules (sync_local): entries must not be mixed up; then an
    inf in rank 1's input: every rank names the module where it appeared first."""
    import gradsentry as gs

    model = nn.parallel.DistributedDataParallel(Branchy())
    res: dict[str, Any] = {}
    with gs.Monitor(model, locate_nonfinite=True) as mon:
        for step in range(2):
            x, y = local_batch(rank)
            if step == 1 and rank == 1:
                x[0, 0] = math.inf
            nn.functional.cross_entropy(model(x), y).backward()
            res[f"step{step}"] = mon.step().to_dict()
            model.zero_grad()
    return res


def ddp_every(rank: int, out: Path) -> dict[str, Any]:
    """overhead_budget under DDP: the ranks propose different `every`; all must adopt the largest."""
    import gradsentry as gs

    model = nn.parallel.DistributedDataParallel(make_model())
    with gs.Monitor(model, sync_local=False, overhead_budget=0.5, activations=False) as mon:
        mon._meter.proposed_every = 3 + 2 * rank  # as if rank 1 had measured a larger overhead
        _step(model, rank)
        with count_all_reduce() as calls:
            mon.step()
        return {"every": mon.every, "calls": calls}


def plain_sharded(rank: int, out: Path) -> dict[str, Any]:
    """sharded=True with plain tensors: rank r holds rows r::2 of every parameter of make_model()
    and the same rows of its full-batch gradient (set by hand, no forward)."""
    import gradsentry as gs

    full = make_model()
    x, y = make_data()
    nn.functional.cross_entropy(full(x), y).backward()
    part = make_model()
    for p, q in zip(part.parameters(), full.parameters(), strict=True):
        p.data = q.data[rank::WORLD].clone()
        p.grad = q.grad[rank::WORLD].clone()
    with gs.Monitor(part, sharded=True, activations=False) as mon:
        return {"record": mon.step().to_dict()}


def fsdp1(rank: int, out: Path) -> dict[str, Any]:
    """FSDP1: refused with a clear error by default; with sharded=True the global norm is right."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    import gradsentry as gs

    model = FullyShardedDataParallel(make_model(), use_orig_params=False, device_id=torch.device("cpu"))
    res: dict[str, Any] = {}
    try:
        gs.Monitor(model)
    except ValueError as exc:
        res["refused"] = str(exc)
    with gs.Monitor(model, sharded=True, activations=False) as mon:
        loss = _step(model, rank)
        rec = mon.step(loss=loss)
    res["global_norm"] = rec.global_norm
    res["loss"] = rec.loss
    return res


def fsdp_nan(rank: int, out: Path) -> dict[str, Any]:
    import gradsentry as gs
    from gradsentry import _dist

    model = _fsdp_model()
    res: dict[str, Any] = {}
    with gs.Monitor(model, activations=False) as mon:
        _step(model, rank)
        if rank == 1:  # a NaN in rank 1's shard of layer "2" only
            model[2].weight.grad.to_local()[0, 0] = float("nan")
        res["any_rank"] = bool(_dist.any_rank(torch.tensor(rank == 1)))
        res["record"] = mon.step().to_dict()
    return res


STEPS = 4  # optimizer steps of the remedy scenarios


REMEDIES = ("ClipGlobalNorm", "ZClip", "AutoClip", "ClipLayerNorm", "ClipValue", "AGC")


def remedies_available() -> bool:
    return importlib.util.find_spec("gradsentry.remedies") is not None


def remedy_cases() -> dict[str, Callable[[], Any]]:
    """Remedies whose distributed result must equal the single-process one (fresh state each call)."""
    from gradsentry.remedies import AGC, AutoClip, ClipGlobalNorm, ClipLayerNorm, ClipValue, ZClip

    return {
        "ClipGlobalNorm": lambda: ClipGlobalNorm(0.05),  # below every step's norm: always clips
        "ZClip": lambda: ZClip(warmup_steps=2, z_thresh=0.5, max_grad_norm=0.05),
        "AutoClip": lambda: AutoClip(percentile=50.0, history=8),
        "ClipLayerNorm": lambda: ClipLayerNorm(0.02),
        "ClipValue": lambda: ClipValue(0.01),
        "AGC": lambda: AGC(clip_factor=0.01),
    }


def _remedy_run(gs: Any, remedy: Any, rank: int) -> dict[str, Any]:
    model = _fsdp_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    actions = []
    with gs.Monitor(model, every=2, remedy=remedy, activations=False) as mon:
        for _ in range(STEPS):
            _step(model, rank)
            rec = mon.step()
            if rec is not None:
                actions.append(rec.actions)
            opt.step()
            opt.zero_grad()
    state = remedy.state_dict() if hasattr(remedy, "state_dict") else None
    params = [p.full_tensor().tolist() for p in model.parameters()]  # type: ignore[attr-defined]
    return {"params": params, "state": state, "actions": actions}


def fsdp_remedies(rank: int, out: Path) -> dict[str, Any]:
    """Each remedy inside a Monitor with every=2: logged steps hand it the Monitor's global norms,
    the others make it compute its own (from the DTensor shards)."""
    import gradsentry as gs

    if not remedies_available():
        return {"skipped": True}
    res: dict[str, Any] = {}
    for name, make in remedy_cases().items():
        try:
            res[name] = _remedy_run(gs, make(), rank)
        except Exception:  # each remedy on its own; the others still run
            res[name] = {"error": traceback.format_exc()}
    return res


def nan_guard(rank: int, out: Path) -> dict[str, Any]:
    """A NaN in rank 1's gradient only: NonFiniteGuard must skip the step on both ranks."""
    import gradsentry as gs

    if not remedies_available():
        return {"skipped": True}
    from gradsentry.remedies import NonFiniteGuard

    res: dict[str, Any] = {}
    model = _fsdp_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    with gs.Monitor(model, remedy=NonFiniteGuard(), activations=False) as mon:
        _step(model, rank)
        if rank == 1:
            model[2].weight.grad.to_local()[0, 0] = float("nan")
        before = [p.full_tensor() for p in model.parameters()]  # type: ignore[attr-defined]
        rec = mon.step()
        grads_none = all(p.grad is None for p in model.parameters())
        opt.step()
        after = [p.full_tensor() for p in model.parameters()]  # type: ignore[attr-defined]
    res["fsdp"] = {
        "actions": rec.actions,
        "grads_none": grads_none,
        "unchanged": all(torch.equal(a, b) for a, b in zip(before, after, strict=True)),
    }
    # DDP, NaN written into rank 1's copy after DDP's all-reduce: replicated gradients now differ,
    # only the guard's all_reduce(MAX) keeps the ranks together; step 1 is not logged (every=2).
    ddp_model = nn.parallel.DistributedDataParallel(make_model())
    opt = torch.optim.SGD(ddp_model.parameters(), lr=LR)
    guard = NonFiniteGuard()
    grads_none = []
    with gs.Monitor(ddp_model, every=2, remedy=guard, sync_local=False, activations=False) as mon:
        for _ in range(2):
            _step(ddp_model, rank)
            if rank == 1:
                ddp_model.module[2].weight.grad[0, 0] = float("nan")
            mon.step()
            grads_none.append(all(p.grad is None for p in ddp_model.parameters()))
            opt.step()
            opt.zero_grad()
    res["ddp"] = {"grads_none": grads_none, "skips": guard.skips}
    return res


def ddp_rollback_ladder(rank: int, out: Path) -> dict[str, Any]:
    """Rank-local trouble under DDP (rank 1's loss is inf; then a NaN in rank 1's gradient only):
    Rollback and Ladder must take the same decision on both ranks."""
    if not remedies_available():
        return {"skipped": True}
    from gradsentry.remedies import ClipGlobalNorm, Ladder, Rollback

    res: dict[str, Any] = {}
    model = nn.parallel.DistributedDataParallel(make_model())
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    rollback = Rollback(model, opt, every=1)
    skips = []
    for step in range(3):
        loss = _step(model, rank)
        if step == 2 and rank == 1:
            loss = loss * math.inf
        skips.append(rollback(list(model.parameters()), loss=loss).skip)
        opt.step()
        opt.zero_grad()
    weight = model.module[0].weight.detach().flatten()[:4].tolist()
    res["rollback"] = {
        "skips": skips,
        "restores": rollback.restores,
        "lr": opt.param_groups[0]["lr"],
        "w": weight,
    }
    model = nn.parallel.DistributedDataParallel(make_model())
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    ladder = Ladder(ClipGlobalNorm(1.0))
    skips = []
    for step in range(2):
        loss = _step(model, rank)
        if step == 1 and rank == 1:
            model.module[2].weight.grad[0, 0] = math.nan
        skips.append(ladder(list(model.parameters()), loss=loss).skip)
        opt.step()
        opt.zero_grad()
    res["ladder"] = {"skips": skips, "counts": ladder.counts}
    return res


def dead_peer(rank: int, out: Path) -> dict[str, Any]:
    """Rank 1 stops calling step() (first on a side group, then it exits); rank 0 must raise."""
    import gradsentry as gs

    res: dict[str, Any] = {}
    side = dist.new_group([0, 1])
    model = make_model()
    mon = gs.Monitor(model, process_group=side, sharded=True, dist_timeout=1.0, activations=False)
    _step(model, rank)
    dist.barrier()
    if rank == 1:
        time.sleep(2.0)  # alive, but skipping the logged step: rank 0 times out
        return res
    t0 = time.perf_counter()
    try:
        mon.step()
    except Exception as exc:
        res["hung"] = {"type": type(exc).__name__, "msg": str(exc), "seconds": time.perf_counter() - t0}
    model2 = make_model()
    mon2 = gs.Monitor(model2, sharded=True, dist_timeout=5.0, activations=False)
    _step(model2, rank)
    time.sleep(1.5)  # rank 1 has exited by now (else this times out: the same error)
    t0 = time.perf_counter()
    try:
        mon2.step()
    except Exception as exc:
        res["died"] = {"type": type(exc).__name__, "msg": str(exc), "seconds": time.perf_counter() - t0}
    return res


SCENARIOS: dict[str, Callable[[int, Path], dict[str, Any]]] = {
    "ddp": ddp,
    "fsdp": fsdp,
    "ddp_every": ddp_every,
    "ddp_branches": ddp_branches,
    "hsdp": hsdp,
    "plain_sharded": plain_sharded,
    "fsdp1": fsdp1,
    "fsdp_nan": fsdp_nan,
    "fsdp_remedies": fsdp_remedies,
    "nan_guard": nan_guard,
    "ddp_rollback_ladder": ddp_rollback_ladder,
    "dead_peer": dead_peer,  # last: it leaves the process group broken
}


def serve(
    rank: int,
    rendezvous: str,
    out_dir: str,
    names: list[str],
    scenarios: dict[str, Callable[[int, Path], dict[str, Any]]],
    timeout_s: float,
    teardown: bool = True,
) -> None:
    """Run ``scenarios[name]`` for each name on this rank and write ``rank{r}.json`` after each one.

    The ranks meet through a file store at ``rendezvous`` (a fresh path), not a TCP port: a port picked
    free can be taken by a concurrent test before rank 0 binds it. With ``teardown``, the ranks pass a
    barrier (both results on disk) and leave with ``os._exit``: a bare DDP forward/backward on gloo,
    without gradsentry, aborts in torch's teardown ("terminate called without an active exception") in
    ~2 of 16 runs on a 2-core machine.
    """
    torch.set_num_threads(1)
    out = Path(out_dir)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{rendezvous}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    results: dict[str, Any] = {}
    for name in names:
        t0 = time.perf_counter()
        try:
            results[name] = scenarios[name](rank, out)
        except Exception:
            results[name] = {"error": traceback.format_exc()}
        results[name]["_seconds"] = time.perf_counter() - t0
        (out / f"rank{rank}.json").write_text(json.dumps(results))
    if teardown:
        dist.barrier()
        os._exit(0)


def main(rank: int, rendezvous: str, out_dir: str, names: list[str]) -> None:
    """Entry point of one spawned rank (``dead_peer``, last, leaves the process group broken)."""
    serve(rank, rendezvous, out_dir, names, SCENARIOS, 10, teardown="dead_peer" not in names)


def spawn_ranks(
    entry: Callable[..., None], out: Path, names: list[str], deadline_s: float
) -> list[dict[str, Any]]:
    """Spawn :data:`WORLD` ranks running ``entry(rank, rendezvous, out, names)`` and return each rank's
    JSON results (``_out``: the folder, on rank 0's); fails the test on a crash or past ``deadline_s``."""
    import pytest
    import torch.multiprocessing as mp

    ctx = mp.start_processes(
        entry, args=(str(out / "rendezvous"), str(out), names), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + deadline_s
    try:
        while not ctx.join(timeout=2):
            if time.monotonic() > deadline:
                pytest.fail(f"the ranks did not finish within {deadline_s:g} s (a hang in a collective?)")
    except mp.ProcessException as exc:  # the scenario errors are in the JSON; this is setup
        pytest.fail(f"a rank crashed: {exc}")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    res = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    res[0]["_out"] = str(out)
    return res


def scenario(ranks: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """Each rank's result of scenario ``name``; fails with the rank's traceback if it raised."""
    got = [r[name] for r in ranks]
    for r, g in enumerate(got):
        assert "error" not in g, f"rank {r} failed in {name}:\n{g['error']}"
    return got
