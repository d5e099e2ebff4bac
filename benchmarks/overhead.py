"""Overhead of gradsentry's Monitor (and clippers) on a training step, measured side by side.

Every variant trains its own copy of the same model on the same batch; in each round the variants
run once each in a shuffled order (interleaved, so machine noise hits all of them alike) and each
time is divided by the bare step's time of the same round. The table shows the median of those
per-round ratios, and the overhead (ratio - 1) relative to ``torch.nn.utils.clip_grad_norm_``'s.

Run: ``python benchmarks/overhead.py [--rounds 20] [--models mlp24,transformer,mlp50m]``.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import typer
from rich.console import Console
from rich.table import Table
from torch import nn

import gradsentry as gs

StepFn = Callable[[], None]


@dataclass
class Case:
    name: str
    make_model: Callable[[], nn.Module]
    make_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def _mlp(depth: int, width: int, in_dim: int, out_dim: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(in_dim, width), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(256, 4, 1024, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
        self.head = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(x).mean(dim=1))


def _ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


CASES = {
    "mlp24": Case(
        "24-layer MLP, width 512 (6.3M params), batch 64",
        lambda: _mlp(24, 512, 512, 10),
        lambda: (torch.randn(64, 512), torch.randint(0, 10, (64,))),
        _ce,
    ),
    "transformer": Case(
        "4-layer transformer encoder, d_model 256, seq 128, batch 8",
        _Encoder,
        lambda: (torch.randn(8, 128, 256), torch.randint(0, 10, (8,))),
        _ce,
    ),
    "mlp50m": Case(
        "MLP of 50M params (3 x 4096), batch 32",
        lambda: _mlp(4, 4096, 1024, 10),
        lambda: (torch.randn(32, 1024), torch.randint(0, 10, (32,))),
        _ce,
    ),
}


def _variants(case: Case) -> dict[str, StepFn]:
    """One step function per variant, each with its own model copy and optimizer."""
    torch.manual_seed(0)
    base = case.make_model()
    x, y = case.make_batch()
    out: dict[str, StepFn] = {}

    def make(extra: Callable[[nn.Module, torch.optim.Optimizer], Callable[[torch.Tensor], None]]) -> StepFn:
        model = type(base)() if isinstance(base, _Encoder) else case.make_model()
        model.load_state_dict(base.state_dict())
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        after_backward = extra(model, opt)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss = case.loss_fn(model, x, y)
            loss.backward()
            after_backward(loss)
            opt.step()

        return step

    out["bare"] = make(lambda m, o: lambda loss: None)

    def clip(m: nn.Module, o: torch.optim.Optimizer) -> Callable[[torch.Tensor], None]:
        params = list(m.parameters())
        return lambda loss: (torch.nn.utils.clip_grad_norm_(params, 1.0), None)[1]

    out["clip_grad_norm_"] = make(clip)

    def loop(m: nn.Module, o: torch.optim.Optimizer) -> Callable[[torch.Tensor], None]:
        params = list(m.parameters())
        return lambda loss: (
            [p.grad.norm().item() for p in params if p.grad is not None],
            None,
        )[1]

    out["per-param .norm().item() loop"] = make(loop)

    def monitor(**kw: object) -> Callable[[nn.Module, torch.optim.Optimizer], Callable[[torch.Tensor], None]]:
        def build(m: nn.Module, o: torch.optim.Optimizer) -> Callable[[torch.Tensor], None]:
            mon = gs.Monitor(m, **kw)  # type: ignore[arg-type]
            return lambda loss: (mon.step(loss=loss), None)[1]

        return build

    out["Monitor(every=1) grad stats"] = make(monitor(every=1, activations=False))
    out["Monitor(every=1) full"] = make(lambda m, o: monitor(every=1, optimizer=o)(m, o))
    out["Monitor(every=10) full"] = make(lambda m, o: monitor(every=10, optimizer=o)(m, o))
    out["Monitor(every=1) + locate_nonfinite"] = make(
        monitor(every=1, activations=False, locate_nonfinite=True)
    )

    def remedy(
        factory: Callable[[nn.Module], Callable[..., object]],
    ) -> Callable[..., Callable[[torch.Tensor], None]]:
        def build(m: nn.Module, o: torch.optim.Optimizer) -> Callable[[torch.Tensor], None]:
            params = list(m.parameters())
            fix = factory(m)
            return lambda loss: (fix(params), None)[1]

        return build

    out["ClipGlobalNorm"] = make(remedy(lambda m: gs.ClipGlobalNorm(1.0)))
    out["ZClip"] = make(remedy(lambda m: gs.ZClip()))
    out["AutoClip"] = make(remedy(lambda m: gs.AutoClip()))
    out["AGC"] = make(remedy(lambda m: gs.AGC(0.01)))
    out["Monitor(every=1) grad stats + ClipGlobalNorm (shared norms)"] = make(
        monitor(every=1, activations=False, remedy=gs.ClipGlobalNorm(1.0))
    )
    return out


def measure(case: Case, rounds: int, warmup: int = 3) -> dict[str, float]:
    """Median over rounds of (variant time / bare time in the same round)."""
    steps = _variants(case)
    names = list(steps)
    for _ in range(warmup):
        for n in names:
            steps[n]()
    ratios: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(rounds):
        order = names[:]
        random.shuffle(order)
        times = {}
        for n in order:
            t0 = time.perf_counter()
            steps[n]()
            times[n] = time.perf_counter() - t0
        for n in names:
            ratios[n].append(times[n] / times["bare"])
    return {n: statistics.median(r) for n, r in ratios.items()}


def main(
    rounds: int = typer.Option(20, help="interleaved rounds per model"),
    models: str = typer.Option(",".join(CASES), help="comma-separated subset of " + ", ".join(CASES)),
    threads: int = typer.Option(0, help="torch threads (0: leave torch's default)"),
) -> None:
    """Print, per model, each variant's median step-time ratio to the bare step."""
    if threads:
        torch.set_num_threads(threads)
    console = Console()
    random.seed(0)
    for key in models.split(","):
        case = CASES[key]
        res = measure(case, rounds)
        clip_over = res["clip_grad_norm_"] - 1
        table = Table(
            title=f"{case.name}  ({rounds} rounds, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads)"
        )
        table.add_column("variant")
        table.add_column("step time / bare (median)", justify="right")
        table.add_column("overhead / clip_grad_norm_'s", justify="right")
        for name, r in res.items():
            rel = (r - 1) / clip_over if clip_over > 0 else float("nan")
            table.add_row(name, f"{r:.4f}", "" if name == "bare" else f"{rel:.2f}")
        # The issue-4 floor compares the combined cost with clip_grad_norm_ alone (overheads).
        combo = res["Monitor(every=1) grad stats + ClipGlobalNorm (shared norms)"] - 1
        console.print(
            f"Monitor(every=1)+ClipGlobalNorm overhead / clip_grad_norm_ overhead: {combo / clip_over:.2f} "
            f"(floor 1.15); Monitor(every=1) grad stats / clip_grad_norm_: "
            f"{(res['Monitor(every=1) grad stats'] - 1) / clip_over:.2f} (floor 1.5)"
        )
        console.print(table)


if __name__ == "__main__":
    typer.run(main)
