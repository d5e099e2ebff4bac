"""Shared training loop of the lab's chapters beyond MLPs: a Monitor-watched run on the digits.

Each chapter (:mod:`~gradsentry.lab.chapters.rnn`, :mod:`~gradsentry.lab.chapters.cnn`,
:mod:`~gradsentry.lab.chapters.attention`) builds its models and calls :func:`train` once per
variant; the result is plain JSON-serialisable data stored under ``results.json["chapters"]``, its
gradient numbers read from the Monitor's records (:mod:`gradsentry.lab.recording`). A run whose loss
(any step) or global gradient norm (a logged step) turns NaN/inf is stopped at that step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gradsentry.lab.recording import LabRecorder, Schedule, watch

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
    meta: dict[str, Any] | None = None,
    jsonl_path: Path | None = None,
    after_backward: Callable[[int], None] | None = None,
) -> tuple[dict[str, Any], LabRecorder]:
    """Train ``model`` with cross-entropy under a :class:`gradsentry.Monitor`.

    The Monitor logs every ``log_every``-th step, each of the first 16 and the last one
    (:class:`~gradsentry.lab.recording.Schedule`, written in the header's ``meta["schedule"]``); its
    records (the returned recorder's) give every gradient number the chapter shows.

    Args:
        log_every: the Monitor's ``every`` (1 for a run whose global norm is shown step by step).
        meta: metadata for the run header (the schedule is added).
        jsonl_path: the run's JSONL record file, or None.
        after_backward: called as ``after_backward(step)`` after each ``backward()``, before the
            Monitor's step (and so before any remedy), e.g. to read per-time-step hooks.

    Returns:
        ``(result, recorder)``: ``result`` is ``{"loss": [float] per step, "global_norm": [float] per
        logged step (before any fix), "logged_steps", "schedule", "steps_run", "total_steps",
        "first_nonfinite_step" (int | None: the first step with a NaN/inf loss, or gradient at a logged
        step; the run stops there), "test_accuracy", "train_accuracy", "findings": [Finding.to_dict()],
        "finding_kinds": [str], "time_s"}``; ``recorder.records`` holds the Monitor's records.
    """
    t0 = time.perf_counter()
    n = int(x_train.shape[0])
    total = epochs * math.ceil(n / batch_size)
    gen = torch.Generator().manual_seed(seed)
    schedule = Schedule(every=log_every, total=total)
    mon, recorder = watch(
        model, schedule, optimizer=optimizer, remedy=remedy, meta=meta, jsonl_path=jsonl_path
    )
    losses: list[float] = []
    step = 0
    bad: int | None = None
    try:
        for _epoch in range(epochs):
            perm = torch.randperm(n, generator=gen)
            for start in range(0, n, batch_size):
                idx = perm[start : start + batch_size]
                loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                lo = float(loss.detach())
                losses.append(lo)
                if after_backward is not None:
                    after_backward(step)
                rec = mon.step(loss=loss)
                step += 1
                if not math.isfinite(lo) or (rec is not None and not rec.finite):
                    bad = step - 1
                    break
                optimizer.step()
            if bad is not None:
                break
    finally:
        mon.close()
    findings = mon.diagnose()
    records = recorder.records
    result = {
        "loss": losses,
        "global_norm": [r.global_norm for r in records],
        "logged_steps": [r.step for r in records],
        "schedule": schedule.meta(),
        "steps_run": step,
        "total_steps": total,
        "first_nonfinite_step": bad,
        "test_accuracy": accuracy(model, x_test, y_test),
        "train_accuracy": accuracy(model, x_train, y_train),
        "findings": [f.to_dict() for f in findings],
        "finding_kinds": list(dict.fromkeys(f.kind for f in findings)),
        "time_s": time.perf_counter() - t0,
    }
    return result, recorder


def run_file(runs_dir: Path | None, chapter: str, variant: str) -> tuple[Path | None, str | None]:
    """A chapter run's JSONL file ``runs_dir/<chapter>/<variant>.jsonl`` and its name relative to the
    lab's output folder (``runs/<chapter>/<variant>.jsonl``); ``(None, None)`` without ``runs_dir``."""
    if runs_dir is None:
        return None, None
    return runs_dir / chapter / f"{variant}.jsonl", f"runs/{chapter}/{variant}.jsonl"


def run_meta(chapter: str, variant: str, title: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The run header's metadata of a chapter run."""
    return {
        "source": "gradsentry lab",
        "chapter": chapter,
        "variant": variant,
        "title": title,
        "settings": settings,
    }


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
