"""Holdout check of gradsentry's verdicts: new real trainings, not in the corpus, judged on every path.

Each run is a short real training on this machine's CPU (scikit-learn's bundled digits, a synthetic
regression, or tokens of a fixed bigram chain for a tiny GPT-2 built from a ``transformers`` config),
recorded live by ``gradsentry.Monitor`` + ``JsonlSink`` and written again, from the loop's own numbers
(loss, pre-clip global norm from ``clip_grad_norm_``, learning rate), in four other formats the readers
accept:

- ``tb``: a TensorBoard event file from ``torch.utils.tensorboard.SummaryWriter`` with the HF
  ``TensorBoardCallback`` tags ``train/loss``, ``train/grad_norm``, ``train/learning_rate`` (step i+1);
- ``csv``: a Lightning ``CSVLogger`` ``metrics.csv`` (``train_loss``, ``grad_2.0_norm_total``, ``lr-<Opt>``
  rows of their own, 0-based ``step``);
- ``hf_state``: an HF ``trainer_state.json`` whose ``log_history`` entries carry ``loss``, ``grad_norm``,
  ``learning_rate``, ``epoch``, ``step`` (i+1); a non-finite loss is written as 0.0, as the Trainer's
  default ``logging_nan_inf_filter`` does with ``logging_steps=1``;
- ``titan``: TorchTitan step lines (``step: 12  loss:  2.30258  grad_norm:  0.1234``, 1-based, the
  precision TorchTitan prints).

Paths compared: ``monitor`` (the live ``Monitor.diagnose()``), ``jsonl`` (``analyze_log`` of the JSONL),
``monitor_w40`` and ``jsonl_w40`` (the same run trained again, its Monitor keeping only its last 40
records, ``max_records=40``: live, and its JSONL read back), and ``analyze_log`` of each other format.
A path's exit is 0 when no finding is a warning or error, 1 otherwise, 2 when the log could not be read.

Labels are decided from the logged traces alone, before and independently of gradsentry, by the rules of
``benchmarks/verdicts/README.md`` ("Label rules"), implemented in :func:`label` below:

- healthy: finite, every norm > 0, median loss of the last 10 % of points < 0.8x that of the first 10 %,
  no point above both 4x the median of the 10 before and 2.5x the point before;
- exploding: the README's early / late / transient-spike / geometric-growth rules (onset from the cause);
- nonfinite: a NaN/inf logged (first one); zero_grad_norm: every norm exactly 0;
- vanishing: loss within 10 % of chance over the last 10 % and first vs last 10 % within 5 % of chance.

Two runs are *layer-only*: their series is healthy (so every log path must say healthy), and only the
Monitor, which measures layers, can see the problem: ``dead_units`` (75 % of the first ReLU layer never
fires on any of the 1,797 digits, measured here by a forward pass) and per-layer ``vanishing`` (the
first/last Linear gradient RMS ratio at init below 1e-3, measured here by one backward pass) while Adam
still trains the net. A run whose trace does not satisfy the rule of its intended kind is ``unlabelled``:
it is reported for cross-path agreement only, never scored.

Usage::

    PYTHONPATH=src python benchmarks/verdicts/holdout.py [--only NAME,...] [--keep DIR] [--verbose]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import math
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # benchmarks/verdicts.py: the aliases and severities it scores with
from verdicts import KIND_ALIASES, PROBLEM_SEVERITIES  # noqa: E402

LOG_PATHS = ("tb", "csv", "hf_state", "titan")
BOUNDED = 40
"""``max_records`` of the second, bounded Monitor (paths ``monitor_w40``, ``jsonl_w40``): the same run
trained again with the same seeds, its Monitor keeping only its last 40 records in full."""
PATHS = ("monitor", "jsonl", "monitor_w40", "jsonl_w40", *LOG_PATHS)
CHANCE = {"digits": math.log(10), "tokens": math.log(64), "noisy": math.log(10)}


@dataclass
class Run:
    """One holdout training. ``onset`` is the 0-based optimizer-step index where the cause shows."""

    name: str
    intent: str  # healthy exploding nonfinite vanishing zero_grad_norm dead_units layer_vanishing
    cause: str
    model: str
    task: str = "digits"  # digits noisy mse saxe tokens
    opt: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.0
    steps: int = 200
    bs: int = 32
    clip: float | None = None
    sched: Callable[[int], float] = field(default=lambda i: 1.0)
    pattern: str = ""  # exploding: early late transient growth
    onset: int = 1
    scale_at: tuple[int, float] | None = None
    poison_at: tuple[int, float] | None = None
    amp_scale: float | None = None  # fp16 autocast with a GradScaler of this initial scale
    pretrain: int = 0
    every: int = 1
    activations: bool = False
    seed: int = 0
    kw: dict[str, Any] = field(default_factory=dict)


def warm_cos(warm: int, n: int) -> Callable[[int], float]:
    return lambda i: (i + 1) / warm if i < warm else 0.5 * (1 + math.cos(math.pi * (i - warm) / (n - warm)))


def runs() -> list[Run]:
    R = Run
    jump = lambda k, f: lambda i: f if i >= k else 1.0  # noqa: E731
    return [
        # healthy controls
        R(
            "ok_warmup_gelu",
            "healthy",
            "AdamW, warm-up 40 then cosine, GELU MLP 128",
            "mlp",
            opt="adamw",
            lr=3e-3,
            sched=warm_cos(40, 200),
            kw={"h": 128, "act": "gelu"},
        ),
        R(
            "ok_stepdecay_cnn",
            "healthy",
            "SGD momentum 0.9, lr 0.05 x0.1 at step 150",
            "cnn",
            opt="sgd",
            lr=0.05,
            momentum=0.9,
            steps=250,
            sched=lambda i: 0.1 if i >= 150 else 1.0,
        ),
        R(
            "ok_noisy_bs8",
            "healthy",
            "SGD lr 0.05, batch 8 (noisy)",
            "mlp",
            opt="sgd",
            lr=0.05,
            bs=8,
            steps=300,
            seed=3,
        ),
        R(
            "ok_plateau_drop",
            "healthy",
            "deep linear net from small init (Saxe et al. 2014): plateau, then a drop",
            "deep_linear",
            task="saxe",
            opt="sgd",
            lr=0.03,
            steps=300,
            bs=64,
        ),
        R(
            "ok_finetune_noisy",
            "healthy",
            "fine-tune a pretrained MLP on noisy digits, SGD lr 3e-3",
            "mlp",
            task="noisy",
            opt="sgd",
            lr=3e-3,
            momentum=0.9,
            pretrain=400,
        ),
        R(
            "ok_finetune_small",
            "healthy",
            "fine-tune a pretrained MLP on the digits it knows, SGD lr 3e-3 (loss 0.05, small gradients)",
            "mlp",
            opt="sgd",
            lr=3e-3,
            momentum=0.9,
            pretrain=400,
        ),
        R(
            "ok_tiny_units",
            "healthy",
            "MSE on targets 1e-3 x one-hot (loss 1e-2 -> 3e-4, norm 1 -> 1e-2)",
            "mlp",
            task="tiny",
        ),
        R(
            "ok_converge_lstsq",
            "healthy",
            "least squares to an exact fit: linear 16->16, full-batch GD at 0.06x the stability limit "
            "(norm 8.7 -> 3e-6: TorchTitan prints 0.0000)",
            "linear16",
            task="saxe",
            opt="sgd",
            steps=200,
            bs=2048,
            kw={"over": 0.06},
        ),
        R(
            "ok_gru_cosine",
            "healthy",
            "row GRU, Adam, cosine",
            "gru",
            lr=5e-3,
            sched=lambda i: 0.5 * (1 + math.cos(math.pi * i / 200)),
        ),
        R(
            "ok_every2_long",
            "healthy",
            "MLP, SGD momentum, 400 steps logged every 2",
            "mlp",
            opt="sgd",
            lr=0.02,
            momentum=0.9,
            steps=400,
            every=2,
            seed=5,
        ),
        R(
            "ok_gpt2_warmup",
            "healthy",
            "tiny GPT-2, AdamW, warm-up 30 then cosine",
            "gpt2",
            task="tokens",
            opt="adamw",
            lr=3e-3,
            steps=150,
            bs=16,
            sched=warm_cos(30, 150),
        ),
        R(
            "ok_fp16_amp",
            "healthy",
            "fp16 autocast + GradScaler (init 2**10), MLP, Adam",
            "mlp",
            amp_scale=2.0**10,
        ),
        # a family: the same noisy fine-tune (batch 8) on ten seeds, each labelled on its own trace
        *(
            R(
                f"ok_finetune_bs8_s{seed}",
                "healthy",
                "fine-tune a pretrained MLP on noisy digits at batch 8, SGD lr 3e-3 (batch losses 0.2-2.6)",
                "mlp",
                task="noisy",
                opt="sgd",
                lr=3e-3,
                momentum=0.9,
                bs=8,
                pretrain=400,
                seed=seed,
            )
            for seed in range(10)
        ),
        # layer-only problems: the series is healthy
        R(
            "dead_units_partial",
            "dead_units",
            "75 % of the first ReLU layer dead (bias -8), rest learns",
            "dead_partial",
            activations=True,
        ),
        R(
            "layer_vanish_adam",
            "layer_vanishing",
            "6-layer sigmoid MLP, default init, Adam lr 1e-2 (trains)",
            "deep",
            kw={"depth": 6, "w": 32, "act": "sigmoid"},
            lr=1e-2,
        ),
        # problem runs
        R(
            "lr_high_adam_cnn",
            "exploding",
            "LR far too high: Adam lr 0.5 (CNN)",
            "cnn",
            lr=0.5,
            pattern="early",
        ),
        R(
            "lr_high_sgd_clip",
            "exploding",
            "LR far too high: SGD lr 10, clip 1.0 (GELU MLP)",
            "mlp",
            opt="sgd",
            lr=10.0,
            clip=1.0,
            pattern="early",
            kw={"act": "gelu"},
        ),
        R(
            "lr_high_mse_nan",
            "nonfinite",
            "LR far too high: SGD lr 1 on MSE, no clip (ReLU MLP) -> NaN",
            "mlp",
            task="mse",
            opt="sgd",
            lr=1.0,
        ),
        R(
            "gpt2_lr_high",
            "exploding",
            "LR far too high: AdamW lr 2 (tiny GPT-2)",
            "gpt2",
            task="tokens",
            opt="adamw",
            lr=2.0,
            steps=100,
            bs=16,
            pattern="early",
        ),
        R(
            "slow_growth_mse",
            "exploding",
            "geometric growth: linear MSE, full-batch GD at 1.02x the stability limit",
            "linear",
            task="mse",
            opt="sgd",
            steps=300,
            bs=1797,
            pattern="growth",
            kw={"over": 1.02},
        ),
        R(
            "late_lr_jump_gru",
            "exploding",
            "late divergence: LR x300 from step 150 (GRU, Adam)",
            "gru",
            lr=3e-3,
            steps=250,
            sched=jump(150, 300.0),
            pattern="late",
            onset=151,
        ),
        R(
            "spike_gru_poison",
            "exploding",
            "transient spike: poisoned batch 120 (x30, labels shifted; GRU, Adam)",
            "gru",
            lr=5e-3,
            steps=300,
            poison_at=(120, 30.0),
            pattern="transient",
            onset=120,
        ),
        R(
            "poison_cnn_x10",
            "exploding",
            "late divergence: poisoned batch 120 (x10, labels shifted; CNN, SGD momentum), no recovery",
            "cnn",
            opt="sgd",
            lr=0.03,
            momentum=0.9,
            steps=400,
            poison_at=(120, 10.0),
            pattern="late",
            onset=120,
        ),
        R(
            "spike_cnn_partial",
            "exploding",
            "poisoned batch 120 (x30; CNN, SGD momentum): the loss "
            "recovers only partly (no README rule fits: unlabelled)",
            "cnn",
            opt="sgd",
            lr=0.03,
            momentum=0.9,
            steps=400,
            poison_at=(120, 30.0),
            pattern="transient",
            onset=120,
        ),
        R(
            "spike_cnn_benign",
            "exploding",
            "batch 120 inputs x30 on a trained CNN: the model grows more "
            "confident, loss ~0 (no spike: unlabelled)",
            "cnn",
            opt="sgd",
            lr=0.03,
            momentum=0.9,
            steps=250,
            scale_at=(120, 30.0),
            pattern="transient",
            onset=120,
        ),
        R(
            "spike_poison_adam",
            "exploding",
            "transient spike: poisoned batch 150 (x1e3, labels shifted; MLP, Adam)",
            "mlp",
            steps=300,
            poison_at=(150, 1e3),
            pattern="transient",
            onset=150,
        ),
        R(
            "vanish_deep_tanh",
            "vanishing",
            "30-layer tanh, N(0, 0.25/fan_in) init, SGD lr 0.05",
            "deep",
            opt="sgd",
            lr=0.05,
            kw={"depth": 30, "w": 32, "act": "tanh", "std": 0.5},
        ),
        R(
            "vanish_sigmoid_15",
            "vanishing",
            "15-layer sigmoid MLP, default init, SGD lr 0.1",
            "deep",
            opt="sgd",
            lr=0.1,
            kw={"depth": 15, "w": 48, "act": "sigmoid"},
        ),
        R(
            "dead_relu_cnn",
            "zero_grad_norm",
            "every ReLU dead: conv biases -1000, head without bias",
            "dead_cnn",
            opt="sgd",
            lr=0.1,
            steps=100,
        ),
        R(
            "fp16_overflow",
            "nonfinite",
            "fp16 autocast + GradScaler(init 1): linear MSE at 1.2x the "
            "stability limit grows until fp16 overflows",
            "linear",
            task="mse",
            opt="sgd",
            steps=300,
            bs=256,
            amp_scale=1.0,
            kw={"over": 1.2},
        ),
        R(
            "fp16_scale_calibration",
            "nonfinite",
            "fp16 GradScaler init 2**40: first steps overflow and are skipped, then it trains",
            "mlp",
            amp_scale=2.0**40,
        ),
    ]


# ----------------------------------------------------------------------------- data and models


def data(run: Run) -> tuple[Any, Any]:
    import torch
    from sklearn.datasets import load_digits

    if run.task == "tokens":
        sys.path.insert(0, str(HERE))
        from make_corpus import bigram_tokens

        x = bigram_tokens(2048, 5, 11 + run.seed)  # a bigram table the corpus does not use
        return x, x
    if run.task == "saxe":  # whitened inputs, a rank-4 teacher with singular values 3, 2, 1, 0.5
        g = torch.Generator().manual_seed(7)
        x = torch.randn(2048, 16, generator=g)
        u, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
        v, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
        s = torch.zeros(16)
        s[:4] = torch.tensor([3.0, 2.0, 1.0, 0.5])
        return x, x @ (u @ torch.diag(s) @ v.T).T
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    if run.task == "noisy":
        x = x + 0.35 * torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    return x, y


def model(run: Run) -> Any:
    import torch
    from torch import nn

    torch.manual_seed(run.seed)
    k = run.kw
    acts = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
    if run.model == "mlp":
        h, a = k.get("h", 64), acts[k.get("act", "relu")]
        return nn.Sequential(nn.Linear(64, h), a(), nn.Linear(h, h), a(), nn.Linear(h, 10))
    if run.model == "deep":
        w, a = k["w"], acts[k["act"]]
        layers: list[nn.Module] = [nn.Linear(64, w), a()]
        for _ in range(k["depth"] - 1):
            layers += [nn.Linear(w, w), a()]
        net = nn.Sequential(*layers, nn.Linear(w, 10))
        if "std" in k:
            for m in net:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, 0.0, k["std"] / math.sqrt(m.in_features))
                    nn.init.zeros_(m.bias)
        return net
    if run.model == "deep_linear":
        net = nn.Sequential(*(nn.Linear(16, 16, bias=False) for _ in range(3)))
        for m in net:
            nn.init.normal_(m.weight, 0.0, 0.02)
        return net
    if run.model == "dead_partial":
        net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        with torch.no_grad():
            net[0].bias[:48] = -8.0  # |w.x| <= 8 * 0.125 = 1 for inputs in [0, 1]: never fires
        return net
    if run.model in ("cnn", "dead_cnn"):
        dead = run.model == "dead_cnn"
        net = nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 12, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(12, 12, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(192, 10, bias=not dead),
        )  # fmt: skip
        if dead:
            with torch.no_grad():
                net[1].bias.fill_(-1000.0)
                net[4].bias.fill_(-1000.0)
        return net
    if run.model == "gru":
        return RowGRU()
    if run.model == "linear":
        return nn.Linear(64, 10)
    if run.model == "linear16":
        return nn.Linear(16, 16)
    if run.model == "gpt2":
        import transformers
        from transformers import GPT2Config, GPT2LMHeadModel

        transformers.logging.set_verbosity_error()
        return GPT2LMHeadModel(
            GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0,
                       eos_token_id=0)
        )  # fmt: skip
    raise ValueError(run.model)


def RowGRU() -> Any:
    from torch import nn

    class _RowGRU(nn.Module):
        """The 8x8 digit read row by row by a GRU."""

        def __init__(self) -> None:
            super().__init__()
            self.gru = nn.GRU(8, 48, batch_first=True)
            self.head = nn.Linear(48, 10)

        def forward(self, x: Any) -> Any:
            out, _ = self.gru(x.view(-1, 8, 8))
            return self.head(out[:, -1])

    return _RowGRU()


def loss_fn(run: Run, net: Any, x: Any, y: Any) -> Any:
    import torch.nn.functional as F

    if run.model == "gpt2":
        return net(input_ids=x, labels=x).loss
    out = net(x)
    if run.task in ("mse", "saxe", "tiny"):
        target = {
            "mse": lambda: F.one_hot(y, 10).float(),
            "saxe": lambda: y,
            "tiny": lambda: 1e-3 * F.one_hot(y, 10).float(),
        }[run.task]()
        return ((out - target) ** 2).sum(1).mean()
    return F.cross_entropy(out, y)


def stability_lr(x: Any) -> float:
    """2 / lambda_max of the MSE loss sum_k mean_n (w_k.x_n + b_k - t)^2 over the data (with bias)."""
    import torch

    xa = torch.cat([x, torch.ones(len(x), 1)], 1).double()
    lam = float(torch.linalg.eigvalsh(2.0 * xa.T @ xa / len(x)).max())
    return 2.0 / lam


def do_pretrain(run: Run, net: Any) -> None:
    """Train on the clean digits first (Adam, 3e-3): the fine-tune starts from a good model."""
    import torch

    x, y = data(Run("pre", "", "", run.model))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(77)
    for _ in range(run.pretrain):
        idx = torch.randint(0, len(x), (64,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
        opt.step()


def train(
    run: Run, out: Path, max_records: int | None = None, name: str = "run.jsonl"
) -> tuple[list[tuple[int, float, float, float]], Any, str]:
    """Train ``run``; returns the logged points (index, loss, pre-clip norm, lr), the live Monitor's
    findings and the optimizer class name. The Monitor (``max_records``) writes ``out/name``."""
    import torch

    import gradsentry

    torch.manual_seed(run.seed)
    net = model(run)
    if run.pretrain:
        do_pretrain(run, net)
    x, y = data(run)
    lr = stability_lr(x) * run.kw["over"] if "over" in run.kw else run.lr
    opt_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[run.opt]
    opt = opt_cls(net.parameters(), lr=lr, **({"momentum": run.momentum} if run.opt == "sgd" else {}))
    scaler = torch.amp.GradScaler("cpu", init_scale=run.amp_scale) if run.amp_scale else None
    mon = gradsentry.Monitor(
        net, every=run.every, optimizer=opt, sinks=[gradsentry.JsonlSink(out / name)],
        activations=run.activations, max_abs=False, max_records=max_records,
    )  # fmt: skip
    g = torch.Generator().manual_seed(1000 + run.seed)
    perm = torch.randperm(len(x), generator=g)
    pos = 0
    pts = []
    for i in range(run.steps):
        if pos + run.bs > len(x):
            perm, pos = torch.randperm(len(x), generator=g), 0
        idx = perm[pos : pos + run.bs]
        pos += run.bs
        xb, yb = x[idx], y[idx]
        if run.scale_at and i == run.scale_at[0]:
            xb = xb * run.scale_at[1]
        if run.poison_at and i == run.poison_at[0]:
            xb, yb = xb * run.poison_at[1], (yb + 1) % 10
        for grp in opt.param_groups:
            grp["lr"] = lr * run.sched(i)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16, enabled=scaler is not None):
            loss = loss_fn(run, net, xb, yb)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        mon.step(loss=loss)
        gn = float(torch.nn.utils.clip_grad_norm_(net.parameters(), run.clip or math.inf))
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        if i % run.every == 0:
            pts.append((i, float(loss), gn, lr * run.sched(i)))
    live = mon.diagnose()
    mon.close()
    return pts, live, type(opt).__name__


# ----------------------------------------------------------------------------- the other formats


def write_formats(
    run: Run, pts: list[tuple[int, float, float, float]], out: Path, opt: str
) -> dict[str, Path]:
    """The same points as TensorBoard, Lightning CSV, HF trainer_state.json and TorchTitan lines."""
    from torch.utils.tensorboard import SummaryWriter

    paths = {"tb": out / "tb", "csv": out / "metrics.csv", "hf_state": out / "trainer_state.json",
             "titan": out / "train.log"}  # fmt: skip
    w = SummaryWriter(str(paths["tb"]))
    for i, lo, gn, lr in pts:
        w.add_scalar("train/loss", lo, i + 1)
        w.add_scalar("train/grad_norm", gn, i + 1)
        w.add_scalar("train/learning_rate", lr, i + 1)
    w.close()
    with paths["csv"].open("w", newline="", encoding="utf-8") as fh:
        cw = csv.writer(fh)
        cw.writerow(["epoch", "grad_2.0_norm_total", f"lr-{opt}", "step", "train_loss"])
        per_epoch = max(1, 1797 // run.bs)
        for i, lo, gn, lr in pts:
            cw.writerow(["", "", lr, i, ""])
            cw.writerow([i // per_epoch, gn, "", i, lo])
    hist = [
        {"epoch": round((i + 1) / max(1, 1797 // run.bs), 4), "grad_norm": gn, "learning_rate": lr,
         "loss": lo if math.isfinite(lo) else 0.0, "step": i + 1}
        for i, lo, gn, lr in pts
    ]  # fmt: skip
    state = {"global_step": run.steps, "max_steps": run.steps, "logging_steps": run.every,
             "log_history": hist, "train_batch_size": run.bs}  # fmt: skip
    paths["hf_state"].write_text(json.dumps(state, indent=2), encoding="utf-8")
    lines = ["[titan] 2024-06-10 06:13:20,101 - root - INFO - Training starts at step 1"]
    for i, lo, gn, _ in pts:
        lines.append(
            f"[titan] 2024-06-10 06:13:{21 + i // 60 % 30:02d},{(i * 37) % 1000:03d} - root - INFO - "
            f"step: {i + 1:2}  loss: {lo:8.5f}  grad_norm: {gn:7.4f}  memory:  0.02GiB(0.00%)  tps: 12,345"
        )
    paths["titan"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths


# ----------------------------------------------------------------------------- labels


def _jump_free(gn: np.ndarray) -> tuple[bool, float]:
    worst = 1.0
    for k in range(3, gn.size):
        ref = float(np.median(gn[max(0, k - 10) : k]))
        worst = max(worst, gn[k] / ref)
        if gn[k] >= 4 * ref and gn[k] >= 2.5 * gn[k - 1]:
            return False, gn[k] / ref
    return True, worst


def label(
    run: Run, pts: list[tuple[int, float, float, float]], extra: dict[str, float]
) -> tuple[str, int | None, str]:
    """``(kind, first bad point index, evidence)`` from the logged trace alone (README "Label rules");
    kind ``unlabelled`` when the trace does not satisfy the rule of the run's intended kind."""
    loss = np.array([p[1] for p in pts])
    gn = np.array([p[2] for p in pts])
    n = loss.size
    q = max(1, n // 10)
    fin = np.isfinite(loss) & np.isfinite(gn)
    chance = CHANCE.get(run.task, math.nan)
    start, end = float(np.median(loss[:q])), float(np.median(loss[-q:]))
    ev = f"{n} points; loss {start:.3g}->{end:.3g}; norm {gn[0]:.3g}->{float(np.median(gn[-q:])):.3g}"
    jump_free, worst = _jump_free(gn) if fin.all() else (False, math.nan)
    no = ("unlabelled", None)
    # in order: a NaN/inf, an all-zero norm, the exploding pattern the cause should give, a loss flat at
    # chance, a healthy series (README "Label rules")
    bad = np.flatnonzero(~fin)
    if bad.size:
        return "nonfinite", int(bad[0]), ev + f"; first NaN/inf at point {bad[0]}"
    if (gn == 0).all():
        return "zero_grad_norm", 0, ev + "; every norm exactly 0"
    if run.intent == "exploding":
        return _exploding(run, pts, loss, gn, chance, start, end, ev)
    if np.abs(loss[-q:] - chance).max() < 0.1 * chance and abs(start - end) < 0.05 * chance:
        return "vanishing", 0, ev + f"; loss flat at chance {chance:.3f}"
    if not ((gn > 0).all() and end < 0.8 * start and jump_free):
        return (*no, ev + f"; not healthy (largest norm / median of the 10 before x{worst:.2g})")
    ev += f"; largest norm / median of the 10 before x{worst:.2g}"
    if run.intent == "dead_units":
        ev += f"; dead fraction of the first ReLU layer {extra['dead']:.2f}"
        return ("dead_units", 0, ev) if extra["dead"] > 0.5 else (*no, ev)  # dead from the start
    if run.intent == "layer_vanishing":
        ev += f"; first/last layer grad RMS at init {extra['ratio']:.1e}"
        return ("layer_vanishing", 0, ev) if extra["ratio"] < 1e-3 else (*no, ev)  # at init
    return ("healthy", None, ev) if run.intent == "healthy" else (*no, ev)


def _exploding(
    run: Run,
    pts: list[Any],
    loss: np.ndarray,
    gn: np.ndarray,
    chance: float,
    start: float,
    end: float,
    ev: str,
) -> tuple[str, int | None, str]:
    no = ("unlabelled", None)
    if run.pattern == "growth":
        peak = int(np.argmax(gn))
        trough = int(np.argmin(gn[: peak + 1]))
        if peak - trough < 8:
            return (*no, ev + "; no growth segment")
        s, lg = np.arange(trough, peak + 1, dtype=float), np.log(gn[trough : peak + 1])
        slope, icpt = np.polyfit(s, lg, 1)
        r2 = 1 - (lg - slope * s - icpt).var() / lg.var()
        factor = gn[peak] / gn[trough]
        ev += f"; norm x{factor:.3g} from point {trough} to {peak}, r2 {r2:.2f}"
        return ("exploding", trough, ev) if factor > 100 and r2 > 0.9 else (*no, ev)
    idx = [p[0] for p in pts]
    k0 = int(np.searchsorted(idx, run.onset))
    ref_loss = float(np.median(loss[:k0][-10:])) if k0 else chance
    ref_gn = float(np.median(gn[:k0][-10:])) if k0 else None
    jump_loss = float(loss[k0:].max()) / ref_loss
    jump_gn = float(gn[k0:].max()) / ref_gn if ref_gn else math.nan
    abnormal = loss[k0] > 1.5 * ref_loss or (ref_gn is not None and gn[k0] > 3 * ref_gn)
    ev += f"; from point {k0}: loss x{jump_loss:.3g} over {ref_loss:.3g}, norm x{jump_gn:.3g}"
    if not ((jump_loss > 3 or jump_gn > 10) and abnormal):
        return (*no, ev)
    if run.pattern == "transient":
        hurt = float(loss[k0 : k0 + 3].max())
        ok = hurt > 1.5 * ref_loss and end < 1.25 * ref_loss
        ev += f"; transient: loss {hurt:.3g} at the spike, {end:.3g} at the end"
    else:
        ok = end > 1.5 * ref_loss or end > 0.95 * chance
        ev += f"; loss at the end {end:.3g}"
    return ("exploding", k0, ev) if ok else (*no, ev)


def layer_facts(run: Run) -> dict[str, float]:
    """Independent layer measurements for the layer-only labels (a fresh model, one pass)."""
    import torch

    if run.intent not in ("dead_units", "layer_vanishing"):
        return {}
    net = model(run)
    x, y = data(run)
    if run.intent == "dead_units":
        h = torch.relu(net[0](x))
        return {"dead": float((h.amax(0) == 0).float().mean())}
    torch.nn.functional.cross_entropy(net(x[:256]), y[:256]).backward()
    lin = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    rms = [float(m.weight.grad.pow(2).mean().sqrt()) for m in (lin[0], lin[-1])]
    return {"ratio": rms[0] / rms[1]}


# ----------------------------------------------------------------------------- verdicts and scores


@dataclass
class PathVerdict:
    path: str
    exit: int
    found: list[tuple[str, str, int | None]]  # (kind, severity, first step) of warning/error findings
    want_kind: str  # healthy, unlabelled, or the finding kind that must be named
    want_step: int | None
    tol: float
    error: str = ""

    @property
    def hit(self) -> bool:
        names = KIND_ALIASES.get(self.want_kind, frozenset({self.want_kind}))
        return self.exit == 1 and any(k in names for k, _, _ in self.found)

    @property
    def step_ok(self) -> bool:
        names = KIND_ALIASES.get(self.want_kind, frozenset({self.want_kind}))
        first = [s for k, _, s in self.found if k in names and s is not None]
        return bool(first) and self.want_step is not None and abs(min(first) - self.want_step) <= self.tol


def _problems(findings: Any) -> list[tuple[str, str, int | None]]:
    return [
        (f.kind, f.severity, f.steps[0] if f.steps else None)
        for f in findings
        if f.severity in PROBLEM_SEVERITIES
    ]


def judge(
    run: Run, kind: str, k0: int | None, pts: list[Any], live: dict[str, Any], files: dict[str, Path]
) -> list[PathVerdict]:
    """Every path's verdict on one run, with what it should have said."""
    from gradsentry.analyze import analyze_log

    idx = [p[0] for p in pts]
    gaps = sorted(np.diff(idx).tolist()) or [1]
    tol = max(2.0 * gaps[len(gaps) // 2], 0.1 * (idx[-1] - idx[0]))
    out = []
    for path in PATHS:
        layer_only = kind in ("dead_units", "layer_vanishing")
        want = kind
        if layer_only:
            want = "healthy" if path in LOG_PATHS else ("vanishing" if kind == "layer_vanishing" else kind)
        one_based = path in ("tb", "hf_state", "titan")
        step = None if k0 is None else idx[k0] + (1 if one_based else 0)
        v = PathVerdict(path, 2, [], want, step, tol)
        try:
            findings = live[path] if path in live else analyze_log(files[path]).findings
        except Exception as exc:  # unreadable: exit 2
            v.error = f"{type(exc).__name__}: {exc}"
            out.append(v)
            continue
        v.found = _problems(findings)
        v.exit = 1 if v.found else 0
        out.append(v)
    return out


def one(run: Run, root: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    out = root / run.name
    out.mkdir(parents=True, exist_ok=True)
    pts, live, opt = train(run, out)
    pts_w, live_w, _ = train(run, out, BOUNDED, "run_w40.jsonl")  # the same seeds: the same run
    same = np.array_equal(np.array([p[1:3] for p in pts_w]), np.array([p[1:3] for p in pts]), equal_nan=True)
    assert same, f"{run.name}: the second training is not the same run"
    files = {
        "jsonl": out / "run.jsonl",
        "jsonl_w40": out / "run_w40.jsonl",
        **write_formats(run, pts, out, opt),
    }
    kind, k0, ev = label(run, pts, layer_facts(run))  # decided from the trace, before any verdict
    verdicts = judge(run, kind, k0, pts, {"monitor": live, "monitor_w40": live_w}, files)
    return {"run": run, "kind": kind, "k0": k0, "evidence": ev, "verdicts": verdicts,
            "seconds": time.perf_counter() - t0}  # fmt: skip


def disagreements(res: dict[str, Any]) -> set[str]:
    """Paths whose exit differs from the JSONL's (the Monitor's record of the same run); for layer-only
    runs, log paths are compared with each other (they cannot see layers) and must agree. ``jsonl`` and
    ``jsonl_w40`` disagree when their findings differ from their live Monitor's in any way."""
    by = {v.path: v for v in res["verdicts"]}
    out = set()
    for live, read in (("monitor", "jsonl"), ("monitor_w40", "jsonl_w40")):
        if by[live].found != by[read].found:
            out.add(read)
    ref = by["jsonl"].exit
    if by["monitor_w40"].exit != ref:
        out.add("monitor_w40")
    if res["kind"] in ("dead_units", "layer_vanishing"):
        ref = max((by[p].exit for p in LOG_PATHS), key=[by[p].exit for p in LOG_PATHS].count)
    for p in LOG_PATHS:
        if by[p].exit != ref:
            out.add(p)
    return out


def table(results: list[dict[str, Any]]) -> str:
    rows = [["path", "runs", "read", "recall (kind)", "first step OK", "false alarms", "disagreements"]]
    for path in PATHS:
        vs = [(r, next(v for v in r["verdicts"] if v.path == path)) for r in results]
        lab = [(r, v) for r, v in vs if v.want_kind != "unlabelled"]
        prob = [v for _, v in lab if v.want_kind != "healthy"]
        ok = [v for _, v in lab if v.want_kind == "healthy"]
        hits = [v for v in prob if v.hit]
        rows.append([
            path, str(len(vs)), f"{sum(v.exit != 2 for _, v in vs)}/{len(vs)}",
            f"{len(hits)}/{len(prob)}", f"{sum(v.step_ok for v in hits)}/{len(hits)}",
            f"{sum(v.exit == 1 for v in ok)}/{len(ok)}",
            f"{sum(path in disagreements(r) for r in results)}/{len(results)}",
        ])  # fmt: skip
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def fmt(r: list[str]) -> str:
        cells = (c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r))
        return "| " + " | ".join(cells) + " |"

    sep = "| " + " | ".join("-" * w[0] if i == 0 else "-" * (w[i] - 1) + ":" for i in range(len(w))) + " |"
    return "\n".join([fmt(rows[0]), sep, *(fmt(r) for r in rows[1:])])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="gradsentry's verdicts on new real trainings, every path")
    ap.add_argument("--only", help="comma-separated run names or prefixes")
    ap.add_argument("--keep", type=Path, help="write the runs' logs here (default: a temporary folder)")
    ap.add_argument("--verbose", "-v", action="store_true")
    a = ap.parse_args(argv)
    todo = runs()
    if a.only:
        todo = [r for r in todo if any(r.name.startswith(p) for p in a.only.split(","))]
    logging.getLogger("gradsentry").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    results = []
    with contextlib.ExitStack() as stack:
        root = a.keep or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        for run in todo:
            results.append(one(run, root))
    for r in results:
        bad = disagreements(r)
        print(
            f"{r['run'].name:24s} label {r['kind']}@{r['k0'] if r['k0'] is not None else '-'} ({r['seconds']:.1f} s)"
        )
        if a.verbose:
            print(f"    {r['run'].cause}\n    evidence: {r['evidence']}")
        for v in r["verdicts"]:
            if v.want_kind == "unlabelled":
                mark = "-"
            elif v.want_kind == "healthy":
                mark = "ok" if v.exit == 0 else "FALSE ALARM"
            else:
                mark = ("hit" if v.step_ok else "hit, step off") if v.hit else "MISS"
            if v.path in bad:
                mark += ", DISAGREES"
            got = (
                v.error[:100]
                if v.exit == 2
                else (", ".join(f"{k}/{s}@{st}" for k, s, st in v.found) or "healthy")
            )
            print(
                f"    {v.path:8s} want {v.want_kind}@{v.want_step if v.want_step is not None else '-'}: {got}  [{mark}]"
            )
    n_lab = sum(r["kind"] != "unlabelled" for r in results)
    print(f"\n{len(results)} runs ({n_lab} labelled) in {time.perf_counter() - t0:.0f} s\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
