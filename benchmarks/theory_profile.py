"""Mean-field depth profiles against float64 measurements at init (issue 17 item 4).

Usage: ``PYTHONPATH=src python benchmarks/theory_profile.py [--seeds 0,1,2] [--width 256]``

For each model, :func:`gradsentry.theory.predict` gives every Linear/Conv layer's per-example gradient
RMS relative to the last layer's (``grad_rms``: weight and bias entries together, Poole et al. 2016,
Schoenholz et al. 2017; residual sums after Yang & Schoenholz 2017); the reference is the same quantity
measured with ``torch.func`` per-example gradients on the model in float64 (a plain ReLU chain at
PyTorch's default init spans ~10 decades over 20 layers, beyond float32's comfort). Printed per model,
as the mean over seeds: the measured span (log10 first/last layer), the predicted span, and the
largest per-layer deviation ``|log10(predicted / measured)|`` in decades. A row passes within 0.3
decades on the wide MLPs and 1.5 on the narrow lab CNNs (16 channels, 8x8 maps: padding borders and a finite width the theory ignores) (the stated tolerances of
``tests/theory/test_theory_profile.py``). About 30 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Callable

import torch
from torch import nn

from gradsentry import theory
from gradsentry.check import per_example_rms


class Stack(nn.Module):
    """``stem -> depth blocks -> head``; ``mode`` ``"plain"``: ``act(fc(h))``; ``"residual"``:
    ``h + fc(act(h))``; ``"preln"``: ``h + fc(act(LN(h)))``."""

    def __init__(self, mode: str, *, width: int, depth: int, act: type[nn.Module], he: bool = False) -> None:
        super().__init__()
        self.mode = mode
        self.stem = nn.Linear(32, width)
        self.fcs = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.acts = nn.ModuleList(act() for _ in range(depth))
        self.norms = nn.ModuleList(
            (nn.LayerNorm(width) if mode == "preln" else nn.Identity()) for _ in range(depth)
        )
        self.head = nn.Linear(width, 10)
        if he:
            for fc in self.fcs:
                nn.init.kaiming_normal_(fc.weight, nonlinearity="relu")
                nn.init.zeros_(fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for fc, act, norm in zip(self.fcs, self.acts, self.norms, strict=True):
            h = act(fc(h)) if self.mode == "plain" else h + fc(act(norm(h)))
        return self.head(h)


def models(width: int) -> dict[str, tuple[Callable[[], nn.Module], int, float]]:
    """name -> (builder, input features, tolerance in decades)."""
    from gradsentry.lab.chapters.cnn import DeepCNN

    return {
        "plain ReLU, 20 layers, default init": (
            lambda: Stack("plain", width=width, depth=20, act=nn.ReLU),
            32,
            0.3,
        ),
        "plain ReLU, 20 layers, He init": (
            lambda: Stack("plain", width=width, depth=20, act=nn.ReLU, he=True),
            32,
            0.3,
        ),
        "plain tanh, 20 layers, default init": (
            lambda: Stack("plain", width=width, depth=20, act=nn.Tanh),
            32,
            0.3,
        ),
        "residual h + W relu(h), 20 blocks": (
            lambda: Stack("residual", width=width, depth=20, act=nn.ReLU),
            32,
            0.3,
        ),
        "pre-LN residual, 20 blocks": (lambda: Stack("preln", width=width, depth=20, act=nn.ReLU), 32, 0.3),
        "lab DeepCNN plain, depth 12, 16 ch": (lambda: DeepCNN(depth=12, channels=16, arch="plain"), 64, 1.5),
        "lab DeepCNN residual, depth 12, 16 ch": (
            lambda: DeepCNN(depth=12, channels=16, arch="residual"),
            64,
            1.0,
        ),
    }


def profile(
    build: Callable[[], nn.Module], features: int, seed: int, batch: int = 128
) -> tuple[float, float, float]:
    """(measured span, predicted span, largest per-layer deviation), in decades, for one seed."""
    torch.manual_seed(seed)
    model = build().double()
    x = torch.randn(batch, features, dtype=torch.float64)
    y = torch.randint(0, 10, (batch,))
    pred = theory.predict(model, example_input=x).layers
    meas = per_example_rms(model, x, "ce", y)
    names = [lp.name for lp in pred]
    m = [math.log10(meas[n] / meas[names[-1]]) for n in names]
    p = [math.log10(lp.grad_rms) for lp in pred]
    return m[0] - m[-1], p[0] - p[-1], max(abs(a - b) for a, b in zip(m, p, strict=True))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--width", type=int, default=256)
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(2)
    print("| model | measured span | predicted span | largest deviation | tolerance | pass |")
    print("| --- | --- | --- | --- | --- | --- |")
    ok = True
    for name, (build, features, tol) in models(args.width).items():
        rows = [profile(build, features, s) for s in seeds]
        ms, ps, dev = (statistics.fmean(r[i] for r in rows) for i in range(3))
        worst = max(r[2] for r in rows)
        good = worst <= tol
        ok &= good
        print(
            f"| {name} | {ms:+.2f} | {ps:+.2f} | {dev:.3f} (worst seed {worst:.3f}) | {tol} | {'yes' if good else 'NO'} |"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
