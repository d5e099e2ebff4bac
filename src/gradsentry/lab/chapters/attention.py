"""Chapter "attention": post-LN vs pre-LN transformer encoders at a fixed learning rate, no warm-up.

Each digit becomes a sequence of 8 tokens, one per row (8 pixels, embedded linearly to ``d_model``,
plus a learned position embedding); a stack of ``nn.TransformerEncoderLayer`` blocks (``d_model``
64, 4 heads, feed-forward 128, no dropout) is followed by mean pooling and a linear head. The two
variants differ only in ``norm_first``:

* ``post_ln`` (``norm_first=False``, the original transformer): ``x = LN(x + F(x))``. Every block's
  output passes through a LayerNorm on the residual path, so the gradient reaching a block is
  rescaled by every LayerNorm above it: at init its size depends on depth and is largest near the
  output (Xiong et al. 2020, arXiv:2002.04745), and large Adam steps at a warm-up-free learning rate
  make training unstable;
* ``pre_ln`` (``norm_first=True``, plus a final LayerNorm): ``x = x + F(LN(x))``: the residual path is
  an identity, the per-block gradient norms stay of one size over depth, and the same learning rate
  trains without warm-up (Xiong et al. 2020; Shleifer et al. 2021, arXiv:2110.09456).

The per-block gradient norm is the L2 norm of the gradients of every parameter under
``encoder.layers.{i}``: the root of the sum of the squared norms the Monitor records for the layers
named ``encoder.layers.{i}.*`` (:func:`gradsentry.lab.recording.group_norms`). ``nn.MultiheadAttention``
uses its ``out_proj`` weights through a functional call, not as a module; the Monitor still records
``self_attn.out_proj`` as a layer, placed by its owner's call.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradsentry.lab.chapters.common import loss_figure, results_text, run_file, run_meta, train
from gradsentry.lab.data import load_digits
from gradsentry.lab.recording import group_norms

CITE = "Xiong et al. 2020 (arXiv:2002.04745); Shleifer, Weston & Ott 2021 (arXiv:2110.09456)"

VARIANTS: dict[str, tuple[str, bool]] = {
    "post_ln": ("post-LN (norm_first=False)", False),
    "pre_ln": ("pre-LN (norm_first=True)", True),
}


class DigitTransformer(nn.Module):
    """Rows of a digit as 8 tokens -> transformer encoder -> mean pool -> head (see the module docstring).

    Example:
        >>> DigitTransformer(layers=2)(torch.zeros(3, 64)).shape
        torch.Size([3, 10])
    """

    def __init__(
        self,
        *,
        layers: int = 6,
        d_model: int = 64,
        heads: int = 4,
        norm_first: bool = False,
        n_classes: int = 10,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d_model)
        self.pos = nn.Parameter(torch.randn(8, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, heads, dim_feedforward=2 * d_model, dropout=0.0, batch_first=True, norm_first=norm_first
        )
        self.encoder = nn.TransformerEncoder(
            layer, layers, norm=nn.LayerNorm(d_model) if norm_first else None, enable_nested_tensor=False
        )
        self.head = nn.Linear(d_model, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[N, 64]`` (or ``[N, 8, 8]``) -> logits ``[N, n_classes]``."""
        h = self.embed(x.reshape(-1, 8, 8)) + self.pos
        return self.head(self.encoder(h).mean(dim=1))  # type: ignore[no-any-return]


def _settings(quick: bool) -> dict[str, Any]:
    return {
        "layers": 6 if quick else 12,
        "d_model": 64,
        "heads": 4,
        "epochs": 3 if quick else 6,
        "batch_size": 64,
        "lr": 0.01 if quick else 0.003,  # the 6-block quick net needs a larger lr to show post-LN's failure
        "record_every": 4,  # the Monitor's every (plus each of the first 16 steps and the last)
    }


def run(
    *,
    quick: bool = False,
    seed: int = 0,
    variants: tuple[str, ...] | None = None,
    runs_dir: Path | None = None,
) -> dict[str, Any]:
    """Run the chapter; returns its ``results.json["chapters"]["attention"]`` object.

    The per-block gradient norms are read from the Monitor's records at the steps of its ``every`` grid
    (``record_every``: 0, 4, 8, ...; the first 16 steps, also logged, are not averaged in twice); each
    run's records go to ``runs_dir/attention/<variant>.jsonl`` when ``runs_dir`` is given.
    """
    cfg = _settings(quick)
    d = load_digits()
    blocks = [f"encoder.layers.{i}" for i in range(cfg["layers"])]
    runs: dict[str, Any] = {}
    for name in variants or tuple(VARIANTS):
        title, norm_first = VARIANTS[name]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = DigitTransformer(
                layers=cfg["layers"], d_model=cfg["d_model"], heads=cfg["heads"], norm_first=norm_first
            )
        opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
        path, rel = run_file(runs_dir, "attention", name)
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
            log_every=cfg["record_every"],
            meta=run_meta("attention", name, title, cfg),
            jsonl_path=path,
        )
        grid = [r for r in recorder.records if r.step % cfg["record_every"] == 0]
        rows = [group_norms(r, blocks) for r in grid]
        init = rows[0]
        early = rows[: max(1, len(rows) // 4)]
        res.update(
            title=title,
            norm_first=norm_first,
            blocks=blocks,
            block_grad_init=init,
            block_grad_by_step=rows,
            recorded_steps=[r.step for r in grid],
            # the spread of per-block gradient norms over depth: last block / first block
            last_first_ratio_init=init[-1] / init[0] if init[0] > 0 else math.nan,
            block_grad_early_mean=[sum(r[i] for r in early) / len(early) for i in range(len(blocks))],
            final_loss=sum(res["loss"][-10:]) / len(res["loss"][-10:]),
            jsonl=rel,
        )
        runs[name] = res
    return {"title": "Through attention: post-LN vs pre-LN", "settings": cfg, "runs": runs, "cite": CITE}


def claims(data: dict[str, Any]) -> dict[str, Any]:
    """The chapter's claims: at the same warm-up-free lr pre-LN ends with a lower training loss and a
    higher test accuracy than post-LN."""
    runs = data["runs"]
    out: dict[str, Any] = {}
    for n, r in runs.items():
        out[f"{n}_test_accuracy"] = r["test_accuracy"]
        out[f"{n}_final_loss"] = r["final_loss"]
        out[f"{n}_last_first_ratio_init"] = r["last_first_ratio_init"]
    if "post_ln" in runs and "pre_ln" in runs:
        post, pre = runs["post_ln"], runs["pre_ln"]
        out["pre_ln_trains_better_holds"] = pre["test_accuracy"] > post["test_accuracy"]
    return out


def sections(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The chapter's part of the HTML report."""
    from gradsentry.report import plots
    from gradsentry.report.html import embed_svg, fmt

    runs, cfg = data["runs"], data["settings"]
    paras = [
        f"Each digit as 8 row tokens through {cfg['layers']} transformer encoder blocks (d_model {cfg['d_model']}, "
        f"{cfg['heads']} heads, no dropout), mean pooling and a linear head; Adam at a fixed lr "
        f"{fmt(cfg['lr'])} with no warm-up, batch {cfg['batch_size']}, {cfg['epochs']} epochs. Only norm_first "
        "differs.",
        "Why: in post-LN blocks, x = LN(x + F(x)), the LayerNorm sits on the residual path, so the gradient "
        "reaching a block is rescaled by every LayerNorm above it; Xiong et al. (2020) show that at init the "
        "gradients of the parameters near the output are large, so that a warm-up-free learning rate takes steps "
        "too large for them and training is unstable, which is why post-LN transformers need a learning-rate "
        "warm-up. In pre-LN blocks, x = x + F(LN(x)), the residual path is an identity and the gradient keeps its "
        "size over depth; Shleifer et al. (2021) add extra normalization for the remaining imbalance.",
        "Last block / first block gradient norm at init: "
        + "; ".join(f"{r['title']}: {fmt(r['last_first_ratio_init'])}" for r in runs.values())
        + ". Training loss (mean of the last 10 steps): "
        + "; ".join(f"{r['title']}: {fmt(r['final_loss'])}" for r in runs.values())
        + ". "
        + results_text(runs),
    ]
    return [
        {
            "id": "attention",
            "heading": "Through attention: post-LN vs pre-LN without warm-up",
            "paragraphs": paras,
            "figures": [
                embed_svg(
                    plots.lines_figure(
                        [
                            ("at initialisation", {r["title"]: r["block_grad_init"] for r in runs.values()}),
                            (
                                "first quarter of training (mean)",
                                {r["title"]: r["block_grad_early_mean"] for r in runs.values()},
                            ),
                        ],
                        xlabel="encoder block (1 = next to the input)",
                        ylabel="block gradient L2 norm",
                    ),
                    "fig-attn-blocks",
                    "Per-block gradient norm of post-LN and pre-LN encoders",
                    "L2 norm of the gradients of each encoder block's parameters (from the Monitor's "
                    "per-layer records, out_proj included), log scale.",
                ),
                loss_figure(
                    runs,
                    "fig-attn-loss",
                    "Training loss of post-LN and pre-LN encoders",
                    "Cross-entropy per step at the same warm-up-free learning rate.",
                ),
            ],
        }
    ]
