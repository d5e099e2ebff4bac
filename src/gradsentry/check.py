"""Check a model at initialization: one forward and backward pass, a per-layer table, theory and findings.

Most vanishing and exploding gradients are visible before the first optimizer step. :func:`check_model`
runs one forward and backward pass on a batch, reads the per-layer statistics from a
:class:`gradsentry.Monitor`, compares the gradient profile with the mean-field prediction of
:mod:`gradsentry.theory` where the model is a plain chain, and diagnoses the record with
:func:`gradsentry.diagnose.diagnose` plus one init-time rule (a gradient that *grows* towards the input by
more than :data:`EXPLODING_RATIO`, or a relative gradient above :data:`REL_GRAD_MAX`).

Like with like: mean-field theory predicts the gradient of *one example* (samples independent), weight
and bias entries together (:attr:`gradsentry.theory.LayerPrediction.grad_rms`); the check measures
exactly that (:attr:`CheckRow.example_rms`, per-example gradients by ``torch.func``) and compares the two,
beside the batch gradient (:attr:`CheckRow.grad_rms`) that training sees, whose profile also carries the
correlations between the examples of the batch. The fitted slope is over the hidden layers only: the
output head (the last layer in forward order) receives the loss gradient directly and is left out.
Models made of repeated blocks holding a normalization layer (transformers) get their per-block gradient
profile and its LayerNorm placement reported (:class:`BlockProfile`: Xiong et al. 2020; NormFormer).
:func:`gradsentry.targets.load_factory` (re-exported here) imports a user's model factory.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from gradsentry._extras import requires_extra
from gradsentry.diagnosis.thresholds import Thresholds
from gradsentry.records import Finding, StepRecord
from gradsentry.targets import TargetError, load_factory, load_model

__all__ = [
    "BlockProfile",
    "CheckReport",
    "CheckRow",
    "InputFitError",
    "TargetError",
    "check_model",
    "digits_batch",
    "load_factory",
    "load_model",
    "per_example_rms",
]

logger = logging.getLogger("gradsentry")

LossName = Literal["ce", "mse", "sum"]
FixName = Literal["he", "xavier", "xavier_gain", "lsuv"]
LOSSES: tuple[str, ...] = ("ce", "mse", "sum")
FIXES: tuple[str, ...] = ("he", "xavier", "xavier_gain", "lsuv")

EXPLODING_RATIO = 1e3
"""First-layer over last-layer gradient RMS above which the gradient explodes towards the input at init
(dimensionless): the mirror image of the vanishing rule's 1e-3. It catches the chaotic phase of
bounded activations (Poole et al. 2016, arXiv:1606.05340): a 20-layer tanh MLP with weight std
``5/sqrt(fan_in)`` (chi ~ 2.9) measures ~1.5e4. It cannot catch oversized weights in a ReLU net: ReLU is
positively homogeneous, so the forward activations grow as fast as the backward signal shrinks and the
weight-gradient profile stays flat; :data:`REL_GRAD_MAX` catches that case."""

REL_GRAD_MAX = 100.0
"""Median over layers of the relative gradient ``||g|| / ||w||`` above which the gradient is too large at init
(dimensionless): one plain SGD step at a typical learning rate of 1e-3 would then change the weights by more
than 0.1 of their norm, the diagnosis rule's ``update_ratio_max`` (CS231n's healthy ratio is ~1e-3). Healthy
models at init measure ~0.1..1 with cross-entropy (He/ReLU MLP on digits: 0.07..0.4); a 20-layer ReLU MLP
with twice the He std measures ~5e4."""

LSUV_THEORY_NOTE = (
    "not applied after LSUV: its data-dependent, orthonormal weights and centring biases break the "
    "mean-field assumption of i.i.d. weights and biases independent of the signal"
)

MAX_EXAMPLES = 256
"""At most this many examples of the batch (the first ones) get per-example gradients; the RMS over
examples is an average, which 256 examples already pin down to a few per cent."""

PER_EXAMPLE_FLOATS = 2**25
"""Per-example gradients are computed in chunks of examples holding at most this many floats (128 MiB)."""

BATCH_COUPLED_EXAMPLES = 32
"""Examples whose gradients are computed one backward each when batch norm couples the batch (the
whole batch is still forwarded, so each example sees the batch statistics it trains with)."""

MIN_BLOCKS = 3
"""Fewest repeated blocks for a per-block gradient profile."""

NORM_TYPES = frozenset({"LayerNorm", "RMSNorm", "GroupNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d"})
"""Layer types counted as the normalization of a block (by class name, so that e.g. a custom RMSNorm counts)."""

PROBLEM_KINDS = frozenset({"vanishing", "exploding", "nonfinite"})
"""Finding kinds that make ``gradsentry check`` exit with 1 (a NaN/inf gradient at init counts: it is the
limit of an exploding one and no training can start from it)."""


class InputFitError(ValueError):
    """The input batch (or the loss) does not fit the model; the message names the layer that rejected it."""


# ------------------------------------------------------------------------------------------------ data
DEAD_UNITS_MIN_BATCH = 8
"""Fewest examples in the check's batch for the dead-unit rule: a unit zero "for every sample" of one or
two samples is chance (half of a ReLU layer's units are zero on any one example), not a dead unit."""


def digits_batch(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A real batch from scikit-learn's bundled digits (no download): ``x [n, 64]`` in [0, 1], ``y [n]``.

    Rows are drawn without replacement with ``seed``; pixel values (0..16) are divided by 16.

    Raises:
        ValueError: unless ``1 <= n <= 1797``.
        gradsentry._extras.MissingExtraError: scikit-learn is not installed (``gradsentry[lab]``).
    """
    with requires_extra("lab", "the digits batch"):
        from sklearn.datasets import load_digits

    digits = load_digits()
    if not 1 <= n <= len(digits.target):
        raise ValueError(f"the digits batch size must be in [1, {len(digits.target)}], got {n}")
    idx = np.random.default_rng(seed).choice(len(digits.target), size=n, replace=False)
    x = torch.tensor(digits.data[idx] / 16.0, dtype=torch.float32)
    return x, torch.tensor(digits.target[idx], dtype=torch.long)


# ------------------------------------------------------------------------------------------------ report
@dataclass
class CheckRow:
    """One layer (a module owning parameters) in forward order.

    Attributes:
        depth: forward-order index.
        name: qualified module name.
        type: module class name.
        params: trainable parameter elements.
        grad_norm: L2 norm of the layer's gradient, same units as the gradient.
        grad_rms: ``grad_norm / sqrt(numel)``.
        rel_grad: ``||g|| / ||w||`` (dimensionless, per unit learning rate), None if ``||w|| = 0``.
        activation: the activation module that follows the layer in forward order, if any.
        saturated_frac: fraction in [0, 1] of that activation's outputs in its flat region (bounded
            activations), else None.
        dead_frac: fraction in [0, 1] of its units dead on the whole batch (ReLU family), else None.
        example_rms: RMS of the layer's *per-example* gradient (weight and bias entries together), the root
            of the mean over up to :data:`MAX_EXAMPLES` examples of ``||g_n||^2 / numel``, same units as the
            gradient: the quantity mean-field theory predicts (no correlation between examples). Computed
            where the theory applies; else None.
        predicted_rms: mean-field prediction of ``example_rms`` (:attr:`gradsentry.theory.LayerPrediction.grad_rms`,
            weight and bias entries, anchored to the measured ``example_rms`` of the last Linear/Conv
            layer), None where the theory does not apply.
        has_grad: False when the layer got no gradient at all (frozen, or not called in forward): its
            gradient figures are then 0 and mean "no gradient", not a vanishing one.
    """

    depth: int
    name: str
    type: str
    params: int
    grad_norm: float
    grad_rms: float
    rel_grad: float | None
    activation: str | None = None
    saturated_frac: float | None = None
    dead_frac: float | None = None
    example_rms: float | None = None
    predicted_rms: float | None = None
    has_grad: bool = True


@dataclass
class BlockProfile:
    """The gradient profile over a model's repeated blocks (e.g. ``encoder.layers.0`` ... ``.11``).

    Attributes:
        container: qualified name of the ``ModuleList``/``Sequential`` holding the blocks.
        blocks: number of blocks (>= :data:`MIN_BLOCKS`).
        norm_placement: ``"pre"`` when a block calls its first normalization layer before its first other
            parameter layer (pre-LN), ``"post"`` when after (post-LN), None without normalization layers.
        norms: per role (a layer's name inside a block, e.g. ``linear2``), its gradient norm in each block,
            first block first; same units as the gradient.
        ratios: per role, last block's gradient norm over the first's (dimensionless).
        ratio: median of ``ratios`` over the roles that are not normalization layers: below 1 the gradient
            falls from the input side to the output side, above 1 it concentrates near the output.
        norm_roles: the roles that are normalization layers (:data:`NORM_TYPES`).
    """

    container: str
    blocks: int
    norm_placement: str | None
    norms: dict[str, list[float]] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)
    ratio: float | None = None
    norm_roles: list[str] = field(default_factory=list)


@dataclass
class CheckReport:
    """Result of :func:`check_model`.

    Attributes:
        rows: per-layer rows in forward order.
        loss: the loss value at init.
        loss_kind: ``ce``, ``mse`` or ``sum``.
        input_shape: shape of the input batch.
        first_last_ratio: first over last layer gradient RMS (layers with a usable gradient).
        log_slope: least-squares slope of log10 gradient RMS over depth, over the hidden layers (the output
            head, ``head``, left out), decades per layer (positive: the gradient shrinks towards the input).
        head: the output head (last layer in forward order) left out of ``log_slope``; None with fewer
            than three layers (then every layer is fitted).
        theory_max_dev: largest ``|log10(predicted_rms / example_rms)|`` over the layers, in decades (how far
            the mean-field prediction is from what it predicts); None without a prediction.
        blocks: the per-block gradient profile of a model made of repeated blocks, else None.
        findings: diagnosed problems (see :mod:`gradsentry.diagnose`).
        theory: None when the mean-field prediction applies, else why it does not.
        record: the Monitor's step record.
        fix: the fix applied before ``fixed`` (``he``, ``xavier``, ``xavier_gain``, ``lsuv``), if any.
        fix_report: what the fix did (per layer), if any.
        fixed: the same check after the fix, if any.
    """

    rows: list[CheckRow]
    loss: float
    loss_kind: str
    input_shape: list[int]
    first_last_ratio: float | None
    log_slope: float | None
    head: str | None = None
    theory_max_dev: float | None = None
    blocks: BlockProfile | None = None
    findings: list[Finding] = field(default_factory=list)
    theory: str | None = None
    record: StepRecord | None = None
    fix: str | None = None
    fix_report: list[dict[str, Any]] | None = None
    fixed: CheckReport | None = None

    @property
    def problems(self) -> list[Finding]:
        """The vanishing / exploding / non-finite findings (see :data:`PROBLEM_KINDS`)."""
        return [f for f in self.findings if f.kind in PROBLEM_KINDS]

    @property
    def final(self) -> CheckReport:
        """The report that decides the outcome: after the fix when one was applied."""
        return self.fixed if self.fixed is not None else self

    def __rich_console__(self, console: Any, options: Any) -> Any:
        """The ``gradsentry check`` view (table, depth profile, findings), fitted to the console's width."""
        from gradsentry.report.views import check_renderable

        yield check_renderable(self, options.max_width)

    def _repr_html_(self) -> str:
        """The ``gradsentry check`` view as escaped HTML (notebooks)."""
        from gradsentry.report.views import check_renderable, to_html

        return to_html(check_renderable(self))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("record", None)
        if self.fixed is not None:
            d["fixed"] = self.fixed.to_dict()
        return d


# ------------------------------------------------------------------------------------------------ running
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


def _forward(model: nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, list[str]]:
    """Forward pass that names the innermost module running when an exception is raised."""
    names = {id(m): n for n, m in model.named_modules()}
    stack: list[str] = []
    order: list[str] = []

    def pre(m: nn.Module, _a: Any) -> None:
        name = names.get(id(m), "?")
        stack.append(name)
        if name not in order:
            order.append(name)

    def post(_m: nn.Module, _a: Any, _o: Any) -> None:
        if stack:
            stack.pop()

    handles = [m.register_forward_pre_hook(pre) for m in model.modules()]
    handles += [m.register_forward_hook(post) for m in model.modules()]
    try:
        out = model(*inputs)
    except Exception as exc:
        culprit = stack[-1] if stack else ""
        mod = dict(model.named_modules()).get(culprit)
        where = "the model's own forward" if culprit == "" else f"layer {culprit!r}"
        kind = f" ({type(mod).__name__})" if mod is not None else ""
        shapes = ", ".join(str(list(x.shape)) for x in inputs if isinstance(x, torch.Tensor))
        raise InputFitError(
            f"the input of shape {shapes} does not fit the model: {where}{kind} rejected it: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    finally:
        for h in handles:
            h.remove()
    return out, order


def _loss(
    out: torch.Tensor, loss: str, targets: torch.Tensor | None, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The loss and the targets it used (drawn with ``gen`` when None; None for ``sum``)."""
    try:
        if loss == "ce":
            if out.dim() < 2:
                raise InputFitError(
                    f"--loss ce needs logits [N, ..., C], the model output is {list(out.shape)}"
                )
            logits = out.reshape(-1, out.shape[-1]).float()
            if targets is None:
                targets = torch.randint(0, out.shape[-1], out.shape[:-1], generator=gen)
            flat = targets.reshape(-1).to(out.device)
            if flat.numel() != logits.shape[0] or int(flat.max()) >= out.shape[-1]:
                raise InputFitError(
                    f"--loss ce: {flat.numel()} labels up to {int(flat.max())} do not fit the model "
                    f"output of shape {list(out.shape)} (classes on the last dimension)"
                )
            return nn.functional.cross_entropy(logits, flat), targets
        if loss == "mse":
            if targets is None or targets.shape != out.shape:
                targets = torch.randn(out.shape, generator=gen)
            return nn.functional.mse_loss(out.float(), targets.to(out.device).float()), targets
        if loss == "sum":
            return out.float().sum(), None
    except InputFitError:
        raise
    except Exception as exc:
        raise InputFitError(f"--loss {loss} does not fit the model output {list(out.shape)}: {exc}") from exc
    raise ValueError(f"unknown loss {loss!r}; valid: {', '.join(LOSSES)}")


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


def _fit_slope(rows: Sequence[CheckRow]) -> tuple[float | None, float | None, str | None]:
    """First/last gradient RMS ratio (all usable layers), the log10-RMS slope over the hidden layers (the
    output head, the last usable layer, left out when three or more remain) and the head's name."""
    usable = [r for r in rows if math.isfinite(r.grad_rms) and r.grad_rms > 0]
    if len(usable) < 2:
        return None, None, None
    head = usable[-1].name if len(usable) >= 3 else None
    hidden = usable[:-1] if head is not None else usable
    x = np.array([r.depth for r in hidden], dtype=np.float64)
    y = np.log10([r.grad_rms for r in hidden])
    slope = float(np.polyfit(x, y, 1)[0])
    return usable[0].grad_rms / usable[-1].grad_rms, slope, head


def _exploding_at_init(
    ratio: float | None, slope: float | None, rows: Sequence[CheckRow], step: int
) -> Finding | None:
    """The two init-time exploding rules (see :data:`EXPLODING_RATIO` and :data:`REL_GRAD_MAX`)."""
    from gradsentry.remedies_catalog import remedies_for

    rel = [r.rel_grad for r in rows if r.rel_grad is not None and math.isfinite(r.rel_grad)]
    median_rel = float(np.median(rel)) if rel else None
    by_profile = ratio is not None and ratio > EXPLODING_RATIO
    by_size = median_rel is not None and median_rel > REL_GRAD_MAX
    if not (by_profile or by_size):
        return None
    biggest = sorted((r for r in rows if r.grad_rms > 0), key=lambda r: -r.grad_rms)[:3]
    parts = []
    if by_profile:
        parts.append(
            f"the gradient reaching the first layer is {ratio:.3g} times the gradient at the last layer (more "
            f"than {EXPLODING_RATIO:g}): going back towards the input it grows by about "
            f"{10 ** -(slope or 0.0):.3g}x per layer (mean-field gain chi > 1, the chaotic phase)"
        )
    if by_size:
        parts.append(
            f"the median relative gradient ||g||/||w|| over the layers is {median_rel:.3g} (more than "
            f"{REL_GRAD_MAX:g}): one SGD step at a learning rate of 1e-3 would change the weights by "
            f"{1e-3 * median_rel:.3g} times their norm"  # type: ignore[operator]
        )
    severe = (ratio is not None and ratio > EXPLODING_RATIO**2) or (
        median_rel is not None and median_rel > REL_GRAD_MAX**2
    )
    return Finding(
        kind="exploding",
        severity="error" if severe else "warning",
        steps=[step],
        layers=[r.name for r in biggest],
        evidence={
            "first_last_rms_ratio": ratio,
            "log10_rms_slope_per_layer": slope,
            "median_rel_grad": median_rel,
            "ratio_threshold": EXPLODING_RATIO,
            "rel_grad_threshold": REL_GRAD_MAX,
        },
        explanation="At initialization " + "; and ".join(parts) + ". The weights are initialised too large.",
        remedies=remedies_for("exploding"),
    )


def _make_inputs(
    model: nn.Module, batch: Any, input_shape: Sequence[int] | None, batch_size: int, gen: torch.Generator
) -> tuple[Any, ...]:
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)

    def place(x: Any) -> Any:  # float inputs follow the model's dtype (fp16/bf16 models)
        if not isinstance(x, torch.Tensor):
            return x
        return x.to(device, dtype) if x.is_floating_point() else x.to(device)

    if batch is not None:
        items = batch if isinstance(batch, tuple) else (batch,)
        return tuple(place(x) for x in items)
    if input_shape is None:
        raise ValueError("check_model needs a batch or an input_shape")
    if any(int(s) < 1 for s in input_shape) or batch_size < 1:
        raise ValueError(
            f"input shape and batch size must be positive, got {list(input_shape)} and {batch_size}"
        )
    shape = (batch_size, *(int(s) for s in input_shape))
    first = next((m for m in model.modules() if any(True for _ in m.parameters(recurse=False))), None)
    if isinstance(first, nn.Embedding):  # a token model: integer ids
        return (torch.randint(0, first.num_embeddings, shape, generator=gen).to(device),)
    numel = math.prod(shape)
    if numel > 2**31:
        raise ValueError(f"the random batch {list(shape)} would hold {numel:,} numbers; use a smaller shape")
    return (place(torch.randn(shape, generator=gen)),)


def _block_profile(model: nn.Module, rows: Sequence[CheckRow]) -> BlockProfile | None:
    """The gradient profile over the largest set of repeated blocks (a ``ModuleList``/``Sequential`` whose
    numbered children hold layers), or None when the model has fewer than :data:`MIN_BLOCKS` such blocks."""
    modules = dict(model.named_modules())
    groups: dict[str, dict[int, dict[str, CheckRow]]] = {}
    for row in rows:
        parts = row.name.split(".")
        for i, part in enumerate(parts[:-1]):
            prefix = ".".join(parts[:i])
            if part.isdigit() and isinstance(modules.get(prefix), nn.ModuleList | nn.Sequential):
                role = ".".join(parts[i + 1 :])
                groups.setdefault(prefix, {}).setdefault(int(part), {})[role] = row
                break
    best = max(groups, key=lambda k: len(groups[k]), default=None)
    if best is None or len(groups[best]) < MIN_BLOCKS:
        return None
    blocks = [groups[best][i] for i in sorted(groups[best])]
    roles = [r for r in blocks[0] if all(r in b and b[r].has_grad for b in blocks)]
    norms = {role: [b[role].grad_norm for b in blocks] for role in roles}
    ratios = {
        role: v[-1] / v[0]
        for role, v in norms.items()
        if v[0] > 0 and math.isfinite(v[0]) and math.isfinite(v[-1])
    }
    first = sorted(blocks[0].values(), key=lambda r: r.depth)
    norm_rows = [r for r in first if r.type in NORM_TYPES]
    other_rows = [r for r in first if r.type not in NORM_TYPES]
    placement = None
    if norm_rows and other_rows:
        placement = "pre" if norm_rows[0].depth < other_rows[0].depth else "post"
    norm_roles = [role for role in roles if blocks[0][role].type in NORM_TYPES]
    main = [v for role, v in ratios.items() if role not in norm_roles]
    return BlockProfile(
        container=best,
        blocks=len(blocks),
        norm_placement=placement,
        norms=norms,
        ratios=ratios,
        ratio=float(np.median(main)) if main else None,
        norm_roles=norm_roles,
    )


def _concentration_finding(profile: BlockProfile, step: int) -> Finding | None:
    """An info finding on the per-block gradient profile of normalized blocks (pre-LN vs post-LN)."""
    if profile.norm_placement is None or profile.ratio is None:
        return None
    n, ratio = profile.blocks, profile.ratio
    last = f"{profile.container}.{n - 1}"
    main = [role for role in profile.ratios if role not in profile.norm_roles]
    head = (
        f"{n} {profile.norm_placement}-LN blocks in {profile.container}: from the first block to the last the "
        f"gradient norm changes by a factor of {ratio:.2f} (median over {len(main)} parameter layers per "
        "block, normalization layers left out)"
    )
    if profile.norm_placement == "post":
        text = (
            f"{head}. Post-LN blocks do not damp the gradient near the output: Xiong et al. 2020 (Theorem 1) "
            f"show that at init the gradient of a post-LN transformer's last layers is about sqrt(L) = "
            f"{math.sqrt(n):.1f} times that of the same pre-LN model, which is why post-LN training needs a "
            "learning-rate warm-up (or pre-LN) to stay stable."
        )
    else:
        agrees = ratio < 1.0
        text = (
            f"{head}. In pre-LN blocks the residual stream grows with depth and each block's LayerNorm "
            "divides by it, so the early blocks are expected to get the larger gradients (NormFormer, Shleifer "
            "et al. 2021) and the gradient near the output about 1/sqrt(L) of a post-LN model's (Xiong et al. "
            "2020). "
            + (
                "This model shows that: its gradient falls towards the output."
                if agrees
                else "This model does not show it at init: the last block's gradient is not smaller than the "
                "first's (measured here, whatever the papers' picture)."
            )
        )
    return Finding(
        kind="gradient_concentration",
        severity="info",
        steps=[step],
        layers=[f"{last}.{role}" for role in sorted(main, key=lambda r: -profile.ratios[r])][:5],
        evidence={
            "container": profile.container,
            "blocks": n,
            "norm_placement": profile.norm_placement,
            "last_first_ratio": ratio,
            "role_ratios": dict(profile.ratios),
        },
        explanation=text,
        remedies=[],
    )


def _run_once(
    model: nn.Module,
    inputs: tuple[Any, ...],
    loss: str,
    targets: torch.Tensor | None,
    seed: int,
    theory_note: str | None = None,
    thresholds: Thresholds | None = None,
) -> CheckReport:
    from gradsentry import theory
    from gradsentry.diagnose import diagnose
    from gradsentry.monitor import Monitor

    pred = None
    note = theory_note
    if note is None:
        try:
            pred = theory.predict(model, example_input=inputs if len(inputs) > 1 else inputs[0])
        except theory.TheoryNotApplicable as exc:
            note = str(exc)
        except Exception as exc:  # never let the prediction hide the measurement; the forward reports it
            note = f"not computed ({type(exc).__name__})"
    gen = torch.Generator().manual_seed(seed + 1)
    model.zero_grad(set_to_none=True)
    mon = Monitor(model, every=1, thresholds=thresholds)
    try:
        out, order = _forward(model, inputs)
        value, used_targets = _loss(_output_tensor(out), loss, targets, gen)
        if not value.requires_grad:
            raise InputFitError(
                "the loss does not depend on any trainable parameter (every parameter is frozen, or the "
                "forward detaches its output): there is no gradient to check"
            )
        value.backward()
        rec = mon.step(loss=value)
        layers = mon.layers
    finally:
        mon.close(write_findings=False)
    assert rec is not None
    position = {n: i for i, n in enumerate(order)}
    layer_names = sorted((position.get(info.name, math.inf), info.name) for info in layers)
    follows: dict[str, Any] = {}
    for act in rec.activations:  # the activation belongs to the nearest layer before it in forward order
        before = [n for p, n in layer_names if p < position.get(act.name, -1)]
        if before and before[-1] not in follows:
            follows[before[-1]] = act
    info_by_name = {info.name: info for info in layers}
    rows = []
    for st in rec.layers:
        info = info_by_name.get(st.name)
        follow = follows.get(st.name)
        rows.append(
            CheckRow(
                depth=st.depth,
                name=st.name,
                type=info.type if info else "",
                params=info.params if info else st.numel,
                grad_norm=st.grad_norm,
                grad_rms=st.grad_rms,
                rel_grad=st.grad_norm / st.weight_norm if st.weight_norm else None,
                has_grad=st.has_grad,
                activation=follow.type if follow else None,
                saturated_frac=follow.saturated_frac if follow else None,
                dead_frac=follow.dead_frac if follow else None,
            )
        )
    max_dev = None
    if pred is not None:
        by_name = {r.name: r for r in rows}
        try:
            example = per_example_rms(model, inputs[0], loss, used_targets)
        except Exception as exc:  # a model torch.func cannot transform: keep the measurement, say why
            example = {}
            note = f"per-example gradients not computed ({type(exc).__name__}: {exc})"
        for name, value_rms in example.items():
            if name in by_name:
                by_name[name].example_rms = value_rms
        anchor = by_name.get(pred.layers[-1].name)
        if anchor is not None and anchor.example_rms:
            scale = anchor.example_rms / pred.layers[-1].grad_rms
            devs = []
            for lp in pred.layers:
                row = by_name.get(lp.name)
                if row is not None:
                    row.predicted_rms = lp.grad_rms * scale
                    if row.example_rms and row.predicted_rms > 0:
                        devs.append(abs(math.log10(row.predicted_rms / row.example_rms)))
            max_dev = max(devs) if devs else None
    ratio, slope, head = _fit_slope([r for r, st in zip(rows, rec.layers, strict=True) if st.has_grad])
    findings = diagnose([rec], layers=layers, thresholds=thresholds)
    n_examples = int(inputs[0].shape[0]) if isinstance(inputs[0], torch.Tensor) and inputs[0].dim() else 0
    if n_examples < DEAD_UNITS_MIN_BATCH:  # "zero for every sample" means little on a few samples
        findings = [f for f in findings if f.kind != "dead_units"]
    init_finding = _exploding_at_init(ratio, slope, rows, rec.step)
    if init_finding is not None and not any(f.kind == "exploding" for f in findings):
        findings.insert(0, init_finding)
    profile = _block_profile(model, rows)
    if profile is not None:
        concentration = _concentration_finding(profile, rec.step)
        if concentration is not None:
            findings.append(concentration)
    shape = list(inputs[0].shape) if isinstance(inputs[0], torch.Tensor) else []
    return CheckReport(
        rows=rows,
        loss=float(value.detach()),
        loss_kind=loss,
        input_shape=shape,
        first_last_ratio=ratio,
        log_slope=slope,
        head=head,
        theory_max_dev=max_dev,
        blocks=profile,
        findings=findings,
        theory=note,
        record=rec,
    )


def check_model(
    model: nn.Module,
    batch: Any = None,
    *,
    input_shape: Sequence[int] | None = None,
    targets: torch.Tensor | None = None,
    batch_size: int = 16,
    loss: LossName = "ce",
    seed: int = 0,
    fix: FixName | None = None,
    thresholds: Thresholds | None = None,
) -> CheckReport:
    """Run one forward and backward pass at init and report the per-layer gradient profile and findings.

    Args:
        model: the model (its gradients are overwritten; with ``fix`` its weights are re-initialised).
        batch: an input batch ``[N, ...]`` or a tuple of positional inputs; or None with ``input_shape``.
        input_shape: per-example input shape (e.g. ``(3, 32, 32)``) for a random batch: standard normal,
            or integer token ids in ``[0, num_embeddings)`` when the model's first layer is an Embedding.
        targets: labels ``[N]`` for ``ce`` or targets for ``mse``; random (seeded) when None.
        batch_size: rows of the random batch.
        loss: ``ce`` (cross-entropy on the last dimension), ``mse`` or ``sum`` (of the output).
        seed: seeds the random batch and targets.
        fix: ``he`` / ``xavier`` / ``xavier_gain`` (:func:`gradsentry.remedies.init.reinit`) or ``lsuv``
            (:func:`gradsentry.remedies.init.lsuv` on the batch); the check is then run again into
            ``report.fixed``.
        thresholds: a :class:`gradsentry.Thresholds` for the measurement (saturation bands) and the
            diagnosis; the defaults when None.

    Returns:
        A :class:`CheckReport`.

    Raises:
        InputFitError: the batch does not fit the model (the message names the layer that rejected it) or
            the loss does not fit its output.
        ValueError: on an unknown loss or fix, or neither ``batch`` nor ``input_shape``.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; valid: {', '.join(LOSSES)}")
    if fix is not None and fix not in FIXES:
        raise ValueError(f"unknown fix {fix!r}; valid: {', '.join(FIXES)}")
    gen = torch.Generator().manual_seed(seed)
    inputs = _make_inputs(model, batch, input_shape, batch_size, gen)
    report = _run_once(model, inputs, loss, targets, seed, thresholds=thresholds)
    if fix is not None:
        from gradsentry.remedies.init import lsuv, reinit

        example = inputs if len(inputs) > 1 else inputs[0]
        if fix == "lsuv":
            report.fix_report = [asdict(x) for x in lsuv(model, example).layers]
        else:
            report.fix_report = [asdict(x) for x in reinit(model, fix, example_input=example)]
        report.fix = fix
        note = LSUV_THEORY_NOTE if fix == "lsuv" else None
        report.fixed = _run_once(model, inputs, loss, targets, seed, theory_note=note, thresholds=thresholds)
    return report
