"""Chapter "rnn": vanishing and exploding gradients through time (Bengio et al. 1994; Pascanu et al. 2013).

Each digit is read as a sequence, row by row: 8 time steps of 8 pixels. A recurrent net unrolled
over the 8 steps classifies it from its last hidden state ``h_T``. The gradient of the loss with
respect to an early hidden state ``h_t`` is a product of ``T - t`` Jacobians
``diag(tanh'(.)) W_hh``; with the default init (spectral radius of ``W_hh`` well below 1) it shrinks
geometrically toward early ``t``: the net cannot learn from the first rows. With ``W_hh`` scaled so
that its eigenvalues are 2 (a ReLU RNN with ``W_hh = 2 I``: the IRNN's identity scaled above 1) the
same product grows instead, gradient norms spike by orders of magnitude and SGD steps blow up (Pascanu
et al. 2013, arXiv:1211.5063), unless the global gradient norm is clipped
(:class:`gradsentry.ClipGlobalNorm`) or spikes are clipped (:class:`gradsentry.ZClip`). The
vanishing fixes: an orthogonal recurrent init, the identity-initialised ReLU RNN (IRNN, Le et al.
2015, arXiv:1504.00941), and gated cells (LSTM, Hochreiter & Schmidhuber 1997; GRU, Cho et al. 2014).

Recording a module called T times in one forward
------------------------------------------------
A :class:`gradsentry.Monitor` records each module once per step: a module called at every time step
(an ``nn.RNNCell``, or here the ``ih``/``hh`` Linear layers) gets one gradient, the *sum* over the
T calls, and one activation statistic. To see each call:

1. give each time step its own parameter-free module, e.g. ``self.acts = nn.ModuleList(nn.Tanh()
   for _ in range(T))`` used as ``h = self.acts[t](...)``: the Monitor then records the activation
   statistics of ``acts.0`` ... ``acts.{T-1}`` separately (saturation per time step), while the
   weights stay shared;
2. for the gradient per time step, ``dL/dh_t``, register a tensor hook on each hidden state during
   the forward (``h.register_hook(fn)``, see :class:`SeqRNN`): it runs during ``backward()`` with the
   gradient of that step's output, which no module hook can separate from the other calls. The
   Monitor records gradients of parameters (per layer, summed over the calls), not gradients of
   activations, so this chapter keeps its own hooks for ``dL/dh_t``; every other gradient number
   (the global norm per step, the findings) is the Monitor's.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradsentry.lab.chapters.common import run_file, run_meta, train
from gradsentry.lab.data import load_digits

CITE = (
    "Bengio, Simard & Frasconi 1994; Pascanu, Mikolov & Bengio 2013 (arXiv:1211.5063); "
    "Le, Jaitly & Hinton 2015 (arXiv:1504.00941)"
)

# name: (title, cell, recurrent init, remedy, family)
VARIANTS: dict[str, tuple[str, str, str, str, str]] = {
    "tanh": ("tanh RNN, default init", "tanh", "default", "none", "vanishing"),
    "tanh_orthogonal": ("tanh RNN, orthogonal W_hh", "tanh", "orthogonal", "none", "vanishing"),
    "irnn": ("ReLU RNN, identity W_hh (IRNN)", "relu", "identity", "none", "vanishing"),
    "lstm": ("LSTM", "lstm", "default", "none", "vanishing"),
    "gru": ("GRU", "gru", "default", "none", "vanishing"),
    "exploding": ("ReLU RNN, W_hh = 2 I", "relu", "scaled_identity", "none", "exploding"),
    "exploding_clip": ("W_hh = 2 I + global-norm clipping", "relu", "scaled_identity", "clip", "exploding"),
    "exploding_zclip": ("W_hh = 2 I + ZClip", "relu", "scaled_identity", "zclip", "exploding"),
}


class SeqRNN(nn.Module):
    """A recurrent classifier unrolled over ``steps`` time steps, with a tensor hook per hidden state.

    ``cell`` ``"tanh"``/``"relu"``: ``h_t = act_t(ih(x_t) + hh(h_{t-1}))`` with one activation module
    per step (``acts.{t}``); ``"lstm"``/``"gru"``: ``nn.LSTMCell``/``nn.GRUCell``. The logits are
    ``head(h_T)``. While :attr:`h_grads` is a list, each forward with gradients registers a hook on
    every ``h_t`` that stores the mean over the batch of ``||dL/dh_t||`` at index ``t`` during
    ``backward()``.

    Example:
        >>> m = SeqRNN(hidden=16)
        >>> m.h_grads = [0.0] * 8
        >>> m(torch.rand(4, 8, 8)).sum().backward()
        >>> len(m.h_grads), m.h_grads[0] < m.h_grads[-1]
        (8, True)
    """

    def __init__(
        self,
        *,
        cell: str = "tanh",
        init: str = "default",
        steps: int = 8,
        inputs: int = 8,
        hidden: int = 64,
        radius: float = 2.0,
        n_classes: int = 10,
    ) -> None:
        super().__init__()
        self.kind, self.steps, self.hidden = cell, steps, hidden
        self.h_grads: list[float] | None = None
        self.cell: nn.Module | None = None
        if cell in ("tanh", "relu"):
            self.ih = nn.Linear(inputs, hidden)
            self.hh = nn.Linear(hidden, hidden, bias=False)
            act = nn.Tanh if cell == "tanh" else nn.ReLU
            self.acts = nn.ModuleList(act() for _ in range(steps))
            with torch.no_grad():
                if init == "orthogonal":
                    nn.init.orthogonal_(self.hh.weight)
                elif init == "identity":
                    self.hh.weight.copy_(torch.eye(hidden))
                    nn.init.normal_(self.ih.weight, 0.0, 0.1)
                    nn.init.zeros_(self.ih.bias)
                elif init == "scaled_identity":  # every eigenvalue = radius > 1: h_t grows like radius^t
                    self.hh.weight.copy_(radius * torch.eye(hidden))
                    nn.init.normal_(self.ih.weight, 0.0, 1.0 / math.sqrt(inputs))
        elif cell == "lstm":
            self.cell = nn.LSTMCell(inputs, hidden)
            with torch.no_grad():  # forget-gate bias 1 (Gers et al. 2000; Jozefowicz et al. 2015)
                self.cell.bias_ih[hidden : 2 * hidden].fill_(1.0)
                self.cell.bias_hh[hidden : 2 * hidden].zero_()
        elif cell == "gru":
            self.cell = nn.GRUCell(inputs, hidden)
        else:
            raise ValueError(f"unknown cell {cell!r}")
        self.head = nn.Linear(hidden, n_classes)

    def _hook(self, t: int) -> Any:
        def hook(g: torch.Tensor) -> None:
            if self.h_grads is not None:
                self.h_grads[t] = float(g.detach().norm(dim=-1).mean())

        return hook

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[N, steps, inputs]`` -> logits ``[N, n_classes]``."""
        n = x.shape[0]
        h = x.new_zeros(n, self.hidden)
        c = x.new_zeros(n, self.hidden)
        for t in range(self.steps):
            if isinstance(self.cell, nn.LSTMCell):
                h, c = self.cell(x[:, t], (h, c))
            elif self.cell is not None:
                h = self.cell(x[:, t], h)
            else:
                h = self.acts[t](self.ih(x[:, t]) + self.hh(h))
            if self.h_grads is not None and h.requires_grad:
                h.register_hook(self._hook(t))
        return self.head(h)  # type: ignore[no-any-return]


def _settings(quick: bool) -> dict[str, Any]:
    return {
        "hidden": 64,
        "steps": 8,  # row by row: 8 steps of 8 pixels
        "epochs": 4 if quick else 15,
        "batch_size": 64,
        "lr": 0.05,
        "momentum": 0.9,
        "radius": 2.0,
        "clip_norm": 1.0,
        "log_every": 4,  # the Monitor's every for the vanishing family; the exploding family logs every step
    }


def run(
    *,
    quick: bool = False,
    seed: int = 0,
    variants: tuple[str, ...] | None = None,
    runs_dir: Path | None = None,
) -> dict[str, Any]:
    """Run the chapter; returns its ``results.json["chapters"]["rnn"]`` object (see the module docstring).

    The global gradient norms are the Monitor's; the exploding family's Monitor logs every step, so
    that its trace is step by step. ``dL/dh_t`` comes from :class:`SeqRNN`'s tensor hooks (see the
    module docstring: no module statistic separates the time steps). Each run's records go to
    ``runs_dir/rnn/<variant>.jsonl`` when ``runs_dir`` is given.
    """
    from gradsentry.remedies import ClipGlobalNorm, ZClip

    cfg = _settings(quick)
    d = load_digits()
    runs: dict[str, Any] = {}
    for name in variants or tuple(VARIANTS):
        title, cell, init, remedy_name, family = VARIANTS[name]
        steps = cfg["steps"]
        inputs = 64 // steps
        xs_tr, xs_te = d.x_train.view(-1, steps, inputs), d.x_test.view(-1, steps, inputs)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = SeqRNN(
                cell=cell, init=init, hidden=cfg["hidden"], steps=steps, inputs=inputs, radius=cfg["radius"]
            )
        model.h_grads = [math.nan] * steps
        per_step: list[list[float]] = []

        def after(step: int, m: SeqRNN = model, store: list[list[float]] = per_step) -> None:
            store.append(list(m.h_grads or []))

        remedy = (
            ClipGlobalNorm(cfg["clip_norm"])
            if remedy_name == "clip"
            else ZClip(max_grad_norm=cfg["clip_norm"])
            if remedy_name == "zclip"
            else None
        )
        lr = cfg["lr"]
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg["momentum"])
        path, rel = run_file(runs_dir, "rnn", name)
        res, _ = train(
            model,
            xs_tr,
            d.y_train,
            xs_te,
            d.y_test,
            optimizer=opt,
            epochs=cfg["epochs"],
            batch_size=cfg["batch_size"],
            seed=seed,
            remedy=remedy,
            log_every=1 if family == "exploding" else cfg["log_every"],
            meta=run_meta("rnn", name, title, cfg),
            jsonl_path=path,
            after_backward=after,
        )
        finite = [row for row in per_step if all(math.isfinite(v) for v in row)]
        init_row = per_step[0]
        res.update(
            title=title,
            cell=cell,
            init=init,
            remedy=remedy_name,
            family=family,
            steps=steps,
            lr=lr,
            h_grad_init=init_row,
            h_grad_final=finite[-1] if finite else init_row,
            early_late_ratio_init=init_row[0] / init_row[-1] if init_row[-1] > 0 else math.nan,
            max_global_norm=max((g for g in res["global_norm"] if math.isfinite(g)), default=math.nan),
            jsonl=rel,
        )
        runs[name] = res
    return {"title": "Through time: recurrent nets", "settings": cfg, "runs": runs, "cite": CITE}


def claims(data: dict[str, Any]) -> dict[str, Any]:
    """The chapter's claims as measured numbers (``*_holds``: whether the claim's direction holds)."""
    runs = data["runs"]
    out: dict[str, Any] = {}
    if "tanh" in runs:
        g = runs["tanh"]["h_grad_init"]
        out["tanh_early_late_ratio_init"] = g[0] / g[-1]
        out["vanishing_holds"] = g[0] < g[-1]
        for fix in ("tanh_orthogonal", "irnn", "lstm", "gru"):
            if fix in runs:
                out[f"{fix}_early_late_ratio_init"] = runs[fix]["early_late_ratio_init"]
        for fix in ("tanh_orthogonal", "irnn"):
            if fix in runs:
                out[f"{fix}_holds"] = runs[fix]["early_late_ratio_init"] > out["tanh_early_late_ratio_init"]
    if "exploding" in runs:
        ex = runs["exploding"]
        out["exploding_max_global_norm"] = ex["max_global_norm"]
        out["exploding_test_accuracy"] = ex["test_accuracy"]
        for fix in ("exploding_clip", "exploding_zclip"):
            if fix in runs:
                r = runs[fix]
                out[f"{fix}_finite"] = r["first_nonfinite_step"] is None
                out[f"{fix}_test_accuracy"] = r["test_accuracy"]
        if "exploding_clip" in runs:
            c = runs["exploding_clip"]
            out["clip_holds"] = c["first_nonfinite_step"] is None and (
                ex["first_nonfinite_step"] is not None or c["test_accuracy"] > ex["test_accuracy"]
            )
    return out


def sections(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The chapter's part of the HTML report."""
    from gradsentry.report import plots
    from gradsentry.report.html import embed_svg, fmt

    runs, cfg, cl = data["runs"], data["settings"], data.get("claims", {})
    van = {n: r for n, r in runs.items() if r["family"] == "vanishing"}
    exp = {n: r for n, r in runs.items() if r["family"] == "exploding"}
    paras = [
        f"Each digit is read row by row, {cfg['steps']} time steps of 8 pixels, by a recurrent net with "
        f"{cfg['hidden']} hidden units classifying from its last hidden state; SGD (lr {fmt(cfg['lr'])}, momentum "
        f"{fmt(cfg['momentum'])}), batch {cfg['batch_size']}, {cfg['epochs']} epochs. The figure shows the mean "
        "norm of dL/dh_t, the gradient reaching the hidden state of step t, measured with a tensor hook on each "
        "unrolled step.",
        "Why: dL/dh_t is the gradient at h_T multiplied by T - t Jacobians diag(tanh'(.)) W_hh. With PyTorch's "
        "default init W_hh's spectral radius is about 0.6 and tanh' <= 1, so the product shrinks geometrically "
        "toward early steps: the first rows of the digit barely influence learning (Bengio et al. 1994; Pascanu "
        "et al. 2013). An orthogonal W_hh (all singular values 1) or the identity with ReLU (IRNN, Le et al. "
        "2015) keeps the product near 1; LSTM and GRU carry the state through gates instead of a repeated matrix.",
    ]
    if van:
        paras.append(
            "dL/dh_1 / dL/dh_T at initialisation: "
            + "; ".join(f"{r['title']}: {fmt(r['early_late_ratio_init'])}" for r in van.values())
            + ". Test accuracy after training: "
            + "; ".join(f"{r['title']}: {100 * r['test_accuracy']:.1f}%" for r in van.values())
            + "."
        )
    out = [
        {
            "id": "rnn-vanishing",
            "heading": "Through time: the gradient of early time steps vanishes",
            "paragraphs": paras,
            "figures": [
                embed_svg(
                    plots.lines_figure(
                        [
                            ("at initialisation", {r["title"]: r["h_grad_init"] for r in van.values()}),
                            ("after training", {r["title"]: r["h_grad_final"] for r in van.values()}),
                        ],
                        xlabel="time step t",
                        ylabel="mean ||dL/dh_t||",
                    ),
                    "fig-rnn-time",
                    "Gradient norm of the hidden state against the time step",
                    "Mean over the batch of ||dL/dh_t|| at step 0 and at the last step, log scale; t = 1 is the "
                    "first row of the digit.",
                )
            ]
            if van
            else [],
        }
    ]
    if exp:
        ex = exp.get("exploding")
        ep = [
            "The same reading with a ReLU RNN whose recurrent matrix is 2 I: every time step multiplies the state "
            "and the gradient by about 2, so dL/dh_1 is "
            + (fmt(ex["early_late_ratio_init"]) if ex else "much larger than")
            + " times dL/dh_T at initialisation, and each SGD step that enlarges W_hh enlarges the next gradient. "
            "Why clipping works: Pascanu et al. (2013) show that the exploding direction is a steep wall in the "
            f"loss surface; rescaling the gradient to a global norm of at most {fmt(cfg['clip_norm'])} keeps the "
            "step's direction but bounds its length, so the optimizer does not jump off the wall. ZClip (Kumar et "
            "al. 2025) clips only norms far above their running mean, capped during its warm-up."
        ]
        ep.append(
            "; ".join(
                f"{r['title']}: largest global gradient norm {fmt(r['max_global_norm'])}, "
                + (
                    f"NaN/inf from step {r['first_nonfinite_step']}"
                    if r["first_nonfinite_step"] is not None
                    else f"test accuracy {100 * r['test_accuracy']:.1f}%"
                )
                + (f", findings: {', '.join(r['finding_kinds'])}" if r["finding_kinds"] else ", no findings")
                for r in exp.values()
            )
            + "."
        )
        if "clip_holds" in cl:
            ep.append(
                "Global-norm clipping rescued the run."
                if cl["clip_holds"]
                else "Clipping did not rescue it here."
            )
        out.append(
            {
                "id": "rnn-exploding",
                "heading": "Through time: recurrent weights above 1 explode, clipping rescues",
                "paragraphs": ep,
                "figures": [
                    embed_svg(
                        plots.lines_figure(
                            [
                                (
                                    "global gradient norm per step",
                                    {r["title"]: r["global_norm"] for r in exp.values()},
                                )
                            ],
                            xlabel="step",
                            ylabel="global gradient norm (before any fix)",
                        ),
                        "fig-rnn-exploding",
                        "Global gradient norm per step of the exploding RNN and its fixes",
                        "L2 norm of all gradients at every step (the Monitor's record), before clipping, "
                        "log scale.",
                    )
                ],
            }
        )
    return out
