"""Remake the labeled corpus of ``benchmarks/verdicts``: real short trainings, fixed seeds.

Every run in ``runs/`` is a real training on this machine's CPU (scikit-learn's bundled digits, or
tokens of a fixed random bigram chain for a tiny GPT-2 built from a ``transformers`` config), with
one cause injected (or none, for the healthy controls), written in the format a user would paste:

- ``hf_state``: a ``transformers.Trainer`` run's ``trainer_state.json`` (``trainer.state.save_to_json``);
- ``hf_console``: what that Trainer printed (its ``PrinterCallback``/``ProgressCallback`` dict lines,
  captured from stdout/stderr; some runs print in the 4.x style, raw floats instead of quoted strings);
- ``lightning_csv`` / ``tensorboard`` / ``lightning_dir``: a ``lightning.Trainer`` run with
  ``CSVLogger``, ``TensorBoardLogger`` or both in one version folder, logging the loss and the
  global gradient norm (``grad_2.0_norm_total`` from ``lightning.pytorch.utilities.grad_norm``, or
  ``gradsentry/global_norm`` from gradsentry's callback);
- ``jsonl``: a plain loop with ``gradsentry.Monitor`` + ``JsonlSink``;
- ``mmengine_text``: mmengine ``LogProcessor`` text lines (10-iteration window means, as mmengine logs);
- ``steplines``: TorchTitan, nanoGPT and llm.c style step lines.

Losses, gradient norms and learning rates are the run's real numbers; the timing, memory and
throughput fields of the text formats are deterministic placeholders. Labels (``labels.tsv``) are
checked against each run's logged numbers by :func:`verify` (see README.md for the rules); a run
whose numbers do not show its labelled pathology stops the script.

Usage (from the repository root)::

    PYTHONPATH=src python benchmarks/verdicts/make_corpus.py            # everything, 2 processes
    PYTHONPATH=src python benchmarks/verdicts/make_corpus.py --only NAME --jobs 1
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import logging
import math
import multiprocessing as mp
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
RUNS = HERE / "runs"
LABELS = HERE / "labels.tsv"

V = 64  # GPT-2 vocabulary
T = 32  # GPT-2 context
CHANCE = {"digits": math.log(10), "tokens": math.log(V)}


# ----------------------------------------------------------------------------- run specification


@dataclass
class Spec:
    """One run: what is trained, how, the injected cause and the expected verdict.

    Step indices (``onset``, ``lr_jump``, ``scale_at``, ``nan_at``) are 0-based optimizer-step
    indices i: batch i is drawn, its loss and pre-clip gradient norm are measured, then update i is
    applied with learning rate lr_i. ``onset`` is the first index whose loss or norm shows the problem.
    """

    name: str
    fmt: str  # hf_state hf_console lightning_csv tensorboard lightning_dir jsonl mmengine_text steplines
    kind: str  # healthy exploding nonfinite vanishing zero_grad_norm
    cause: str
    model: str = "mlp"  # mlp tanh_mlp deep_sigmoid dead_relu cnn lstm linear gpt2
    task: str = "digits"  # digits digits_mse tokens
    opt: str = "adam"  # adam adamw sgd
    lr: float = 1e-3
    momentum: float = 0.0
    steps: int = 200
    bs: int = 32
    clip: float | None = None
    sched: str = "constant"  # constant cosine warmup_linear warmup_cosine
    warmup: int = 0
    lr_jump: tuple[int, float] | None = None  # updates i >= k use lr * factor
    scale_at: tuple[int, float] | None = None  # batch k's inputs multiplied by factor
    poison_at: tuple[int, float] | None = None  # batch k: inputs multiplied by factor, labels shifted by 1
    nan_at: int | None = None  # batch k's inputs hold a NaN
    onset: int | None = None  # first index showing the problem (None: found from the data)
    log_every: int = 1
    seed: int = 0
    opts: dict[str, Any] = field(default_factory=dict)  # format-specific options


# ----------------------------------------------------------------------------- data and models


def set_threads() -> None:
    import torch

    torch.set_num_threads(1)
    with contextlib.suppress(RuntimeError):  # allowed once per process, before any parallel work
        torch.set_num_interop_threads(1)


def digits() -> tuple[Any, Any]:
    import torch
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target)


def bigram_tokens(n: int, table_seed: int, data_seed: int, k: int = 4) -> Any:
    """``n`` sequences of a bigram chain whose successor table (``k`` successors per token) is fixed
    by ``table_seed``: random tokens a model can learn (loss ln 64 -> about ln 4)."""
    import torch

    gt = torch.Generator().manual_seed(table_seed)
    succ = torch.randint(0, V, (V, k), generator=gt)
    g = torch.Generator().manual_seed(data_seed)
    x = torch.empty(n, T, dtype=torch.long)
    x[:, 0] = torch.randint(0, V, (n,), generator=g)
    for t in range(1, T):
        x[:, t] = succ[x[:, t - 1], torch.randint(0, k, (n,), generator=g)]
    return x


def make_model(spec: Spec) -> Any:
    import torch
    from torch import nn

    torch.manual_seed(spec.seed)
    if spec.model == "gpt2":
        import transformers
        from transformers import GPT2Config, GPT2LMHeadModel

        transformers.logging.set_verbosity_error()

        cfg = GPT2Config(
            n_layer=spec.opts.get("n_layer", 2),
            n_embd=32,
            n_head=2,
            vocab_size=V,
            n_positions=T,
            bos_token_id=0,
            eos_token_id=0,
        )
        return GPT2LMHeadModel(cfg)
    if spec.model in ("mlp", "tanh_mlp"):
        act = nn.Tanh if spec.model == "tanh_mlp" else nn.ReLU
        return nn.Sequential(nn.Linear(64, 64), act(), nn.Linear(64, 64), act(), nn.Linear(64, 10))
    if spec.model == "deep_sigmoid":  # 20 sigmoid layers, PyTorch's default init
        layers: list[nn.Module] = [nn.Linear(64, 32), nn.Sigmoid()]
        for _ in range(19):
            layers += [nn.Linear(32, 32), nn.Sigmoid()]
        return nn.Sequential(*layers, nn.Linear(32, 10))
    if spec.model == "dead_relu":  # a huge negative bias kills every unit; no bias after it
        first = nn.Linear(64, 64)
        with torch.no_grad():
            first.bias.fill_(-1000.0)
        return nn.Sequential(first, nn.ReLU(), nn.Linear(64, 10, bias=False))
    if spec.model == "cnn":
        return nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64, 10),
        )
    if spec.model == "lstm":
        return RowLSTM()
    if spec.model == "linear":
        return nn.Linear(64, 10)
    raise ValueError(spec.model)


def _row_lstm_cls() -> Any:
    from torch import nn

    class _RowLSTM(nn.Module):
        """The 8x8 digit read row by row (8 steps of 8 pixels) by an LSTM."""

        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(8, 32, batch_first=True)
            self.head = nn.Linear(32, 10)

        def forward(self, x: Any) -> Any:
            out, _ = self.lstm(x.view(-1, 8, 8))
            return self.head(out[:, -1])

    return _RowLSTM


def RowLSTM() -> Any:  # a class factory (torch imported lazily)
    return _row_lstm_cls()()


def lr_factor(spec: Spec, i: int) -> float:
    """Multiplier of the base learning rate for update ``i`` (0-based)."""
    f = 1.0
    n = spec.steps
    if spec.sched == "cosine":
        f = 0.5 * (1 + math.cos(math.pi * i / n))
    elif spec.sched == "warmup_linear":
        f = (i + 1) / spec.warmup if i < spec.warmup else max(0.0, (n - i) / (n - spec.warmup))
    elif spec.sched == "warmup_cosine":
        if i < spec.warmup:
            f = (i + 1) / spec.warmup
        else:
            f = 0.5 * (1 + math.cos(math.pi * (i - spec.warmup) / (n - spec.warmup)))
    if spec.lr_jump and i >= spec.lr_jump[0]:
        f *= spec.lr_jump[1]
    return f


def make_optimizer(spec: Spec, params: Any) -> Any:
    import torch

    if spec.opt == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum)
    if spec.opt == "adamw":
        return torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.01)
    return torch.optim.Adam(params, lr=spec.lr)


def inject(spec: Spec, i: int, x: Any) -> Any:
    """The batch's inputs as the cause wants them at index ``i`` (float inputs, or GPT-2 embeddings)."""
    if spec.scale_at and i == spec.scale_at[0]:
        x = x * spec.scale_at[1]
    if spec.nan_at is not None and i == spec.nan_at:
        x = x.clone()
        x[0, 0] = float("nan")
    return x


def loss_of(spec: Spec, model: Any, x: Any, y: Any, i: int) -> Any:
    """Forward one batch with the injection applied; returns the scalar loss."""
    import torch.nn.functional as F

    if spec.poison_at and i == spec.poison_at[0]:  # wrong labels on huge inputs: a huge, wrong gradient
        x, y = x * spec.poison_at[1], (y + 1) % 10

    if spec.model == "gpt2":
        emb = inject(spec, i, model.transformer.wte(x))
        return model(inputs_embeds=emb, labels=x).loss
    out = model(inject(spec, i, x))
    if spec.task == "digits_mse":
        return ((out - F.one_hot(y, 10).float()) ** 2).sum(1).mean()
    return F.cross_entropy(out, y)


def batches(spec: Spec, data: tuple[Any, Any] | None = None) -> Any:
    """Epoch-wise shuffled batches (drop_last) for ``spec.steps`` steps: yields (epoch, iter, n_iter, x, y)."""
    import torch

    if data is None:
        data = task_data(spec)
    X, Y = data
    g = torch.Generator().manual_seed(1000 + spec.seed)
    per_epoch = len(X) // spec.bs
    i = 0
    epoch = 0
    while True:
        perm = torch.randperm(len(X), generator=g)
        for j in range(per_epoch):
            if i == spec.steps:
                return
            idx = perm[j * spec.bs : (j + 1) * spec.bs]
            yield epoch, j, per_epoch, X[idx], Y[idx]
            i += 1
        epoch += 1


def task_data(spec: Spec) -> tuple[Any, Any]:
    if spec.task == "tokens":
        x = bigram_tokens(2048, spec.opts.get("table", 1), 7 + spec.seed)
        return x, x
    return digits()


# ----------------------------------------------------------------------------- a plain loop


def plain_train(spec: Spec, monitor_path: Path | None = None) -> list[dict[str, Any]]:
    """Train ``spec`` in a plain PyTorch loop; one dict per step: i, epoch, iter, n_iter, loss, gn, lr.

    With ``monitor_path`` a ``gradsentry.Monitor`` writes the run there (JsonlSink), reading the
    gradients after ``backward`` and before clipping.
    """
    import torch

    model = make_model(spec)
    if spec.opts.get("pretrain"):
        pretrain(spec, model)
    opt = make_optimizer(spec, model.parameters())
    mon = None
    if monitor_path is not None:
        import gradsentry

        mon = gradsentry.Monitor(
            model,
            every=spec.opts.get("every", 1),
            optimizer=opt,
            sinks=[gradsentry.JsonlSink(monitor_path)],
            activations=spec.opts.get("activations", False),
            max_abs=False,
        )
    out = []
    for i, (epoch, j, n_iter, x, y) in enumerate(batches(spec)):
        for g in opt.param_groups:
            g["lr"] = spec.lr * lr_factor(spec, i)
        opt.zero_grad()
        loss = loss_of(spec, model, x, y, i)
        loss.backward()
        if mon is not None:
            mon.step(loss=loss)
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), spec.clip or float("inf"))
        opt.step()
        out.append(
            {
                "i": i,
                "epoch": epoch,
                "iter": j,
                "n_iter": n_iter,
                "loss": loss.item(),
                "gn": gn.item(),
                "lr": opt.param_groups[0]["lr"],
            }
        )
    if mon is not None:
        mon.close()
    return out


def pretrain(spec: Spec, model: Any) -> None:
    """Train ``model`` on another task first (fine-tuning controls): GPT-2 on another bigram table,
    a digits model on permuted labels."""
    import torch

    pre = Spec(
        name="pre",
        fmt="",
        kind="",
        cause="",
        model=spec.model,
        task=spec.task,
        opt="adam",
        lr=3e-3,
        steps=spec.opts["pretrain"],
        bs=spec.bs,
        seed=spec.seed + 100,
        opts={"table": 99},
    )
    data = task_data(pre)
    if spec.task == "digits":
        perm = torch.tensor([3, 7, 0, 9, 1, 8, 2, 6, 4, 5])
        data = (data[0], perm[data[1]])
    opt = make_optimizer(pre, model.parameters())
    for i, (_, _, _, x, y) in enumerate(batches(pre, data)):
        opt.zero_grad()
        loss_of(pre, model, x, y, i).backward()
        opt.step()


# ----------------------------------------------------------------------------- Hugging Face


def hf_train(spec: Spec, run_dir: Path) -> list[tuple[int, float, float]]:
    """A real ``transformers.Trainer`` run: writes trainer_state.json or console.log (spec.fmt)."""
    import torch
    import transformers
    from torch import nn
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    transformers.logging.set_verbosity_error()
    data = task_data(spec)

    class Injected(nn.Module):
        """The model, with the cause applied to the n-th training forward (n = optimizer step index)."""

        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner
            self.calls = 0

        def forward(self, x: Any = None, labels: Any = None, input_ids: Any = None) -> dict[str, Any]:
            i = self.calls if self.training else -1
            if self.training:
                self.calls += 1
            if input_ids is not None:
                return {"loss": loss_of(spec, self.inner, input_ids, input_ids, i)}
            return {"loss": loss_of(spec, self.inner, x, labels, i)}

    class DS(torch.utils.data.Dataset):
        def __init__(self, x: Any, y: Any) -> None:
            self.x, self.y = x, y

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, k: int) -> dict[str, Any]:
            if spec.task == "tokens":  # labels too, so that evaluation reports eval_loss
                return {"input_ids": self.x[k], "labels": self.x[k]}
            return {"x": self.x[k], "labels": self.y[k]}

    inner = make_model(spec)
    if spec.opts.get("pretrain"):
        pretrain(spec, inner)
    model = Injected(inner)
    X, Y = data
    train_ds = DS(X, Y)
    eval_ds = DS(X[:256], Y[:256]) if spec.opts.get("eval_steps") else None
    sched_name = {
        "constant": "constant",
        "cosine": "cosine",
        "warmup_linear": "linear",
        "warmup_cosine": "cosine",
    }
    args = TrainingArguments(
        output_dir=str(run_dir / "_out"),
        max_steps=spec.steps,
        per_device_train_batch_size=spec.bs,
        learning_rate=float(spec.lr),
        max_grad_norm=float(spec.clip or 0.0),
        logging_steps=spec.log_every,
        report_to=[],
        save_strategy="no",
        optim={"adam": "adamw_torch", "adamw": "adamw_torch", "sgd": "sgd"}[spec.opt],
        weight_decay=0.01 if spec.opt == "adamw" else 0.0,
        lr_scheduler_type=sched_name[spec.sched],
        warmup_steps=spec.warmup,
        seed=spec.seed,
        data_seed=spec.seed,
        disable_tqdm=not spec.opts.get("tqdm", False),
        use_cpu=True,
        dataloader_num_workers=0,
        eval_strategy="steps" if eval_ds is not None else "no",
        eval_steps=spec.opts.get("eval_steps"),
        per_device_eval_batch_size=64,
    )
    optimizers: tuple[Any, Any] = (None, None)
    if spec.lr_jump or spec.momentum:  # an LR jump the Trainer's schedulers cannot express; SGD momentum
        opt = make_optimizer(spec, model.parameters())
        sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(spec, s))
        optimizers = (opt, sch)
        assert spec.sched == "constant"
    trainer = Trainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, optimizers=optimizers
    )
    if spec.opts.get("old_print"):  # transformers 4.x printed raw floats: print(logs)

        class OldPrinter(TrainerCallback):
            def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
                logs.pop("total_flos", None)
                print(logs)

        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(OldPrinter())
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    shutil.rmtree(run_dir / "_out", ignore_errors=True)
    hist = trainer.state.log_history
    if spec.fmt == "hf_state":
        trainer.state.save_to_json(str(run_dir / "trainer_state.json"))
        return [(h["step"], h["loss"], h.get("grad_norm", math.nan)) for h in hist if "loss" in h]
    text = buf.getvalue()
    (run_dir / "console.log").write_text(text, encoding="utf-8")
    train = [h for h in hist if "loss" in h]
    # console lines carry no step: logging_steps=1 makes a train line's 1-based ordinal its step
    assert spec.log_every == 1
    return [(k + 1, h["loss"], h.get("grad_norm", math.nan)) for k, h in enumerate(train)]


# ----------------------------------------------------------------------------- Lightning


def pl_train(spec: Spec, run_dir: Path) -> list[tuple[int, float, float]]:
    """A real ``lightning.Trainer`` run with CSVLogger and/or TensorBoardLogger."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from lightning.pytorch.utilities import grad_norm

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    data = task_data(spec)
    use_gs = spec.opts.get("norm_key") == "gradsentry"

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_model(spec)
            if spec.opts.get("pretrain"):
                pretrain(spec, self.net)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            loss = loss_of(spec, self.net, x, y, self.global_step)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.log("val_loss", loss_of(spec, self.net, x, y, -1))

        def on_before_optimizer_step(self, optimizer: Any) -> None:  # pre-clip, as Lightning's docs show
            if not use_gs:
                self.log("grad_2.0_norm_total", grad_norm(self, norm_type=2)["grad_2.0_norm_total"])

        def configure_optimizers(self) -> Any:
            opt = make_optimizer(spec, self.parameters())
            sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(spec, s))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sch, "interval": "step"}}

    loggers: list[Any] = []
    kinds = spec.opts.get("loggers", ("csv",))
    if "csv" in kinds:
        loggers.append(CSVLogger(str(run_dir), name="lightning_logs", version=0))
    if "tb" in kinds:
        loggers.append(
            TensorBoardLogger(str(run_dir), name="lightning_logs", version=0, default_hp_metric=False)
        )
    callbacks: list[Any] = [LearningRateMonitor(logging_interval="step")]
    if use_gs:
        from gradsentry.integrations.lightning import GradSentryCallback

        callbacks.append(GradSentryCallback(every=spec.log_every, log_stats=()))
    X, Y = data
    g = torch.Generator().manual_seed(1000 + spec.seed)
    dl = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(X, Y), batch_size=spec.bs, shuffle=True, drop_last=True, generator=g
    )
    val = spec.opts.get("val_every")
    vdl = (
        torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X[:256], Y[:256]), batch_size=128)
        if val
        else None
    )
    L.seed_everything(spec.seed, verbose=False)
    trainer = L.Trainer(
        max_steps=spec.steps,
        logger=loggers,
        callbacks=callbacks,
        log_every_n_steps=spec.log_every,
        val_check_interval=val,
        check_val_every_n_epoch=None if val else 1,
        num_sanity_val_steps=0,
        limit_val_batches=2 if val else 0,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        gradient_clip_val=spec.clip,
        deterministic=True,
    )
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        trainer.fit(Module(), dl, vdl)
    return read_lightning(run_dir / "lightning_logs" / "version_0", "tb" if "csv" not in kinds else "csv")


def read_lightning(vdir: Path, which: str) -> list[tuple[int, float, float]]:
    """(step, train_loss, global norm) as the Lightning run wrote them (CSV rows or TB scalars)."""
    cols: dict[str, dict[int, float]] = {}
    if which == "csv":
        with (vdir / "metrics.csv").open(encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                for k, v in row.items():
                    if k not in ("step", "epoch") and v not in ("", None):
                        cols.setdefault(k, {})[int(row["step"])] = float(v)
    else:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(vdir))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            cols[tag] = {e.step: e.value for e in acc.Scalars(tag)}
    norm_key = "grad_2.0_norm_total" if "grad_2.0_norm_total" in cols else "gradsentry/global_norm"
    loss, gn = cols["train_loss"], cols[norm_key]
    assert set(loss) == set(gn), f"{vdir}: loss and norm on different steps"
    return [(s, loss[s], gn[s]) for s in sorted(loss)]


# ----------------------------------------------------------------------------- text formats

BASE_TIME = 1_718_000_000  # 2024-06-10, for deterministic time stamps


def stamp(sec: float, fmt: str) -> str:
    return time.strftime(fmt, time.gmtime(BASE_TIME + sec))


def write_mmengine(spec: Spec, rows: list[dict[str, Any]], path: Path) -> list[tuple[int, float, float]]:
    """mmengine LogProcessor lines: loss, grad_norm, time, data_time as means over the last
    ``log_every`` iterations (mmengine's window mean), lr the current value. grad_norm is what
    ``OptimWrapper`` logs when ``clip_grad`` is configured (the pre-clip norm)."""
    by_epoch = spec.opts.get("by_epoch", True)
    date_fmt = spec.opts.get("date_fmt", "%Y/%m/%d %H:%M:%S")
    w = spec.log_every
    n = spec.steps
    n_iter = rows[0]["n_iter"]
    max_epochs = (n + n_iter - 1) // n_iter
    lines = [
        f"{stamp(0, date_fmt)} - mmengine - INFO - ",
        "------------------------------------------------------------",
        "System environment:",
        "    sys.platform: linux",
        "    CUDA available: False",
        "    PyTorch: 2.13.0+cpu",
        "------------------------------------------------------------",
        f"{stamp(1, date_fmt)} - mmengine - INFO - Checkpoints will be saved to /work/runs/{spec.name}.",
    ]
    truth = []
    for k in range(n):
        r = rows[k]
        # LoggerHook: every `interval` inner iterations and at the end of an epoch (by_epoch);
        # every `interval` iterations (iter-based). The window mean covers the last 10 iterations.
        if by_epoch:
            if (r["iter"] + 1) % w and r["iter"] + 1 != n_iter:
                continue
        elif (k + 1) % w:
            continue
        win = rows[max(0, k - 9) : k + 1]
        loss = float(np.mean([x["loss"] for x in win]))
        gn = float(np.mean([x["gn"] for x in win]))
        t = 0.05 + 0.001 * (k % 7)
        eta = int((n - k - 1) * t)
        eta_s = f"{eta // 3600}:{eta % 3600 // 60:02d}:{eta % 60:02d}"
        if by_epoch:
            ep = f"[{r['epoch'] + 1}]".rjust(len(str(max_epochs)) + 3)
            it = str(r["iter"] + 1).rjust(len(str(n_iter)))
            head = f"Epoch(train){ep}[{it}/{n_iter}]  "  # mmengine: no space, the epoch is right-aligned
        else:
            head = f"Iter(train) [{str(k + 1).rjust(len(str(n)))}/{n}]  "
        msg = (
            f"{head}lr: {r['lr']:.4e}  eta: {eta_s}  time: {t:.4f}  data_time: {0.0021 + 0.0001 * (k % 3):.4f}  "
            f"memory: {118 + k % 5}  loss: {loss:.4f}  grad_norm: {gn:.4f}"
        )
        lines.append(f"{stamp(2 + k * t, date_fmt)} - mmengine - INFO - {msg}")
        if by_epoch and r["iter"] + 1 == n_iter:
            lines.append(f"{stamp(2 + k * t, date_fmt)} - mmengine - INFO - Exp name: {spec.name}_{20240610}")
        truth.append((k + 1, loss, gn))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return truth


def write_steplines(spec: Spec, rows: list[dict[str, Any]], path: Path) -> list[tuple[int, float, float]]:
    """TorchTitan, nanoGPT (with a grad_norm field, as many forks print) or llm.c step lines."""
    style = spec.opts["style"]
    n = spec.steps
    w = spec.log_every
    lines: list[str] = []
    truth = []
    if style == "titan":
        lines += [
            f"[titan] {stamp(0, '%Y-%m-%d %H:%M:%S')},101 - root - INFO - Starting job: {spec.name}",
            f"[titan] {stamp(1, '%Y-%m-%d %H:%M:%S')},244 - root - INFO - Training starts at step 1",
        ]
    for k in range(n):
        r = rows[k]
        step = k + 1 if style in ("titan", "llmc") else k
        if step % w != 0 and not (style == "titan" and step == 1):
            continue
        loss, gn, lr = r["loss"], r["gn"], r["lr"]
        ms = 10.0 + 0.37 * (k % 5)
        if style == "titan":
            lines.append(
                f"[titan] {stamp(2 + k * 0.01, '%Y-%m-%d %H:%M:%S')},{(k * 37) % 1000:03d} - root - INFO - "
                f"step: {step:2}  loss: {loss:8.5f}  grad_norm: {gn:7.4f}  memory:  0.02GiB(0.00%)  "
                f"tps: {int(spec.bs * T / ms * 1000):,}  tflops: 0.00  mfu: 0.00%"
            )
        elif style == "nanogpt":
            if spec.opts.get("eval_every") and k % spec.opts["eval_every"] == 0:
                lines.append(f"step {k}: train loss {loss:.4f}, val loss {loss * 1.01:.4f}")
            lines.append(
                f"iter {k}: loss {loss:.4f}, grad_norm {gn:.4f}, time {ms:.2f}ms, mfu {0.01 * (k % 3):.2f}%"
            )
        else:  # llm.c train_gpt2.py
            lines.append(
                f"step {step:4d}/{n} | train loss {loss:.6f} | norm {gn:.4f} | lr {lr:.2e} | "
                f"({ms:.2f} ms | {int(spec.bs * T / ms * 1000)} tok/s)"
            )
        truth.append((step, loss, gn))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return truth


# ----------------------------------------------------------------------------- one run


def rel_path(spec: Spec) -> str:
    """Path of the run's log relative to runs/: what a user would pass to ``gradsentry analyze``."""
    return {
        "hf_state": f"{spec.name}/trainer_state.json",
        "hf_console": f"{spec.name}/console.log",
        "lightning_csv": f"{spec.name}/lightning_logs/version_0/metrics.csv",
        "tensorboard": f"{spec.name}/lightning_logs/version_0",
        "lightning_dir": f"{spec.name}/lightning_logs/version_0",
        "jsonl": f"{spec.name}/run.jsonl",
        "mmengine_text": f"{spec.name}/train.log",
        "steplines": f"{spec.name}/train.log",
    }[spec.fmt]


def make_run(spec: Spec) -> dict[str, Any]:
    """Train and write one run; returns its label row (verified against the logged numbers)."""
    set_threads()
    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    run_dir = RUNS / spec.name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    if spec.fmt in ("hf_state", "hf_console"):
        truth = hf_train(spec, run_dir)
    elif spec.fmt in ("lightning_csv", "tensorboard", "lightning_dir"):
        truth = pl_train(spec, run_dir)
        vdir = run_dir / "lightning_logs" / "version_0"
        for extra in vdir.glob("hparams.yaml"):
            extra.unlink()
        for k, ev in enumerate(
            sorted(vdir.glob("events.out.tfevents.*"))
        ):  # a stable name (no time/host/pid)
            ev.rename(vdir / f"events.out.tfevents.{BASE_TIME}.corpus.0.{k}")
    elif spec.fmt == "jsonl":
        rows = plain_train(spec, monitor_path=run_dir / "run.jsonl")
        every = spec.opts.get("every", 1)
        truth = [(r["i"], r["loss"], r["gn"]) for r in rows if r["i"] % every == 0]
    else:
        rows = plain_train(spec)
        writer = write_mmengine if spec.fmt == "mmengine_text" else write_steplines
        truth = writer(spec, rows, run_dir / "train.log")
    first_bad, evidence = verify(spec, truth)
    if spec.kind == "vanishing":
        evidence += f"; {layer_ratio(spec)}"
    return {
        "run": spec.name,
        "format": spec.fmt,
        "path": rel_path(spec),
        "expected_exit": 0 if spec.kind == "healthy" else 1,
        "kind": spec.kind,
        "first_bad_step": "-" if first_bad is None else str(first_bad),
        "cause": spec.cause,
        "evidence": evidence,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def layer_ratio(spec: Spec) -> str:
    """Gradient RMS of the first Linear layer over the last one's, at init (one batch): the
    depth-wise vanishing that a vanishing label claims."""
    import torch

    model = make_model(spec)
    X, Y = digits()
    loss = torch.nn.functional.cross_entropy(model(X[:256]), Y[:256])
    loss.backward()
    lin = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    rms = [float(m.weight.grad.pow(2).mean().sqrt()) for m in (lin[0], lin[-1])]
    return f"first/last layer grad RMS {rms[0] / rms[1]:.1e} at init"


# ----------------------------------------------------------------------------- label checks


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def verify(spec: Spec, truth: list[tuple[int, float, float]]) -> tuple[int | None, str]:
    """Check that the logged numbers show the labelled pathology; return (first_bad_step, evidence).

    ``truth`` is (step as the format writes it, loss, norm) for every logged training point. The
    rules (README.md "Label rules") raise AssertionError when a run does not show its label.
    """
    steps = np.array([t[0] for t in truth])
    loss = np.array([t[1] for t in truth], dtype=float)
    gn = np.array([t[2] for t in truth], dtype=float)
    n = len(truth)
    fin = np.isfinite(loss) & np.isfinite(gn)
    fl, fg = loss[np.isfinite(loss)], gn[np.isfinite(gn)]
    q = max(1, n // 10)
    ev = (
        f"{n} points; loss {_fmt(fl[0])}->{_fmt(np.median(fl[-q:]))} (max {_fmt(fl.max())}); "
        f"norm {_fmt(fg[0])}->{_fmt(np.median(fg[-q:]))} (max {_fmt(fg.max())}, min {_fmt(fg.min())})"
    )
    name = spec.name
    chance = CHANCE["tokens" if spec.task == "tokens" else "digits"]
    if spec.kind == "healthy":
        assert fin.all(), f"{name}: non-finite value in a healthy control"
        assert (gn > 0).all(), f"{name}: zero norm in a healthy control"
        start, end = np.median(loss[:q]), np.median(loss[-q:])
        assert end < 0.8 * start, f"{name}: loss did not fall ({start:.3g} -> {end:.3g})"
        for k in range(3, n):  # no sudden norm jump: 4x the median before and 2.5x the previous point
            ref = np.median(gn[max(0, k - 10) : k])
            assert gn[k] < 4 * ref or gn[k] < 2.5 * gn[k - 1], (
                f"{name}: norm spike {gn[k]:.3g} at step {steps[k]} (median before {ref:.3g})"
            )
        rise = max(gn[k] / np.median(gn[max(0, k - 10) : k]) for k in range(3, n)) if n > 3 else 1.0
        return None, ev + f"; largest norm over the median of the 10 points before: x{rise:.2g}"
    if spec.kind == "nonfinite":
        bad = np.flatnonzero(~fin)
        assert bad.size, f"{name}: no NaN/inf logged"
        k = int(bad[0])
        return int(steps[k]), ev + f"; first NaN/inf at step {steps[k]}"
    if spec.kind == "zero_grad_norm":
        assert (gn == 0).all(), f"{name}: norm not exactly 0 everywhere"
        return int(steps[0]), ev
    if spec.kind == "vanishing":
        assert fin.all() and (gn > 0).all()
        assert np.abs(loss[-q:] - chance).max() < 0.1 * chance, f"{name}: loss not flat at chance"
        assert np.abs(np.median(loss[:q]) - np.median(loss[-q:])) < 0.05 * chance, f"{name}: loss not flat"
        return int(steps[0]), ev + f"; loss flat at chance (ln 10 = {chance:.3f})"
    assert spec.kind == "exploding", spec.kind
    if spec.opts.get("growth"):  # steady geometric growth: from the norm's trough to the end
        peak = int(np.argmax(np.where(np.isfinite(gn), gn, -np.inf)))
        trough = int(np.argmin(gn[: peak + 1]))
        seg_s, seg_g = steps[trough : peak + 1].astype(float), np.log(gn[trough : peak + 1])
        slope, icpt = np.polyfit(seg_s, seg_g, 1)
        resid = seg_g - (slope * seg_s + icpt)
        r2 = 1 - resid.var() / seg_g.var()
        factor = gn[peak] / gn[trough]
        assert factor > 100 and r2 > 0.9, f"{name}: growth x{factor:.3g}, r2 {r2:.2f}"
        assert fin.all(), f"{name}: growth run reached NaN/inf"
        return int(steps[trough]), ev + (
            f"; norm grows x{factor:.3g} from step {steps[trough]} to {steps[peak]} "
            f"(x{math.exp(slope):.3f} per step, r2 {r2:.2f})"
        )
    assert fin.all(), f"{name}: an exploding run must stay finite (else label it nonfinite)"
    onset_step = onset_to_step(spec, steps)
    k0 = int(np.searchsorted(steps, onset_step))
    pre_loss = loss[:k0]
    pre_gn = gn[:k0]
    ref_loss = float(np.median(pre_loss[-10:])) if k0 else chance
    ref_gn = float(np.median(pre_gn[-10:])) if k0 else None
    after_loss, after_gn = loss[k0:], gn[k0:]
    jump_loss = after_loss.max() / ref_loss
    jump_gn = after_gn.max() / ref_gn if ref_gn else float("nan")
    assert jump_loss > 3 or jump_gn > 10, f"{name}: loss x{jump_loss:.3g}, norm x{jump_gn:.3g} only"
    # the point at onset must itself be abnormal (the first bad step is not a guess)
    assert loss[k0] > 1.5 * ref_loss or (ref_gn is not None and gn[k0] > 3 * ref_gn), (
        f"{name}: step {steps[k0]} is normal (loss {loss[k0]:.3g} vs {ref_loss:.3g}, norm {gn[k0]:.3g} vs {ref_gn})"
    )
    ev += f"; from step {steps[k0]}: loss x{jump_loss:.3g} over {_fmt(ref_loss)}"
    if ref_gn:
        ev += f", norm x{jump_gn:.3g} over {_fmt(ref_gn)}"
    if spec.opts.get("transient"):  # the spike hurt the loss, which then came back
        hurt = float(loss[k0 : k0 + 3].max())
        assert hurt > 1.5 * ref_loss, (
            f"{name}: the spike did not hurt the loss ({hurt:.3g} vs {ref_loss:.3g})"
        )
        end = float(np.median(loss[-q:]))
        assert end < 1.25 * ref_loss, f"{name}: loss did not recover ({end:.3g} vs {ref_loss:.3g})"
        ev += f"; transient: loss {_fmt(hurt)} at the spike, back to {_fmt(end)} (before {_fmt(ref_loss)})"
    else:  # divergence: the loss stays harmed (above 1.5x its level before, or back at chance)
        end = float(np.median(loss[-q:]))
        assert end > 1.5 * ref_loss or end > 0.95 * chance, (
            f"{name}: loss recovered ({end:.3g} vs {ref_loss:.3g})"
        )
        ev += f"; loss at the end {_fmt(end)} (x{end / ref_loss:.3g})"
    return int(steps[k0]), ev


def onset_to_step(spec: Spec, steps: np.ndarray) -> int:
    """The format's step number of the first logged point that covers optimizer index ``spec.onset``.

    HF logs at step s the updates s-L+1..s (index s-1 last); an mmengine line at iteration I covers
    indices I-10..I-1; TorchTitan and llm.c number steps from 1. The Monitor (JSONL), Lightning
    (global_step before the increment) and nanoGPT (iter) number them from 0.
    """
    i = spec.onset if spec.onset is not None else 1
    one_based = spec.fmt in ("hf_state", "hf_console", "mmengine_text") or (
        spec.fmt == "steplines" and spec.opts["style"] in ("titan", "llmc")
    )
    target = i + 1 if one_based else i
    k = int(np.searchsorted(steps, target))
    assert k < len(steps), f"{spec.name}: onset {i} after the last logged step"
    return int(steps[k])


# ----------------------------------------------------------------------------- the corpus


def corpus() -> list[Spec]:
    """Every run of the corpus (names are unique; the format is the name's first part)."""
    S = Spec
    gpt = {"model": "gpt2", "task": "tokens", "bs": 16}
    runs: list[Spec] = [
        # --------------------------------------------------------------- HF trainer_state.json
        S(
            "hf_state-lr5_adamw_clip1",
            "hf_state",
            "exploding",
            "LR far too high: AdamW lr 5, max_grad_norm 1.0 (GPT-2)",
            opt="adamw",
            lr=5.0,
            clip=1.0,
            steps=60,
            log_every=2,
            **gpt,
        ),
        S(
            "hf_state-lr5_adamw_noclip",
            "hf_state",
            "exploding",
            "LR far too high: AdamW lr 5, no clipping (GPT-2)",
            opt="adamw",
            lr=5.0,
            clip=None,
            steps=40,
            log_every=1,
            **gpt,
        ),
        S(
            "hf_state-lr20_sgd_clip1",
            "hf_state",
            "exploding",
            "LR far too high: SGD lr 20, max_grad_norm 1.0 (GPT-2)",
            opt="sgd",
            lr=20.0,
            clip=1.0,
            steps=60,
            log_every=3,
            **gpt,
        ),
        S(
            "hf_state-lr5_sgd_noclip_nan",
            "hf_state",
            "nonfinite",
            "LR far too high: SGD lr 5, no clipping (GPT-2) -> NaN; HF logs the NaN loss as 0.0",
            opt="sgd",
            lr=5.0,
            steps=60,
            log_every=2,
            **gpt,
        ),
        S(
            "hf_state-lr_jump_x1000",
            "hf_state",
            "exploding",
            "late divergence: LR x1000 from step 150 (AdamW, GPT-2)",
            opt="adamw",
            lr=1e-3,
            clip=1.0,
            steps=250,
            log_every=5,
            lr_jump=(150, 1000.0),
            onset=151,
            **gpt,
        ),
        S(
            "hf_state-nan_batch_mlp",
            "hf_state",
            "nonfinite",
            "NaN in the inputs of batch 80 (MLP on digits, AdamW)",
            opt="adamw",
            lr=1e-3,
            clip=1.0,
            steps=150,
            log_every=2,
            nan_at=80,
        ),
        S(
            "hf_state-dead_relu_mlp",
            "hf_state",
            "zero_grad_norm",
            "collapse: dead ReLU (first bias -1000), norm 0",
            model="dead_relu",
            opt="adamw",
            lr=1e-3,
            clip=1.0,
            steps=60,
            log_every=2,
        ),
        S(
            "hf_state-deep_sigmoid",
            "hf_state",
            "vanishing",
            "vanishing: 20-layer sigmoid MLP at default init, SGD",
            model="deep_sigmoid",
            opt="sgd",
            lr=0.1,
            steps=150,
            log_every=3,
        ),
        S(
            "hf_state-spike_mlp",
            "hf_state",
            "exploding",
            "transient spike: batch 100 inputs x50 (MLP, SGD momentum), loss recovers",
            opt="sgd",
            lr=0.05,
            momentum=0.9,
            steps=300,
            log_every=1,
            scale_at=(100, 50.0),
            onset=100,
            opts={"transient": True},
        ),
        S(
            "hf_state-ok_warmup",
            "hf_state",
            "healthy",
            "healthy: linear warm-up 60 steps, norm rises while loss falls",
            opt="adamw",
            lr=3e-3,
            clip=1.0,
            steps=300,
            warmup=60,
            sched="warmup_linear",
            log_every=5,
            **gpt,
        ),
        S(
            "hf_state-ok_warmup_lstm",
            "hf_state",
            "healthy",
            "healthy: LSTM, AdamW, warm-up 50 steps; the norm rises ~10x while the loss falls",
            model="lstm",
            opt="adamw",
            lr=1e-2,
            clip=1.0,
            steps=300,
            warmup=50,
            sched="warmup_linear",
            log_every=3,
        ),
        S(
            "hf_state-ok_cosine",
            "hf_state",
            "healthy",
            "healthy: cosine decay (AdamW, GPT-2)",
            opt="adamw",
            lr=3e-3,
            clip=1.0,
            steps=300,
            sched="cosine",
            log_every=3,
            **gpt,
        ),
        S(
            "hf_state-ok_finetune_high",
            "hf_state",
            "healthy",
            "healthy: fine-tuning a GPT-2 pretrained on another bigram table (loss starts high)",
            opt="adamw",
            lr=1e-3,
            clip=1.0,
            steps=200,
            log_every=4,
            **{**gpt, "opts": {"pretrain": 300}},
        ),
        S(
            "hf_state-ok_eval_interleaved",
            "hf_state",
            "healthy",
            "healthy: eval entries every 25 steps (GPT-2)",
            opt="adamw",
            lr=3e-3,
            clip=1.0,
            steps=200,
            log_every=5,
            **{**gpt, "opts": {"eval_steps": 25}},
        ),
        S(
            "hf_state-ok_short7",
            "hf_state",
            "healthy",
            "healthy: 7 logged points (MLP on digits)",
            opt="adamw",
            lr=3e-3,
            clip=1.0,
            steps=35,
            log_every=5,
        ),
        S(
            "hf_state-ok_long520",
            "hf_state",
            "healthy",
            "healthy: 520 logged points (GPT-2)",
            opt="adamw",
            lr=2e-3,
            clip=1.0,
            steps=520,
            log_every=1,
            **gpt,
        ),
        S(
            "hf_state-ok_cnn_sgd",
            "hf_state",
            "healthy",
            "healthy: CNN on digits, SGD momentum",
            model="cnn",
            opt="sgd",
            lr=0.05,
            momentum=0.9,
            clip=1.0,
            steps=200,
            log_every=2,
        ),
        # --------------------------------------------------------------- HF console (logging_steps=1)
        S(
            "hf_console-lr5_adamw_clip1",
            "hf_console",
            "exploding",
            "LR far too high: AdamW lr 5, max_grad_norm 1.0 (GPT-2)",
            opt="adamw",
            lr=5.0,
            clip=1.0,
            steps=40,
            **gpt,
        ),
        S(
            "hf_console-lr20_sgd_clip1_tqdm",
            "hf_console",
            "exploding",
            "LR far too high: SGD lr 20, max_grad_norm 1.0 (GPT-2); progress bar in the log",
            opt="sgd",
            lr=20.0,
            clip=1.0,
            steps=40,
            **{**gpt, "opts": {"tqdm": True}},
        ),
        S(
            "hf_console-nan_batch_old",
            "hf_console",
            "nonfinite",
            "NaN in the inputs of batch 60 (MLP, AdamW); 4.x print",
            opt="adamw",
            lr=1e-3,
            clip=1.0,
            steps=100,
            nan_at=60,
            opts={"old_print": True},
        ),
        S(
            "hf_console-lr_jump_x300",
            "hf_console",
            "exploding",
            "late divergence: LR x300 from step 120 (AdamW, GPT-2)",
            opt="adamw",
            lr=1e-3,
            clip=1.0,
            steps=200,
            lr_jump=(120, 300.0),
            onset=121,
            **gpt,
        ),
        S(
            "hf_console-ok_warmup",
            "hf_console",
            "healthy",
            "healthy: warm-up 40 steps then cosine (AdamW, GPT-2)",
            opt="adamw",
            lr=3e-3,
            clip=1.0,
            steps=150,
            warmup=40,
            sched="warmup_cosine",
            **gpt,
        ),
        S(
            "hf_console-ok_eval",
            "hf_console",
            "healthy",
            "healthy: eval lines every 30 steps (GPT-2)",
            opt="adamw",
            lr=3e-3,
            clip=1.0,
            steps=120,
            **{**gpt, "opts": {"eval_steps": 30}},
        ),
        S(
            "hf_console-ok_short6_old",
            "hf_console",
            "healthy",
            "healthy: 6 logged points (MLP, AdamW); 4.x print",
            opt="adamw",
            lr=2e-2,
            clip=1.0,
            steps=6,
            bs=128,
            opts={"old_print": True},
        ),
        S(
            "hf_console-ok_tqdm",
            "hf_console",
            "healthy",
            "healthy: CNN SGD, progress bar in the log",
            model="cnn",
            opt="sgd",
            lr=0.05,
            momentum=0.9,
            clip=1.0,
            steps=80,
            opts={"tqdm": True},
        ),
        # --------------------------------------------------------------- Lightning CSVLogger
        S(
            "lightning_csv-lr10_sgd_clip1",
            "lightning_csv",
            "exploding",
            "LR far too high: SGD lr 10, gradient_clip_val 1.0 (tanh MLP)",
            model="tanh_mlp",
            opt="sgd",
            lr=10.0,
            clip=1.0,
            steps=100,
        ),
        S(
            "lightning_csv-lr10_sgd_noclip",
            "lightning_csv",
            "exploding",
            "LR far too high: SGD lr 10, no clipping (tanh MLP)",
            model="tanh_mlp",
            opt="sgd",
            lr=10.0,
            steps=100,
        ),
        S(
            "lightning_csv-poison_x1e4",
            "lightning_csv",
            "exploding",
            "late divergence: poisoned batch 150 (inputs x1e4, labels shifted; SGD momentum MLP), no recovery",
            opt="sgd",
            lr=0.05,
            momentum=0.9,
            steps=250,
            poison_at=(150, 1e4),
            onset=150,
        ),
        S(
            "lightning_csv-nan_batch_cnn",
            "lightning_csv",
            "nonfinite",
            "NaN in the inputs of batch 90 (CNN, Adam)",
            model="cnn",
            opt="adam",
            lr=1e-3,
            steps=150,
            nan_at=90,
        ),
        S(
            "lightning_csv-deep_sigmoid",
            "lightning_csv",
            "vanishing",
            "vanishing: 20-layer sigmoid MLP, SGD",
            model="deep_sigmoid",
            opt="sgd",
            lr=0.1,
            steps=150,
        ),
        S(
            "lightning_csv-dead_relu",
            "lightning_csv",
            "zero_grad_norm",
            "collapse: dead ReLU (first bias -1000), norm 0",
            model="dead_relu",
            opt="adam",
            lr=1e-3,
            steps=60,
        ),
        S(
            "lightning_csv-growth_mse",
            "lightning_csv",
            "exploding",
            "geometric growth: linear MSE model, SGD lr 1.05x the stability limit",
            model="linear",
            task="digits_mse",
            opt="sgd",
            lr=1.05 * 0.0874,
            bs=256,
            steps=100,
            opts={"growth": True},
        ),
        S("lightning_csv-ok_adam", "lightning_csv", "healthy", "healthy: MLP, Adam", steps=200),
        S(
            "lightning_csv-ok_cosine_cnn",
            "lightning_csv",
            "healthy",
            "healthy: CNN, SGD momentum, cosine decay",
            model="cnn",
            opt="sgd",
            lr=0.05,
            momentum=0.9,
            sched="cosine",
            steps=200,
            log_every=2,
        ),
        S(
            "lightning_csv-ok_long600",
            "lightning_csv",
            "healthy",
            "healthy: 600 logged points (MLP, SGD momentum)",
            opt="sgd",
            lr=0.02,
            momentum=0.9,
            steps=600,
        ),
        S(
            "lightning_csv-ok_val",
            "lightning_csv",
            "healthy",
            "healthy: val_loss rows every 40 steps (LSTM, Adam)",
            model="lstm",
            opt="adam",
            lr=3e-3,
            steps=200,
            opts={"val_every": 40},
        ),
        S(
            "lightning_csv-ok_finetune_high",
            "lightning_csv",
            "healthy",
            "healthy: fine-tuning an MLP pretrained on permuted labels (loss starts high)",
            opt="adam",
            lr=1e-3,
            steps=150,
            opts={"pretrain": 300},
        ),
        # --------------------------------------------------------------- Lightning TensorBoardLogger
        S(
            "tensorboard-lr5_adam_clip1",
            "tensorboard",
            "exploding",
            "LR far too high: Adam lr 5, gradient_clip_val 1.0 (tanh MLP)",
            model="tanh_mlp",
            opt="adam",
            lr=5.0,
            clip=1.0,
            steps=80,
            opts={"loggers": ("tb",)},
        ),
        S(
            "tensorboard-lr_jump_x1000",
            "tensorboard",
            "exploding",
            "late divergence: LR x1000 from step 120 (MLP, Adam)",
            opt="adam",
            lr=1e-3,
            steps=200,
            lr_jump=(120, 1000.0),
            onset=121,
            opts={"loggers": ("tb",)},
        ),
        S(
            "tensorboard-nan_batch",
            "tensorboard",
            "nonfinite",
            "NaN in the inputs of batch 70 (MLP, SGD)",
            opt="sgd",
            lr=0.1,
            steps=120,
            nan_at=70,
            opts={"loggers": ("tb",)},
        ),
        S(
            "tensorboard-spike_cnn",
            "tensorboard",
            "exploding",
            "transient spike: batch 100 inputs x10 (CNN, SGD momentum), loss recovers",
            model="cnn",
            opt="sgd",
            lr=0.05,
            momentum=0.9,
            steps=320,
            scale_at=(100, 10.0),
            onset=100,
            opts={"loggers": ("tb",), "transient": True},
        ),
        S(
            "tensorboard-deep_sigmoid_gs",
            "tensorboard",
            "vanishing",
            "vanishing: 20-layer sigmoid MLP, SGD; norm logged by gradsentry's callback",
            model="deep_sigmoid",
            opt="sgd",
            lr=0.1,
            steps=150,
            opts={"loggers": ("tb",), "norm_key": "gradsentry"},
        ),
        S(
            "tensorboard-ok_cnn_gs",
            "tensorboard",
            "healthy",
            "healthy: CNN, SGD momentum; norm logged by gradsentry's callback (gradsentry/global_norm)",
            model="cnn",
            opt="sgd",
            lr=0.05,
            momentum=0.9,
            steps=200,
            opts={"loggers": ("tb",), "norm_key": "gradsentry"},
        ),
        S(
            "tensorboard-ok_short8",
            "tensorboard",
            "healthy",
            "healthy: 8 logged points (MLP, Adam)",
            lr=1e-2,
            steps=8,
            opts={"loggers": ("tb",)},
        ),
        S(
            "tensorboard-ok_lstm_every5",
            "tensorboard",
            "healthy",
            "healthy: LSTM, Adam, logged every 5 steps",
            model="lstm",
            lr=3e-3,
            steps=300,
            log_every=5,
            opts={"loggers": ("tb",)},
        ),
        # --------------------------------------------------------------- Lightning, CSV + TB in one folder
        S(
            "lightning_dir-ok_two_loggers",
            "lightning_dir",
            "healthy",
            "healthy: MLP, Adam; CSVLogger and TensorBoardLogger",
            steps=150,
            opts={"loggers": ("csv", "tb")},
        ),
        S(
            "lightning_dir-poison_x1e4",
            "lightning_dir",
            "exploding",
            "late divergence: poisoned batch 120 (inputs x1e4, labels shifted; SGD momentum MLP); CSV and TB",
            opt="sgd",
            lr=0.05,
            momentum=0.9,
            steps=200,
            poison_at=(120, 1e4),
            onset=120,
            opts={"loggers": ("csv", "tb")},
        ),
        # --------------------------------------------------------------- gradsentry JSONL (Monitor)
        S(
            "jsonl-lr10_sgd_tanh",
            "jsonl",
            "exploding",
            "LR far too high: SGD lr 10 (tanh MLP)",
            model="tanh_mlp",
            opt="sgd",
            lr=10.0,
            steps=80,
        ),
        S(
            "jsonl-lr_jump_x500_cnn",
            "jsonl",
            "exploding",
            "late divergence: LR x500 from step 120 (CNN, Adam)",
            model="cnn",
            opt="adam",
            lr=1e-3,
            steps=200,
            lr_jump=(120, 500.0),
            onset=121,
            opts={"every": 1},
        ),
        S(
            "jsonl-poison_x1e4_mlp",
            "jsonl",
            "exploding",
            "late divergence: poisoned batch 150 (inputs x1e4, labels shifted; SGD momentum MLP), no recovery",
            opt="sgd",
            lr=0.05,
            momentum=0.9,
            steps=220,
            poison_at=(150, 1e4),
            onset=150,
            opts={"every": 2},
        ),
        S(
            "jsonl-spike_poison_lstm",
            "jsonl",
            "exploding",
            "transient spike: poisoned batch 150 (inputs x1e4, labels shifted; LSTM, SGD momentum), loss recovers",
            model="lstm",
            opt="sgd",
            lr=0.1,
            momentum=0.9,
            steps=260,
            poison_at=(150, 1e4),
            onset=150,
            opts={"transient": True},
        ),
        S(
            "jsonl-nan_batch_mlp",
            "jsonl",
            "nonfinite",
            "NaN in the inputs of batch 60 (MLP, Adam)",
            steps=100,
            nan_at=60,
        ),
        S(
            "jsonl-growth_mse",
            "jsonl",
            "exploding",
            "geometric growth: linear MSE model, SGD lr 1.05x the stability limit",
            model="linear",
            task="digits_mse",
            opt="sgd",
            lr=1.05 * 0.0874,
            bs=256,
            steps=100,
            opts={"growth": True},
        ),
        S(
            "jsonl-deep_sigmoid",
            "jsonl",
            "vanishing",
            "vanishing: 20-layer sigmoid MLP at default init, SGD",
            model="deep_sigmoid",
            opt="sgd",
            lr=0.1,
            steps=150,
            opts={"every": 5},
        ),
        S(
            "jsonl-dead_relu",
            "jsonl",
            "zero_grad_norm",
            "collapse: dead ReLU (first bias -1000), norm 0",
            model="dead_relu",
            steps=60,
            opts={"activations": True},
        ),
        S(
            "jsonl-spike_mlp",
            "jsonl",
            "exploding",
            "transient spike: batch 100 inputs x50 (SGD momentum), loss recovers",
            opt="sgd",
            lr=0.05,
            momentum=0.9,
            steps=200,
            scale_at=(100, 50.0),
            onset=100,
            opts={"transient": True},
        ),
        S(
            "jsonl-ok_adam_mlp",
            "jsonl",
            "healthy",
            "healthy: MLP, Adam",
            steps=200,
            opts={"activations": True},
        ),
        S(
            "jsonl-ok_sgd_cnn",
            "jsonl",
            "healthy",
            "healthy: CNN, SGD momentum, every=2",
            model="cnn",
            opt="sgd",
            lr=0.05,
            momentum=0.9,
            steps=200,
            opts={"every": 2},
        ),
        S(
            "jsonl-ok_lstm",
            "jsonl",
            "healthy",
            "healthy: LSTM, Adam, cosine",
            model="lstm",
            lr=3e-3,
            sched="cosine",
            steps=200,
        ),
        # --------------------------------------------------------------- mmengine text (window means of 10)
        S(
            "mmengine_text-lr5_adamw_gpt2",
            "mmengine_text",
            "exploding",
            "LR far too high: AdamW lr 5, clip_grad max_norm 1.0 (GPT-2)",
            opt="adamw",
            lr=5.0,
            clip=1.0,
            steps=200,
            log_every=10,
            **{**gpt, "opts": {"by_epoch": False}},
        ),
        S(
            "mmengine_text-nan_batch",
            "mmengine_text",
            "nonfinite",
            "NaN in the inputs of batch 125 (CNN, SGD)",
            model="cnn",
            opt="sgd",
            lr=0.05,
            momentum=0.9,
            clip=35.0,
            steps=200,
            log_every=10,
            nan_at=125,
        ),
        S(
            "mmengine_text-spike_poison_clip35",
            "mmengine_text",
            "exploding",
            "transient spike: poisoned batch 124 (inputs x1e4, labels shifted; MLP, SGD momentum); clip_grad 35 "
            "limits the damage, the loss recovers",
            opt="sgd",
            lr=0.05,
            momentum=0.9,
            clip=35.0,
            steps=220,
            log_every=10,
            poison_at=(124, 1e4),
            onset=124,
            opts={"transient": True},
        ),
        S(
            "mmengine_text-lr_jump_x1000",
            "mmengine_text",
            "exploding",
            "late divergence: LR x1000 from step 150 (MLP, Adam, clip_grad 35)",
            opt="adam",
            lr=1e-3,
            clip=35.0,
            steps=250,
            log_every=10,
            lr_jump=(150, 1000.0),
            onset=151,
        ),
        S(
            "mmengine_text-growth_mse",
            "mmengine_text",
            "exploding",
            "geometric growth: linear MSE model, SGD lr 1.05x the stability limit",
            model="linear",
            task="digits_mse",
            opt="sgd",
            lr=1.05 * 0.0874,
            bs=256,
            clip=1e9,
            steps=120,
            log_every=10,
            opts={"growth": True, "date_fmt": "%m/%d %H:%M:%S"},
        ),
        S(
            "mmengine_text-ok_cnn",
            "mmengine_text",
            "healthy",
            "healthy: CNN, SGD momentum, 4 epochs",
            model="cnn",
            opt="sgd",
            lr=0.05,
            momentum=0.9,
            clip=35.0,
            steps=224,
            log_every=10,
            opts={"date_fmt": "%m/%d %H:%M:%S"},
        ),
        S(
            "mmengine_text-ok_gpt2_iter",
            "mmengine_text",
            "healthy",
            "healthy: GPT-2, AdamW, cosine, Iter(train) lines",
            opt="adamw",
            lr=3e-3,
            clip=1.0,
            sched="cosine",
            steps=300,
            log_every=10,
            **{**gpt, "opts": {"by_epoch": False}},
        ),
        # --------------------------------------------------------------- plain step lines
        S(
            "steplines-titan_lr5_adamw",
            "steplines",
            "exploding",
            "LR far too high: AdamW lr 5, clip 1.0 (GPT-2), TorchTitan",
            opt="adamw",
            lr=5.0,
            clip=1.0,
            steps=60,
            **{**gpt, "opts": {"style": "titan"}},
        ),
        S(
            "steplines-nanogpt_nan",
            "steplines",
            "nonfinite",
            "NaN in the embeddings of batch 130 (GPT-2), nanoGPT",
            opt="adamw",
            lr=3e-3,
            clip=1.0,
            steps=200,
            nan_at=130,
            log_every=10,
            **{**gpt, "opts": {"style": "nanogpt"}},
        ),
        S(
            "steplines-llmc_lr_jump",
            "steplines",
            "exploding",
            "late divergence: LR x1000 from step 150 (GPT-2), llm.c",
            opt="adamw",
            lr=1e-3,
            steps=250,
            lr_jump=(150, 1000.0),
            onset=151,
            **{**gpt, "opts": {"style": "llmc"}},
        ),
        S(
            "steplines-titan_spike",
            "steplines",
            "exploding",
            "transient spike: batch 99 inputs x50 (MLP, SGD), TorchTitan",
            opt="sgd",
            lr=0.05,
            momentum=0.9,
            steps=200,
            scale_at=(99, 50.0),
            onset=99,
            opts={"style": "titan", "transient": True},
        ),
        S(
            "steplines-nanogpt_ok",
            "steplines",
            "healthy",
            "healthy: GPT-2, AdamW, eval lines every 50 iters, nanoGPT",
            opt="adamw",
            lr=3e-3,
            clip=1.0,
            steps=200,
            **{**gpt, "opts": {"style": "nanogpt", "eval_every": 50}},
        ),
        S(
            "steplines-llmc_ok_long",
            "steplines",
            "healthy",
            "healthy: 520 steps (GPT-2, AdamW, warm-up + cosine), llm.c",
            opt="adamw",
            lr=3e-3,
            clip=1.0,
            steps=520,
            warmup=50,
            sched="warmup_cosine",
            **{**gpt, "opts": {"style": "llmc"}},
        ),
    ]
    names = [s.name for s in runs]
    assert len(set(names)) == len(names)
    for s in runs:
        assert s.name.split("-")[0] == s.fmt, s.name
    return runs


# ----------------------------------------------------------------------------- main

COLUMNS = ["run", "format", "path", "expected_exit", "kind", "first_bad_step", "cause", "evidence"]


def _safe_make(spec: Spec) -> dict[str, Any]:
    try:
        return make_run(spec)
    except Exception as exc:  # report and go on; the caller exits non-zero
        import traceback

        return {"run": spec.name, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--only", help="comma-separated run names (or name prefixes); keeps the other runs' labels"
    )
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--list", action="store_true", help="list the runs and exit")
    a = ap.parse_args(argv)
    specs = corpus()
    if a.list:
        for s in specs:
            print(f"{s.name}\t{s.kind}\t{s.cause}")
        return 0
    old: dict[str, dict[str, str]] = {}
    if a.only:
        keys = a.only.split(",")
        specs = [s for s in specs if any(s.name == k or s.name.startswith(k) for k in keys)]
        if LABELS.exists():
            with LABELS.open(encoding="utf-8") as fh:
                old = {r["run"]: r for r in csv.DictReader(fh, delimiter="\t")}
    else:
        shutil.rmtree(RUNS, ignore_errors=True)
    RUNS.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # spawn: each worker imports torch afresh (one thread each); the largest runs first
    order = sorted(specs, key=lambda s: -(s.steps * (4 if s.model == "gpt2" else 1)))
    if a.jobs > 1 and len(order) > 1:
        with mp.get_context("spawn").Pool(a.jobs) as pool:
            results = list(pool.imap_unordered(_safe_make, order))
    else:
        results = [_safe_make(s) for s in order]
    failed = [r for r in results if "error" in r]
    for r in sorted(results, key=lambda r: r["run"]):
        if "error" in r:
            print(f"FAILED {r['run']}: {r['error']}", file=sys.stderr)
            print(r["trace"], file=sys.stderr)
        else:
            print(
                f"{r['seconds']:5.1f}s  {r['run']:38s} {r['kind']:15s} {r['first_bad_step']:>5s}  {r['evidence']}"
            )
    rows = {**old, **{r["run"]: r for r in results if "error" not in r}}
    known = {s.name for s in corpus()}
    with LABELS.open("w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, delimiter="\t", extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for name in sorted(rows):
            if name in known:
                w.writerow(rows[name])
    size = sum(f.stat().st_size for f in RUNS.rglob("*") if f.is_file())
    print(
        f"{len(results) - len(failed)} runs written in {time.perf_counter() - t0:.0f} s "
        f"({a.jobs} processes); corpus {size / 1e6:.2f} MB; labels in {LABELS.relative_to(HERE.parent.parent)}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
