"""The check's records: :class:`CheckRow`, :class:`BlockProfile`, :class:`CheckReport`, and the
thresholds and names they use."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from gradsentry import _taxonomy
from gradsentry.records import Finding, StepRecord

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

NORM_TYPES = _taxonomy.NORMALIZATION_LAYERS
"""Layer types counted as the normalization of a block, by class name (:func:`gradsentry._taxonomy.is_normalization`
also counts any ``...RMSNorm``, e.g. a custom one or Hugging Face's)."""

PROBLEM_KINDS = frozenset({"vanishing", "exploding", "nonfinite"})
"""Finding kinds that make ``gradsentry check`` exit with 1 (a NaN/inf gradient at init counts: it is the
limit of an exploding one and no training can start from it)."""


class InputFitError(ValueError):
    """The input batch (or the loss) does not fit the model; the message names the layer that rejected it."""


# ------------------------------------------------------------------------------------------------ data
DEAD_UNITS_MIN_BATCH = 8
"""Fewest examples in the check's batch for the dead-unit rule: a unit zero "for every sample" of one or
two samples is chance (half of a ReLU layer's units are zero on any one example), not a dead unit."""


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
