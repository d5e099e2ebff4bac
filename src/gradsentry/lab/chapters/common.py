"""Shared training loop of the lab's chapters beyond MLPs: a Monitor-watched run on the digits.

Each chapter (:mod:`~gradsentry.lab.chapters.rnn`, :mod:`~gradsentry.lab.chapters.cnn`,
:mod:`~gradsentry.lab.chapters.attention`) builds its models and calls :func:`train` once per
variant; the result is plain JSON-serialisable data stored under ``results.json["chapters"]``.
A run whose loss or global gradient norm turns NaN/inf is stopped at that step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from gradsentry.report.html import FigureView


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``x`` classified as ``y`` (eval mode, no gradient); 0 when the logits are not finite."""
    model.eval()
    with torch.no_grad():
        logits = model(x)
    model.train()
    if not bool(torch.isfinite(logits).all()):
        return 0.0
    return float((logits.argmax(dim=1) == y).float().mean())


def train(
    model: nn.Module,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    *,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    batch_size: int,
    seed: int,
    remedy: Any = None,
    log_every: int = 4,
    after_backward: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train ``model`` with cross-entropy under a :class:`gradsentry.Monitor`.

    Args:
        after_backward: called as ``after_backward(step)`` after each ``backward()``, before the
            Monitor's step (and so before any remedy), e.g. to read per-time-step hooks.

    Returns:
        ``{"loss": [float] per step, "global_norm": [float] per step (before any fix), "steps_run",
        "total_steps", "first_nonfinite_step" (int | None), "test_accuracy", "train_accuracy",
        "findings": [Finding.to_dict()], "finding_kinds": [str], "time_s"}``.
    """
    from gradsentry.monitor import Monitor

    t0 = time.perf_counter()
    n = int(x_train.shape[0])
    total = epochs * math.ceil(n / batch_size)
    gen = torch.Generator().manual_seed(seed)
    mon = Monitor(model, every=1, optimizer=optimizer, remedy=remedy)
    params = [p for p in model.parameters() if p.requires_grad]
    losses: list[float] = []
    norms: list[float] = []
    step = 0
    bad: int | None = None
    try:
        for _epoch in range(epochs):
            perm = torch.randperm(n, generator=gen)
            for start in range(0, n, batch_size):
                idx = perm[start : start + batch_size]
                if step == 16:
                    mon.every = log_every
                loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grads = [p.grad for p in params if p.grad is not None]
                gn = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))
                lo = float(loss.detach())
                losses.append(lo)
                norms.append(gn)
                if after_backward is not None:
                    after_backward(step)
                mon.step(loss=loss)
                step += 1
                if not (math.isfinite(gn) and math.isfinite(lo)):
                    bad = step - 1
                    break
                optimizer.step()
            if bad is not None:
                break
    finally:
        mon.close()
    findings = mon.diagnose()
    return {
        "loss": losses,
        "global_norm": norms,
        "steps_run": step,
        "total_steps": total,
        "first_nonfinite_step": bad,
        "test_accuracy": accuracy(model, x_test, y_test),
        "train_accuracy": accuracy(model, x_train, y_train),
        "findings": [f.to_dict() for f in findings],
        "finding_kinds": list(dict.fromkeys(f.kind for f in findings)),
        "time_s": time.perf_counter() - t0,
    }


def block_grad_norms(model: nn.Module, prefixes: list[str]) -> list[float]:
    """L2 norm of the gradients of the parameters whose name starts with each prefix (by name, so
    that submodules not called as modules, e.g. ``nn.MultiheadAttention.out_proj``, are counted)."""
    out = []
    for prefix in prefixes:
        sq = 0.0
        for name, p in model.named_parameters():
            if (name == prefix or name.startswith(prefix + ".")) and p.grad is not None:
                sq += float(p.grad.detach().float().pow(2).sum())
        out.append(math.sqrt(sq))
    return out


def results_text(runs: dict[str, Any]) -> str:
    """The report's sentence on every run's test accuracy and Monitor findings (each run a ``train`` result
    with its ``title``)."""
    return (
        "Test accuracy: "
        + "; ".join(f"{r['title']}: {100 * r['test_accuracy']:.1f}%" for r in runs.values())
        + ". Findings: "
        + "; ".join(f"{r['title']}: {', '.join(r['finding_kinds']) or 'none'}" for r in runs.values())
        + "."
    )


def loss_figure(runs: dict[str, Any], fig_id: str, title: str, caption: str) -> FigureView:
    """The report's figure of every run's training loss per step (cross-entropy, linear scale), embedded."""
    from gradsentry.report import plots
    from gradsentry.report.html import embed_svg

    return embed_svg(
        plots.lines_figure(
            [("training loss", {r["title"]: r["loss"] for r in runs.values()})],
            xlabel="step",
            ylabel="cross-entropy (nats)",
            logy=False,
        ),
        fig_id,
        title,
        caption,
    )
