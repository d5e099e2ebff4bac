"""The Monitor: per-layer gradient, weight, update and activation statistics during training.

Cost model (see ``benchmarks/overhead.py``): on a step it does not log, :meth:`Monitor.step` only
increments a counter and compares one gradient tensor's identity and version with the previous call's
(to warn about a second call for one optimizer step); no module hook is armed, no device→host copy
(with ``optimizer=`` a step post-hook counts optimizer steps, one Python increment each). On a logged step it makes one pass
over the gradients for the L2 norms (:func:`gradsentry.stats.sq_norms`: a fused ``torch._foreach_norm``
on accelerators, per-row norms summed in float64 on CPU), one for max |g| (``aminmax`` on CPU), one
L2 pass over the weights, reduces them into layers on the device, and moves one small tensor to the
host.
``max_abs=False, weight_norms=False`` leaves a single read of the gradients, whose per-tensor norms
a norm-based remedy (e.g. ``ClipGlobalNorm``) given as ``remedy=`` then reuses.

Alerts (``on_nonfinite=``) read the record a logged step has already copied to the host: they add no
device work and no host sync; a diagnosis runs only on a step that holds a NaN/inf.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import math
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from gradsentry import _dist, _taxonomy, stats
from gradsentry import histograms as layer_hist
from gradsentry.diagnosis.history import RunHistory
from gradsentry.diagnosis.thresholds import Thresholds
from gradsentry.diagnosis.thresholds import resolve as resolve_thresholds
from gradsentry.records import ActivationStats, Finding, LayerInfo, LayerStats, RunHeader, StepRecord
from gradsentry.remedies.base import lend_names, param_names
from gradsentry.sinks.base import SafeSink, Sink

log = logging.getLogger("gradsentry")

_EARLY = 1e12  # larger than the number of module calls between two logged steps (see Monitor._finite_post)
#: A layer whose mean squared gradient is below this (RMS < 1e-15) may hold entries under ~1e-19,
#: whose float32 squares lose precision or flush to zero: its norm is recomputed in float64.
_TINY_MEAN_SQUARE = 1e-30

NO_PARAMS_MSG = (
    "gradsentry: the model has no parameters, so there is no gradient to watch. "
    "Pass the module that owns the trainable parameters."
)

_MAX_LISTED_SKIPS = 1000  # labels of skipped unlogged steps listed in one record (all are counted)

RECORDS_BUDGET_BYTES = 64 << 20
"""Host memory the records kept by a Monitor with ``max_records=None`` may take (64 MiB)."""

SAMPLE_RECORDS = 1024
"""The most records of older steps a Monitor keeps as a uniform sample for the per-layer rules."""


def record_bytes(layers: int, activation_sites: int = 0, histogram_bins: int = 0) -> int:
    """Host memory of one :class:`StepRecord` (Python objects), in bytes, as measured with
    ``tracemalloc`` on CPython 3.11 (records of 10 and 50 layers, 100 steps each): about 2,000 bytes
    per record, 256 per layer, 180 per activation site, and 64 + 34 per histogram bin per site."""
    per_site = 180 + (64 + 34 * histogram_bins if histogram_bins > 0 else 0)
    return 2000 + 256 * layers + per_site * activation_sites


ALERT_WINDOW = 200
"""How many of the most recent records a live alert diagnoses (:func:`alert_finding`): enough for the
spike test's trailing window (20) and the growth window (50), and a bounded cost per alert however long
the run."""

OnNonFinite: TypeAlias = Literal["warn", "raise"] | Callable[[Finding], Any] | None
"""What :class:`Monitor` does on a logged step that holds a NaN/inf (see its ``on_nonfinite``)."""


class NonFiniteGradientError(FloatingPointError):
    """Raised by :meth:`Monitor.step` (``on_nonfinite="raise"``) on a logged step with a NaN/inf gradient
    or loss, after the step's record was stored and written to the sinks.

    Attributes:
        step: the record's step label.
        layers: the layers whose gradient holds NaN/inf, the origin module first when known, then
            deepest first (empty when only the loss is non-finite).
        record: the :class:`~gradsentry.records.StepRecord` of the step.
        finding: the ``nonfinite`` :class:`~gradsentry.records.Finding` (the same text as the
            end-of-run diagnosis gives).
    """

    def __init__(self, message: str, *, record: StepRecord, layers: list[str], finding: Finding) -> None:
        super().__init__(message)
        self.step = record.step
        self.layers = layers
        self.record = record
        self.finding = finding


def nonfinite_step(record: StepRecord) -> bool:
    """True when the record holds a NaN/inf: its global gradient norm, a layer's gradient
    (``nonfinite > 0`` or a non-finite norm) or its loss."""
    if not math.isfinite(record.global_norm):
        return True
    if record.loss is not None and not math.isfinite(record.loss):
        return True
    return any(
        layer.has_grad and (layer.nonfinite > 0 or not math.isfinite(layer.grad_norm))
        for layer in record.layers
    )


def nonfinite_layers(record: StepRecord) -> list[str]:
    """The layers whose gradient holds NaN/inf in ``record``: the origin module first (when
    ``locate_nonfinite`` named one of them), then deepest first."""
    holding = [
        layer
        for layer in record.layers
        if layer.has_grad and (layer.nonfinite > 0 or not math.isfinite(layer.grad_norm))
    ]
    names = [layer.name for layer in sorted(holding, key=lambda x: -x.depth)]
    origin = record.nonfinite_origin
    if origin is not None and origin in names:
        names = [origin] + [n for n in names if n != origin]
    return names


def alert_finding(
    records: Sequence[StepRecord],
    layers: Sequence[LayerInfo] | None,
    kind: str,
    meta: Mapping[str, Any] | None = None,
) -> Finding | None:
    """The finding of ``kind`` that :func:`gradsentry.diagnose` gives on ``records`` and whose steps
    include the newest record's step; None when there is none.

    ``records`` are the recent records, oldest first, ending with the step being judged (the callers
    pass at most :data:`ALERT_WINDOW`). For ``"nonfinite"`` a diagnosis that fails or finds nothing
    still gives a finding built from the newest record, so that an alert is never lost; for other
    kinds a failed diagnosis is logged and gives None.
    """
    from gradsentry.diagnose import diagnose

    if not records:
        return None
    newest = records[-1]
    try:
        findings = diagnose(records, layers=layers, meta=meta)
    except Exception as exc:  # an alert must never take the run down through the diagnosis
        log.error("gradsentry: diagnosis failed at step %s (%s)", newest.step, exc)
        findings = []
    found = next((f for f in findings if f.kind == kind and newest.step in f.steps), None)
    if found is None and kind == "nonfinite" and nonfinite_step(newest):
        names = nonfinite_layers(newest)
        where = f" in {', '.join(n or '<root>' for n in names[:3])}" if names else ""
        found = Finding(
            "nonfinite",
            "error",
            [newest.step],
            names,
            {"first_step": newest.step, "global_norm": newest.global_norm, "loss": newest.loss},
            f"At step {newest.step} the gradient or the loss is NaN/inf{where}.",
        )
    return found


def alert_message(record: StepRecord, finding: Finding) -> str:
    """One text for a live alert: the step, the layers holding NaN/inf, the origin module, the
    finding's explanation and its first remedy."""
    if nonfinite_step(record):
        names = nonfinite_layers(record)
        if names:
            what = f"NaN/inf gradient at step {record.step} in {', '.join(n or '<root>' for n in names[:5])}"
            if len(names) > 5:
                what += f" (+{len(names) - 5} more layers)"
        elif not math.isfinite(record.global_norm):
            what = f"NaN/inf gradient at step {record.step}"
        else:
            what = f"non-finite loss ({record.loss!r}) at step {record.step}, gradients still finite"
        if record.nonfinite_origin is not None:
            what += f"; first non-finite output: module {record.nonfinite_origin or '<root>'}"
    else:
        what = f"{finding.kind} at step {record.step} (global gradient norm {record.global_norm:.3g})"
    text = f"gradsentry: {what}. {finding}"
    if finding.remedies:
        fix = finding.remedies[0]
        text += f" Remedy: {fix.action}" + (f" ({fix.api})" if fix.api else "")
    return text


@dataclass
class _Layer:
    info: LayerInfo
    module: nn.Module
    params: list[nn.Parameter]


@dataclass
class _ActSite:
    name: str
    kind: str
    module: nn.Module
    depth: int = 0


@dataclass
class _Pending:
    """Device tensors gathered between two logged steps, read with the next transfer."""

    update_sq: Tensor | None = None
    before_sq: Tensor | None = None  # squared weight norms per layer before that optimizer step
    update_layers: frozenset[int] | None = None  # layers with a gradient at that optimizer step
    acts: dict[str, Tensor] = field(default_factory=dict)
    hists: dict[str, Tensor] = field(default_factory=dict)
    # locate_nonfinite: one score per module (named_modules order), max-folded in place on the device
    # at each call, so that forwards that never reach step() (eval with grad, RL rollouts, GAN passes)
    # keep the memory and the next step's work fixed (see Monitor._finite_post).
    flag_scores: Tensor | None = None
    calls: int = 0
    inputs_ok: dict[int, list[Tensor | None]] = field(default_factory=dict)


def _optimizer_meta(optimizer: Any) -> dict[str, Any]:
    """``{"optimizer": "<class name, lower case>", "lr": <first group's lr>}`` for the run header."""
    if optimizer is None:
        return {}
    meta: dict[str, Any] = {"optimizer": type(optimizer).__name__.lower()}
    groups = getattr(optimizer, "param_groups", None) or []
    try:  # a scheduler keeps the base lr as "initial_lr" (under warm-up "lr" may start at 0)
        lr = groups[0].get("initial_lr", groups[0].get("lr")) if groups else None
        meta["lr"] = float(lr) if lr is not None else None
    except (TypeError, ValueError, RuntimeError):  # an lr that is not a number (or a multi-element tensor)
        meta["lr"] = None
    return meta


class Monitor:
    """Watch a model's gradients and diagnose vanishing and exploding gradients.

    Call :meth:`step` once per optimizer step, after ``loss.backward()`` (after
    ``GradScaler.unscale_(optimizer)`` under AMP) and before clipping and ``optimizer.step()``. Under
    gradient accumulation, call it once per optimizer step, not per micro-batch.

    A *layer* is a module that owns parameters directly (Linear, Conv, norms, Embedding); layers are
    ordered by *depth*, the order in which their forward hooks first fire on the first forward pass.

    Args:
        model: any ``nn.Module`` with at least one parameter. Frozen parameters are allowed: their
            layers are reported with ``has_grad=False``; a model whose parameters are all frozen
            gives records whose layers all have ``has_grad=False`` and a global norm of 0.
        every: log every ``every``-th step (step 0 is always logged).
        optimizer: when given, the update-to-weight ratio ``||Δw|| / ||w||`` (``w`` before the update)
            of the optimizer step before each logged step is recorded (weights are copied only before those steps) and
            the learning rate of its first parameter group is recorded. The header's metadata then
            also names it (``"optimizer"``: the lower-case class name, e.g. ``"adamw"``) and holds
            ``"lr"``, its first group's base learning rate at construction (a scheduler's
            ``initial_lr`` when one is attached, since warm-up may start ``lr`` at 0), for the advice.
        sinks: where records go (e.g. :class:`gradsentry.sinks.JsonlSink`). A failing sink is
            reported once and disabled; training continues.
        remedy: optional callable ``remedy(params, norms=...)`` (a clipper from
            :mod:`gradsentry.remedies`) applied inside :meth:`step` after the statistics are taken,
            reusing the per-tensor norms on logged steps; what it did goes into ``record.actions``.
        activations: record pre-activation statistics of activation modules on logged steps.
        max_abs: record each layer's max |g| (one more read of the gradients per logged step).
        weight_norms: record each layer's weight norm and, with ``optimizer``, the update-to-weight
            ratio (one read of the weights per logged step, a weight copy before logged steps).
            With ``max_abs=False, weight_norms=False`` a logged step reads the gradients once.
        histogram_bins: if > 0, also record a histogram of each activation's input over
            ``[-histogram_range, histogram_range]``.
        histograms: per-layer histograms of |gradient| and |weight| entries on logged steps, in
            ``record.histograms``: True for :class:`gradsentry.histograms.HistogramSpec`'s defaults (64
            bins of log10|x| from 1e-24 to 1e8; zeros, NaN/inf and values outside counted apart), or
            a ``HistogramSpec``; counted on the device, copied with the step's other statistics.
        locate_nonfinite: on logged steps, name the module where a NaN/inf came from: the first
            module call (in the order calls end) whose output is non-finite although its inputs held
            no NaN, so a NaN made by tensor code inside a module is blamed on that module and not on
            a child that merely received it; else the first call with a non-finite output. Costs an
            ``isnan`` of each module call's inputs and an ``isfinite`` of its output, folded on the
            device into one score per module: memory stays fixed however many forward passes run
            before the next :meth:`step` (eval with gradients, RL rollouts, GAN passes).
        overhead_budget: if set (e.g. 0.01), raise ``every`` so that the Monitor's amortized time
            stays under this fraction of the training step time.
        max_records: how many records to keep in memory (oldest dropped first; :attr:`records`).
            None (default): as many as fit in :data:`RECORDS_BUDGET_BYTES` (64 MiB) by the measured
            size of one record of this model (:func:`record_bytes`; between 100 and 100,000): e.g.
            ~2,800 for 50 layers and 50 activation sites, ~21,000 for a 3-layer MLP. Findings
            (:meth:`diagnose`, and the ones :meth:`close` writes) cover the whole run whatever this
            is: a record leaving the window leaves its series point (34 bytes) and, for a few
            records and a uniform sample of at most :data:`SAMPLE_RECORDS` of them, the record
            itself (see :mod:`gradsentry.diagnosis.history`).
        meta: free-form metadata written into the JSONL header; its keys override the ones the
            Monitor fills in (``every``, ``model``, ``optimizer``, ``lr``, ``activations``).
        on_nonfinite: what to do, at that step, when a logged step holds a NaN/inf: a non-finite
            global gradient norm, a layer with NaN/inf gradient entries, or a non-finite loss.
            The check reads the record the step already copied to the host, so it costs nothing on
            healthy steps and nothing at all on unlogged ones; every action comes after the record
            is stored and written to the sinks. ``None`` (default): record it only.
            ``"warn"``: log a WARNING through the ``gradsentry`` logger (rank 0) naming the step, the
            layers holding NaN/inf, the module where it first appeared (``locate_nonfinite=True``),
            the ``nonfinite`` finding's explanation and its first remedy; once per stretch of
            consecutive non-finite logged steps (NaN weights make every later step non-finite).
            ``"raise"``: raise :class:`NonFiniteGradientError` (a ``FloatingPointError`` carrying
            ``.step``, ``.layers``, ``.record``, ``.finding``) from :meth:`step`, on every
            non-finite logged step, before your ``optimizer.step()`` runs. A callable: called with
            the ``nonfinite`` :class:`~gradsentry.records.Finding` on every non-finite logged step
            (its exceptions propagate). The finding comes from :func:`gradsentry.diagnose` over the
            last :data:`ALERT_WINDOW` records, so its text is the end-of-run one. With ``every > 1``
            only logged steps are checked: a NaN on an unlogged step is caught at the next logged
            step, through the NaN it left in the weights (or not at all if a guard skipped it).
        process_group: under ``torch.distributed``, the group to reduce statistics over; None uses
            the group of the parameters' device mesh (FSDP2), else the default group. Create the Monitor after wrapping the model
            (``DistributedDataParallel(...)`` or ``fully_shard(...)``), and call :meth:`step` on
            every rank.
        sharded: None detects: gradients are sharded when parameters are DTensors with a ``Shard``
            placement (FSDP2 ``fully_shard``), replicated otherwise (DDP). Replicated gradient
            statistics need no collective; sharded ones take one ``all_reduce(SUM)`` and one
            ``all_reduce(MAX)`` per logged step. True: each rank's plain parameters are different
            parts of the model.
        sync_local: under ``torch.distributed``, average the rank-local statistics (loss,
            activation statistics; histogram counts are summed, forward non-finite flags OR-ed) over
            ranks, so that every rank gets the same records and findings. Under sharded gradients
            they ride on the same two collectives; under DDP this costs one small
            ``all_reduce(SUM)`` (and one ``all_reduce(MAX)`` with ``locate_nonfinite``) per logged
            step, which also carries one non-finite indicator per layer: a NaN/inf in one rank's
            copy of a replicated gradient (written after DDP's reduction) is recorded by every rank,
            rank 0 included (its count is then max-reduced, one more collective on that rare step).
            False: no collective at all under DDP; records then hold each rank's own loss and
            gradient, and a NaN local to one rank is seen by that rank only.
        rank_zero_only_sinks: write the sinks on rank 0 only (the other ranks keep the records in
            memory). False: every rank writes its sinks.
        dist_timeout: seconds to wait for a collective before raising
            :class:`gradsentry.DistributedError`; None uses the process group's own timeout
            (``init_process_group(timeout=...)``).
        thresholds: a :class:`gradsentry.Thresholds` used to measure (its saturation bands,
            ``sigmoid_saturation`` and ``tanh_saturation``, recorded in the header's
            ``meta["saturation"]``) and by :meth:`diagnose`; the defaults when None.
        also_log: a predicate on the 0-based index of a :meth:`step` call; the calls it accepts are
            logged steps too, besides ``every``'s (e.g. a trainer's logging steps). It must be the
            same on every rank.

    Raises:
        ValueError: if the model has no parameters, or ``every`` is not an int >= 1, a histogram or
            ``max_records`` argument is out of range, or a distributed option is inconsistent (see
            :func:`gradsentry._dist.resolve`).
        TypeError: if ``model`` is not an ``nn.Module`` or has complex parameters, or
            ``on_nonfinite`` is neither None, ``"warn"``, ``"raise"`` nor callable.
        gradsentry.DistributedError: from :meth:`step`, when a rank died or hung during the
            reduction of a logged step.
        NonFiniteGradientError: from :meth:`step`, with ``on_nonfinite="raise"``.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        >>> with Monitor(model) as mon:
        ...     model(torch.randn(16, 4)).pow(2).mean().backward()
        ...     rec = mon.step()
        >>> [layer.name for layer in rec.layers]
        ['0', '2']
        >>> rec.global_norm > 0
        True
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        every: int = 1,
        optimizer: torch.optim.Optimizer | None = None,
        sinks: Sequence[Sink] = (),
        remedy: Callable[..., Any] | None = None,
        activations: bool = True,
        max_abs: bool = True,
        weight_norms: bool = True,
        histogram_bins: int = 0,
        histogram_range: float = 8.0,
        histograms: bool | layer_hist.HistogramSpec = False,
        locate_nonfinite: bool = False,
        overhead_budget: float | None = None,
        max_records: int | None = None,
        meta: dict[str, Any] | None = None,
        on_nonfinite: OnNonFinite = None,
        process_group: Any = None,
        sharded: bool | None = None,
        sync_local: bool = True,
        rank_zero_only_sinks: bool = True,
        dist_timeout: float | None = None,
        thresholds: Thresholds | None = None,
        also_log: Callable[[int], bool] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"gradsentry.Monitor expects an nn.Module, got {type(model).__name__}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        if overhead_budget is not None and not 0 < overhead_budget < 1:
            raise ValueError(f"overhead_budget must be a fraction in (0, 1), got {overhead_budget}")
        self.model = model
        if isinstance(histogram_bins, bool) or not isinstance(histogram_bins, int) or histogram_bins < 0:
            raise ValueError(f"histogram_bins must be an int >= 0 (0: no histograms), got {histogram_bins!r}")
        if not (
            isinstance(histogram_range, (int, float))
            and math.isfinite(histogram_range)
            and histogram_range > 0
        ):
            raise ValueError(f"histogram_range must be a finite number > 0, got {histogram_range!r}")
        if max_records is not None and (
            isinstance(max_records, bool) or not isinstance(max_records, int) or max_records < 0
        ):
            raise ValueError(f"max_records must be None or an int >= 0, got {max_records!r}")
        if isinstance(on_nonfinite, str):
            if on_nonfinite not in ("warn", "raise"):
                raise ValueError(
                    f"on_nonfinite must be None, 'warn', 'raise' or a callable, got {on_nonfinite!r}"
                )
        elif on_nonfinite is not None and not callable(on_nonfinite):
            raise TypeError(
                f"on_nonfinite must be None, 'warn', 'raise' or a callable, got {type(on_nonfinite).__name__}"
            )
        self.thresholds = resolve_thresholds(thresholds, {})
        self.on_nonfinite = on_nonfinite
        self._in_nonfinite = False  # the previous logged step was non-finite ("warn" once per stretch)
        self.every = int(every)
        self.also_log = also_log
        self.optimizer = optimizer
        self.remedy = remedy
        self.activations = activations
        self.max_abs = max_abs
        self.weight_norms = weight_norms
        self.histogram_bins = int(histogram_bins)
        self.histogram_range = float(histogram_range)
        self.histograms = layer_hist.resolve(histograms)
        self._layer_hist = layer_hist.LayerCounter(self.histograms) if self.histograms else None
        self.locate_nonfinite = locate_nonfinite
        self.overhead_budget = overhead_budget
        self._records: deque[StepRecord] = deque()
        self._sinks = [SafeSink(s) for s in sinks]
        self._meta = {**_optimizer_meta(optimizer), **(meta or {})}
        self.step_count = 0
        self._next_log = 0
        self._closed = False
        self._pending = _Pending()
        self._hook_time = 0.0
        self._last_step_end: float | None = None
        self._last_logged_count = 0
        self._step_time_ema: float | None = None
        self.last_norms: tuple[list[Tensor], Tensor] | None = None
        self._sinks_opened = False

        self._layers = self._find_layers(model)
        self._dist = _dist.resolve(
            model,
            [p for layer in self._layers for p in layer.params],
            process_group=process_group,
            sharded=sharded,
            timeout=dist_timeout,
        )
        self.sync_local = sync_local
        self.rank = self._dist.rank if self._dist is not None else 0
        if self.rank != 0 and rank_zero_only_sinks:
            self._sinks = []
        self._proposed_every = self.every
        self._sites = [
            _ActSite(name, kind, m)
            for name, m in model.named_modules()
            if (kind := _taxonomy.activation_kind(m)) is not None
        ]
        if activations and (note := _taxonomy.functional_activation_note(model)):
            log.info("%s", note)
        if max_records is None:  # what fits in the budget, by the measured size of this model's records
            size = record_bytes(
                len(self._layers), len(self._sites) if activations else 0, self.histogram_bins
            ) + layer_hist.record_bytes(len(self._layers), self.histograms)
            max_records = min(100_000, max(100, RECORDS_BUDGET_BYTES // size))
        self.max_records: int = max_records
        # What leaves the window: its series and the records the verdict needs (diagnosis/history.py).
        self._history = RunHistory(sample_size=min(max_records, SAMPLE_RECORDS))
        self._order_handles: list[RemovableHandle] = []
        self._act_handles: list[RemovableHandle] = []
        self._opt_handles: list[RemovableHandle] = []
        self._depth_fixed = False
        # First-forward call order: when each module's first call begins and ends (event numbers).
        self._called_at: dict[int, int] = {}
        self._ended_at: dict[int, int] = {}
        self._events = 0
        for _, module in model.named_modules():
            self._order_handles.append(module.register_forward_pre_hook(self._order_hook))
            self._order_handles.append(module.register_forward_hook(self._order_end_hook))
        self._grad_set_cache: dict[tuple[int, ...], tuple[Tensor, list[int]]] = {}
        self._params_cache: tuple[list[Tensor], Tensor] | None = None
        self._owners_all: list[int] = []
        self._raw_grads: tuple[list[Tensor], list[Tensor]] = ([], [])
        self._single_device = False
        self._all_float32 = False
        self._param_kinds: set[tuple[torch.dtype, torch.device]] = set()
        self._snapshot: list[Tensor] | None = None
        self._snapshot_buffer: list[Tensor] | None = None  # CPU only: reused across logged steps
        self._update_layers: frozenset[int] | None = None
        self._remedy_names: dict[int, tuple[str, str]] | None = None
        self._warned_no_grad = False
        self._remedy_params: set[str] | None = None
        self._hist_edges: list[float] | None = None
        self._skipped_steps: list[int] = []  # unlogged steps the remedy skipped since the last record
        self._skipped_count = 0
        self._skips_dev: Tensor | None = None  # the same, from device flags
        # Detecting step() called twice for one optimizer step: a trainable parameter whose gradient
        # object and version are compared between calls, and (with an optimizer) a count of its steps.
        self._probe = next((p for layer in self._layers for p in layer.params if p.requires_grad), None)
        self._last_call: tuple[int, weakref.ref[Tensor] | None, int] | None = None
        self._opt_steps = 0
        self._warned_double = False
        self._count_handle: RemovableHandle | None = None
        if optimizer is not None:
            self._count_handle = optimizer.register_step_post_hook(self._count_opt_step)
        self._arm_for(self._next_log)

    # ------------------------------------------------------------------ layers and order
    @staticmethod
    def _find_layers(model: nn.Module) -> list[_Layer]:
        seen: set[int] = set()
        layers: list[_Layer] = []
        for name, module in model.named_modules():
            params = []
            for p in module.parameters(recurse=False):
                if id(p) not in seen:  # tied weights belong to their first owner
                    seen.add(id(p))
                    params.append(p)
            if params:
                trainable = sum(p.numel() for p in params if p.requires_grad)
                info = LayerInfo(name=name, type=type(module).__name__, depth=len(layers), params=trainable)
                layers.append(_Layer(info, module, params))
        if not layers:
            raise ValueError(NO_PARAMS_MSG)
        complex_params = [layer.info.name for layer in layers if any(p.is_complex() for p in layer.params)]
        if complex_params:
            raise TypeError(
                "gradsentry.Monitor measures real-valued parameters; layer(s) "
                f"{', '.join(repr(n) for n in complex_params[:3])} hold complex ones"
            )
        if not any(p.requires_grad for layer in layers for p in layer.params):
            log.warning(
                "gradsentry.Monitor: every parameter is frozen (requires_grad=False); records will "
                "show no gradient (has_grad=False) for every layer"
            )
        return layers

    def _order_hook(self, module: nn.Module, args: Any) -> None:
        self._called_at.setdefault(id(module), self._events)
        self._events += 1

    def _order_end_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self._ended_at.setdefault(id(module), self._events)
        self._events += 1

    def _call_order(self) -> list[nn.Module]:
        """Layers and activation sites in depth order, from the first forward's calls.

        A module is placed where its first call began. A layer that is never called as a module but
        whose parameters its owner uses directly (``nn.MultiheadAttention.out_proj``: the attention
        calls ``F.multi_head_attention_forward`` with ``out_proj.weight``) is placed where its nearest
        called ancestor's first call ended, i.e. after everything that ancestor called: the output
        projection sits after the attention, not after the model's output head. Layers with no called
        ancestor but the root land at the end of the forward (last), as do layers whose ancestors
        were never called at all.
        """
        called, ended = self._called_at, self._ended_at
        named = list(self.model.named_modules())
        by_name = dict(named)
        wanted = {id(layer.module) for layer in self._layers} | {id(site.module) for site in self._sites}
        keyed: list[tuple[tuple[int, int, int], nn.Module]] = []
        for index, (name, module) in enumerate(named):
            if id(module) not in wanted:
                continue
            if id(module) in called:
                keyed.append(((called[id(module)], 0, index), module))
                continue
            parts = name.split(".") if name else []
            while parts:
                parts.pop()
                owner = by_name.get(".".join(parts))
                if owner is not None and id(owner) in called:
                    if id(owner) in ended:  # just before the owner's call ended
                        keyed.append(((ended[id(owner)], -1, index), module))
                    break
        keyed.sort(key=lambda km: km[0])
        return [m for _, m in keyed]

    def _fix_depth(self) -> None:
        """Sort layers and activation sites by the first forward's calls (see :meth:`_call_order`);
        layers never placed keep their module order, last."""
        if self._depth_fixed:
            return
        if not self._called_at and self._dist is None:  # no forward pass yet: keep watching for the order
            return
        for h in self._order_handles:
            h.remove()
        self._order_handles.clear()
        seen = self._call_order()
        ctx = self._dist
        if ctx is not None and (ctx.sharded or self.sync_local or self.overhead_budget is not None):
            seen = self._agree_order(seen, ctx)
        rank = {id(m): i for i, m in enumerate(seen)}
        big = len(seen)
        self._layers.sort(key=lambda L: (rank.get(id(L.module), big), L.info.depth))
        for depth, layer in enumerate(self._layers):
            layer.info.depth = depth
        self._sites.sort(key=lambda s: rank.get(id(s.module), big))
        for depth, site in enumerate(self._sites):
            site.depth = depth
        self._grad_set_cache = {}
        self._params_cache = None
        self._depth_fixed = True
        self._called_at, self._ended_at = {}, {}

    def _agree_order(self, seen: list[nn.Module], ctx: _dist.DistContext) -> list[nn.Module]:
        """Rank 0's first-call order of the modules, on every rank (one all-reduce, once per run).

        Ranks whose forward took different paths would otherwise order layers and activation sites
        differently, and the reduced entries would not match.
        """
        modules = [m for _, m in self.model.named_modules()]
        where = {id(m): i for i, m in enumerate(modules)}
        order = torch.zeros(len(modules), dtype=torch.float64, device=self._all_params()[0][0].device)
        if ctx.rank == 0:  # 1 + module index in call order; the others add zeros
            idx = [where[id(m)] + 1 for m in seen if id(m) in where]
            order[: len(idx)] = torch.tensor(idx, dtype=torch.float64)
        agreed = ctx.all_reduce_(order, "sum").tolist()
        return [modules[int(i) - 1] for i in agreed if i > 0]

    @property
    def layers(self) -> list[LayerInfo]:
        """Layers in depth order (forward order once the first forward pass has run)."""
        return [layer.info for layer in self._layers]

    @property
    def header(self) -> RunHeader:
        """The JSONL header: schema version, layers, metadata."""
        meta = {"every": self.every, "model": type(self.model).__name__, **self._meta}
        meta.setdefault("activations", [{"name": s.name, "type": s.kind} for s in self._sites])
        meta.setdefault(
            "saturation",
            {"sigmoid": self.thresholds.sigmoid_saturation, "tanh": self.thresholds.tanh_saturation},
        )
        return RunHeader(layers=self.layers, meta=meta)

    @property
    def records(self) -> list[StepRecord]:
        """Records of the logged steps kept so far, oldest first."""
        return list(self._records)

    # ------------------------------------------------------------------ hooks armed per logged step
    def _arm_for(self, step: int) -> None:
        """Arm activation hooks for the forward of ``step`` when it will be logged; disarm otherwise."""
        logged = self._logs_at(step)
        want_acts = logged and (self.activations or self.locate_nonfinite)
        if want_acts and not self._act_handles:
            if self.activations:
                for site in self._sites:
                    self._act_handles.append(site.module.register_forward_hook(self._make_act_hook(site)))
            if self.locate_nonfinite:
                for i, (_, module) in enumerate(self.model.named_modules()):
                    self._act_handles.append(
                        module.register_forward_pre_hook(self._finite_pre, with_kwargs=True)
                    )
                    self._act_handles.append(module.register_forward_hook(self._make_finite_hook(i)))
        elif not want_acts and self._act_handles:
            for h in self._act_handles:
                h.remove()
            self._act_handles.clear()

    def _make_act_hook(self, site: _ActSite) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not torch.is_grad_enabled() or not args or not isinstance(args[0], Tensor):
                return
            t0 = time.perf_counter()
            x = args[0]
            y = output if isinstance(output, Tensor) else None
            self._pending.acts[site.name] = stats.activation_stats(
                site.kind,
                x,
                y,
                module,
                sigmoid_band=self.thresholds.sigmoid_saturation,
                tanh_band=self.thresholds.tanh_saturation,
            )
            if self.histogram_bins > 0:
                self._pending.hists[site.name] = stats.histogram(x, self.histogram_bins, self.histogram_range)
            self._hook_time += time.perf_counter() - t0

        return hook

    def _finite_pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Note whether the module's floating-point inputs are free of NaN (on the device, no sync).

        Only NaN counts against an input: ``-inf`` is a normal attention-mask value, and an inf made
        upstream was already flagged where it was made."""
        if not torch.is_grad_enabled():
            return
        t0 = time.perf_counter()
        inputs = [
            t
            for t in itertools.chain(args, kwargs.values())
            if isinstance(t, Tensor) and t.is_floating_point() and t.numel()
        ]
        ok: Tensor | None = None  # None: no floating-point input, nothing received
        if len(inputs) == 1:
            ok = ~torch.isnan(inputs[0]).any()
        elif inputs:
            ok = ~torch.stack([torch.isnan(t).any() for t in inputs]).any()
        stack = self._pending.inputs_ok.setdefault(id(module), [])
        if len(stack) > 64:  # calls that raised before their end hook: never let them pile up
            del stack[0]
        stack.append(ok)
        self._hook_time += time.perf_counter() - t0

    def _make_finite_hook(self, index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not torch.is_grad_enabled():
                return
            t0 = time.perf_counter()
            stack = self._pending.inputs_ok.get(id(module))
            inputs_ok = stack.pop() if stack else None
            out = output[0] if isinstance(output, (tuple, list)) and output else output
            if isinstance(out, Tensor) and out.is_floating_point():
                self._finite_post(index, out, inputs_ok)
            self._hook_time += time.perf_counter() - t0

        return hook

    def _finite_post(self, index: int, out: Tensor, inputs_ok: Tensor | None) -> None:
        """Fold one module call into the module's score: ``_EARLY - k`` when call ``k`` (counted since
        the last logged step) gave a NaN/inf output, plus ``_EARLY`` when its inputs held no NaN (the
        module *made* it, rather than passed on what it received); the score keeps its maximum. The
        origin is then the module with the highest score: the earliest call that made a non-finite
        value, else the earliest call that output one. Calls end inner modules first, so a NaN made
        by tensor code inside a module (a fully masked attention row) is blamed on that module, not on
        the child it was handed to (whose input already held it).
        """
        pending = self._pending
        if pending.flag_scores is None:
            n = sum(1 for _ in self.model.modules())
            pending.flag_scores = torch.zeros(n, dtype=stats.reduce_dtype(out.device), device=out.device)
        scores = pending.flag_scores
        bad = ~torch.isfinite(out).all()
        made = bad if inputs_ok is None else bad & inputs_ok.to(bad.device)
        value = bad.to(scores.dtype) * (_EARLY - pending.calls) + made.to(scores.dtype) * _EARLY
        pending.calls += 1
        slot = scores.narrow(0, index, 1)
        torch.maximum(slot, value.to(scores.device).reshape(1), out=slot)

    def _arm_optimizer(self) -> None:
        """Snapshot the weights now and measure ``||Δw||`` when the coming optimizer step ends.

        The snapshot is taken in :meth:`step` rather than in an optimizer step pre-hook, because
        trainers such as Lightning run backward (and so :meth:`step`) inside
        ``optimizer.step(closure)``, after the pre-hooks have fired; the weights do not change
        between :meth:`step` and the update.
        """
        if self.optimizer is None or not self.weight_norms:
            return
        t0 = time.perf_counter()
        params, _ = self._all_params()
        self._snapshot = self._copy_weights([_dist.local(p).detach() for p in params])
        # A layer without a gradient at this optimizer step (a branch not taken, an unused expert)
        # gets no update-to-weight ratio rather than a 0 that reads as a stalled layer.
        self._update_layers = (
            frozenset(
                o
                for o, p in zip(self._owners_all, params, strict=True)
                if p.grad is not None and p.requires_grad
            )
            if self._dist is None
            else None
        )
        if not self._opt_handles:
            self._opt_handles.append(self.optimizer.register_step_post_hook(self._opt_post))
        self._hook_time += time.perf_counter() - t0

    def _copy_weights(self, weights: list[Tensor]) -> list[Tensor]:
        """A copy of ``weights`` for the update-to-weight ratio. On CPU the copy goes into a buffer
        kept between logged steps (allocating fresh pages costs ~4x the copy there: 77 ms against
        20 ms for 50M parameters); elsewhere a fresh clone, which the caching allocator serves
        cheaply and which frees the memory between logged steps."""
        if not all(w.device.type == "cpu" for w in weights):
            return [w.clone() for w in weights]
        buf = self._snapshot_buffer
        if (
            buf is None
            or [b.shape for b in buf] != [w.shape for w in weights]
            or any(b.dtype != w.dtype for b, w in zip(buf, weights, strict=True))
        ):
            buf = self._snapshot_buffer = [
                torch.empty_like(w, memory_format=torch.preserve_format) for w in weights
            ]
        torch._foreach_copy_(buf, weights)
        return buf

    def _disarm_optimizer(self) -> None:
        for h in self._opt_handles:
            h.remove()
        self._opt_handles.clear()
        self._snapshot = None

    def _all_params(self) -> tuple[list[Tensor], Tensor]:
        """Every parameter in depth order and its layer index (cached once the depth is fixed)."""
        if self._params_cache is None or not self._depth_fixed:
            params: list[Tensor] = []
            idx: list[int] = []
            for i, layer in enumerate(self._layers):
                for p in layer.params:
                    params.append(p)
                    idx.append(i)
            self._params_cache = (params, torch.tensor(idx, device=params[0].device))
            self._owners_all = idx
            self._single_device = all(p.device == params[0].device for p in params)
            self._all_float32 = all(p.dtype == torch.float32 for p in params)
            self._param_kinds = self._kinds(params)
        return self._params_cache

    @staticmethod
    def _kinds(params: list[Tensor]) -> set[tuple[torch.dtype, torch.device]]:
        return {(p.dtype, p.device) for p in params}

    def _revalidate_params(self) -> None:
        """Drop the cached parameter facts when a parameter changed dtype or device since they were
        taken (``model.to(torch.bfloat16)`` or ``.cuda()`` after the first logged step converts the
        parameters in place): a stale float32 fast path computes bf16 norms in bf16 (1e-3 errors),
        and cached index tensors would sit on the old device. One pass over the parameters' dtype
        and device per logged step."""
        cache = self._params_cache
        if cache is not None and self._kinds(cache[0]) != self._param_kinds:
            self._params_cache = None
            self._grad_set_cache = {}
            self._snapshot_buffer = None

    def _count_opt_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._opt_steps += 1

    def _check_double_call(self) -> None:
        """Warn (once) when :meth:`step` is called again for the same optimizer step.

        A second call is recognised when nothing happened in between: the gradient is the same tensor
        object, and either no ``optimizer.step()`` ran (with ``optimizer=``) or, without an optimizer,
        the gradient was not even written (same version). A new ``backward()`` after
        ``zero_grad(set_to_none=True)`` (the default) makes a new gradient object, so a step a loss
        scaler skipped is not mistaken for a second call.
        """
        probe = self._probe
        grad = probe.grad if probe is not None else None
        last = self._last_call
        if grad is None:
            self._last_call = None
            return
        version = grad._version
        if last is not None and not self._warned_double:
            opt_steps, ref, last_version = last
            same = ref is not None and ref() is grad
            if same and (
                opt_steps == self._opt_steps if self.optimizer is not None else version == last_version
            ):
                self._warned_double = True
                log.warning(
                    "gradsentry.Monitor.step() was called again for the same optimizer step (no "
                    "optimizer.step() and no new gradient since the previous call): every call makes a "
                    "record, so the log now holds two records for one step. Call step() once per "
                    "optimizer step (under gradient accumulation, after the last micro-batch only)."
                )
        self._last_call = (self._opt_steps, weakref.ref(grad), version)

    def _opt_post(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        t0 = time.perf_counter()
        snap = self._snapshot
        if snap is not None:
            params, index = self._all_params()
            # ||w|| before the update: the ratio's denominator. After it, a blow-up caps the ratio near
            # 1 (||dw|| / ||w + dw|| -> 1 as dw grows), so an update 2,500x the weights would read 1.0.
            before = _dist.sq_norms(self._dist, snap, like=params)
            torch._foreach_sub_(snap, [_dist.local(p).detach() for p in params])
            sq = _dist.sq_norms(self._dist, snap, like=params)
            self._pending.update_sq = stats.layer_sum(sq, index.to(sq.device), len(self._layers))
            self._pending.before_sq = stats.layer_sum(before, index.to(before.device), len(self._layers))
            self._pending.update_layers = self._update_layers
            self._snapshot = None
        self._disarm_optimizer()
        self._hook_time += time.perf_counter() - t0

    # ------------------------------------------------------------------ the step
    def step(
        self, loss: Tensor | float | None = None, *, lr: float | None = None, step: int | None = None
    ) -> StepRecord | None:
        """Record statistics for this optimizer step if it is a logged step, and apply the remedy.

        Args:
            loss: the training loss of the step (a scalar tensor or float), recorded as is
                (NaN/inf kept). A tensor is read only on logged steps, in the same transfer.
            lr: learning rate to record; defaults to the optimizer's first group's ``lr``.
            step: label for the record (e.g. a trainer's global step); defaults to the number of
                earlier ``step`` calls.

        Returns:
            The :class:`StepRecord` on logged steps, else None.

        Raises:
            RuntimeError: if called after :meth:`close`.
            ValueError: on a logged step, if ``loss`` is a tensor with more than one element.
        """
        if self._closed:
            raise RuntimeError("gradsentry.Monitor.step() called after close()")
        self._check_double_call()
        current = self.step_count
        self.step_count += 1
        record: StepRecord | None = None
        try:
            if self._logs_at(current):
                try:
                    record = self._log_step(current if step is None else int(step), loss, lr)
                finally:  # an error on a logged step (a bad argument, a raising remedy) must not stop logging
                    if current == self._next_log:
                        self._next_log = current + self.every
                    self._pending = _Pending()
            elif self.remedy is not None:
                result = self._call_remedy(self._all_params()[0], loss=loss)
                self._note_unlogged_skip(result, current if step is None else int(step))
        finally:  # arm (or disarm) the hooks for the coming step even after an error
            if self._logs_at(self.step_count):  # the coming optimizer step precedes a logged step
                self._arm_optimizer()
            else:
                self._disarm_optimizer()
            self._arm_for(self.step_count)
        if record is not None and self.on_nonfinite is not None:
            self._check_nonfinite(record)
        return record

    def _logs_at(self, call: int) -> bool:
        """Whether the ``call``-th :meth:`step` call (0-based) is a logged step."""
        return call == self._next_log or (self.also_log is not None and bool(self.also_log(call)))

    def recent(self, n: int) -> list[StepRecord]:
        """The last ``n`` records kept, oldest first (costs O(n), not O(records kept))."""
        out = list(itertools.islice(reversed(self._records), max(0, int(n))))
        out.reverse()
        return out

    def _check_nonfinite(self, record: StepRecord) -> None:
        """Act on a logged step holding a NaN/inf, as ``on_nonfinite`` says (see the class docstring)."""
        if not nonfinite_step(record):
            self._in_nonfinite = False
            return
        onset = not self._in_nonfinite
        self._in_nonfinite = True
        action = self.on_nonfinite
        if action == "warn" and (not onset or self.rank != 0):
            return
        finding = alert_finding(self.recent(ALERT_WINDOW), self.layers, "nonfinite", self.header.meta)
        assert finding is not None  # alert_finding always builds one for a non-finite newest record
        if action == "warn":
            log.warning("%s", alert_message(record, finding))
        elif action == "raise":
            self._flush_sinks()
            raise NonFiniteGradientError(
                alert_message(record, finding),
                record=record,
                layers=nonfinite_layers(record),
                finding=finding,
            )
        elif callable(action):
            action(finding)

    def _note_unlogged_skip(self, result: Any, label: int) -> None:
        """Remember that the remedy skipped this unlogged step, for the next record's actions.

        A host flag (``NonFiniteGuard()``, ``Rollback``: already copied by the remedy) keeps the
        step's label; a device flag (``NonFiniteGuard(sync=False)``) is added to a device counter,
        read with the next logged step's transfer: no sync here.
        """
        pending: list[Any] = [result]
        while pending:
            r = pending.pop()
            flag = getattr(r, "skipped", None)
            if isinstance(flag, Tensor):
                if self._skips_dev is None or self._skips_dev.device != flag.device:
                    self._skips_dev = torch.zeros(
                        (),
                        dtype=torch.float64 if flag.device.type == "cpu" else torch.float32,
                        device=flag.device,
                    )
                self._skips_dev.add_(flag.detach().reshape(-1)[:1].sum().to(self._skips_dev.dtype))
            elif flag is True:
                self._skipped_steps.append(label)
                if len(self._skipped_steps) > _MAX_LISTED_SKIPS:
                    self._skipped_steps.pop(0)
                self._skipped_count += 1
                return
            pending.extend(getattr(r, "children", None) or [])

    def _skip_action(self, device_skips: int) -> dict[str, Any] | None:
        """The action telling which unlogged steps since the previous logged step a remedy skipped."""
        count = self._skipped_count + device_skips
        if count == 0:
            return None
        action = {
            "remedy": type(self.remedy).__name__,
            "skipped_unlogged": count,  # steps between the previous logged step and this one
            "skipped_unlogged_steps": list(self._skipped_steps),  # their labels, when known on the host
        }
        self._skipped_steps, self._skipped_count = [], 0
        return action

    def _flush_sinks(self) -> None:
        """Push what the sinks buffered to disk (sinks with a ``flush`` method), e.g. before raising."""
        for s in self._sinks:
            s.flush()

    def _call_remedy(self, params: list[Tensor], *, loss: Any, norms: Tensor | None = None) -> Any:
        """Call the remedy, passing ``norms``/``loss`` only where its signature accepts them."""
        assert self.remedy is not None
        kwargs: dict[str, Any] = {}
        if norms is not None and self._remedy_takes("norms"):
            kwargs["norms"] = norms
        if self._remedy_takes("loss"):
            kwargs["loss"] = loss
        if self._remedy_names is None:
            self._remedy_names = param_names(self.model)
        with lend_names(self._remedy_names):  # so that its records name the Monitor's layers
            return self.remedy(params, **kwargs)

    def _remedy_takes(self, name: str) -> bool:
        if self._remedy_params is None:
            try:
                sig = inspect.signature(self.remedy)  # type: ignore[arg-type]
                kinds = {p.kind for p in sig.parameters.values()}
                self._remedy_params = (
                    {"norms", "loss"} if inspect.Parameter.VAR_KEYWORD in kinds else set(sig.parameters)
                )
            except (TypeError, ValueError):
                self._remedy_params = set()
        return name in self._remedy_params

    def _grad_params(self) -> tuple[list[Tensor], list[Tensor], list[int], list[int]]:
        """Parameters with a gradient, their gradients, their layers, and their positions in
        :meth:`_all_params`."""
        params, _ = self._all_params()
        # A frozen parameter's stale .grad (zero_grad(set_to_none=False) keeps zeros) is no gradient.
        grads_all = [p.grad if p.requires_grad else None for p in params]
        positions = [pos for pos, g in enumerate(grads_all) if g is not None]
        if len(positions) == len(params):
            return params, grads_all, self._owners_all, positions  # type: ignore[return-value]
        owners_all = self._owners_all
        return (
            [params[i] for i in positions],
            [grads_all[i] for i in positions],  # type: ignore[misc]
            [owners_all[i] for i in positions],
            positions,
        )

    def _log_step(self, label: int, loss: Tensor | float | None, lr: float | None) -> StepRecord:
        t_start = time.perf_counter()
        self._fix_depth()
        self._revalidate_params()
        L = len(self._layers)
        params_with_grad, g, owners, positions = self._grad_params()
        if not g and not self._warned_no_grad and any(p.requires_grad for p in self._all_params()[0]):
            self._warned_no_grad = True
            log.warning(
                "gradsentry.Monitor.step(): no parameter has a gradient at step %d; call step() after "
                "loss.backward() and before optimizer.zero_grad() (the record shows has_grad=False)",
                label,
            )
        all_params, all_index = self._all_params()
        device = all_params[0].device
        dt = stats.reduce_dtype(device)
        ctx = self._dist
        shard_op = "sum" if ctx is not None and ctx.sharded else None  # replicated: already global
        shard_max = "max" if shard_op else None  # (the gradient parts are placed below)
        sync = ctx is not None and (ctx.sharded or self.sync_local)

        def local_op(op: str) -> str | None:  # rank-local statistics: reduced only when syncing
            return op if sync else None

        # Device tensors in transfer order, each with its reduction over ranks (see _dist.reduce_parts).
        parts: list[tuple[Tensor, str | None]] = []
        if g:
            index = self._grad_set(positions)[0]
        if ctx is not None and ctx.sharded:
            # Per-tensor squared norms of the local shards over *all* parameters (0 without a
            # gradient), so that entries match on ranks that differ in which parameters have one.
            at = torch.tensor(positions, dtype=torch.long, device=device)
            g_sq = torch.zeros(len(all_params), dtype=dt, device=device)
            if g:
                g_sq.index_copy_(0, at, _dist.sq_norms(ctx, g).to(device))
            parts.append((g_sq, "sum"))
            if self.max_abs:
                g_max = torch.zeros(L, dtype=dt, device=device)
                if g:
                    maxabs = stats.foreach_max_abs([_dist.local(t) for t in g])
                    g_max = stats.layer_max(maxabs, index.to(maxabs.device), L).to(device, dt)
                parts.append((g_max, "max"))
        elif g:
            g_sq = stats.sq_norms(g, same_device=self._single_device, all_float32=self._all_float32)
            parts.append((g_sq.to(device), None))
            if self.max_abs:
                maxabs = stats.foreach_max_abs(g)
                parts.append((stats.layer_max(maxabs, index.to(maxabs.device), L).to(device, dt), None))
        else:
            zeros = torch.zeros(L, dtype=dt, device=device)
            parts += [(zeros, None)] * (2 if self.max_abs else 1)
        if ctx is not None and ctx.sharded:  # gradient entries per layer, summed over the ranks' shards
            keep = ctx.counted(params_with_grad)
            sizes = [_dist.local(p).numel() * k for p, k in zip(params_with_grad, keep, strict=True)]
            local_numel = stats.layer_sum(torch.tensor(sizes, dtype=dt), torch.tensor(owners), L)
            parts.append((local_numel.to(device), shard_op))
        if self.weight_norms:
            w_sq = _dist.sq_norms(
                ctx if shard_op else None, [p.detach() for p in all_params], like=all_params
            )
            parts.append((stats.layer_sum(w_sq, all_index.to(w_sq.device), L).to(device), shard_op))
        has_update = self._pending.update_sq is not None and self._pending.before_sq is not None
        if has_update:
            parts.append((self._pending.update_sq.to(device, dt), shard_op))  # type: ignore[union-attr]
            parts.append((self._pending.before_sq.to(device, dt), shard_op))  # type: ignore[union-attr]
        if isinstance(loss, Tensor) and loss.numel() != 1:
            raise ValueError(
                f"Monitor.step(loss=...) expects a scalar loss, got a tensor of shape {list(loss.shape)}; "
                "pass loss.mean() (or the value you call backward() on)"
            )
        has_loss_tensor = isinstance(loss, Tensor) or (sync and loss is not None)
        if has_loss_tensor:
            loss_t = torch.as_tensor(loss).detach().reshape(-1)[:1].to(device, dt)
            parts.append((loss_t, local_op("mean")))
        act_names, hist_names, flag_names = self._pack_local(parts, sync, device, dt)
        if self._layer_hist is not None:  # per-layer |g|, |w| counts (histograms.py), in the same copy
            counts = self._layer_hist.part(g, owners, all_params, self._owners_all, L, device, dt)
            parts.append((counts, shard_op))
        # Replicated gradients (DDP) are identical on every rank after DDP's all-reduce, so their norms
        # need no collective; but a NaN/inf written into one rank's copy afterwards (a rank-local bug,
        # a hook) stays on that rank. When syncing, one indicator per layer rides on the SUM, so that
        # rank 0 (the writer) records the NaN too.
        check_replicas = sync and ctx is not None and not ctx.sharded
        if check_replicas:
            bad_here = (
                ~torch.isfinite(stats.layer_sum(g_sq, index, L)) if g else torch.zeros(L, dtype=torch.bool)
            )
            parts.append((bad_here.to(device, dt), "sum"))
        nan_pos = len(parts) if shard_max and self.max_abs else None  # a MAX may drop NaN: flag it
        if nan_pos is not None:
            parts.append((torch.isnan(parts[1][0]).to(dt), shard_max))
        agree_every = ctx is not None and self.overhead_budget is not None
        if agree_every:  # every rank must log the same steps: take the largest proposed `every`
            parts.append((torch.tensor([float(self._proposed_every)], dtype=dt, device=device), "max"))

        reduced = _dist.reduce_parts(ctx, parts)
        self.last_norms = None
        if ctx is not None and ctx.sharded:  # whole-tensor norms of this rank's parameters with a gradient
            if g:
                self.last_norms = (params_with_grad, reduced[0][at].sqrt().float())
            reduced[0] = stats.layer_sum(reduced[0], all_index, L)
        elif g:
            self.last_norms = (params_with_grad, g_sq.sqrt().float())
            reduced[0] = stats.layer_sum(reduced[0], index, L)
        if nan_pos is not None:
            reduced[1] = torch.where(reduced.pop(nan_pos) > 0, torch.nan, reduced[1])
        device_skips = self._skips_dev
        self._skips_dev = None
        if device_skips is not None:
            reduced.append(device_skips.reshape(1).to(device, dt))
        # The remedy runs now: after every gradient statistic above was computed from the raw
        # gradients, before the transfer, so that its figures travel in the same copy.
        remedy_result: Any = None
        remedy_finalize: Callable[[list[float]], list[dict[str, Any]]] | None = None
        remedy_size = 0
        self._raw_grads = (params_with_grad, g)  # a guard may drop p.grad: keep the tensors
        if self.remedy is not None:
            grads_for_remedy = self.last_norms[0] if self.last_norms else []
            shared = self.last_norms[1] if self.last_norms else None
            remedy_result = self._call_remedy(grads_for_remedy, norms=shared, loss=loss)
            pack = getattr(remedy_result, "pack_dicts", None)
            if callable(pack):
                remedy_tensors, remedy_finalize = pack()
                reduced += [t.reshape(-1).to(device, dt) for t in remedy_tensors]
                remedy_size = sum(t.numel() for t in remedy_tensors)
        host = torch.cat(reduced).cpu().tolist()  # the one device→host transfer of this step
        remedy_values = host[len(host) - remedy_size :] if remedy_size else []

        pos = 0

        def take(n: int) -> list[float]:
            nonlocal pos
            out = host[pos : pos + n]
            pos += n
            return out

        g_sq_l = take(L)
        g_max_l: list[float | None] = list(take(L)) if self.max_abs else [None] * L
        numel = [round(n) for n in take(L)] if shard_op is not None else self._grad_set(positions)[1]
        w_sq_l: list[float | None] = list(take(L)) if self.weight_norms else [None] * L
        u_sq = take(L) if has_update else None
        before_sq = take(L) if has_update else None
        loss_value: float | None
        if has_loss_tensor:
            loss_value = take(1)[0]
        else:
            loss_value = float(loss) if loss is not None else None  # type: ignore[arg-type]
        act_values: dict[str, list[float]] = {}
        for name in act_names:
            v = take(5 if sync else 4)
            if not sync:
                act_values[name] = v
            elif v[0] > 0:  # [ranks where the site ran, then sums of its 4 statistics]
                act_values[name] = [x / v[0] for x in v[1:]]
        hist_values = {name: take(self.histogram_bins) for name in hist_names}
        hist_values = {name: h for name, h in hist_values.items() if name in act_values}
        flag_scores = take(len(flag_names))
        layer_counts = take(self._layer_hist.size(L)) if self._layer_hist is not None else None
        elsewhere: list[int] = []  # layers non-finite on another rank only
        replicas_differ = False  # decided from reduced figures: the same on every rank
        if check_replicas:
            assert ctx is not None
            ranks_bad = take(L)
            replicas_differ = any(0 < n < ctx.world_size for n in ranks_bad)
            elsewhere = [
                i
                for i, (n, sq) in enumerate(zip(ranks_bad, g_sq_l, strict=True))
                if n > 0 and math.isfinite(sq)
            ]
            for i in elsewhere:
                g_sq_l[i] = math.nan
                if self.max_abs:
                    g_max_l[i] = math.nan
        if agree_every:
            self._agree_every(int(take(1)[0]))
        skip_action = self._skip_action(round(take(1)[0]) if device_skips is not None else 0)

        total_sq = math.fsum(g_sq_l)
        all_finite = math.isfinite(total_sq) and (not self.max_abs or math.isfinite(math.fsum(g_max_l)))  # type: ignore[arg-type]
        bad_layers = (
            []
            if all_finite
            else [
                i
                for i, (sq, mx) in enumerate(zip(g_sq_l, g_max_l, strict=True))
                if numel[i] and not (math.isfinite(sq) and (mx is None or math.isfinite(mx)))
            ]
        )
        nonfinite_counts = (
            self._count_nonfinite(bad_layers, across_replicas=replicas_differ) if bad_layers else {}
        )
        # float32 squares underflow for entries below ~1e-19 (deep vanishing gradients) and overflow
        # for norms above ~1.8e19 with every entry finite: recompute those layers in float64.
        at_risk = [
            i
            for i, (sq, mx) in enumerate(zip(g_sq_l, g_max_l, strict=True))
            if numel[i]
            and i not in elsewhere
            and (
                (not math.isfinite(sq) and i in nonfinite_counts and nonfinite_counts[i] == 0)
                or (sq < numel[i] * _TINY_MEAN_SQUARE and (mx is None or mx > 0))
            )
        ]
        if at_risk:
            for i, exact in self._exact_sq(at_risk).items():
                g_sq_l[i] = exact
            total_sq = math.fsum(g_sq_l)
        sqrt = math.sqrt
        gnorms = [sqrt(x) for x in g_sq_l]
        wnorms = [None if x is None else sqrt(x) for x in w_sq_l]
        ratios: list[float | None] = [None] * L
        if u_sq is not None and before_sq is not None:
            updated = self._pending.update_layers
            ratios = [
                None
                if not n or (updated is not None and i not in updated)
                else (sqrt(u) / sqrt(wb) if wb > 0 else (math.inf if u > 0 else 0.0))
                for i, (u, wb, n) in enumerate(zip(u_sq, before_sq, numel, strict=True))
            ]
        maxes = [(m if n else 0.0) for m, n in zip(g_max_l, numel, strict=True)] if self.max_abs else g_max_l
        layer_stats = [
            LayerStats(
                layer.info.name,
                i,
                n,
                gn,
                gn / sqrt(n) if n else 0.0,
                mx,
                nonfinite_counts.get(i, 0) if bad_layers else 0,
                wn,
                r,
                n > 0,
            )
            for i, (layer, n, gn, mx, wn, r) in enumerate(
                zip(self._layers, numel, gnorms, maxes, wnorms, ratios, strict=True)
            )
        ]
        global_norm = math.sqrt(total_sq) if not math.isnan(total_sq) else math.nan
        acts = []
        for site in self._sites:
            if site.name not in act_values:
                continue
            mean, std, sat, dead = act_values[site.name]
            hist = None
            if site.name in hist_values:
                if self._hist_edges is None:  # one list shared by every record (never mutated)
                    edges = torch.linspace(
                        -self.histogram_range, self.histogram_range, self.histogram_bins + 1
                    )
                    self._hist_edges = edges.tolist()
                hist = {"edges": self._hist_edges, "counts": hist_values[site.name]}
            acts.append(
                ActivationStats(
                    name=site.name,
                    type=site.kind,
                    depth=site.depth,
                    pre_mean=mean,
                    pre_std=std,
                    saturated_frac=None if math.isnan(sat) else sat,
                    dead_frac=None if math.isnan(dead) else dead,
                    histogram=hist,
                )
            )
        origin = None
        if flag_names and not math.isfinite(global_norm):
            best = max(range(len(flag_scores)), key=flag_scores.__getitem__)
            origin = flag_names[best] if flag_scores[best] > 0 else None
            if origin is None:  # forward was finite: the deepest layer whose gradient is not
                origin = next((s.name for s in reversed(layer_stats) if not math.isfinite(s.grad_norm)), None)
        if lr is None and self.optimizer is not None and self.optimizer.param_groups:
            lr_raw = self.optimizer.param_groups[0].get("lr")
            lr = float(lr_raw) if lr_raw is not None else None
        self._pending = _Pending()

        record = StepRecord(
            step=label,
            global_norm=global_norm,
            layers=layer_stats,
            loss=loss_value,
            lr=lr,
            activations=acts,
            nonfinite_origin=origin,
        )
        if self._layer_hist is not None and layer_counts is not None:
            record.histograms = self._layer_hist.unpack(layer_counts, layer_stats)
        if skip_action is not None:
            record.actions.append(skip_action)
        if remedy_finalize is not None:
            record.actions.extend(remedy_finalize(remedy_values))
        elif remedy_result is not None:  # a user remedy without pack_dicts: its own copy to the host
            to_dicts = getattr(remedy_result, "to_dicts", None)
            to_dict = getattr(remedy_result, "to_dict", None)
            if callable(to_dicts):
                record.actions.extend(to_dicts())
            elif callable(to_dict):
                record.actions.append(to_dict())
        self._raw_grads = ([], [])  # keep no gradient alive past this step
        cost = time.perf_counter() - t_start + self._hook_time
        self._hook_time = 0.0
        record.overhead = self._overhead(cost)
        self._keep(record)
        self._emit(record)
        return record

    def _keep(self, record: StepRecord) -> None:
        """Keep the record in the window; the one it pushes out goes to the run's history."""
        self._records.append(record)
        while len(self._records) > self.max_records:
            self._history.absorb(self._records.popleft())

    def _pack_local(
        self, parts: list[tuple[Tensor, str | None]], sync: bool, device: torch.device, dt: torch.dtype
    ) -> tuple[list[str], list[str], list[str]]:
        """Append the rank-local statistics (activations, histograms, forward non-finite flags) to
        ``parts``; returns the site names of the activations and histograms and the module names of
        the flags, in that order.

        Under ``sync`` (reduced over ranks) the layout is fixed — every watched site and every module,
        whether or not it ran on this rank — so that ranks whose forward took different paths still
        reduce matching entries: each site carries the count of ranks where it ran, and its statistics
        are averaged over those ranks. The modules' non-finite scores (see :meth:`_finite_post`) are
        max-reduced, so that the earliest module of any rank that made a NaN/inf wins.
        """
        pending = self._pending
        if not sync:
            acts = [s.name for s in self._sites if s.name in pending.acts]
            hists = [n for n in acts if n in pending.hists]
            parts.extend((pending.acts[n].to(device, dt), None) for n in acts)
            parts.extend((pending.hists[n].to(device, dt), None) for n in hists)
            if pending.flag_scores is None:
                return acts, hists, []
            parts.append((pending.flag_scores.to(device, dt), None))
            return acts, hists, [n for n, _ in self.model.named_modules()]
        acts = [s.name for s in self._sites] if self.activations else []
        one = torch.ones(1, dtype=dt, device=device)
        for n in acts:
            a = pending.acts.get(n)
            parts.append((torch.cat([one, a.to(device, dt)]) if a is not None else one.new_zeros(5), "sum"))
        hists = acts if self.histogram_bins > 0 else []
        for n in hists:
            h = pending.hists.get(n)
            parts.append((h.to(device, dt) if h is not None else one.new_zeros(self.histogram_bins), "sum"))
        if not self.locate_nonfinite:
            return acts, hists, []
        names = [n for n, _ in self.model.named_modules()]
        scores = pending.flag_scores
        parts.append((scores.to(device, dt) if scores is not None else one.new_zeros(len(names)), "max"))
        return acts, hists, names

    def _grad_set(self, positions: list[int]) -> tuple[Tensor, list[int]]:
        """For the parameters at ``positions`` in :meth:`_all_params` (those with a gradient): their
        layer index ``[N]`` (int64, on the parameters' device) and the gradient entries per layer.
        Cached per gradient set (the parameter list is fixed once depth is)."""
        key = tuple(positions)
        cached = self._grad_set_cache.get(key)
        if cached is None:
            params, _ = self._all_params()
            owners = [self._owners_all[pos] for pos in positions]
            numel = [0] * len(self._layers)
            for pos, owner in zip(positions, owners, strict=True):
                numel[owner] += params[pos].numel()
            cached = (torch.tensor(owners, dtype=torch.long, device=params[0].device), numel)
            self._grad_set_cache = {key: cached}
        return cached

    def _layer_totals(
        self, layers: list[int], per_grad: Callable[[Tensor], Tensor], op: str | None = None
    ) -> list[float]:
        """``sum(per_grad(g))`` over the raw gradients (this rank's counted parts, sparse ones as their
        entries) of each of these layers, summed over ranks when sharded; one more transfer.

        Only called on the rare layers a logged step flags, which are the same on every rank (they
        are decided from reduced figures), so a sharded total is one more all-reduce.
        """
        device = self._all_params()[0][0].device
        dt = stats.reduce_dtype(device)
        raw = dict(zip(map(id, self._raw_grads[0]), self._raw_grads[1], strict=True))
        totals = []
        for i in layers:
            ps = [p for p in self._layers[i].params if raw.get(id(p)) is not None]
            keep = self._dist.counted(ps) if self._dist is not None else [True] * len(ps)
            grads = [
                stats.entries(_dist.local(raw[id(p)])).detach() for p, k in zip(ps, keep, strict=True) if k
            ]
            zero = torch.zeros((), dtype=dt, device=device)
            totals.append(sum((per_grad(g).to(device, dt) for g in grads), zero))
        total = torch.stack(totals)
        if self._dist is not None and self._dist.sharded:
            total = self._dist.all_reduce_(total, "sum")
        elif self._dist is not None and op is not None:
            total = self._dist.all_reduce_(total, op)
        return total.cpu().tolist()

    def _exact_sq(self, layers: list[int]) -> dict[int, float]:
        """Squared gradient norms of these layers from float64 squares (CPU/CUDA)."""
        dt = stats.reduce_dtype(self._all_params()[0][0].device)
        return dict(zip(layers, self._layer_totals(layers, lambda g: g.to(dt).square().sum()), strict=True))

    def _count_nonfinite(self, layers: list[int], across_replicas: bool = False) -> dict[int, int]:
        """Count NaN/inf gradient entries of these layers (called for layers whose norm is not finite).

        ``across_replicas``: replicated copies differ (a NaN on one rank only); the counts are then the
        largest over ranks (one more ``all_reduce(MAX)``, on every rank alike: the decision comes from
        reduced figures), so that every rank records the same count."""
        op = "max" if across_replicas else None
        counts = self._layer_totals(layers, lambda g: (~torch.isfinite(g)).sum(), op)
        return dict(zip(layers, (int(c) for c in counts), strict=True))

    def _agree_every(self, agreed: int) -> None:
        """Apply the largest ``every`` that any rank proposed (overhead_budget under distributed)."""
        if agreed > self.every:
            log.info(
                "gradsentry.Monitor: logging every %d steps (was %d) to stay under %.1f%% overhead",
                agreed,
                self.every,
                100 * (self.overhead_budget or 0.0),
            )
            self.every = agreed
        self._proposed_every = self.every

    def _overhead(self, cost: float) -> float | None:
        """Fraction of this logged step's wall time spent in the Monitor (hooks + statistics).

        The training step's own time is estimated from the wall time since the previous logged
        step, less the Monitor's cost, divided by the steps in between. Also applies the budget.
        """
        now = time.perf_counter()
        prev, steps = self._last_step_end, self.step_count - self._last_logged_count
        self._last_step_end, self._last_logged_count = now, self.step_count
        if prev is None or now <= prev or steps <= 0:
            return None
        step_time = max(now - prev - cost, 1e-9) / steps  # the training step without the Monitor
        ema = self._step_time_ema
        self._step_time_ema = step_time if ema is None else 0.8 * ema + 0.2 * step_time
        if self.overhead_budget is not None:
            needed = math.ceil(cost / (self.overhead_budget * self._step_time_ema))
            if self._dist is not None:  # agreed over ranks at the next logged step
                self._proposed_every = max(self._proposed_every, needed)
            elif needed > self.every:
                log.info(
                    "gradsentry.Monitor: logging every %d steps (was %d) to stay under %.1f%% overhead",
                    needed,
                    self.every,
                    100 * self.overhead_budget,
                )
                self.every = needed
        return cost / (cost + step_time)

    @property
    def amortized_overhead(self) -> float | None:
        """The Monitor's time as a fraction of training time at the current ``every``.

        The median per-logged-step overhead fraction divided by ``every``; None before two logged
        steps.
        """
        values = sorted(r.overhead for r in self._records if r.overhead is not None)
        if not values:
            return None
        f = values[len(values) // 2]
        per_step = f / (1 - f) if f < 1 else math.inf  # cost / step_time
        return per_step / self.every / (1 + per_step / self.every)

    # ------------------------------------------------------------------ sinks, findings, close
    def _emit(self, record: StepRecord) -> None:
        if not self._sinks:
            return
        if not self._sinks_opened:
            header = self.header
            for s in self._sinks:
                s.open(header)
            self._sinks_opened = True
        for s in self._sinks:
            s.write(record)

    def record_action(self, action: dict[str, Any]) -> None:
        """Attach a remedy's action (a JSON-serialisable dict) to the latest record."""
        if self._records:
            self._records[-1].actions.append(dict(action))

    def diagnose(self, **overrides: Any) -> list[Finding]:
        """Diagnose the whole run so far; see :func:`gradsentry.diagnose` for the rules.

        Covers every logged step, not only the ``max_records`` records kept: the series rules (NaN/inf,
        spikes, growth, skipped steps, the loss) read the run's full series, and the per-layer rules
        the kept records plus those pinned for them (the first NaN/inf record, the largest update
        ratios) and a uniform sample of the older ones (see :mod:`gradsentry.diagnosis.history`).
        The findings :meth:`close` writes are these.

        Args:
            **overrides: threshold overrides on top of the Monitor's ``thresholds``, e.g.
                ``vanishing_ratio=1e-4``.
        """
        from gradsentry.diagnose import diagnose

        live = list(self._records)
        history = self._history
        if not history.absorbed:
            return diagnose(
                live, layers=self.layers, thresholds=self.thresholds, meta=self.header.meta, **overrides
            )
        meta = self.header.meta
        return diagnose(
            history.records(live),
            layers=self.layers,
            thresholds=self.thresholds,
            meta=meta,
            signals=history.signals(live, meta),
            **overrides,
        )

    def close(self, *, write_findings: bool = True) -> None:
        """Remove every hook this Monitor added and close its sinks (idempotent).

        Args:
            write_findings: diagnose the run and write the findings to the sinks before closing.
        """
        if self._closed:
            return
        self._closed = True
        for h in [*self._order_handles, *self._act_handles, *self._opt_handles]:
            h.remove()
        if self._count_handle is not None:
            self._count_handle.remove()
            self._count_handle = None
        self._order_handles.clear()
        self._act_handles.clear()
        self._opt_handles.clear()
        self._snapshot = self._snapshot_buffer = None
        if self._sinks and self._sinks_opened:
            if write_findings and (self._records or self._history.absorbed):
                try:
                    findings = self.diagnose()
                except Exception as exc:  # diagnosis must never lose the log
                    log.error("gradsentry: diagnosis failed at close (%s); the records are kept", exc)
                    findings = []
                for s in self._sinks:
                    s.write_findings(findings)
            for s in self._sinks:
                s.close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Monitor(layers={len(self._layers)}, every={self.every}, steps={self.step_count}, "
            f"records={len(self._records)})"
        )
