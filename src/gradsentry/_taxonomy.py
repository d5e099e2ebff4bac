"""Module families: which modules are activations (and which checks apply to them), norms, weight layers.

Activations are recognised by type, not by exact class name: a module is an activation of kind ``K``
when ``torch.nn.K`` is in its class's method resolution order (so subclasses count, and ``ReLU6``, a
subclass of ``Hardtanh``, is ``ReLU6``: the most specific class wins), or when a class in that order
has the name of one of the activation classes of Hugging Face ``transformers``
(``transformers/activations.py``: ``NewGELUActivation``, ``GELUActivation``, ``SiLUActivation``, ...),
matched by name so that ``transformers`` need not be imported (copies of those classes in other code
bases count too). Each kind belongs to a family that says which statistics are defined for it:

| family | kinds | saturated fraction | dead-unit fraction |
| --- | --- | --- | --- |
| ``sigmoid`` | Sigmoid, Hardsigmoid | yes (output near 0 or 1) | no |
| ``tanh`` | Tanh, Softsign, Hardtanh | yes (\\|output\\| near 1) | no |
| ``relu`` | ReLU, LeakyReLU, PReLU, RReLU, ELU, CELU, SELU; ReLU6 (also saturates at 6) | ReLU6 only | yes (x <= 0 on the whole batch) |
| ``smooth`` | GELU, SiLU, Mish, Softplus, Hardswish and the transformers GELU/SiLU variants | no | no |

Each kind's row of :data:`ACTIVATION_TABLE` also says which saturation rule applies (and with which band),
which nonlinearity :func:`torch.nn.init.calculate_gain` gives its He/Xavier gain (He et al. 2015,
arXiv:1502.01852; GELU, SiLU and the other smooth ReLU-like kinds take ReLU's sqrt 2, an approximation),
and whether the mean-field theory (Poole et al. 2016, arXiv:1606.05340; Schoenholz et al. 2017,
arXiv:1611.01232) can integrate it (an elementwise, deterministic function of one input).

Normalizations (:data:`NORMALIZATION_TABLE`) are recognised the same way: by type for ``torch.nn``,
by class name for Hugging Face's RMS norms (``LlamaRMSNorm``, ``T5LayerNorm``, ... and any class whose
name ends in ``RMSNorm``). Weight layers (:func:`weight_family`): Linear, Bilinear, convolutions
(transposed ones apart), embeddings.

Activations called as functions (``F.relu``, ``torch.tanh``, ``x * torch.sigmoid(x)``) are not
modules: no hook can see them, so their saturation and dead units are not measured
(:func:`functional_activation_note`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:  # torch is imported only by the functions that look at modules: log readers never need it
    from torch import nn

SIGMOID: Final = "sigmoid"
TANH: Final = "tanh"
RELU: Final = "relu"
SMOOTH: Final = "smooth"
OTHER: Final = "other"

# ------------------------------------------------------------------------------------------ bands
#: Default sigmoid saturation band: output < 0.01 or > 0.99, i.e. ``|x| > ln(99) ≈ 4.595`` (LeCun et
#: al. 1998, "Efficient BackProp": the derivative there is < 0.0099, 4% of its maximum 0.25). The
#: documented, overridable threshold is ``gradsentry.Thresholds.sigmoid_saturation`` (same default).
SIGMOID_SATURATION: Final = 0.01
#: ``|x|`` beyond which the sigmoid is saturated at the default band: ``ln(99) ≈ 4.595``.
SIGMOID_SATURATION_X: Final = math.log((1.0 - SIGMOID_SATURATION) / SIGMOID_SATURATION)
#: Default tanh/softsign saturation band: ``|y| > 1 - 0.01``, i.e. ``|x| > atanh(0.99) ≈ 2.647`` for
#: tanh (derivative < 0.02); ``gradsentry.Thresholds.tanh_saturation``.
TANH_SATURATION: Final = 0.01
TANH_SATURATION_Y: Final = 1.0 - TANH_SATURATION
#: Hardsigmoid is flat (derivative 0) for ``|x| >= 3``; ReLU6 for ``x >= 6`` (and ``x <= 0``: a dead unit).
HARDSIGMOID_SATURATION_X: Final = 3.0
RELU6_SATURATION_X: Final = 6.0


def sigmoid_saturation_x(band: float) -> float:
    """``|x|`` beyond which ``sigmoid(x)`` is within ``band`` of 0 or 1: ``ln((1 - band) / band)``.

    Args:
        band: distance of the output from its asymptote, in (0, 0.5).

    Raises:
        ValueError: ``band`` outside (0, 0.5).

    Example:
        >>> round(sigmoid_saturation_x(0.01), 4)
        4.5951
    """
    if not 0.0 < band < 0.5:
        raise ValueError(f"a saturation band must be in (0, 0.5), got {band!r}")
    return math.log((1.0 - band) / band)


# ------------------------------------------------------------------------------------- activations
@dataclass(frozen=True)
class Activation:
    """One activation kind's facts.

    Attributes:
        family: ``"sigmoid"``, ``"tanh"``, ``"relu"``, ``"smooth"`` or ``"other"``.
        saturation: the saturation rule (None: unbounded, no saturated fraction): ``"sigmoid_band"``
            (``|x| > sigmoid_saturation_x(band)``), ``"tanh_band"`` (``|y| > 1 - band``), ``"hardtanh"``
            (``x`` at or beyond the module's ``min_val``/``max_val``), ``"hardsigmoid"``
            (``|x| >= 3``), ``"relu6"`` (``x >= 6``).
        dead_units: whether the dead-unit fraction (``x <= 0`` on the whole batch) is measured.
        gain: the ``nonlinearity`` of :func:`torch.nn.init.calculate_gain` for He/Xavier init
            (``"leaky_relu"`` takes the module's slope); ``"linear"`` (gain 1) where none applies.
        exact_gain: torch defines this kind's gain (False: ReLU's gain used as an approximation).
        mean_field: an elementwise, deterministic function that the mean-field integrals cover.
        monitored: the Monitor records this kind's input statistics.
    """

    family: str
    saturation: str | None = None
    dead_units: bool = False
    gain: str = "linear"
    exact_gain: bool = False
    mean_field: bool = True
    monitored: bool = True


#: kind (a torch.nn class name) -> its facts. The one list of activation kinds.
ACTIVATION_TABLE: Final[dict[str, Activation]] = {
    "Sigmoid": Activation(SIGMOID, "sigmoid_band", gain="sigmoid", exact_gain=True),
    "Hardsigmoid": Activation(SIGMOID, "hardsigmoid"),
    "Tanh": Activation(TANH, "tanh_band", gain="tanh", exact_gain=True),
    "Softsign": Activation(TANH, "tanh_band"),
    "Hardtanh": Activation(TANH, "hardtanh"),
    "ReLU": Activation(RELU, None, True, "relu", True),
    "ReLU6": Activation(RELU, "relu6", True, "relu"),
    "LeakyReLU": Activation(RELU, None, True, "leaky_relu", True),
    "PReLU": Activation(RELU, None, True, mean_field=False),  # learned slopes
    "RReLU": Activation(RELU, None, True, mean_field=False),  # random slopes in training
    "ELU": Activation(RELU, None, True, "relu"),
    "CELU": Activation(RELU, None, True, "relu"),
    "SELU": Activation(RELU, None, True, "selu", True),
    "GELU": Activation(SMOOTH, gain="relu"),
    "SiLU": Activation(SMOOTH, gain="relu"),
    "Mish": Activation(SMOOTH, gain="relu"),
    "Softplus": Activation(SMOOTH, gain="relu"),
    "Hardswish": Activation(SMOOTH, gain="relu"),
    # derivative -> 0 away from the origin (LogSigmoid for x > 0, Tanhshrink near 0): saturating for the
    # advice, integrated by the theory, not watched by the Monitor
    "LogSigmoid": Activation(OTHER, monitored=False),
    "Tanhshrink": Activation(OTHER, monitored=False),
}

#: kind -> (family, has a saturation rule, has a dead-unit rule) for the kinds the Monitor watches.
ACTIVATION_RULES: Final[dict[str, tuple[str, bool, bool]]] = {
    k: (a.family, a.saturation is not None, a.dead_units) for k, a in ACTIVATION_TABLE.items() if a.monitored
}


@functools.cache
def _torch_kinds() -> dict[type, str]:
    from torch import nn

    return {getattr(nn, kind): kind for kind in ACTIVATION_TABLE}


def activation_types(*, mean_field: bool = False) -> tuple[type[nn.Module], ...]:
    """The ``torch.nn`` activation classes of the table (only those the theory covers if ``mean_field``)."""
    kinds = _torch_kinds()
    return tuple(cls for cls, k in kinds.items() if not mean_field or ACTIVATION_TABLE[k].mean_field)


#: transformers activation class name -> the kind whose rules apply (transformers/activations.py).
TRANSFORMERS_ACTIVATIONS: Final[dict[str, str]] = {
    "GELUActivation": "GELU",
    "NewGELUActivation": "GELU",
    "GELUTanh": "GELU",
    "FastGELUActivation": "GELU",
    "QuickGELUActivation": "GELU",
    "ClippedGELUActivation": "GELU",
    "AccurateGELUActivation": "GELU",
    "LaplaceActivation": "GELU",
    "XIELUActivation": "GELU",
    "SiLUActivation": "SiLU",
    "MishActivation": "Mish",
    "SqrtSoftplusActivation": "Softplus",
    "ReLUSquaredActivation": "ReLU",  # relu(x)^2: zero, with zero gradient, for x <= 0
}

#: Kinds whose saturated fraction is measured.
BOUNDED_ACTIVATIONS: Final = frozenset(k for k, (_, sat, _) in ACTIVATION_RULES.items() if sat)
#: Kinds whose dead-unit fraction is measured (zero or negative-slope region for x <= 0).
RELU_FAMILY: Final = frozenset(k for k, (_, _, dead) in ACTIVATION_RULES.items() if dead)
#: Every activation kind the Monitor watches.
ACTIVATIONS: Final = frozenset(ACTIVATION_RULES)

#: Bounded activation names whose derivative goes to zero at large inputs (saturation), for the advice.
SATURATING_ACTIVATIONS: Final = BOUNDED_ACTIVATIONS | {
    k for k, a in ACTIVATION_TABLE.items() if a.family == OTHER
}


def gain_nonlinearity(module: nn.Module | None) -> tuple[str, float | None]:
    """``(nonlinearity, param)`` for :func:`torch.nn.init.calculate_gain` of an activation module.

    ``("linear", None)`` for None, non-activations and kinds without a gain (Hardtanh, Softsign, ...).

    Example:
        >>> from torch import nn
        >>> gain_nonlinearity(nn.LeakyReLU(0.2)), gain_nonlinearity(nn.GELU())
        (('leaky_relu', 0.2), ('relu', None))
    """
    kind = activation_kind(module) if module is not None else None
    if kind is None:
        return "linear", None
    gain = ACTIVATION_TABLE[kind].gain
    if gain == "leaky_relu":
        return gain, float(getattr(module, "negative_slope", 0.01))
    return gain, None


# ----------------------------------------------------------------------------------- normalizations
BATCH: Final = "batch"
LAYER: Final = "layer"
GROUP: Final = "group"
INSTANCE: Final = "instance"
RMS: Final = "rms"

#: normalization class name -> family: ``"batch"`` (statistics over the batch, per channel), ``"layer"``
#: (over the features of one example, centred), ``"group"``, ``"instance"``, ``"rms"`` (not centred).
NORMALIZATION_TABLE: Final[dict[str, str]] = {
    "BatchNorm1d": BATCH,
    "BatchNorm2d": BATCH,
    "BatchNorm3d": BATCH,
    "SyncBatchNorm": BATCH,
    "LazyBatchNorm1d": BATCH,
    "LazyBatchNorm2d": BATCH,
    "LazyBatchNorm3d": BATCH,
    "LayerNorm": LAYER,
    "GroupNorm": GROUP,
    "InstanceNorm1d": INSTANCE,
    "InstanceNorm2d": INSTANCE,
    "InstanceNorm3d": INSTANCE,
    "LazyInstanceNorm1d": INSTANCE,
    "LazyInstanceNorm2d": INSTANCE,
    "LazyInstanceNorm3d": INSTANCE,
    "RMSNorm": RMS,
    # Hugging Face transformers, by name (``x * rsqrt(mean(x^2) + eps) * weight``, weight init 1)
    "T5LayerNorm": RMS,
    "LlamaRMSNorm": RMS,
}
#: Gemma's RMS norm scales by ``1 + weight`` (weight init 0): an RMS norm, but not ``x * weight``.
SHIFTED_RMS_NORMS: Final = frozenset({"GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm"})

#: Normalization module names (records hold class names); when the model has one, other fixes rank first.
NORMALIZATION_LAYERS: Final = frozenset(NORMALIZATION_TABLE)


def normalization_family(type_name: str) -> str | None:
    """The family of a normalization class name (any name ending in ``RMSNorm`` is ``"rms"``), or None.

    Example:
        >>> normalization_family("BatchNorm2d"), normalization_family("MistralRMSNorm")
        ('batch', 'rms')
    """
    family = NORMALIZATION_TABLE.get(type_name)
    if family is None and type_name.endswith("RMSNorm"):
        return RMS
    return family


def is_normalization(type_name: str) -> bool:
    """Whether a class name is a normalization layer's (see :func:`normalization_family`)."""
    return normalization_family(type_name) is not None


def normalization_kind(module: nn.Module) -> str | None:
    """The normalization family of ``module`` by its class hierarchy (subclasses count), or None."""
    for cls in type(module).__mro__:
        family = normalization_family(cls.__name__)
        if family is not None:
            return family
    return None


@functools.cache
def weight_types() -> tuple[type[nn.Module], ...]:
    """Layers whose outputs an activation normally follows (linear, convolution, embedding)."""
    from torch import nn

    return (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd, nn.Embedding, nn.EmbeddingBag)


def weight_family(module: nn.Module) -> str | None:
    """``"linear"``, ``"bilinear"``, ``"conv"``, ``"conv_transpose"``, ``"embedding"`` or None."""
    from torch import nn

    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Bilinear):
        return "bilinear"
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return "conv_transpose"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, nn.Embedding | nn.EmbeddingBag):
        return "embedding"
    return None


@functools.cache
def dense_types() -> tuple[type[nn.Module], ...]:
    """Layers whose weight is a random linear map of the input by fan-in: Linear and (non-transposed)
    Conv1d/2d/3d; the layers the theory's variance map reads and :mod:`gradsentry.remedies.init` re-draws."""
    from torch import nn

    return (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def activation_kind(module: nn.Module) -> str | None:
    """The activation kind of ``module`` (a key of :data:`ACTIVATION_TABLE`), or None if it is none.

    Example:
        >>> from torch import nn
        >>> activation_kind(nn.ReLU6()), activation_kind(nn.Linear(2, 2))
        ('ReLU6', None)
        >>> class NewGELUActivation(nn.Module): ...
        >>> activation_kind(NewGELUActivation())
        'GELU'
    """
    for cls in type(module).__mro__:
        kind = _torch_kinds().get(cls) or TRANSFORMERS_ACTIVATIONS.get(cls.__name__)
        if kind is not None:
            return kind if ACTIVATION_TABLE[kind].monitored else None
    return None


def activation_family(kind: str) -> str | None:
    """The family (``"sigmoid"``, ``"tanh"``, ``"relu"``, ``"smooth"``, ``"other"``) of an activation kind, or None."""
    row = ACTIVATION_TABLE.get(kind)
    return row.family if row else None


def functional_activation_note(model: nn.Module) -> str | None:
    """The note to log when ``model`` has weight layers but no activation module, else None.

    Such a model calls its activations as functions (``F.relu``, ``torch.tanh``, e.g. the default of
    ``nn.TransformerEncoderLayer``), which no module hook sees.
    """
    modules = list(model.modules())
    if any(activation_kind(m) is not None for m in modules):
        return None
    if not any(isinstance(m, weight_types()) for m in modules):
        return None
    return (
        f"gradsentry: {type(model).__name__} has no activation module the Monitor recognises (its "
        "activations are probably functional calls such as F.relu or torch.tanh, which are not modules), "
        "so the saturation and dead-unit checks are off; use nn.ReLU()/nn.Tanh()/... modules to enable them"
    )
