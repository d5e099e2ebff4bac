"""Speed and accuracy of gradsentry's per-tensor norms (``stats.sq_norms``) against torch's own.

For each case, ``torch._foreach_norm`` (what ``clip_grad_norm_`` and ``get_total_norm`` use) and
``gradsentry.stats.sq_norms`` run interleaved on the same tensors; the table shows the median time
of each, the median of per-round time ratios, and each one's largest relative error on a tensor's
L2 norm against a float64 recomputation.

Run: ``python benchmarks/norms.py [--rounds 15]``.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable

import torch
import typer
from rich.console import Console
from rich.table import Table

from gradsentry import stats


def _heavy_tailed(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 1e-3
    x[::7] *= 50.0
    return x


def _mlp50m_grads() -> list[torch.Tensor]:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(3):
        layers += [torch.nn.Linear(4096, 4096), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(4096, 10))
    x, y = torch.randn(32, 4096), torch.randint(0, 10, (32,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    return [p.grad for p in model.parameters() if p.grad is not None]


def _transformer_grads() -> list[torch.Tensor]:
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(256, 4, 1024, dropout=0.0, batch_first=True)
    enc = torch.nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
    enc(torch.randn(8, 128, 256)).square().mean().backward()
    return [p.grad for p in enc.parameters() if p.grad is not None]


CASES: dict[str, Callable[[], list[torch.Tensor]]] = {
    "50 x 32K entries, heavy-tailed": lambda: [_heavy_tailed(1 << 15, i) for i in range(50)],
    "8 x 1M entries, heavy-tailed": lambda: [_heavy_tailed(1 << 20, i) for i in range(8)],
    "3 x 16M entries, heavy-tailed": lambda: [_heavy_tailed(1 << 24, i) for i in range(3)],
    "transformer encoder gradients (3.2M, 48 tensors)": _transformer_grads,
    "50.4M MLP gradients (8 tensors)": _mlp50m_grads,
}


def _max_rel_error(sq: list[float], ref: list[float]) -> float:
    return max(abs(math.sqrt(s) - math.sqrt(r)) / math.sqrt(r) for s, r in zip(sq, ref, strict=True) if r > 0)


def main(rounds: int = typer.Option(15, help="interleaved rounds per case")) -> None:
    """Print, per case, the time and accuracy of both ways of computing per-tensor norms."""
    console = Console()
    random.seed(0)
    table = Table(
        title=f"per-tensor L2 norms on CPU ({rounds} rounds, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads)"
    )
    for col in (
        "case",
        "_foreach_norm ms",
        "sq_norms ms",
        "time ratio",
        "_foreach_norm max rel err",
        "sq_norms max rel err",
    ):
        table.add_column(col, justify="right" if col != "case" else "left")
    for name, make in CASES.items():
        tensors = make()
        ref = [t.double().pow(2).sum().item() for t in tensors]
        fns: dict[str, Callable[[], torch.Tensor]] = {
            "torch": lambda ts=tensors: torch.stack(torch._foreach_norm(ts)).double().square(),
            "ours": lambda ts=tensors: stats.sq_norms(ts),
        }
        errs = {k: _max_rel_error(f().tolist(), ref) for k, f in fns.items()}
        times: dict[str, list[float]] = {k: [] for k in fns}
        ratios: list[float] = []
        for _ in range(rounds):
            order = list(fns)
            random.shuffle(order)
            got = {}
            for k in order:
                t0 = time.perf_counter()
                fns[k]()
                got[k] = time.perf_counter() - t0
            for k, v in got.items():
                times[k].append(v)
            ratios.append(got["ours"] / got["torch"])
        table.add_row(
            name,
            f"{1e3 * statistics.median(times['torch']):.2f}",
            f"{1e3 * statistics.median(times['ours']):.2f}",
            f"{statistics.median(ratios):.2f}",
            f"{errs['torch']:.1e}",
            f"{errs['ours']:.1e}",
        )
    console.print(table)


if __name__ == "__main__":
    typer.run(main)
