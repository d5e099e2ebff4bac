"""Init fixes: He/Xavier re-initialisation with per-layer gains, and LSUV.

* :func:`reinit` re-draws every Linear/Conv weight and zeroes biases, with one of three schemes:

  - ``"he"``: He et al. 2015 (arXiv:1502.01852), normal, ``std = gain / sqrt(fan_in)`` with the gain
    (:func:`torch.nn.init.calculate_gain`) of the activation module that *follows* the layer (sqrt 2 for
    ReLU);
  - ``"xavier"``: Glorot & Bengio 2010's normalized initialization (their eq. 16), exactly as the paper
    defines it: uniform on ``[-a, a]``, ``a = sqrt(6 / (fan_in + fan_out))``, i.e. variance
    ``2 / (fan_in + fan_out)``, *whatever the activation* (gain 1). This is the init the paper
    studies for tanh and softsign networks and the "Xavier" baseline of He et al. 2015 (variance
    ``1 / n`` for square layers), which stalls a 30-layer ReLU net;
  - ``"xavier_gain"``: Xavier's variance times the following activation's gain squared, normal (PyTorch's
    recipe ``xavier_normal_(w, gain=calculate_gain(act))``: 5/3 for tanh, sqrt 2 for ReLU, where it
    equals He init for square layers). It is not Glorot's init: for tanh it puts the network at the
    mean-field gain chi ~ 1.2 per layer (the ordered/chaotic edge on the chaotic side, Poole et al. 2016).
* :func:`lsuv` is layer-sequential unit-variance init (Mishkin & Matas 2016, "All you need is a good init",
  arXiv:1511.06422): orthonormal weights (Saxe et al. 2014), then, layer by layer in forward order, the
  weights are rescaled until the layer's output variance on a real batch is 1 within ``tol``.

Which activation follows a layer: the next leaf module after it, skipping shape-only and normalization
modules (Flatten, Identity, Dropout and every normalization of :mod:`gradsentry._taxonomy`: batch, layer,
group, instance and RMS norms, Hugging Face's by name), and stopping at the next Linear/Conv or any other
module (then the gain is 1, "linear"). The gain of each activation kind is its row of
:data:`gradsentry._taxonomy.ACTIVATION_TABLE`. "Next" is forward order when ``example_input`` is given
(traced with forward hooks on one no-grad forward pass), else module registration order, which equals
forward order for ``nn.Sequential`` and for most modules that define their children in the order they use
them. Activations applied functionally in ``forward`` (``F.relu``) are invisible to both: the gain is then 1.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from gradsentry import _taxonomy
from gradsentry.theory import LINEAR_TYPES, NEUTRAL_TYPES, trace_forward

logger = logging.getLogger("gradsentry")

Scheme = Literal["he", "xavier", "xavier_gain"]
SCHEMES: tuple[str, ...] = ("he", "xavier", "xavier_gain")
"""The schemes :func:`reinit` accepts (see the module docstring)."""


def _skipped(module: nn.Module) -> bool:
    """Shape-only, dropout and normalization modules, looked through when finding the activation."""
    return (
        isinstance(module, (*NEUTRAL_TYPES, nn.Dropout)) or _taxonomy.normalization_kind(module) is not None
    )


def _gain_for(act: nn.Module | None) -> tuple[str, float]:
    """Nonlinearity name for :func:`torch.nn.init.calculate_gain` and its parameter (leaky slope), from
    the activation table (:data:`gradsentry._taxonomy.ACTIVATION_TABLE`: GELU/SiLU/ELU/... take ReLU's
    gain, an approximation; kinds without a gain, ``"linear"``)."""
    name, param = _taxonomy.gain_nonlinearity(act)
    return name, param or 0.0


def _leaves(model: nn.Module, example_input: Any | None) -> list[tuple[str, nn.Module]]:
    if example_input is not None:
        calls, _ = trace_forward(model, example_input)
        seen: set[int] = set()
        out = []
        for name, mod, _i, _o in calls:
            if id(mod) not in seen:
                seen.add(id(mod))
                out.append((name, mod))
        return out
    return [(n, m) for n, m in model.named_modules() if next(m.children(), None) is None]


def layers_with_activations(
    model: nn.Module, example_input: Any | None = None
) -> list[tuple[str, nn.Module, nn.Module | None]]:
    """Every Linear/Conv layer with the activation module that follows it (None if none), in order.

    See the module docstring for how "follows" is decided.
    """
    leaves = _leaves(model, example_input)
    out: list[tuple[str, nn.Module, nn.Module | None]] = []
    for i, (name, mod) in enumerate(leaves):
        if not isinstance(mod, LINEAR_TYPES):
            continue
        act: nn.Module | None = None
        for _n, nxt in leaves[i + 1 :]:
            if _skipped(nxt):
                continue
            if not isinstance(nxt, LINEAR_TYPES) and _gain_for(nxt)[0] != "linear":
                act = nxt
            break
        out.append((name, mod, act))
    return out


@dataclass
class ReinitLayer:
    """One re-initialised layer: its name, type, the activation that follows it and the gain used."""

    name: str
    type: str
    activation: str
    nonlinearity: str
    gain: float
    std: float
    """Standard deviation the weights were drawn with (same units as the weights)."""


def reinit(model: nn.Module, scheme: Scheme = "he", *, example_input: Any | None = None) -> list[ReinitLayer]:
    """Re-initialise every Linear/Conv layer in place; zero the biases.

    ``"he"``: normal, ``std = gain / sqrt(fan_in)``, ``gain`` = :func:`torch.nn.init.calculate_gain` of the
    activation that follows the layer (sqrt 2 for ReLU, 5/3 for tanh, 1 for sigmoid and for no activation).
    ``"xavier"``: Glorot & Bengio's uniform ``U[-a, a]``, ``a = sqrt(6 / (fan_in + fan_out))`` (std
    ``sqrt(2 / (fan_in + fan_out))``), gain 1 for every activation, as in the paper. ``"xavier_gain"``: normal,
    ``std = gain * sqrt(2 / (fan_in + fan_out))`` with the activation's gain (PyTorch's recipe).

    Args:
        model: the model (changed in place).
        scheme: ``"he"`` (He et al. 2015, arXiv:1502.01852), ``"xavier"`` (Glorot & Bengio 2010, eq. 16) or
            ``"xavier_gain"`` (Xavier scaled by the activation's gain); see the module docstring.
        example_input: optional batch used to trace forward order (see the module docstring).

    Returns:
        One :class:`ReinitLayer` per re-initialised layer, in order; ``gain`` is the gain actually used (1 for
        every layer under ``"xavier"``) and ``std`` the standard deviation of the distribution drawn from.

    Raises:
        ValueError: on an unknown scheme.

    Example:
        >>> m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> [(r.nonlinearity, round(r.gain, 3)) for r in reinit(m, "he")]
        [('relu', 1.414), ('linear', 1.0)]
        >>> [round(r.gain, 3) for r in reinit(m, "xavier")]
        [1.0, 1.0]
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown init scheme {scheme!r}; valid: {', '.join(repr(s) for s in SCHEMES)}")
    report = []
    for name, mod, act in layers_with_activations(model, example_input):
        weight: torch.Tensor = mod.weight  # type: ignore[assignment]
        nonlin, slope = _gain_for(act)
        gain = (
            1.0
            if scheme == "xavier"
            else nn.init.calculate_gain(nonlin, slope if nonlin == "leaky_relu" else None)  # type: ignore[arg-type]
        )
        fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(weight)
        std = gain / math.sqrt(fan_in) if scheme == "he" else gain * math.sqrt(2.0 / (fan_in + fan_out))
        with torch.no_grad():
            if scheme == "xavier":
                weight.uniform_(-math.sqrt(3.0) * std, math.sqrt(3.0) * std)
            else:
                weight.normal_(0.0, std)
            bias = getattr(mod, "bias", None)
            if isinstance(bias, torch.Tensor):
                bias.zero_()
        report.append(
            ReinitLayer(
                name=name,
                type=type(mod).__name__,
                activation=type(act).__name__ if act is not None else "none",
                nonlinearity=nonlin,
                gain=float(gain),
                std=std,
            )
        )
    logger.info("reinit(%s): %d layers", scheme, len(report))
    return report


@dataclass
class LSUVLayer:
    """LSUV outcome for one layer.

    Attributes:
        name: qualified module name.
        type: module class name.
        var_start: output variance on the batch after the orthonormal start (dimensionless if the input is).
        var_final: output variance after rescaling (target 1).
        iterations: number of rescalings done.
        converged: ``|var_final - 1| <= tol``.
    """

    name: str
    type: str
    var_start: float
    var_final: float
    iterations: int
    converged: bool


@dataclass
class LSUVReport:
    """What :func:`lsuv` did, layer by layer in forward order."""

    tol: float
    center: bool
    layers: list[LSUVLayer] = field(default_factory=list)

    @property
    def converged(self) -> bool:
        """True when every layer reached unit output variance within ``tol``."""
        return all(x.converged for x in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Stop(Exception):
    """Raised from a forward hook to stop the forward pass once the layer of interest has run."""


def _layer_output(model: nn.Module, layer: nn.Module, batch: Any) -> torch.Tensor | None:
    """The first output of ``layer`` on ``batch`` (forward stopped right after it), or None if never run."""
    box: list[torch.Tensor] = []

    def hook(_m: nn.Module, _a: Any, out: Any) -> None:
        box.append(out.detach())
        raise _Stop

    handle = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(*batch) if isinstance(batch, tuple) else model(batch)
    except _Stop:
        pass
    finally:
        handle.remove()
    return box[0] if box else None


def _orthogonal_(weight: torch.Tensor) -> None:
    """:func:`torch.nn.init.orthogonal_`, drawn in float32 for fp16/bf16 weights (the QR behind it has no
    half-precision kernel on CPU) and then rounded into them."""
    if weight.dtype in (torch.float16, torch.bfloat16):
        full = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
        nn.init.orthogonal_(full)
        weight.copy_(full)
    else:
        nn.init.orthogonal_(weight)


def lsuv(
    model: nn.Module,
    batch: Any,
    tol: float = 0.1,
    max_iter: int = 10,
    *,
    center: bool = True,
    orthonormal: bool = True,
) -> LSUVReport:
    """Layer-sequential unit-variance init (Mishkin & Matas 2016, arXiv:1511.06422), in place.

    1. Orthonormal start: every Linear/Conv weight gets :func:`torch.nn.init.orthogonal_`, biases 0.
    2. For each such layer in forward order: forward ``batch``, measure the variance of the layer's output
       over all its elements, divide the weights (and bias) by its square root; repeat until
       ``|var - 1| <= tol`` or ``max_iter`` rescalings.

    ``center=True`` (default) also sets the bias so that every output unit (channel) has zero mean on the
    batch, a data-dependent bias as in Salimans & Kingma 2016 (arXiv:1602.07868) and Krähenbühl et al.
    2016 (arXiv:1511.06856). This is an extension of the paper: with a non-zero-mean activation such as
    sigmoid (mean 0.5), unit variance alone leaves the mean-field gain chi about 0.15 per layer (a 20-layer
    sigmoid MLP on digits still has a first/last weight-gradient RMS ratio of ~1e-8), while centering
    makes the next layer see only the activation's fluctuations and brings chi close to 1 (ratio ~2).
    ``center=False`` is the paper's LSUV. Layers without a bias are only rescaled.

    Args:
        model: the model (changed in place; train/eval mode is kept).
        batch: a real input batch ``[N, ...]``, or a tuple of positional inputs.
        tol: tolerance on the output variance (dimensionless, > 0).
        max_iter: maximum rescalings per layer (>= 1).
        center: also zero each output unit's mean on the batch through the bias (see above).
        orthonormal: start from orthonormal weights (False: keep the current weights and biases).

    Returns:
        An :class:`LSUVReport`.

    Raises:
        ValueError: on ``tol <= 0`` or ``max_iter < 1``, a model without Linear/Conv layers, or
            (with ``center``) a batch giving a layer one sample per output unit.
    """
    if not tol > 0 or max_iter < 1:
        raise ValueError(f"need tol > 0 and max_iter >= 1, got tol={tol!r}, max_iter={max_iter!r}")
    layers = [(n, m) for n, m, _ in layers_with_activations(model, batch)]
    if not layers:
        raise ValueError("lsuv: the model has no Linear/Conv layer to initialise")
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if orthonormal:
        with torch.no_grad():
            for _, mod in layers:
                _orthogonal_(mod.weight)  # type: ignore[arg-type]
                if isinstance(getattr(mod, "bias", None), torch.Tensor):
                    mod.bias.zero_()  # type: ignore[union-attr,operator]
    report = LSUVReport(tol=tol, center=center)
    for name, mod in layers:
        weight: torch.Tensor = mod.weight  # type: ignore[assignment]
        bias = getattr(mod, "bias", None)
        unit_dim = -1 if isinstance(mod, nn.Linear) else 1
        var_start = math.nan
        var = math.nan
        its = 0
        while True:
            out = _layer_output(model, mod, batch)
            if out is None:
                logger.warning("lsuv: layer %s did not run on the batch; left as is", name)
                break
            out = out.double()
            dims = [d for d in range(out.dim()) if d != unit_dim % out.dim()]
            if center and isinstance(bias, torch.Tensor) and out.numel() // out.shape[unit_dim] < 2:
                with torch.no_grad():
                    for key, value in model.state_dict(keep_vars=True).items():  # leave the model as it was
                        value.copy_(saved[key])
                raise ValueError(
                    f"lsuv: layer {name} sees 1 sample per output unit, so its centred variance is 0; "
                    "pass a batch of several samples (64-512 is typical), or center=False"
                )
            mean = out.mean(dim=dims, keepdim=True) if center and isinstance(bias, torch.Tensor) else None
            var = float((out - mean).pow(2).mean()) if mean is not None else float(out.var())
            if its == 0:
                var_start = var
            done = abs(var - 1.0) <= tol and (mean is None or float(mean.abs().max()) <= math.sqrt(tol))
            if done or its >= max_iter or not math.isfinite(var) or var <= 0:
                break
            scale = 1.0 / math.sqrt(var)
            with torch.no_grad():
                if mean is not None:
                    bias.sub_(mean.reshape(-1).to(bias.dtype))  # type: ignore[union-attr]
                weight.mul_(scale)
                if isinstance(bias, torch.Tensor):
                    bias.mul_(scale)
            its += 1
        report.layers.append(
            LSUVLayer(
                name=name,
                type=type(mod).__name__,
                var_start=var_start,
                var_final=var,
                iterations=its,
                converged=abs(var - 1.0) <= tol,
            )
        )
    logger.info("lsuv: %d layers, converged=%s", len(report.layers), report.converged)
    return report
