"""The Monitor facade: its arguments, :meth:`Monitor.step`, :meth:`Monitor.close` and the records.

Cost model (see ``benchmarks/overhead.py``): on a step it does not log, :meth:`Monitor.step` only
increments a counter and compares one gradient tensor's identity and version with the previous call's
(to warn about a second call for one optimizer step); no module hook is armed, no device→host copy
(with ``optimizer=`` a step post-hook counts optimizer steps, one Python increment each). On a logged
step it makes one pass over the gradients for the L2 norms (:func:`gradsentry.stats.sq_norms`: a fused
``torch._foreach_norm`` on accelerators, per-row norms summed in float64 on CPU), one for max |g|, one
L2 pass over the weights, reduces them into layers on the device, and moves one small named packet to
the host (:mod:`gradsentry.monitor.measure`): on an accelerator without a host sync (``sync``).
``max_abs=False, weight_norms=False`` leaves a single read of the gradients, whose per-tensor norms
a norm-based remedy (e.g. ``ClipGlobalNorm``) given as ``remedy=`` then reuses.

"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gradsentry import _taxonomy
from gradsentry import histograms as layer_hist
from gradsentry._transfer import EventFactory
from gradsentry.diagnosis.thresholds import Thresholds
from gradsentry.diagnosis.thresholds import resolve as resolve_thresholds
from gradsentry.monitor import options as opts
from gradsentry.monitor.alerts import ALERT_WINDOW, NonFiniteAlert, OnNonFinite
from gradsentry.monitor.calls import DoubleCallCheck
from gradsentry.monitor.hooks import StepHooks
from gradsentry.monitor.layers import LayerIndex
from gradsentry.monitor.measure import InFlight, Measurer
from gradsentry.monitor.options import Sync
from gradsentry.monitor.output import RecordStore
from gradsentry.monitor.overhead import SAMPLE_RECORDS, OverheadMeter, default_max_records
from gradsentry.monitor.remedy_link import RemedyLink
from gradsentry.monitor.undo import UndoOnError
from gradsentry.records import Finding, LayerInfo, RunHeader, StepRecord
from gradsentry.sinks.base import Sink

log = logging.getLogger("gradsentry")


class Monitor:
    """Watch a model's gradients and diagnose vanishing and exploding gradients.

    Call :meth:`step` once per optimizer step, after ``loss.backward()`` (after
    ``GradScaler.unscale_(optimizer)`` under AMP) and before clipping and ``optimizer.step()``. Under
    gradient accumulation, call it once per optimizer step, not per micro-batch.

    A *layer* is a module that owns parameters directly (Linear, Conv, norms, Embedding); layers are
    ordered by *depth*, the order in which their forward hooks first fire on the first forward pass.
    Construction is all-or-nothing: when it raises, the model and the optimizer keep only their own hooks.

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
        activations: record pre-activation statistics of activation modules on logged steps. Off
            on a compiled model (``torch.compile``, before or after the Monitor; one warning), as is
            ``locate_nonfinite``: forward hooks would break or recompile its graph.
        max_abs: record each layer's max |g| (one more read of the gradients per logged step).
        weight_norms: record each layer's weight norm and, with ``optimizer``, the update-to-weight
            ratio (one read of the weights per logged step, a weight copy before logged steps).
            With ``max_abs=False, weight_norms=False`` a logged step reads the gradients once.
        histogram_bins: if > 0, also record a histogram of each activation's input over
            ``[-histogram_range, histogram_range]``.
        histograms: per-layer histograms of |g| and |w| on logged steps (``record.histograms``): True
            for :class:`gradsentry.histograms.HistogramSpec`'s defaults (64 bins of log10|x| over
            [1e-24, 1e8]), or a ``HistogramSpec``; counted on the device, in the step's one copy.
        locate_nonfinite: on logged steps, name the module where a NaN/inf came from: the first
            module call (in the order calls end) whose output is non-finite although its inputs held
            no NaN (so tensor code inside a module is blamed on it, not on a child that received the
            NaN); else the first call with a non-finite output. Costs an ``isnan`` of each call's
            inputs and an ``isfinite`` of its output, one score per module on the device.
        overhead_budget: if set (e.g. 0.01), raise ``every`` so that the Monitor's amortized time
            stays under this fraction of the training step time.
        max_records: how many records to keep in memory (oldest dropped first; :attr:`records`).
            None (default): as many as fit in 64 MiB by the measured size of one record of this
            model (:func:`record_bytes`; 100 to 100,000): ~2,800 for 50 layers and 50 activation
            sites. Findings cover the whole run whatever this is: a record leaving the window leaves
            its series point and a sample of records (:mod:`gradsentry.diagnosis.history`).
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
            :class:`gradsentry.monitor.DistributedError`; None uses the process group's own timeout
            (``init_process_group(timeout=...)``).
        sync: how a logged step's statistics reach the host. ``"blocking"``: one copy that waits
            for the device, so :meth:`step` returns the record. ``"deferred"``: a ``non_blocking``
            copy into pinned memory and an event, no host sync in :meth:`step`; the record is
            completed, in step order, once the event has passed: at a later :meth:`step`, or when
            :attr:`records`, :meth:`recent`, :meth:`diagnose`, :meth:`flush` or :meth:`close` needs it
            (they wait); sinks and ``on_nonfinite`` see it then, so :meth:`step` returns None on every
            step and an ``on_nonfinite="raise"`` comes from a later call. Rare layers (NaN/inf, or
            float32 squares that may have underflowed) need one more read of their gradients at
            completion; if those were freed or rewritten by then, a non-finite count is recorded as
            1 and the float32 norm is kept. ``"auto"`` (default): deferred when the parameters are
            on an accelerator, outside ``torch.distributed`` and without ``on_nonfinite`` (which
            must act before ``optimizer.step()``); blocking otherwise (on CPU the copy is free).
        thresholds: a :class:`gradsentry.Thresholds` used to measure (its saturation bands,
            ``sigmoid_saturation`` and ``tanh_saturation``, recorded in the header's
            ``meta["saturation"]``) and by :meth:`diagnose`; the defaults when None.
        also_log: a predicate on the 0-based index of a :meth:`step` call; the calls it accepts are
            logged steps too, besides ``every``'s (e.g. a trainer's logging steps). It must be the
            same on every rank.

    Raises:
        ValueError: if the model has no parameters, or ``every`` is not an int >= 1, a histogram or
            ``max_records`` argument is out of range, ``sync`` is not one of its choices (or
            ``"deferred"`` under ``torch.distributed``), or a distributed option is inconsistent
            (see :func:`gradsentry._dist.resolve`).
        TypeError: if ``model`` is not an ``nn.Module`` or has complex parameters, or
            ``on_nonfinite`` is neither None, ``"warn"``, ``"raise"`` nor callable, ``sinks`` is one sink
            rather than a list, ``optimizer`` is not an optimizer or ``remedy`` is not callable.
        gradsentry.monitor.DistributedError: from :meth:`step`, when a rank died or hung during the
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
        sync: Sync = "auto",
        also_log: Callable[[int], bool] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"gradsentry.Monitor expects an nn.Module, got {type(model).__name__}")
        opts.check_args(every, overhead_budget, histogram_bins, histogram_range, max_records, on_nonfinite)
        opts.check_objects(sync, sinks, optimizer, remedy)
        wrapped = type(model).__name__ == "OptimizedModule"  # torch.compile(model): watch the model inside
        self.model = model = model._orig_mod if wrapped else model  # type: ignore[assignment]
        self.thresholds = resolve_thresholds(thresholds, {})
        self.on_nonfinite = on_nonfinite
        self.optimizer = optimizer
        self.remedy = remedy
        self.activations = activations
        self.max_abs = max_abs
        self.weight_norms = weight_norms
        self.histogram_bins = int(histogram_bins)
        self.histogram_range = float(histogram_range)
        self.histograms = layer_hist.resolve(histograms)
        self.also_log = also_log
        self.locate_nonfinite = locate_nonfinite
        self.overhead_budget = overhead_budget
        self.sync_local = sync_local
        self._meta = {**opts.optimizer_meta(optimizer), **(meta or {})}
        self.step_count = 0
        self._next_log = 0
        self._closed = False
        with UndoOnError() as undo:  # a failure below removes the hooks set so far
            self._index = LayerIndex(model, compiled=wrapped)
            undo.add(self._index.remove_hooks)
            self._dist = opts.resolve_dist(model, self._index, sync, process_group, sharded, dist_timeout)
            self.sync = sync
            self._event: EventFactory | None = None  # makes the deferred copy's event (tests inject one)
            self._inflight: deque[InFlight] = deque()
            self._carried_cost = 0.0  # completion time of deferred records, charged to the next logged step
            self.rank = self._dist.rank if self._dist is not None else 0
            self._meter = OverheadMeter(int(every), overhead_budget, self._dist is not None)
            if max_records is None:  # what fits in the budget, by the measured size of this model's records
                max_records = default_max_records(self._index, activations, histogram_bins, self.histograms)
            self.max_records: int = max_records
            # What leaves the window: its series and the records the verdict needs (diagnosis/history.py).
            self._store = RecordStore(
                sinks if self.rank == 0 or not rank_zero_only_sinks else (),
                max_records,
                min(max_records, SAMPLE_RECORDS),
                lambda: self.header,
            )
            self._alert = (
                None if on_nonfinite is None else NonFiniteAlert(on_nonfinite, self.rank, self._store.flush)
            )
            agree_every = self._dist is not None and overhead_budget is not None
            bands = (self.thresholds.sigmoid_saturation, self.thresholds.tanh_saturation)
            options = opts.MeasureOptions(
                max_abs, weight_norms, activations, locate_nonfinite, self.histogram_bins,
                self.histogram_range, sync_local, agree_every, *bands,
            )  # fmt: skip
            self._hooks = StepHooks(model, self._index, self._dist, optimizer, options)
            undo.add(self._hooks.remove)
            self._measure = Measurer(model, self._index, self._dist, options, self.histograms)
            self._remedy = RemedyLink(model, remedy) if remedy is not None else None
            self._calls = DoubleCallCheck(self._index.probe(), optimizer)  # step() called twice per step
            undo.add(self._calls.remove)
            self._hooks.arm_forward(True)
            if activations and (note := _taxonomy.functional_activation_note(model)):
                log.info("%s", note)

    # ------------------------------------------------------------------ what it exposes
    @property
    def every(self) -> int:
        """The logging interval (steps); ``overhead_budget`` may raise it."""
        return self._meter.every

    @every.setter
    def every(self, value: int) -> None:
        self._meter.every = value

    @property
    def last_norms(self) -> tuple[list[Tensor], Tensor] | None:
        """The parameters with a gradient at the last logged step and their L2 norms ``[N]`` (device)."""
        return self._measure.last_norms

    @property
    def layers(self) -> list[LayerInfo]:
        """Layers in depth order (forward order once the first forward pass has run)."""
        return self._index.infos

    @property
    def header(self) -> RunHeader:
        """The JSONL header: schema version, layers, metadata."""
        meta = {"every": self.every, "model": type(self.model).__name__, **self._meta}
        meta.setdefault("activations", [{"name": s.name, "type": s.kind} for s in self._index.sites])
        meta.setdefault(
            "saturation",
            {"sigmoid": self.thresholds.sigmoid_saturation, "tanh": self.thresholds.tanh_saturation},
        )
        return RunHeader(layers=self.layers, meta=meta)

    @property
    def records(self) -> list[StepRecord]:
        """Records of the logged steps kept so far, oldest first (deferred ones are completed first)."""
        self.flush()
        return list(self._store.window)

    @property
    def amortized_overhead(self) -> float | None:
        """The Monitor's time as a fraction of training time at the current ``every``.

        The median per-logged-step overhead fraction divided by ``every``; None before two logged
        steps.
        """
        self.flush()
        return self._meter.amortized(r.overhead for r in self._store.window)

    def recent(self, n: int) -> list[StepRecord]:
        """The last ``n`` records kept, oldest first (costs O(n), not O(records kept))."""
        self.flush()
        return self._store.recent(n)

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
            The :class:`StepRecord` on logged steps with a blocking copy (``sync``), else None: a
            deferred record reaches :attr:`records` and the sinks when its copy has arrived.

        Raises:
            RuntimeError: if called after :meth:`close`.
            TypeError: if ``loss`` is not a float, a real tensor or None, ``lr`` not a float, a
                one-element tensor or None, or ``step`` not an int or None (the call is not counted).
            ValueError: on a logged step, if ``loss`` is a tensor with more than one element.
        """
        if self._closed:
            raise RuntimeError("gradsentry.Monitor.step() called after close()")
        opts.check_step_args(loss, lr, step)
        t_start = time.perf_counter()
        self._drain(wait=False)
        self._carried_cost += time.perf_counter() - t_start
        self._calls.check()
        current = self.step_count
        self.step_count += 1
        record: StepRecord | None = None
        label = current if step is None else int(step)
        try:
            if self._logs_at(current):
                try:
                    record = self._log_step(label, loss, lr)
                finally:  # an error on a logged step (a bad argument, a raising remedy) must not stop logging
                    if current == self._next_log:
                        self._next_log = current + self.every
                    self._hooks.take_pending()
            elif self._remedy is not None:
                result = self._remedy(self._index.all_params()[0], loss=loss)
                self._remedy.note_unlogged_skip(result, label)
        finally:  # arm (or disarm) the hooks for the coming step even after an error
            coming = self._logs_at(self.step_count)
            if coming:  # the coming optimizer step precedes a logged step
                self._hooks.arm_update()
            else:
                self._hooks.disarm_update()
            self._hooks.arm_forward(coming)
        if record is not None:
            self._deliver(record)
        return record

    def _logs_at(self, call: int) -> bool:
        """Whether the ``call``-th :meth:`step` call (0-based) is a logged step."""
        return call == self._next_log or (self.also_log is not None and bool(self.also_log(call)))

    def _log_step(self, label: int, loss: Tensor | float | None, lr: float | None) -> StepRecord | None:
        t_start = time.perf_counter()
        pending = self._hooks.take_pending()
        ctx = self._dist
        agree = ctx is not None and (ctx.sharded or self.sync_local or self.overhead_budget is not None)
        if self._index.prepare(ctx, agree, label):
            self._hooks.drop_buffers()
        lr = opts.optimizer_lr(self.optimizer) if lr is None else float(lr)
        remedy = self._remedy
        device = self._index.all_params()[0][0].device
        deferred = opts.defers(self.sync, device, self._dist is not None, self.on_nonfinite is not None)
        flight = self._measure.launch(
            label,
            loss,
            lr,
            pending,
            remedy=(lambda params, norms: remedy(params, norms=norms, loss=loss))
            if remedy is not None
            else None,
            remedy_name=remedy.name if remedy is not None else "",
            skips=remedy.take_skips() if remedy is not None else (0, [], None),
            proposed_every=self._meter.proposed_every,
            deferred=deferred,
            event=self._event,
        )
        if not deferred:
            return self._complete(flight, t_start)
        self._inflight.append(flight)
        flight.overhead = self._charge(t_start)
        if len(self._inflight) > opts.MAX_IN_FLIGHT:
            self._deliver(self._complete(self._inflight.popleft()))
        return None

    def _charge(self, t_start: float) -> float | None:
        """The overhead fraction of the logged step that began at ``t_start`` (its hooks included)."""
        cost = time.perf_counter() - t_start + self._hooks.time + self._carried_cost
        self._hooks.time = self._carried_cost = 0.0
        return self._meter.measure(cost, self.step_count)

    def _complete(self, flight: InFlight, t_start: float | None = None) -> StepRecord:
        """The record of ``flight`` (waiting for its copy if needed), kept and written to the sinks.
        ``t_start``: a blocking step's start; None for a deferred one, measured at its launch."""
        t0 = time.perf_counter()
        record, agreed = self._measure.complete(flight)
        if agreed is not None:
            self._meter.agree(agreed)
        if t_start is not None:
            record.overhead = self._charge(t_start)
        else:  # this completion's time is charged to the next logged step
            record.overhead = flight.overhead
            self._carried_cost += time.perf_counter() - t0
        self._store.add(record)
        return record

    def _drain(self, wait: bool) -> None:
        """Complete the deferred records in step order: those whose copy has arrived, or all (``wait``)."""
        while self._inflight and (wait or self._inflight[0].transfer.ready()):
            self._deliver(self._complete(self._inflight.popleft()))

    def flush(self) -> None:
        """Complete every deferred record now (waits for their copies: a host sync when one is left)."""
        self._drain(wait=True)

    def _deliver(self, record: StepRecord) -> None:
        if self._alert is not None:
            self._alert.check(record, self._store.recent(ALERT_WINDOW), self.layers, self.header.meta)

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
        self.flush()
        return self._store.diagnose(self.layers, self.thresholds, **overrides)

    def close(self, *, write_findings: bool = True) -> None:
        """Complete the deferred records, remove every hook this Monitor added and close its sinks
        (idempotent).

        Args:
            write_findings: diagnose the run and write the findings to the sinks before closing.
        """
        if self._closed:
            return
        self._closed = True
        self._index.remove_hooks()
        self._hooks.remove()
        self._calls.remove()
        try:  # deferred records are completed, written and checked before the sinks close
            self.flush()
        finally:
            self._store.close(self.diagnose if write_findings else None)

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        counts = f"layers={len(self._index.layers)}, every={self.every}, steps={self.step_count}"
        return f"Monitor({counts}, records={len(self._store.window)})"
