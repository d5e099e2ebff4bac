"""One set of thresholds for every verdict: the live Monitor, ``diagnose(records)`` and ``analyze``.

"Logged points" are the steps at which something was recorded (a Monitor record, a log line), so windows
count logged points, not optimizer steps.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from gradsentry import _taxonomy

__all__ = ["Thresholds"]

_COUNTS = (
    "spike_window",
    "spike_min_history",
    "loss_harm_window",
    "nonfinite_link_window",
    "smooth_window",
    "growth_min_points",
    "divergence_tail",
    "stall_min_points",
    "skipped_min_run",
    "max_listed",
)
_FRACTIONS = (
    "sustained_fraction",
    "saturated_frac",
    "dead_frac",
    "flat_loss_rel",
    "converged_loss_frac",
    "sigmoid_saturation",
    "tanh_saturation",
    "stall_loss_gain",
)
_BANDS = ("sigmoid_saturation", "tanh_saturation")
_FACTORS = (
    "spike_min_factor",
    "spike_error_factor",
    "jump_factor",
    "growth_factor",
    "loss_harm_factor",
    "divergence_factor",
    "early_divergence_factor",
    "recovery_factor",
    "vanish_factor",
    "stalled_gap",
)


@dataclass(frozen=True)
class Thresholds:
    """Every threshold the diagnosis uses, with its source; override any of them by keyword.

    Series thresholds (global gradient norm and loss; the same for Monitor records and other tools' logs):

    Attributes:
        spike_window: logged points before a point that form its reference level (rolling median and MAD).
            Reasoning: long enough for a robust median, short enough to follow the decay of the norm during
            training (ZClip warms up over 25 steps, Kumar et al. 2025, arXiv:2504.02507).
        spike_min_history: fewest earlier finite points before the robust z-score is used; before that the
            jump test (``jump_factor``) judges a point against the median of the points before it.
        spike_z: robust z-score ``(ln x - median) / max(1.4826 * MAD, mad_floor)`` above which a point is a
            spike. Source: the modified z-score (Iglewicz & Hoaglin 1993 flag 3.5); 6 because gradient norms
            are heavy-tailed and a diagnosis must not cry wolf (one-sided Gaussian tail 1e-9).
        mad_floor: smallest robust spread of ``ln(norm)`` used in z-scores (natural-log units; 0.05 is 5 %),
            so a nearly constant norm does not turn a tiny wiggle into a huge z.
        spike_min_factor: a spike must also be at least this many times the rolling median. Reasoning: with
            30 % log-normal noise a 5x jump is a 5.4-sigma event; at 3x, 2 % of simulated healthy 500-step
            runs were flagged, at 5x none of 300.
        spike_error_factor: a spike or jump at least this many times the reference level is an error even
            when no loss was logged to show harm: one such step moves the weights two orders of magnitude
            further than usual.
        jump_factor: short and early runs. A point with fewer than ``spike_min_history`` earlier points is
            judged against the median of those points (the first point included): at least this many times
            higher is a jump. Reasoning: 20x is beyond the 10x rise a warm-up or a net leaving its flat
            start shows over its first logged points; like a spike, a jump counts only if it did harm (see
            ``loss_harm_factor``) or reaches ``spike_error_factor``.
        loss_harm_factor: a spike, jump or growth of the norm is reported only when it did harm: within
            ``loss_harm_window`` points the loss rose above this factor times its median before, a NaN/inf
            followed (within ``nonfinite_link_window``), or the factor reaches ``spike_error_factor``. A norm
            rising while the loss keeps falling is a network leaving its flat start (the lab's 20-layer
            ReLU + He run: 0.55 -> 5 while accuracy rose to 94 %). Runs with no loss are judged on the norm.
        loss_harm_window: logged points after a spike in which the loss is checked for harm.
        nonfinite_link_window: a spike or growth followed by a NaN/inf within this many logged points led
            to it (the finding is then an error).
        smooth_window: width (points) of the centred rolling median that removes isolated spikes before
            trends (growth, divergence, collapse) are measured.
        growth_factor: sustained growth must raise the smoothed norm by at least this factor above both its
            start and the median before it. Source: gradsentry's specification ("grows by > 10x").
        growth_min_points: points needed in a growth segment.
        growth_min_r2: coefficient of determination of the log-linear fit ``ln(norm) = a + rate * step``
            needed to call growth steady.
        divergence_factor: the loss "stays above x times its earlier (best) level" with x = this factor.
            Late divergence compares like with like: the median of the last ``divergence_tail`` points
            against the lowest median of as many consecutive points before them, and the rise must also
            exceed the batch noise of such medians (3 standard errors, Bonferroni over the windows), so a
            flat but noisy loss (small batches near convergence) does not "diverge" from a lucky dip.
        early_divergence_factor: the loss rising to this many times its first logged value (or going
            NaN/inf) within the first ``spike_min_history`` points is early divergence, judged with as few as
            two points. Reasoning: a healthy run's loss at initialisation is close to its highest; 3x above
            it in the first steps is a learning rate far too high (Goyal et al. 2017 need warm-up for this).
            One logged loss is one batch, so the rise must also exceed the run's batch noise (3.09 *
            sqrt(2) * the point-to-point noise of ln loss, :func:`~gradsentry.diagnosis.signals.log_noise`):
            a fine-tune at batch 8 whose batches range 0.2-2.6 needs ~29x, a run from scratch keeps 3x.
        divergence_tail: points at the end (or after a spike) whose median is compared.
        recovery_factor: after a spike the loss has "recovered" when the median of its last
            ``divergence_tail`` points is at most this factor times its level before the spike.
        vanish_factor: the norm must fall by this factor from its smoothed peak to the end to count as
            collapsed (stalled training, Hochreiter 1991; Bengio et al. 1994).
        flat_loss_rel: relative loss change (first vs last third) under which the loss is flat.
        converged_loss_frac: a loss below this fraction of its starting level counts as converged: a
            collapsing norm is then expected, not vanishing.
        stall_min_points: fewest logged points of a loss that never improved (by more than
            ``flat_loss_rel`` from its first points) before the run is called stalled, when the loss sits
            at chance level (ln K for K <= 20 classes); elsewhere 3x as many points and half the
            relative change are needed, a flat loss being weaker evidence there.
        skipped_min_run: consecutive logged non-finite norms (with a finite, flat loss) that mean a loss
            scaler is skipping every step.
        max_listed: at most this many steps/events are listed per finding (display only).

    Per-layer thresholds (need the Monitor's per-layer records):

    Attributes:
        vanishing_ratio: the first layer's gradient RMS divided by the last layer's below which gradients
            vanish (dimensionless). Source: gradsentry's specification ("falls by > 1e3 from the last layer
            to the first"); healthy deep ReLU nets with He init stay within O(0.1..10) (He et al. 2015).
        vanishing_error_ratio: ratio below which vanishing is an error rather than a warning (Glorot &
            Bengio 2010: a 20-layer sigmoid MLP at default init is far below it).
        sustained_fraction: a condition counts as sustained when it holds on more than this fraction of the
            logged points that measure it ("on most logged steps": a majority vote).
        update_ratio_max: update-to-weight ratio ``||Δw|| / ||w||`` above which a step changes a layer far
            too much, when sustained. Source: the CS231n rule of thumb (Karpathy) that ~1e-3 is healthy.
        update_ratio_any_step: update-to-weight ratio above which one logged step is enough (the update was
            as large as the weights themselves).
        saturated_frac: fraction of a bounded activation's outputs in its flat region above which the layer
            is saturated. Source: gradsentry's specification ("> 50 % of a layer's units").
        sigmoid_saturation: the saturation band of the sigmoid: an output below this value or above one
            minus it is in the flat region (dimensionless, in (0, 0.5)). Default 0.01 (output < 0.01 or
            > 0.99, ``|x| > ln 99 = 4.6``, derivative < 0.0099, 4 % of its maximum; LeCun et al. 1998,
            "Efficient BackProp"). Glorot & Bengio 2010 (Fig. 2) call a top hidden layer stuck near 0.02
            saturated: ``sigmoid_saturation=0.05`` (derivative < 0.048, 19 % of its maximum) counts it.
            The band applies where fractions are *measured*: give it to the Monitor
            (``Monitor(model, thresholds=Thresholds(sigmoid_saturation=0.05))``) or to ``check_model``;
            the records keep the measured fractions and the run header the band
            (``meta["saturation"]``), so overriding it in a later ``diagnose`` cannot re-measure them.
        tanh_saturation: the same for tanh and softsign: ``|y| > 1 - tanh_saturation`` is saturated.
            Default 0.01 (``|tanh(x)| > 0.99``, ``|x| > 2.65``, derivative < 0.02).
        dead_frac: fraction of a ReLU-family activation's units zero on the whole batch above which the
            layer has dead units. Source: gradsentry's specification.
        stalled_ratio: update-to-weight ratio below which a layer is not learning (1000x below 1e-3).
        stalled_gap: the model's median update-to-weight ratio must be at least this many times the layer's.
        forward_collapse_ratio: the last watched activation's pre-activation standard deviation divided by
            the first's below which the forward signal has collapsed (dimensionless). He et al. 2015
            (arXiv:1502.01852, sec. 2.2): with ``n Var[w] = 1`` ("Xavier") each ReLU layer halves the second
            moment, so 30 layers shrink the std by 2^-15 ~ 3e-5 and the net stalls; He init keeps it ~1. The
            mirror of ``vanishing_ratio`` (1e-3) on the forward pass.
        stall_loss_gain: a run whose first logged step shows vanishing (first/last-layer gradient RMS
            under ``vanishing_ratio``) or a collapsed forward signal (``forward_collapse_ratio``), and whose
            loss never fell by more than this fraction of its start, stalled at init (a ``vanishing``
            finding, pattern ``stalled_init``), even when later steps drift above the thresholds: He et
            al.'s 30-layer Xavier ReLU net ends at 14-22 % accuracy on digits with the loss within 2 % of
            ln 10 while its first/last ratio rises from 2e-4 to 2e-2. 0.1: a healthy run's loss falls far
            more than 10 % (the lab's runs: > 90 %).

    Raises:
        ValueError: from the constructor (and :meth:`replace`) on a non-finite, non-positive or otherwise
            invalid value, naming the threshold.
    """

    spike_window: int = 20
    spike_min_history: int = 8
    spike_z: float = 6.0
    mad_floor: float = 0.05
    spike_min_factor: float = 5.0
    spike_error_factor: float = 100.0
    jump_factor: float = 20.0
    loss_harm_factor: float = 1.5
    loss_harm_window: int = 5
    nonfinite_link_window: int = 20
    smooth_window: int = 5
    growth_factor: float = 10.0
    growth_min_points: int = 8
    growth_min_r2: float = 0.5
    divergence_factor: float = 2.0
    early_divergence_factor: float = 3.0
    divergence_tail: int = 20
    recovery_factor: float = 1.25
    vanish_factor: float = 100.0
    flat_loss_rel: float = 0.05
    converged_loss_frac: float = 1e-3
    stall_min_points: int = 10
    skipped_min_run: int = 3
    max_listed: int = 20
    vanishing_ratio: float = 1e-3
    vanishing_error_ratio: float = 1e-6
    sustained_fraction: float = 0.5
    update_ratio_max: float = 0.1
    update_ratio_any_step: float = 1.0
    saturated_frac: float = 0.5
    dead_frac: float = 0.5
    stalled_ratio: float = 1e-6
    stalled_gap: float = 1e3
    sigmoid_saturation: float = _taxonomy.SIGMOID_SATURATION
    tanh_saturation: float = _taxonomy.TANH_SATURATION
    forward_collapse_ratio: float = 1e-3
    stall_loss_gain: float = 0.1

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"threshold {f.name} must be a finite number, got {value!r}")
            if value <= 0:
                raise ValueError(f"threshold {f.name} must be > 0, got {value!r}")
        for name in _COUNTS:
            if not isinstance(getattr(self, name), int):
                raise ValueError(
                    f"threshold {name} counts logged points and must be an int, got {getattr(self, name)!r}"
                )
        for name in _FRACTIONS:
            if getattr(self, name) >= 1:
                raise ValueError(
                    f"threshold {name} is a fraction and must be < 1, got {getattr(self, name)!r}"
                )
        for name in _FACTORS:
            if getattr(self, name) <= 1:
                raise ValueError(f"threshold {name} is a factor and must be > 1, got {getattr(self, name)!r}")
        for name in _BANDS:
            if getattr(self, name) >= 0.5:
                raise ValueError(
                    f"threshold {name} is the distance of a saturated output from its asymptote and must be "
                    f"< 0.5, got {getattr(self, name)!r}"
                )
        if self.vanishing_error_ratio > self.vanishing_ratio:
            raise ValueError(
                f"vanishing_error_ratio ({self.vanishing_error_ratio!r}) must not exceed vanishing_ratio "
                f"({self.vanishing_ratio!r})"
            )
        if self.spike_min_history > self.spike_window:
            raise ValueError(
                f"spike_min_history ({self.spike_min_history}) must not exceed spike_window "
                f"({self.spike_window})"
            )
        if self.growth_min_points < 3:
            raise ValueError(f"growth_min_points must be at least 3, got {self.growth_min_points}")
        if self.recovery_factor > self.divergence_factor:
            raise ValueError(
                f"recovery_factor ({self.recovery_factor!r}) must not exceed divergence_factor "
                f"({self.divergence_factor!r})"
            )

    def replace(self, **overrides: Any) -> Thresholds:
        """Return a copy with some thresholds changed.

        Args:
            **overrides: threshold names and their new values.

        Returns:
            A new, validated :class:`Thresholds`.

        Raises:
            ValueError: on an unknown name (the message lists the valid ones) or an invalid value.
        """
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(
                f"unknown threshold(s) {', '.join(unknown)}; valid names: {', '.join(sorted(names))}"
            )
        return dataclasses.replace(self, **overrides)


def resolve(thresholds: Thresholds | None, overrides: dict[str, Any]) -> Thresholds:
    """The thresholds to use: ``thresholds`` (or the defaults) with ``overrides`` applied.

    Raises:
        TypeError: ``thresholds`` is not a :class:`Thresholds`.
        ValueError: an unknown name or an invalid value.
    """
    if thresholds is not None and not isinstance(thresholds, Thresholds):
        raise TypeError(f"thresholds must be a gradsentry Thresholds, got {type(thresholds).__name__}")
    t = thresholds or Thresholds()
    return t.replace(**overrides) if overrides else t
