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

Activations called as functions (``F.relu``, ``torch.tanh``, ``x * torch.sigmoid(x)``) are not
modules: no hook can see them, so their saturation and dead units are not measured
(:func:`functional_activation_note`).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:  # torch is imported only by the functions that look at modules: log readers never need it
    from torch import nn

SIGMOID: Final = "sigmoid"
TANH: Final = "tanh"
RELU: Final = "relu"
SMOOTH: Final = "smooth"

#: kind -> (family, has a saturation rule, has a dead-unit rule). Kinds are torch.nn class names.
ACTIVATION_RULES: Final[dict[str, tuple[str, bool, bool]]] = {
    "Sigmoid": (SIGMOID, True, False),
    "Hardsigmoid": (SIGMOID, True, False),
    "Tanh": (TANH, True, False),
    "Softsign": (TANH, True, False),
    "Hardtanh": (TANH, True, False),
    "ReLU": (RELU, False, True),
    "ReLU6": (RELU, True, True),
    "LeakyReLU": (RELU, False, True),
    "PReLU": (RELU, False, True),
    "RReLU": (RELU, False, True),
    "ELU": (RELU, False, True),
    "CELU": (RELU, False, True),
    "SELU": (RELU, False, True),
    "GELU": (SMOOTH, False, False),
    "SiLU": (SMOOTH, False, False),
    "Mish": (SMOOTH, False, False),
    "Softplus": (SMOOTH, False, False),
    "Hardswish": (SMOOTH, False, False),
}


@functools.cache
def _torch_kinds() -> dict[type, str]:
    from torch import nn

    return {getattr(nn, kind): kind for kind in ACTIVATION_RULES}


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
SATURATING_ACTIVATIONS: Final = BOUNDED_ACTIVATIONS | {"LogSigmoid", "Tanhshrink"}

#: Normalization module names (records hold class names); when the model has one, other fixes rank first.
NORMALIZATION_LAYERS: Final = frozenset(
    {
        "BatchNorm1d",
        "BatchNorm2d",
        "BatchNorm3d",
        "SyncBatchNorm",
        "LayerNorm",
        "GroupNorm",
        "RMSNorm",
        "InstanceNorm1d",
        "InstanceNorm2d",
        "InstanceNorm3d",
        "LazyBatchNorm1d",
        "LazyBatchNorm2d",
        "LazyBatchNorm3d",
    }
)


@functools.cache
def weight_types() -> tuple[type[nn.Module], ...]:
    """Layers whose outputs an activation normally follows (linear, convolution, embedding)."""
    from torch import nn

    return (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd, nn.Embedding, nn.EmbeddingBag)


def activation_kind(module: nn.Module) -> str | None:
    """The activation kind of ``module`` (a key of :data:`ACTIVATION_RULES`), or None if it is none.

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
            return kind
    return None


def activation_family(kind: str) -> str | None:
    """The family (``"sigmoid"``, ``"tanh"``, ``"relu"``, ``"smooth"``) of an activation kind, or None."""
    rules = ACTIVATION_RULES.get(kind)
    return rules[0] if rules else None


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
