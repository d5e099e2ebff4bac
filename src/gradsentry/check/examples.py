"""Per-example gradients of a batch, the quantity mean-field theory predicts (``torch.func``; one
backward per example where batch norm couples the batch)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from gradsentry.check.report import (
    BATCH_COUPLED_EXAMPLES,
    MAX_EXAMPLES,
    PER_EXAMPLE_FLOATS,
    InputFitError,
)

logger = logging.getLogger("gradsentry")


def _output_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, list | tuple):
        for item in out:
            if isinstance(item, torch.Tensor):
                return item
    raise InputFitError(f"the model returned a {type(out).__name__}; expected a tensor (or logits in it)")


def _example_loss(out: torch.Tensor, loss: str, target: torch.Tensor) -> torch.Tensor:
    """One example's loss (``out`` and ``target`` with a batch dimension of 1), reduced like the batch's."""
    if loss == "ce":
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]).float(), target.reshape(-1))
    if loss == "mse":
        return nn.functional.mse_loss(out.float(), target.float())
    return out.float().sum()


def per_example_rms(
    model: nn.Module,
    x: torch.Tensor,
    loss: str,
    targets: torch.Tensor | None,
    *,
    max_examples: int = MAX_EXAMPLES,
) -> dict[str, float]:
    """RMS of each layer's per-example gradient, the quantity mean-field theory predicts.

    For every example n of the first ``max_examples`` of the batch, the gradient ``g_n`` of that example's
    loss (reduced like the batch loss: the batch's gradient is the mean of the ``g_n`` for ``ce``/``mse``
    and their sum for ``sum``) is computed with ``torch.func.vmap(grad(...))``, in chunks of at most
    :data:`PER_EXAMPLE_FLOATS` floats. A layer is a module owning parameters directly.

    Args:
        model: the model (a single positional input).
        x: the batch ``[N, ...]``.
        loss: ``ce``, ``mse`` or ``sum``.
        targets: the batch's targets (``[N, ...]`` labels for ``ce``, ``x``-batched targets for ``mse``), or
            None for ``sum``.
        max_examples: at most this many examples are used.

    Returns:
        ``{layer name: sqrt(mean_n ||g_n||^2 / numel)}`` over the trainable parameters, same units as the
        gradient.

    Raises:
        Exception: whatever ``torch.func`` raises on a model it cannot transform (callers catch it).
    """
    from torch.func import functional_call, grad, vmap

    n = min(int(x.shape[0]), max_examples)
    named = {k: p for k, p in model.named_parameters() if p.requires_grad}
    params = {k: p.detach() for k, p in named.items()}
    buffers = {k: b.detach() for k, b in model.named_buffers()}
    dummy = torch.zeros(n, device=x.device)
    tgt = dummy if targets is None else targets[:n].to(x.device)
    if _couples_examples(model):
        sq = _per_example_sq_loop(model, named, x, loss, tgt, min(n, BATCH_COUPLED_EXAMPLES))
        return _layer_rms(params, sq, min(n, BATCH_COUPLED_EXAMPLES))

    def one(p: dict[str, torch.Tensor], xi: torch.Tensor, ti: torch.Tensor) -> torch.Tensor:
        out = _output_tensor(functional_call(model, (p, buffers), (xi.unsqueeze(0),)))
        return _example_loss(out, loss, ti.unsqueeze(0))

    total = sum(p.numel() for p in params.values())
    chunk = max(1, min(n, PER_EXAMPLE_FLOATS // max(1, total)))
    sq = {k: torch.zeros((), dtype=torch.float64) for k in params}
    per = vmap(grad(one), in_dims=(None, 0, 0), randomness="different")
    for start in range(0, n, chunk):
        grads = per(params, x[start : start + chunk], tgt[start : start + chunk])
        for k, g in grads.items():
            sq[k] += g.detach().double().pow(2).sum().cpu()
    return _layer_rms(params, sq, n)


def _layer_rms(params: dict[str, torch.Tensor], sq: dict[str, torch.Tensor], n: int) -> dict[str, float]:
    """Per-layer ``sqrt(sum of squared per-example gradients / (n * numel))`` from per-parameter sums."""
    layer_sq: dict[str, float] = {}
    layer_n: dict[str, int] = {}
    for k, p in params.items():
        owner = k.rpartition(".")[0]
        layer_sq[owner] = layer_sq.get(owner, 0.0) + float(sq[k])
        layer_n[owner] = layer_n.get(owner, 0) + p.numel()
    return {name: math.sqrt(layer_sq[name] / (n * layer_n[name])) for name in layer_sq if layer_n[name]}


def _couples_examples(model: nn.Module) -> bool:
    """True when the forward mixes the examples of a batch (batch norm on batch statistics), so that an
    example's gradient depends on the others and ``vmap`` over single examples would change the model."""
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats)
        for m in model.modules()
    )


def _per_example_sq_loop(
    model: nn.Module,
    named: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    loss: str,
    tgt: torch.Tensor,
    n: int,
) -> dict[str, torch.Tensor]:
    """Sum over the first ``n`` examples of each parameter's squared per-example gradient, for a model whose
    forward couples the examples: one forward of the whole batch (batch statistics as in training), then
    one backward per example of that example's loss. The buffers (running statistics) are restored."""
    saved = {k: b.detach().clone() for k, b in model.named_buffers()}
    keys = list(named)
    sq = {k: torch.zeros((), dtype=torch.float64) for k in keys}
    try:
        out = _output_tensor(model(x))
        for i in range(n):
            li = _example_loss(out[i : i + 1], loss, tgt[i : i + 1])
            grads = torch.autograd.grad(
                li, [named[k] for k in keys], retain_graph=i + 1 < n, allow_unused=True
            )
            for k, g in zip(keys, grads, strict=True):
                if g is not None:
                    sq[k] += g.detach().double().pow(2).sum().cpu()
    finally:  # after the backward passes, which read the buffers the forward saved
        with torch.no_grad():
            for k, b in model.named_buffers():
                b.copy_(saved[k])
    return sq
