"""What the mean-field prediction covers, and the plain reason where it makes none.

Covered (:func:`gradsentry.theory.predict`): Linear and Conv1d/2d/3d layers read by fan-in (the
variance map of Poole et al. 2016, arXiv:1606.05340, with He et al. 2015's fan-in bookkeeping,
arXiv:1502.01852), every elementwise deterministic activation of :data:`gradsentry._taxonomy.ACTIVATION_TABLE`
(module or functional call; Schoenholz et al. 2017's gain ``chi``, arXiv:1611.01232), residual sums
(Yang & Schoenholz 2017, arXiv:1712.08969), normalization layers (BatchNorm, LayerNorm, GroupNorm,
RMSNorm and Hugging Face's RMS norms by name: they reset the variance map to ``<gamma^2> + <beta^2>``,
Ioffe & Szegedy 2015), average pooling, reshapes, dropout (``1/(1-p)`` on the second moment and the
backward signal in training, neutral in eval) and scaling by a constant.

Not covered (:class:`TheoryNotApplicable`, whose ``module`` names the first module or graph node where
the prediction stops and ``reason`` says why): attention (data-dependent softmax mixing of positions),
recurrence and any layer called more than once per forward (weights shared across time steps: the
i.i.d.-weights assumption fails), embeddings (a lookup, not a random linear map), products of two
tensors (gating), concatenation, indexing, max pooling, transposed convolutions, instance norm,
learned or random activations (PReLU, RReLU), alpha and feature dropout in training, and any other op :mod:`gradsentry.theory.graph` does not list.
"""

from __future__ import annotations

from torch import nn

from gradsentry import _taxonomy

__all__ = [
    "ACTIVATION_TYPES",
    "LINEAR_TYPES",
    "NEUTRAL_TYPES",
    "NORM_TYPES",
    "POOL_TYPES",
    "TheoryNotApplicable",
    "check_supported",
    "is_norm",
    "why_not",
]

LINEAR_TYPES: tuple[type[nn.Module], ...] = _taxonomy.dense_types()
"""Layer types whose init variance :func:`~gradsentry.theory.predict` reads (Conv by fan-in)."""

ACTIVATION_TYPES: tuple[type[nn.Module], ...] = _taxonomy.activation_types(mean_field=True)
"""Elementwise activation modules the theory integrates (the ``mean_field`` rows of the taxonomy; any
elementwise callable works in :func:`~gradsentry.theory.chi`)."""

NEUTRAL_TYPES: tuple[type[nn.Module], ...] = (nn.Flatten, nn.Identity, nn.Unflatten)
"""Modules that do not change the per-unit statistics."""

FOLLOWED_NORMS: frozenset[str] = frozenset({_taxonomy.BATCH, _taxonomy.LAYER, _taxonomy.GROUP, _taxonomy.RMS})
"""Normalization families (:data:`gradsentry._taxonomy.NORMALIZATION_TABLE`) the propagation follows;
instance norm is not (its statistics are per example and channel over positions only)."""

NORM_TYPES: tuple[type[nn.Module], ...] = tuple(
    getattr(nn, name)
    for name, family in _taxonomy.NORMALIZATION_TABLE.items()
    if family in FOLLOWED_NORMS and hasattr(nn, name)
)
"""The ``torch.nn`` normalization layers followed (see :func:`is_norm` for the ones recognised by name)."""

POOL_TYPES: tuple[type[nn.Module], ...] = (
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
)
"""Average pooling layers, taken as neutral (positions assumed fully correlated)."""


def is_norm(module: nn.Module) -> bool:
    """A normalization layer the propagation follows: :data:`NORM_TYPES`, or an RMS norm recognised by
    name (:func:`gradsentry._taxonomy.normalization_kind`: ``LlamaRMSNorm``, ``T5LayerNorm``, ...) that
    holds a ``weight`` (scale ``x * weight``; Gemma's ``1 + weight`` norms are left out)."""
    if isinstance(module, NORM_TYPES):
        return True
    if _taxonomy.normalization_kind(module) != _taxonomy.RMS:
        return False
    # _parameters, not getattr: while torch.fx traces, a module's getattr returns proxies
    return type(module).__name__ not in _taxonomy.SHIFTED_RMS_NORMS and isinstance(
        module._parameters.get("weight"), nn.Parameter
    )


class TheoryNotApplicable(ValueError):
    """No mean-field prediction for this model; the message says where it stops and why.

    Attributes:
        module: the qualified name of the module (or the ``torch.fx`` node) where the prediction stops,
            or None when the reason is the model as a whole (no Linear/Conv layer, several outputs).
        reason: why, in plain words.
    """

    def __init__(self, message: str, *, module: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.module = module
        self.reason = reason if reason is not None else message


_ATTENTION: tuple[type[nn.Module], ...] = (
    nn.MultiheadAttention,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
    nn.TransformerEncoder,
    nn.TransformerDecoder,
    nn.Transformer,
)
_RECURRENT: tuple[type[nn.Module], ...] = (nn.RNNBase, nn.RNNCellBase)
_NO_THEORY: tuple[type[nn.Module], ...] = (
    *_ATTENTION,
    *_RECURRENT,
    nn.Embedding,
    nn.EmbeddingBag,
    nn.modules.conv._ConvTransposeNd,
)


def why_not(module: nn.Module) -> str:
    """The plain reason a module gets no mean-field prediction."""
    if isinstance(module, _ATTENTION):
        return (
            "attention mixes positions with data-dependent softmax weights; the mean-field map of "
            "Linear/Conv layers and elementwise activations does not cover it"
        )
    if isinstance(module, _RECURRENT):
        return "a recurrent cell shares its weights across time steps; the theory assumes independent weights per layer"
    if isinstance(module, nn.Embedding | nn.EmbeddingBag):
        return "an embedding lookup is not a random linear map of its input"
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return "a transposed convolution's fan-in depends on the stride; only Linear and Conv layers are read"
    if _taxonomy.normalization_kind(module) is not None:
        return "a normalization the propagation does not follow (only batch, layer, group and RMS norms)"
    if _taxonomy.activation_kind(module) is not None and not isinstance(module, ACTIVATION_TYPES):
        return (
            "an activation with learned or random slopes; the theory integrates fixed elementwise functions"
        )
    return (
        "outside what the mean-field propagation covers (Linear/Conv, elementwise activations, "
        "normalization, residual sums, average pooling)"
    )


def not_applicable(name: str, module: nn.Module) -> TheoryNotApplicable:
    """The exception for module ``name``, naming it and saying why."""
    reason = why_not(module)
    return TheoryNotApplicable(
        f"no prediction for module {name!r} ({type(module).__name__}): {reason}", module=name, reason=reason
    )


def covered_leaf(module: nn.Module) -> bool:
    """A leaf module the propagation has a rule for."""
    return isinstance(
        module, (*LINEAR_TYPES, *ACTIVATION_TYPES, *NEUTRAL_TYPES, *POOL_TYPES, nn.modules.dropout._DropoutNd)
    ) or is_norm(module)


def check_supported(model: nn.Module) -> None:
    """Raise :class:`TheoryNotApplicable` if a module of ``model`` is outside the propagation's rules.

    Cheap (no forward pass); the graph walk finds unsupported functional ops later. Modules with
    children are looked at only when they are attention or recurrent containers; an RMS norm
    recognised by name is a leaf for the propagation even if it has children.
    """
    for name, mod in model.named_modules():
        if (
            isinstance(mod, _ATTENTION)
            and not isinstance(mod, nn.MultiheadAttention)
            and any(isinstance(m, nn.MultiheadAttention) for m in mod.modules())
        ):
            continue  # name the attention itself (encoder.layers.0.self_attn), not its container
        if isinstance(mod, _NO_THEORY):
            raise not_applicable(name, mod)
        if next(mod.children(), None) is not None or covered_leaf(mod):
            continue
        if not any(True for _ in mod.parameters(recurse=False)) and not any(
            True for _ in mod.buffers(recurse=False)
        ):
            continue  # a parameter-free module (e.g. a custom activation): judged by its graph ops
        raise not_applicable(name, mod)
