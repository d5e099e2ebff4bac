"""ATen ops launched by one logged Monitor step: a device-independent proxy for kernel launches.

Usage: ``PYTHONPATH=src python benchmarks/launches.py [--layers 24] [--width 512]``

The model is an MLP of ``--layers`` Linear layers of width ``--width`` with a ReLU after each hidden one
(the ``mlp24`` model of ``benchmarks/overhead.py``). For each configuration the script runs a few
logged steps (the first fixes the layer order and fills the caches), then counts with a
``TorchDispatchMode`` the ATen operator calls of one more logged step (a ``_foreach_*`` op counts
once, as it is one launch, or a few, on a GPU):

* ``step()``: the calls made inside ``Monitor.step()`` (gradient statistics, weight norms, packet);
* ``forward hooks``: calls made by the armed forward hooks (activation statistics), i.e. the logged
  forward's calls minus those of the same forward without a Monitor;
* ``update ratio``: the calls the optimizer-step hook adds (weight snapshot, ``||dw||``), i.e. the
  logged ``optimizer.step()``'s calls minus a bare one's.

``max |g|`` is the difference between the ``lean`` and ``lean + max |g|`` rows' ``step()`` counts.

Two code paths are counted when the installed gradsentry has both (``gradsentry.stats.fused_path``):
``accelerator`` (what a GPU runs: one fused multi-tensor op per statistic, forced here on CPU) and
``cpu`` (what this CPU runs: per-tensor ``aminmax`` for max |g|, which is ~13x faster than the
fused ``_foreach_norm(inf)`` on CPU, and per-tensor row norms for the accurate float32 sums).
"""

from __future__ import annotations

import argparse
import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gradsentry as gs
from gradsentry import stats


class OpCounter(TorchDispatchMode):
    """Counts ATen operator calls (by name)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def count(self) -> int:
        return sum(self.ops.values())


def count(fn: Callable[[], object]) -> OpCounter:
    with OpCounter() as counter:
        fn()
    return counter


def mlp(layers: int, width: int) -> nn.Module:
    """``layers`` Linear layers of ``width`` (input ``width``, output 10), ReLU between them."""
    mods: list[nn.Module] = []
    for i in range(layers):
        mods.append(nn.Linear(width, width if i < layers - 1 else 10))
        if i < layers - 1:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


CONFIGS: dict[str, dict[str, Any]] = {
    "lean (norms only)": {"activations": False, "max_abs": False, "weight_norms": False},
    "lean + max |g|": {"activations": False, "max_abs": True, "weight_norms": False},
    "default record (no activations)": {"activations": False},
    "default record (with activations)": {},
    "default + optimizer (update ratio)": {"with_optimizer": True},
}


def measure(layers: int, width: int, config: dict[str, Any]) -> tuple[int, int, int]:
    """(step() ops, forward-hook ops, update-ratio ops) of one logged step."""
    torch.manual_seed(0)
    model = mlp(layers, width)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    kw = dict(config)
    if kw.pop("with_optimizer", False):
        kw["optimizer"] = opt
    x, y = torch.randn(64, width), torch.randint(0, 10, (64,))
    bare_fwd = count(lambda: nn.functional.cross_entropy(model(x), y)).count
    nn.functional.cross_entropy(model(x), y).backward()
    bare_opt = count(opt.step).count
    with gs.Monitor(model, every=1, sync="blocking", **kw) as mon:
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            mon.step()
            opt.step()
        opt.zero_grad(set_to_none=True)
        loss_box: list[torch.Tensor] = []
        fwd = count(lambda: loss_box.append(nn.functional.cross_entropy(model(x), y))).count
        loss_box[0].backward()
        step = count(mon.step).count
        upd = count(opt.step).count
    return step, fwd - bare_fwd, upd - bare_opt


@contextlib.contextmanager
def path(name: str) -> Iterator[None]:
    fused = getattr(stats, "fused_path", None)
    if name == "accelerator" and fused is not None:
        with fused(True):
            yield
    else:
        yield


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--width", type=int, default=512)
    args = ap.parse_args()
    paths = ["accelerator", "cpu"] if hasattr(stats, "fused_path") else ["cpu"]
    print(f"MLP of {args.layers} Linear layers, width {args.width}; torch {torch.__version__}")
    for p in paths:
        print(f"\n{p} path:")
        print(f"{'configuration':40s} {'step()':>8s} {'fwd hooks':>10s} {'update':>8s} {'total':>8s}")
        rows = {}
        for name, cfg in CONFIGS.items():
            with path(p):
                s, f, u = measure(args.layers, args.width, cfg)
            rows[name] = s
            print(f"{name:40s} {s:8d} {f:10d} {u:8d} {s + f + u:8d}")
        print(
            f"{'max |g| (difference of the lean rows)':40s} {rows['lean + max |g|'] - rows['lean (norms only)']:8d}"
        )


if __name__ == "__main__":
    main()
