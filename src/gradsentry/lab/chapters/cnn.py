"""Chapter "cnn": a deep plain CNN vs the same with residual connections vs with batch norm.

The 8x8 digits go through a stem convolution, ``depth`` 3x3 convolutions of ``channels`` channels
(padding 1, so every layer keeps the 8x8 map), global average pooling and a linear head. Every
variant uses PyTorch's default init and the same optimizer and batches; only the architecture
differs:

* ``plain``: ``h = relu(conv_i(h))``: the default init (weight variance 1/(3 fan_in)) and ReLU halve
  the signal's second moment about six-fold per layer, so the gradient reaching the first layers
  vanishes and the deep net barely trains (the degradation problem, He et al. 2016);
* ``residual``: ``h = h + conv_i(relu(h))``, the pre-activation residual unit (He et al. 2016,
  arXiv:1512.03385 and arXiv:1603.05027): the identity path carries the gradient unchanged to every
  layer;
* ``batchnorm``: ``h = relu(bn_i(conv_i(h)))`` (Ioffe & Szegedy 2015, arXiv:1502.03167): each layer's
  output is re-standardized, so the scale no longer shrinks with depth.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradsentry.lab.chapters.common import loss_figure, results_text, run_file, run_meta, train
from gradsentry.lab.data import load_digits
from gradsentry.lab.recording import layer_norms

CITE = "He, Zhang, Ren & Sun 2016 (arXiv:1512.03385); Ioffe & Szegedy 2015 (arXiv:1502.03167)"

VARIANTS: dict[str, str] = {
    "plain": "plain CNN",
    "residual": "CNN + residual connections",
    "batchnorm": "CNN + batch norm",
}


class DeepCNN(nn.Module):
    """``stem -> convs.0 .. convs.{depth-1} -> mean over the 8x8 map -> head`` (see the module docstring).

    Example:
        >>> DeepCNN(depth=3, channels=4)(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self, *, depth: int = 20, channels: int = 16, arch: str = "plain", n_classes: int = 10
    ) -> None:
        super().__init__()
        if arch not in VARIANTS:
            raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(VARIANTS)}")
        self.arch = arch
        self.stem = nn.Conv2d(1, channels, 3, padding=1)
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(depth))
        self.bns = (
            nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(depth)) if arch == "batchnorm" else None
        )
        self.acts = nn.ModuleList(nn.ReLU() for _ in range(depth))
        self.head = nn.Linear(channels, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[N, 1, 8, 8]`` (or ``[N, 64]``) -> logits ``[N, n_classes]``."""
        h = self.stem(x.view(-1, 1, 8, 8))
        for i, conv in enumerate(self.convs):
            if self.arch == "residual":  # pre-activation form, h + conv(relu(h)) (He et al. 2016b)
                h = h + conv(self.acts[i](h))
                continue
            z = conv(h)
            if self.bns is not None:
                z = self.bns[i](z)
            h = self.acts[i](z)
        return self.head(h.mean(dim=(2, 3)))  # type: ignore[no-any-return]


def _settings(quick: bool) -> dict[str, Any]:
    return {
        "depth": 12 if quick else 20,
        "channels": 8 if quick else 16,
        "epochs": 3 if quick else 8,
        "batch_size": 64,
        "lr": 0.002,
        "log_every": 4,  # the Monitor's every (plus each of the first 16 steps and the last)
    }


def run(
    *,
    quick: bool = False,
    seed: int = 0,
    variants: tuple[str, ...] | None = None,
    runs_dir: Path | None = None,
) -> dict[str, Any]:
    """Run the chapter; returns its ``results.json["chapters"]["cnn"]`` object.

    The depth profiles are the Monitor's per-layer gradient norms at step 0 and at the last finite
    logged step (the last step of the budget is logged); each run's records go to
    ``runs_dir/cnn/<variant>.jsonl`` when ``runs_dir`` is given.
    """
    cfg = _settings(quick)
    d = load_digits()
    layers = ["stem"] + [f"convs.{i}" for i in range(cfg["depth"])] + ["head"]
    runs: dict[str, Any] = {}
    for name in variants or tuple(VARIANTS):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = DeepCNN(depth=cfg["depth"], channels=cfg["channels"], arch=name)
        opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
        path, rel = run_file(runs_dir, "cnn", name)
        res, recorder = train(
            model,
            d.x_train,
            d.y_train,
            d.x_test,
            d.y_test,
            optimizer=opt,
            epochs=cfg["epochs"],
            batch_size=cfg["batch_size"],
            seed=seed,
            log_every=cfg["log_every"],
            meta=run_meta("cnn", name, VARIANTS[name], cfg),
            jsonl_path=path,
        )
        init = layer_norms(recorder.records[0], layers)
        res.update(
            title=VARIANTS[name],
            layers=layers,
            grad_norm_init=init,
            grad_norm_final=layer_norms(recorder.last_finite(), layers),
            first_last_ratio_init=init[1] / init[-2] if init[-2] > 0 else float("nan"),
            jsonl=rel,
        )
        runs[name] = res
    return {"title": "Through convolutions: deep CNNs", "settings": cfg, "runs": runs, "cite": CITE}


def claims(data: dict[str, Any]) -> dict[str, Any]:
    """The chapter's claims: residual and batch-norm CNNs beat the plain one on test accuracy, and the
    plain net's first conv gets a smaller gradient than its last at init."""
    runs = data["runs"]
    out: dict[str, Any] = {f"{n}_test_accuracy": r["test_accuracy"] for n, r in runs.items()}
    out.update({f"{n}_first_last_ratio_init": r["first_last_ratio_init"] for n, r in runs.items()})
    if "plain" in runs:
        out["plain_vanishing_holds"] = runs["plain"]["first_last_ratio_init"] < 1
        for fix in ("residual", "batchnorm"):
            if fix in runs:
                out[f"{fix}_beats_plain_holds"] = runs[fix]["test_accuracy"] > runs["plain"]["test_accuracy"]
    return out


def sections(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The chapter's part of the HTML report."""
    from gradsentry.report import plots
    from gradsentry.report.html import embed_svg, fmt

    runs, cfg = data["runs"], data["settings"]
    paras = [
        f"The digits as 8x8 images through a stem convolution, {cfg['depth']} 3x3 convolutions of "
        f"{cfg['channels']} channels with ReLU, global average pooling and a linear head; PyTorch's default init, "
        f"Adam (lr {fmt(cfg['lr'])}), batch {cfg['batch_size']}, "
        f"{cfg['epochs']} epochs. Only the architecture differs.",
        "Why: with PyTorch's default init each convolution scales the signal's second moment by about 1/3 and "
        "the ReLU halves it, so both the forward signal and the backward gradient shrink geometrically with depth "
        "in the plain net: its first layers get almost no gradient. He et al. (2016) observed that deep plain "
        "nets train worse than shallower ones (degradation) and added identity shortcuts, h + F(h), through "
        "which the gradient reaches every layer unchanged; batch normalization (Ioffe & Szegedy 2015) "
        "re-standardizes each layer's output, which undoes the shrinking.",
        "First conv / last conv gradient norm at init: "
        + "; ".join(f"{r['title']}: {fmt(r['first_last_ratio_init'])}" for r in runs.values())
        + ". "
        + results_text(runs),
    ]
    layers = next(iter(runs.values()))["layers"] if runs else []
    return [
        {
            "id": "cnn",
            "heading": "Through convolutions: plain vs residual vs batch norm",
            "paragraphs": paras,
            "figures": [
                embed_svg(
                    plots.lines_figure(
                        [
                            ("at initialisation", {r["title"]: r["grad_norm_init"] for r in runs.values()}),
                            ("after training", {r["title"]: r["grad_norm_final"] for r in runs.values()}),
                        ],
                        xlabel=f"layer (1 = stem, {len(layers)} = head)",
                        ylabel="gradient L2 norm",
                    ),
                    "fig-cnn-depth",
                    "Per-layer gradient norm of the deep CNNs against depth",
                    "Gradient norm of each layer's parameters (the Monitor's records) at step 0 and at the "
                    "last step, log scale.",
                ),
                loss_figure(
                    runs,
                    "fig-cnn-loss",
                    "Training loss of the deep CNNs",
                    "Cross-entropy per step; chance is ln 10 = 2.30 nats.",
                ),
            ],
        }
    ]
