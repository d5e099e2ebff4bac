"""Ranked advice for each kind of finding, with the gradsentry call that applies it and the source paper.

The advice catalogue (beside the rules that use it) holds each fix once (:data:`CATALOG`, keyed by a short id); :func:`remedies_for` returns fresh
:class:`~gradsentry.records.Advice` objects, best first, tailored to what the diagnosis saw (saturating
activations, normalization layers already present, a spike before a non-finite step). Rankings follow the
usual order of practice: fix the cause (activation, initialization, architecture) before treating the symptom
(clipping, skipping steps).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from gradsentry._taxonomy import NORMALIZATION_LAYERS as NORMALIZATION_LAYERS
from gradsentry._taxonomy import SATURATING_ACTIVATIONS as SATURATING_ACTIVATIONS
from gradsentry.records import Advice

__all__ = ["ADAM_FAMILY", "CATALOG", "RemedyContext", "remedies_for"]

_PASCANU = (
    "Pascanu, Mikolov & Bengio 2013, On the difficulty of training recurrent neural networks, arXiv:1211.5063"
)
_GLOROT = (
    "Glorot & Bengio 2010, Understanding the difficulty of training deep feedforward neural networks, AISTATS"
)
_HE_INIT = "He et al. 2015, Delving Deep into Rectifiers, arXiv:1502.01852"
_RESNET = "He et al. 2016, Deep Residual Learning for Image Recognition, arXiv:1512.03385"
_BN_LN = (
    "Ioffe & Szegedy 2015, Batch Normalization, arXiv:1502.03167; Ba, Kiros & Hinton 2016, Layer "
    "Normalization, "
    "arXiv:1607.06450"
)
_AGC = (
    "Brock et al. 2021, High-Performance Large-Scale Image Recognition Without Normalization, "
    "arXiv:2102.06171"
)
_ZCLIP = "Kumar et al. 2025, ZClip: Adaptive Spike Mitigation for LLM Pre-Training, arXiv:2504.02507"
_LSUV = "Mishkin & Matas 2016, All you need is a good init, arXiv:1511.06422"
_WARMUP = "Goyal et al. 2017, Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour, arXiv:1706.02677"
_MIXED = "Micikevicius et al. 2018, Mixed Precision Training, arXiv:1710.03740"
_LEAKY = (
    "Maas, Hannun & Ng 2013, Rectifier Nonlinearities Improve Neural Network Acoustic Models, ICML workshop; "
    "Hendrycks & Gimpel 2016, Gaussian Error Linear Units, arXiv:1606.08415"
)
_ADAMW = "Loshchilov & Hutter 2019, Decoupled Weight Decay Regularization, arXiv:1711.05101"
_CS231N = "Karpathy, CS231n notes, Neural Networks Part 3 (update-to-weight ratio ~1e-3)"


@dataclass(frozen=True)
class _Entry:
    action: str
    api: str | None
    reference: str | None

    def make(self) -> Advice:
        return Advice(action=self.action, api=self.api, reference=self.reference)


CATALOG: Mapping[str, _Entry] = {
    "relu_he": _Entry(
        "Replace the saturating activations (Sigmoid/Tanh) with a ReLU-family activation (ReLU, LeakyReLU, "
        "GELU) "
        "and re-initialise the weights with He (Kaiming) init, which keeps the gradient variance constant "
        "through depth for rectifiers.",
        "gradsentry.reinit(model, 'he')",
        _HE_INIT,
    ),
    "xavier": _Entry(
        "If the activations must stay Sigmoid/Tanh, re-initialise with Xavier (Glorot) init so that each "
        "layer "
        "roughly preserves the gradient variance.",
        "gradsentry.reinit(model, 'xavier')",
        _GLOROT,
    ),
    "he_reinit": _Entry(
        "Re-initialise the weights with He (Kaiming) init matched to the ReLU-family activation.",
        "gradsentry.reinit(model, 'he')",
        _HE_INIT,
    ),
    "residual": _Entry(
        "Add residual (skip) connections so the gradient has an identity path from the loss to the early "
        "layers.",
        None,
        _RESNET,
    ),
    "normalization": _Entry(
        "Insert normalization layers (BatchNorm for CNNs/MLPs, LayerNorm for transformers/RNNs) before the "
        "activations, so that pre-activations stay at unit scale.",
        None,
        _BN_LN,
    ),
    "lsuv": _Entry(
        "Use data-driven LSUV initialization: rescale each layer so its output has unit variance on a real "
        "batch.",
        None,
        _LSUV,
    ),
    "clip_global": _Entry(
        "Clip the global gradient norm (e.g. max_norm=1.0) so one bad batch cannot move the weights "
        "arbitrarily far.",
        "gradsentry.ClipGlobalNorm(max_norm=1.0)",
        _PASCANU,
    ),
    "zclip": _Entry(
        "Use adaptive z-score clipping, which clips a gradient norm only when it spikes far above its recent "
        "mean and needs no hand-set threshold.",
        "gradsentry.ZClip()",
        _ZCLIP,
    ),
    "agc": _Entry(
        "Use adaptive gradient clipping (AGC), which limits each unit's gradient relative to its weight "
        "norm.",
        "gradsentry.AGC(0.01)",
        _AGC,
    ),
    "lower_lr_warmup": _Entry(
        "Lower the learning rate and start with a linear warm-up, so early large gradients take small steps.",
        None,
        _WARMUP,
    ),
    "weight_decay": _Entry(
        "Add (decoupled) weight decay to keep weight norms, and with them the gradient scale, bounded.",
        None,
        _ADAMW,
    ),
    "guard": _Entry(
        "Skip optimizer steps whose gradients hold NaN/inf, so one bad step cannot poison every weight.",
        "gradsentry.NonFiniteGuard()",
        _MIXED,
    ),
    "check_numerics": _Entry(
        "Look for the operation that produced the first NaN/inf (log or division by zero, overflow in fp16, "
        "exp of a large logit) and make it safe (clamp, eps, log-sum-exp, bf16 or loss scaling).",
        None,
        _MIXED,
    ),
    "leaky": _Entry(
        "Use an activation that keeps a gradient for negative inputs (LeakyReLU, GELU, ELU), so units "
        "cannot die.",
        None,
        _LEAKY,
    ),
    "check_optimizer": _Entry(
        "Check that the layer's parameters are in an optimizer parameter group with a non-zero learning rate "
        "(and not frozen by mistake); a healthy update-to-weight ratio is about 1e-3.",
        None,
        _CS231N,
    ),
}
"""Every remedy once, keyed by a short id; :func:`remedies_for` copies the entries it ranks."""


ADAM_FAMILY = frozenset(
    {
        "adam",
        "adamw",
        "nadam",
        "radam",
        "adamax",
        "sparseadam",
        "fusedadam",
        "adam8bit",
        "adamw8bit",
        "pagedadamw",
        "pagedadamw8bit",
        "adafactor",
        "lamb",
        "fusedlamb",
        "lion",
        "adabelief",
        "sophia",
    }
)
"""Optimizers (lower-case class names) whose step size is about the learning rate whatever the gradient
scale: clipping the gradient norm barely shortens their steps, so a lower learning rate comes first."""


@dataclass(frozen=True)
class RemedyContext:
    """What the diagnosis saw that changes the ranking (and wording) of remedies.

    Attributes:
        saturating: the model uses bounded activations (Sigmoid, Tanh, ...),
            see :data:`SATURATING_ACTIVATIONS`.
        has_normalization: the model already has normalization layers, see :data:`NORMALIZATION_LAYERS`.
        after_spike: a gradient spike or growth came before the non-finite step.
        optimizer: lower-case optimizer class name (``"sgd"``, ``"adamw"``...), when the run says.
        lr: the learning rate recorded at the onset of the problem, when known.
        max_grad_norm: the threshold at which the trainer already clips the global norm (HF
            ``max_grad_norm``, Lightning ``gradient_clip_val``), or None when it does not (or unknown).
        early: the problem started in the first logged points (a learning rate far too high).
        guarded: the non-finite steps were skipped (a guard or loss scaler already does that).
        monitored: the run was recorded by gradsentry's Monitor (per-layer records exist).
    """

    saturating: bool = False
    has_normalization: bool = False
    after_spike: bool = False
    optimizer: str | None = None
    lr: float | None = None
    max_grad_norm: float | None = None
    early: bool = False
    guarded: bool = False
    monitored: bool = False

    @property
    def adam_like(self) -> bool:
        """The optimizer normalises its steps (Adam family, see :data:`ADAM_FAMILY`)."""
        return self.optimizer is not None and self.optimizer.lower() in ADAM_FAMILY


def _rank(kind: str, ctx: RemedyContext) -> list[str]:
    if kind == "vanishing":
        if ctx.saturating:
            order = ["relu_he", "normalization", "residual", "xavier", "lsuv"]
        elif ctx.has_normalization:
            order = ["residual", "he_reinit", "lsuv", "normalization"]
        else:
            order = ["residual", "normalization", "he_reinit", "lsuv"]
        return order
    if kind == "exploding":
        if ctx.max_grad_norm is not None:  # clipping is already on: do not offer it first
            return ["lower_lr_warmup", "zclip", "agc", "normalization", "weight_decay", "clip_global"]
        if ctx.early or ctx.adam_like:
            return ["lower_lr_warmup", "clip_global", "zclip", "agc", "normalization", "weight_decay"]
        return ["clip_global", "zclip", "lower_lr_warmup", "agc", "normalization", "weight_decay"]
    if kind == "nonfinite":
        if ctx.after_spike:
            order = ["guard", "clip_global", "lower_lr_warmup", "check_numerics"]
        else:
            order = ["guard", "check_numerics", "lower_lr_warmup", "clip_global"]
        return [k for k in order if k != "guard"] if ctx.guarded else order  # not what it already does
    if kind == "saturation":
        return ["relu_he", "normalization", "xavier", "lsuv", "lower_lr_warmup"]
    if kind == "dead_units":
        return ["leaky", "lower_lr_warmup", "he_reinit", "normalization", "lsuv"]
    if kind == "stalled_layer":
        return ["check_optimizer", "normalization", "residual", "lsuv"]
    raise ValueError(
        f"unknown finding kind {kind!r}; expected one of: dead_units, exploding, nonfinite, saturation, "
        "stalled_layer, vanishing"
    )


def remedies_for(kind: str, context: RemedyContext | None = None) -> list[Advice]:
    """Ranked remedies (best first) for one kind of finding.

    Args:
        kind: the finding kind: ``vanishing``, ``exploding``, ``nonfinite``, ``saturation``, ``dead_units`` or
            ``stalled_layer``.
        context: what the diagnosis saw (saturating activations, normalization present, a spike before a
            non-finite step); the default assumes none of these.

    Returns:
        New :class:`~gradsentry.records.Advice` objects, best first (safe to modify).

    Raises:
        ValueError: if ``kind`` is not one of the kinds above.

    Example:
        >>> [r.api for r in remedies_for("nonfinite")][:1]
        ['gradsentry.NonFiniteGuard()']
    """
    ctx = context or RemedyContext()
    out = [CATALOG[key].make() for key in _rank(kind, ctx)]
    for r in out:
        if r.api == CATALOG["clip_global"].api and ctx.max_grad_norm is not None:
            r.action = (
                f"The run already clips the global norm at {ctx.max_grad_norm:g}: clipping bounds each step's "
                "length but does not remove the cause; keep it, and fix the learning rate first."
            )
        elif r.action == CATALOG["lower_lr_warmup"].action:
            if ctx.lr is not None and math.isfinite(ctx.lr) and ctx.lr > 0:
                r.action += f" The recorded learning rate was {ctx.lr:g}; try {ctx.lr / 10:g} or lower."
            if ctx.adam_like:
                r.action += (
                    f" With {ctx.optimizer} the step size is about the learning rate whatever the gradient "
                    "norm, so clipping alone does not shorten the steps."
                )
    return out
