"""The lab's variant table: what each row of the MLP chapter trains (activation, init, architecture, fix)
and what it shows, and how a variant's model and remedy are built."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from gradsentry.lab.models import Activation, DeepMLP, Init, build_mlp

if TYPE_CHECKING:
    from gradsentry.lab.config import LabConfig

RemedyName = Literal["none", "clip", "agc", "zclip"]


@dataclass(frozen=True)
class Variant:
    """One row of the lab's table: what is trained and what it shows.

    Attributes:
        name: identifier used on the command line (``--variants``) and in file names.
        title: short label for plots and tables.
        shows: what the variant demonstrates, in one sentence.
        activation: ``"sigmoid"``, ``"tanh"`` or ``"relu"``.
        init: ``"default"`` (PyTorch), ``"he"`` or ``"oversized"`` (He times ``LabConfig.oversized_gain``).
        residual: identity shortcuts ``x + F(x)`` around each hidden block.
        batchnorm: batch normalization before each hidden activation.
        weight_decay: use ``LabConfig.weight_decay`` as the optimizer's L2 weight decay.
        remedy: gradient fix applied after ``backward()``: ``"clip"`` (global-norm clipping,
            :class:`gradsentry.remedies.ClipGlobalNorm`), ``"agc"`` (adaptive gradient clipping,
            :class:`gradsentry.remedies.AGC`), ``"zclip"`` (:class:`gradsentry.remedies.ZClip`), or ``"none"``.
        family: ``"vanishing"`` (the activation/init/architecture comparison) or ``"exploding"`` (the
            oversized-init run and its fixes).
    """

    name: str
    title: str
    shows: str
    activation: Activation
    init: Init = "default"
    residual: bool = False
    batchnorm: bool = False
    weight_decay: bool = False
    remedy: RemedyName = "none"
    family: Literal["vanishing", "exploding"] = "vanishing"


_EXPLODE = "ReLU, oversized He init"
VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("sigmoid_default", "sigmoid, default init", "vanishing gradients: the seed case", "sigmoid"),
        Variant("tanh_default", "tanh, default init", "vanishing gradients, milder than sigmoid", "tanh"),
        Variant(
            "relu_default",
            "ReLU, default init",
            "ReLU alone is not enough: PyTorch's default init still shrinks the signal",
            "relu",
        ),
        Variant("relu_he", "ReLU, He init", "the activation fix done right (He et al. 2015)", "relu", "he"),
        Variant(
            "sigmoid_residual",
            "sigmoid + residual",
            "the residual fix: x + F(x) (He et al. 2016)",
            "sigmoid",
            residual=True,
        ),
        Variant(
            "sigmoid_batchnorm",
            "sigmoid + batch norm",
            "the normalization fix: batch norm before the activation (Ioffe & Szegedy 2015)",
            "sigmoid",
            batchnorm=True,
        ),
        Variant(
            "exploding",
            _EXPLODE,
            "exploding gradients, ending in inf/NaN",
            "relu",
            "oversized",
            family="exploding",
        ),
        Variant(
            "exploding_clip",
            _EXPLODE + " + global-norm clipping",
            "global-norm clipping rescues it (Pascanu et al. 2013)",
            "relu",
            "oversized",
            remedy="clip",
            family="exploding",
        ),
        Variant(
            "exploding_wd",
            _EXPLODE + " + weight decay",
            "weight decay (L2 regularization) on its own",
            "relu",
            "oversized",
            weight_decay=True,
            family="exploding",
        ),
        Variant(
            "exploding_agc",
            _EXPLODE + " + AGC",
            "adaptive gradient clipping, unit-wise (Brock et al. 2021)",
            "relu",
            "oversized",
            remedy="agc",
            family="exploding",
        ),
        Variant(
            "exploding_zclip",
            _EXPLODE + " + ZClip",
            "z-score spike clipping with a warm-up cap (Kumar et al. 2025)",
            "relu",
            "oversized",
            remedy="zclip",
            family="exploding",
        ),
    )
}
"""Every lab variant by name, in report order."""

DEFAULT_VARIANTS: tuple[str, ...] = tuple(VARIANTS)


def build_variant_model(
    variant: Variant, config: LabConfig, in_features: int = 64, n_classes: int = 10
) -> DeepMLP:
    """The variant's model with the config's depth and width (weights drawn from torch's global RNG)."""
    return build_mlp(
        depth=config.depth,
        width=config.width,
        activation=variant.activation,
        init=variant.init,
        init_gain=config.oversized_gain,
        residual=variant.residual,
        batchnorm=variant.batchnorm,
        in_features=in_features,
        n_classes=n_classes,
    )


def build_remedy(variant: Variant, config: LabConfig, model: DeepMLP) -> Any:
    """The gradsentry remedy of a variant (None for ``remedy="none"``)."""
    if variant.remedy == "none":
        return None
    from gradsentry import remedies

    if variant.remedy == "clip":
        return remedies.ClipGlobalNorm(config.clip_norm)
    if variant.remedy == "agc":
        return remedies.AGC(config.agc_clip_factor, exclude=model.head)
    if variant.remedy == "zclip":
        return remedies.ZClip(max_grad_norm=config.clip_norm, cap_after_warmup=True)
    raise ValueError(f"unknown remedy {variant.remedy!r}")
