"""Time gradsentry's clippers against torch.nn.utils.clip_grad_norm_ and count device->host syncs.

Usage: ``PYTHONPATH=src python benchmarks/clippers.py [--reps N] [--device cpu|cuda] [--quick]``

Two models (gradients filled with random values, scaled so that every clipper clips):
``mlp24x512`` (24 Linear layers of width 512, 6.3M parameters) and ``mlp50m`` (12 Linear layers of
width 2048, 50.4M parameters). Methods run interleaved in a shuffled order per repetition, each on a
fresh copy of the same gradients; the table gives the median wall time per call, the median of the
per-repetition ratios against ``clip_grad_norm_`` by wall clock ("ratio") and by the process's CPU time
("cpu ratio", steadier on a machine shared with other jobs). Floors (issue 4): ClipGlobalNorm <= 1.1x, ZClip and AutoClip <= 1.3x.

Syncs: on CUDA, ``torch.cuda.set_sync_debug_mode("warn")`` reports every synchronizing call; on CPU
there is no device to wait for, so the script counts calls of ``Tensor.item/tolist/__bool__/__float__/
__int__/numpy`` (the ways Python code forces a device->host copy) during each method. The "ops"
column counts ATen operator calls per call (a foreach op counts once), a proxy for GPU kernel launches,
which dominate on a GPU when the gradients are small.

Issue 13 item 5 rows: "AGC (batched: GPU default)" (unit norms batched over same-shape tensors) beside
"AGC (per tensor: CPU default)" in the same run; "SpikeSkip (no optimizer)"; and, per model, two tables of a remedy *together
with* the AdamW step it guards (fused: the guard skips through ``found_inf``; foreach: through the
snapshot-and-restore hooks), ratios against the bare step of the same optimizer kind. There the "syncs"
column includes the optimizer's own host reads (foreach AdamW reads its CPU step counters with
``.item()``: 48 for 48 tensors), so compare it with the bare step's row.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from gradsentry.remedies import (
    AGC,
    AutoClip,
    Chain,
    ClipGlobalNorm,
    NonFiniteGuard,
    SpikeSkip,
    ZClip,
    per_tensor_norms,
)

FLOORS = {"ClipGlobalNorm": 1.1, "ZClip": 1.3, "AutoClip": 1.3}
_HOST_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy")


def make_mlp(depth: int, width: int, device: torch.device) -> list[nn.Parameter]:
    layers = [nn.Linear(width, width) for _ in range(depth)]
    params = [p for layer in layers for p in layer.parameters()]
    return [nn.Parameter(p.detach().to(device)) for p in params]


def methods(params: list[nn.Parameter]) -> dict[str, Callable[[], object]]:
    max_norm = 1e-3  # far below the random gradients' norm: every call clips
    cgn, agc, zclip, autoclip = ClipGlobalNorm(max_norm), AGC(0.01), ZClip(warmup_steps=3), AutoClip(10, 1000)
    # What a Monitor hands over: per-tensor norms it computed anyway (gradients are reset before each call).
    shared = per_tensor_norms([p.grad for p in params])
    guard = NonFiniteGuard()
    fused = torch.optim.AdamW(params, fused=True)  # only used for its found_inf attribute; never stepped
    guard_free = NonFiniteGuard(fused, sync=False)
    spike = SpikeSkip(window=8, warmup=2)
    agc_batched = AGC(0.01, batched=True)
    loss = torch.ones((), device=params[0].device)
    return {
        "clip_grad_norm_": lambda: torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True),
        "ClipGlobalNorm": lambda: cgn(params),
        "ClipGlobalNorm (shared norms)": lambda: cgn(params, norms=shared),
        "ZClip": lambda: zclip(params),
        "AutoClip": lambda: autoclip(params),
        "AGC (per tensor: CPU default)": lambda: agc(params),
        "AGC (batched: GPU default)": lambda: agc_batched(params),
        "NonFiniteGuard (sync=True)": lambda: guard(params),
        "NonFiniteGuard (sync=False)": lambda: guard_free(params),
        "SpikeSkip (no optimizer)": lambda: spike(params, loss=loss),
    }


class HostCallCounter:
    """Counts Python-level device->host copies (CPU stand-in for CUDA's sync debug mode)."""

    def __init__(self) -> None:
        self.count = 0
        self._saved: dict[str, Callable[..., object]] = {}

    def __enter__(self) -> HostCallCounter:
        for name in _HOST_METHODS:
            orig = getattr(torch.Tensor, name)
            self._saved[name] = orig

            def spy(t: torch.Tensor, *a: object, _orig: Callable[..., object] = orig, **k: object) -> object:
                self.count += 1
                return _orig(t, *a, **k)

            setattr(torch.Tensor, name, spy)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, orig in self._saved.items():
            setattr(torch.Tensor, name, orig)


class OpCounter(TorchDispatchMode):
    """Counts ATen operator calls: a device-independent proxy for kernel launches on a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.count += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], object]) -> int:
    with OpCounter() as counter:
        fn()
    return counter.count


def count_syncs(fn: Callable[[], object], device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return sum("synchroniz" in str(w.message) for w in caught)
    with HostCallCounter() as counter:
        fn()
    return counter.count


def step_methods(params: list[nn.Parameter], fused: bool) -> dict[str, Callable[[], object]]:
    """A remedy *and* the optimizer step it guards, against the bare step (AdamW, fused or foreach)."""
    opts = {k: torch.optim.AdamW(params, lr=1e-6, fused=fused, foreach=not fused) for k in range(6)}
    guard_sync, guard_dev = NonFiniteGuard(opts[1]), NonFiniteGuard(opts[2], sync=False)
    spike = SpikeSkip(opts[3], window=8, warmup=2)
    chain = Chain(
        NonFiniteGuard(opts[4], sync=False), SpikeSkip(opts[4], window=8, warmup=2), ClipGlobalNorm(1e3)
    )
    loss = torch.ones((), device=params[0].device)

    def run(opt: torch.optim.Optimizer, remedy: Callable[..., object] | None = None) -> Callable[[], object]:
        def fn() -> object:
            if remedy is not None:
                remedy(params, loss=loss)
            return opt.step()

        return fn

    tag = "fused" if fused else "foreach"
    return {
        f"AdamW {tag} step": run(opts[0]),
        "+ NonFiniteGuard (sync=True)": run(opts[1], guard_sync),
        f"+ NonFiniteGuard (sync=False: {'found_inf' if fused else 'restore'})": run(opts[2], guard_dev),
        "+ SpikeSkip(opt)": run(opts[3], spike),
        "+ Chain(guard, SpikeSkip, clip)": run(opts[4], chain),
    }


def bench(
    name: str,
    params: list[nn.Parameter],
    reps: int,
    device: torch.device,
    fns: dict[str, Callable[[], object]] | None = None,
) -> list[str]:
    g = torch.Generator(device=device).manual_seed(0)
    saved = [torch.randn(p.shape, generator=g, device=device) for p in params]
    for p, s in zip(params, saved, strict=True):
        p.grad = s.clone()
    grads = [p.grad for p in params]
    fns = fns if fns is not None else methods(params)
    base = next(iter(fns))
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(2):  # warm-up (ZClip's; optimizers: the first step creates the state, host path)
        for fn in fns.values():
            fn()
    syncs = {k: count_syncs(fn, device) for k, fn in fns.items()}
    ops = {k: count_ops(fn) for k, fn in fns.items()}
    order = list(fns)
    for _ in range(reps):
        random.shuffle(order)
        for k in order:
            torch._foreach_copy_(grads, saved)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            fns[k]()
            if device.type == "cuda":
                torch.cuda.synchronize()
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    n = sum(p.numel() for p in params)
    rows = [f"\n{name}: {len(params)} tensors, {n / 1e6:.1f}M parameters, {reps} reps, device {device}"]
    rows.append(
        f"{'method':30s} {'median ms':>9s} {'ratio':>6s} {'cpu ratio':>9s} {'floor':>5s} {'syncs':>5s} {'ops':>4s}"
    )

    def paired(t: dict[str, list[float]], k: str) -> float:
        # median of per-repetition ratios: each pair ran close in time, so machine load mostly cancels
        return statistics.median(a / max(b, 1e-9) for a, b in zip(t[k], t[base], strict=True))

    for k in fns:
        ratio, cpu_ratio = paired(wall, k), paired(cpu, k)
        floor = FLOORS.get(k)
        ok = "" if floor is None else ("ok" if min(ratio, cpu_ratio) <= floor else "MISS")
        floor_s = "" if floor is None else f"{floor:.1f}x"
        med = statistics.median(wall[k]) * 1e3
        rows.append(
            f"{k:30s} {med:9.2f} {ratio:5.2f}x {cpu_ratio:8.2f}x {floor_s:>5s} {syncs[k]:5d} {ops[k]:4d} {ok}"
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20, help="repetitions (50M model: a third)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="only the 24-layer MLP")
    ap.add_argument("--no-steps", action="store_true", help="skip the remedy + optimizer step tables")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    random.seed(0)
    configs = [("mlp24x512", 24, 512)] + ([] if args.quick else [("mlp50m", 12, 2048)])
    for name, depth, width in configs:
        params = make_mlp(depth, width, device)
        reps = args.reps if width == 512 else max(3, args.reps // 3)
        print("\n".join(bench(name, params, reps, device)))
        if not args.no_steps:
            for fused in (True, False):
                label = f"{name}, remedy + AdamW step ({'fused' if fused else 'foreach'})"
                print("\n".join(bench(label, params, reps, device, step_methods(params, fused))))
        del params


if __name__ == "__main__":
    main()
