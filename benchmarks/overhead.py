"""Overhead of gradsentry's Monitor (and clippers) on a training step, measured side by side.

Every variant trains its own copy of the same model on the same batch; in each round the variants
run once each in a shuffled order (interleaved, so machine noise hits all of them alike) and each
time is divided by the bare step's time of the same round. The table shows the median of those
per-round ratios, and, measured more precisely, the time of the work each variant adds after
``backward()`` (statistics, clipping) divided by ``torch.nn.utils.clip_grad_norm_``'s in the same
round (median over rounds).

Run: ``python benchmarks/overhead.py [--rounds 20] [--models mlp24,transformer,mlp50m]``.

On an accelerator (``--device cuda``, default model ``gpt2``: GPT-2 small from its config, random
init, through ``transformers``) a step launches work without waiting for it, so timing each step,
or syncing after each, would hide the Monitor's own sync (or add one the Monitor does not make).
There each variant runs ``--block`` steps back to back and the device is synchronized at the block's
ends only; the table holds block time / bare block time (median over rounds) and the amortized
overhead. Rows there include the Monitor with ``sync="blocking"`` and ``"deferred"`` side by side
and the peers: ``clip_grad_norm_``, Lightning's ``grad_norm``, a ``.item()`` loop, ZClip and timm's
AGC (when timm is installed).

CPU: ``python benchmarks/overhead.py --rounds 25``; quick check of the GPU path on CPU:
``python benchmarks/overhead.py --device cpu --models gpt2tiny --block 4 --rounds 3``.
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


def _gpt2(layers: int, width: int, heads: int) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        config = GPT2Config(
            n_layer=layers, n_embd=width, n_head=heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
        )
        return GPT2LMHeadModel(config)  # random init: nothing is downloaded

    return make


def _lm(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(input_ids=x, labels=x).loss  # type: ignore[no-any-return]


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
        "MLP of 50.4M params (4096 in, 3 hidden layers of 4096), batch 32",
        lambda: _mlp(4, 4096, 4096, 10),
        lambda: (torch.randn(32, 4096), torch.randint(0, 10, (32,))),
        _ce,
    ),
    "gpt2": Case(
        "GPT-2 small (124M params, transformers, random init), batch 8 x 512 tokens",
        _gpt2(12, 768, 12),
        lambda: (torch.randint(0, 50257, (8, 512)), torch.zeros(8, dtype=torch.long)),
        _lm,
    ),
    "gpt2tiny": Case(
        "GPT-2 shape, 2 layers, width 128 (6.9M params), batch 4 x 64 tokens",
        _gpt2(2, 128, 4),
        lambda: (torch.randint(0, 50257, (4, 64)), torch.zeros(4, dtype=torch.long)),
        _lm,
    ),
}


CPU_MODELS = "mlp24,transformer,mlp50m"


@dataclass
class Variant:
    """A training step, and the time of its after-backward work (what the variant adds)."""

    step: Callable[[], float]  # runs one step, returns the seconds spent after backward()


LEAN = {"activations": False, "max_abs": False, "weight_norms": False}


def _variants(case: Case, device: torch.device) -> dict[str, Variant]:
    """One step function per variant, each with its own model copy and optimizer."""
    torch.manual_seed(0)
    base = case.make_model()
    x, y = (t.to(device) for t in case.make_batch())
    out: dict[str, Variant] = {}
    After = Callable[[torch.Tensor], object]

    def make(extra: Callable[[nn.Module, torch.optim.Optimizer], After]) -> Variant:
        model = type(base)() if isinstance(base, _Encoder) else case.make_model()
        model.load_state_dict(base.state_dict())
        model.to(device)
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        after_backward = extra(model, opt)

        def step() -> float:
            opt.zero_grad(set_to_none=True)
            loss = case.loss_fn(model, x, y)
            loss.backward()
            t0 = time.perf_counter()
            after_backward(loss)
            spent = time.perf_counter() - t0
            opt.step()
            return spent

        return Variant(step)

    def with_params(fn: Callable[[list[nn.Parameter]], object]) -> Callable[..., After]:
        def build(m: nn.Module, o: torch.optim.Optimizer) -> After:
            params = list(m.parameters())
            return lambda loss: fn(params)

        return build

    def monitor(**kw: object) -> Callable[[nn.Module, torch.optim.Optimizer], After]:
        def build(m: nn.Module, o: torch.optim.Optimizer) -> After:
            if kw.pop("with_optimizer", False):
                kw["optimizer"] = o
            mon = gs.Monitor(m, **kw)  # type: ignore[arg-type]
            return lambda loss: mon.step(loss=loss)

        return build

    out["bare"] = make(lambda m, o: lambda loss: None)
    out["clip_grad_norm_"] = make(with_params(lambda ps: torch.nn.utils.clip_grad_norm_(ps, 1.0)))
    out["per-param .norm().item() loop"] = make(
        with_params(lambda ps: [p.grad.norm().item() for p in ps if p.grad is not None])
    )
    out["Monitor(every=1) gradient norms/RMS/non-finite (lean)"] = make(monitor(every=1, **LEAN))
    out["Monitor(every=1) + max |g|"] = make(monitor(every=1, activations=False, weight_norms=False))
    out["Monitor(every=1) + max |g| + weight norms"] = make(monitor(every=1, activations=False))
    out["Monitor(every=1) full (+ activations, update ratio)"] = make(monitor(every=1, with_optimizer=True))
    out["Monitor(every=10) full"] = make(monitor(every=10, with_optimizer=True))
    out["Monitor(every=10) default, no optimizer"] = make(monitor(every=10))
    out["Monitor(every=10) lean"] = make(monitor(every=10, **LEAN))
    out["Monitor(every=1) + max |g| + weight norms + histograms (|g| and |w|, 64 bins)"] = make(
        monitor(every=1, activations=False, histograms=True)
    )
    out["Monitor(every=10) default + histograms"] = make(monitor(every=10, histograms=True))
    out["Monitor(every=1) lean + locate_nonfinite"] = make(monitor(every=1, **LEAN, locate_nonfinite=True))
    out["ClipGlobalNorm"] = make(with_params(gs.ClipGlobalNorm(1.0)))
    out["ZClip"] = make(with_params(gs.ZClip()))
    out["AutoClip"] = make(with_params(gs.AutoClip()))
    out["AGC"] = make(with_params(gs.AGC(0.01)))
    out["Monitor(every=1) lean + ClipGlobalNorm (shared norms)"] = make(
        monitor(every=1, **LEAN, remedy=gs.ClipGlobalNorm(1.0))
    )
    out["Monitor(every=1) default, sync=blocking"] = make(
        monitor(every=1, activations=False, sync="blocking")
    )
    out["Monitor(every=1) default, sync=deferred"] = make(
        monitor(every=1, activations=False, sync="deferred")
    )
    out["Monitor(every=10) default, sync=blocking"] = make(monitor(every=10, sync="blocking"))
    out["Monitor(every=10) default, sync=deferred"] = make(monitor(every=10, sync="deferred"))
    out["Lightning grad_norm (every step)"] = make(_lightning_grad_norm)
    agc = _timm_agc()
    if agc is not None:
        out["timm adaptive_clip_grad"] = make(with_params(agc))
    return out


def _lightning_grad_norm(model: nn.Module, opt: torch.optim.Optimizer) -> Callable[[torch.Tensor], object]:
    from lightning.pytorch.utilities import grad_norm

    return lambda loss: grad_norm(model, norm_type=2)  # one .item() per parameter, as Lightning logs them


def _timm_agc() -> Callable[[list[nn.Parameter]], object] | None:
    try:
        from timm.utils.agc import adaptive_clip_grad
    except ImportError:  # timm is optional here (it needs torchvision)
        return None
    return lambda ps: adaptive_clip_grad(ps, clip_factor=0.01, eps=1e-3)


def measure_blocks(
    case: Case, rounds: int, block: int, device: torch.device, only: tuple[str, ...] = ()
) -> dict[str, tuple[float, float]]:
    """Per variant on an accelerator: (median over rounds of block time / bare block time, total
    added time over total bare time). Each block is ``block`` steps with a device sync at its
    ends only, so the Monitor's own syncs (or their absence) show."""
    variants = _select(_variants(case, device), only)
    names = list(variants)

    def run(n: str) -> float:
        torch.accelerator.synchronize(device) if device.type != "cpu" else None
        t0 = time.perf_counter()
        for _ in range(block):
            variants[n].step()
        torch.accelerator.synchronize(device) if device.type != "cpu" else None
        return time.perf_counter() - t0

    for n in names:  # warm-up: allocator, kernels, the Monitor's first logged step
        run(n)
    ratio: dict[str, list[float]] = {n: [] for n in names}
    total = dict.fromkeys(names, 0.0)
    for _ in range(rounds):
        order = names[:]
        random.shuffle(order)
        t = {n: run(n) for n in order}
        for n in names:
            ratio[n].append(t[n] / t["bare"])
            total[n] += t[n]
    return {n: (statistics.median(ratio[n]), total[n] / total["bare"] - 1.0) for n in names}


def _select(variants: dict[str, Variant], only: tuple[str, ...]) -> dict[str, Variant]:
    if not only:
        return variants
    keep = ("bare", "clip_grad_norm_", *only)  # bare and clip_grad_norm_ are the references
    return {n: v for n, v in variants.items() if n in keep[:2] or any(k in n for k in keep[2:])}


def measure(
    case: Case, rounds: int, warmup: int = 3, only: tuple[str, ...] = ()
) -> dict[str, tuple[float, float, float]]:
    """Per variant: (median over rounds of step time / bare step time in the same round,
    median over rounds of after-backward time / clip_grad_norm_'s in the same round).

    For ``every=10`` variants, whose cost falls on one round in ten, the ratio of total times and
    the mean work ratio instead (use a multiple of 10 rounds). Third: the total added work over
    the total bare step time, i.e. the amortized overhead of the after-backward work (precise,
    but blind to costs inside the forward pass or the optimizer step, e.g. activation hooks)."""
    variants = _select(_variants(case, torch.device("cpu")), only)
    names = list(variants)
    for _ in range(warmup):
        for n in names:
            variants[n].step()
    step_ratio: dict[str, list[float]] = {n: [] for n in names}
    work_ratio: dict[str, list[float]] = {n: [] for n in names}
    step_total: dict[str, float] = dict.fromkeys(names, 0.0)
    work_total: dict[str, float] = dict.fromkeys(names, 0.0)
    for _ in range(rounds):
        order = names[:]
        random.shuffle(order)
        total, work = {}, {}
        for n in order:
            t0 = time.perf_counter()
            work[n] = variants[n].step()
            total[n] = time.perf_counter() - t0
        for n in names:
            step_ratio[n].append(total[n] / total["bare"])
            step_total[n] += total[n]
            work_total[n] += work[n]
            work_ratio[n].append(work[n] / work["clip_grad_norm_"])
    bare = step_total["bare"]
    out = {
        n: (statistics.median(step_ratio[n]), statistics.median(work_ratio[n]), work_total[n] / bare)
        for n in names
    }
    for n in names:  # a cost paid every k-th step hides from a median: use the ratio of total times
        if "every=10" in n:
            out[n] = (step_total[n] / bare, sum(work_ratio[n]) / len(work_ratio[n]), work_total[n] / bare)
    return out


def main(
    rounds: int = typer.Option(20, help="interleaved rounds per model"),
    models: str = typer.Option(
        CPU_MODELS, help="comma-separated subset of " + ", ".join(CASES) + " (cuda: gpt2)"
    ),
    only: str = typer.Option("", help="comma-separated substrings: run only variants whose name holds one"),
    threads: int = typer.Option(0, help="torch threads (0: leave torch's default)"),
    device: str = typer.Option("cpu", help="cpu, or an accelerator (cuda): block timing, sync at block ends"),
    block: int = typer.Option(20, help="steps per timed block on an accelerator (a multiple of 10)"),
    blocks: bool = typer.Option(False, help="use block timing on CPU too (to check that path)"),
) -> None:
    """Print, per model, each variant's median step-time ratio to the bare step."""
    if threads:
        torch.set_num_threads(threads)
    console = Console()
    random.seed(0)
    dev = torch.device(device)
    for key in (models if dev.type == "cpu" or models != CPU_MODELS else "gpt2").split(","):
        case = CASES[key]
        if dev.type != "cpu" or blocks:
            _print_blocks(
                console, case, measure_blocks(case, rounds, block, dev, _only(only)), rounds, block, dev
            )
            continue
        res = measure(case, rounds, only=_only(only))
        table = Table(
            title=f"{case.name}  ({rounds} rounds, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads)"
        )
        table.add_column("variant")
        table.add_column("step time / bare step", justify="right")
        table.add_column("added work / clip_grad_norm_'s", justify="right")
        table.add_column("added work / bare step", justify="right")
        for name, (step_r, work_r, amort) in res.items():
            if name == "bare":
                table.add_row(name, f"{step_r:.3f}", "", "")
            else:
                table.add_row(name, f"{step_r:.3f}", f"{work_r:.2f}", f"{100 * amort:.2f} %")
        console.print(table)


def _only(only: str) -> tuple[str, ...]:
    return tuple(x for x in only.split(",") if x)


def _print_blocks(
    console: Console,
    case: Case,
    res: dict[str, tuple[float, float]],
    rounds: int,
    block: int,
    dev: torch.device,
) -> None:
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
    table = Table(
        title=f"{case.name}  ({rounds} rounds of {block}-step blocks, {name}, torch {torch.__version__})"
    )
    table.add_column("variant")
    table.add_column("block time / bare block", justify="right")
    table.add_column("added time / bare", justify="right")
    for n, (ratio, added) in res.items():
        table.add_row(n, f"{ratio:.3f}", "" if n == "bare" else f"{100 * added:.2f} %")
    console.print(table)


if __name__ == "__main__":
    typer.run(main)
