"""Hugging Face ``Trainer`` callback: pre-clip gradient statistics, log-history figures, findings.

Where it records, and why there. In ``transformers.Trainer`` (5.x, ``_inner_training_loop``) the
optimizer step runs ``_clip_grad_norm`` (``max_grad_norm > 0``) or ``_get_grad_norm`` (clipping with
``inf``) and only *then* calls ``on_pre_optimizer_step``; no callback fires between the last
backward of an optimizer step and the clipping. A callback that reads gradients in
``on_pre_optimizer_step`` therefore sees clipped gradients. This callback records earlier, at the
end of the backward pass of the optimizer step's last micro-batch:

- on ``on_train_begin`` it registers a ``register_post_accumulate_grad_hook`` on every trainable
  parameter; the first of these to fire in a backward pass queues a callback on the autograd engine
  (``Variable._execution_engine.queue_callback``, the mechanism DDP uses to finish its gradient
  reduction), which re-queues itself once so that it runs after every final callback queued during
  the pass (e.g. DDP's), i.e. when all gradients of that backward are final;
- that callback records only when accelerate's ``GradientState.sync_gradients`` is True, which the
  Trainer sets for the last micro-batch of each optimizer step: under gradient accumulation, one
  record per optimizer step, on the gradient summed over the micro-batches, before any clipping.

So the recorded global norm equals the ``grad_norm`` the Trainer logs (its pre-clip norm), and a
gradsentry ``remedy`` runs before the Trainer's clipping (set ``max_grad_norm=0`` when the remedy
clips, or both clip; a warning says so). Exception: with fp16 mixed precision and a ``GradScaler``,
gradients at the end of backward are still multiplied by the loss scale and only accelerate may
unscale them (a second ``unscale_`` raises), so in that case (``capture="auto"``) the callback
records in ``on_pre_optimizer_step`` on unscaled gradients; they are pre-clip only with
``max_grad_norm=0`` (a warning says so). bf16 and fp32 use the backward capture.

NaN/inf. The Trainer's ``logging_nan_inf_filter`` (default True) replaces a non-finite loss in the
*logged* running loss by the recent average. gradsentry keeps the raw figures: each record holds the
model's own loss for the step (the model output's ``loss``, read by a forward hook, over the micro-
batches as the Trainer logs it, see :class:`~gradsentry.integrations._hf.StepLoss`; None when the loss
is computed outside the model) and the raw global norm, so a
NaN/inf step shows in the records, the sinks and the findings.

What it logs, and where. On each Trainer train log line (``on_log`` of a line holding ``loss``):

- the console (the Trainer's progress bar or printer) and the line in ``state.log_history`` (saved in
  ``trainer_state.json``) get ``gradsentry/global_norm`` (the record of that very step),
  ``gradsentry/nonfinite_steps`` (records with a non-finite global norm since the previous line) and
  ``gradsentry/worst_layer`` (text: the layer with NaN/inf gradients, else the one whose gradient RMS
  is furthest from the median, see :func:`~gradsentry.integrations._common.worst_layer`); per-layer keys
  ``gradsentry/<stat>/<layer>`` only with ``console_layers=True``;
- the ``report_to`` integrations (TensorBoard, W&B, MLflow, ...) get, in the same log call, the
  numeric figures: the global ones and ``gradsentry/<stat>/<layer>`` for ``stat`` in ``log_stats``.

How the figures reach ``report_to``. ``Trainer.log`` calls the callbacks' ``on_log`` in list order
with one ``logs`` dict, and the ``report_to`` callbacks come before the user's callbacks, so keys added
by a user callback arrive after they have written the line. At ``on_train_begin`` this callback
therefore places a small companion callback at the front of the Trainer's callback list (it finds the
``CallbackHandler`` that is calling it, up its call stack, and swaps in a new list so that the
iteration in progress is not disturbed); the companion adds the figures to ``logs`` before any other
callback reads it. This callback, at its own place (after ``report_to``, before the console printer,
which the Trainer adds last), then removes the per-layer keys from ``logs`` unless ``console_layers``
and adds the worst layer. Integrations added after this callback do not get the per-layer keys. If
the handler cannot be found (a Trainer that does not call callbacks through a ``CallbackHandler``),
a WARNING says so and the figures are added at this callback's own place.

Which steps are recorded. Every ``every``-th optimizer step from the first, and every step the
Trainer logs (``logging_strategy="steps"``: the multiples of ``logging_steps``, and step 1 with
``logging_first_step``), whatever ``every`` says: so ``gradsentry/global_norm`` on a line is the norm
of that line's step and equals its ``grad_norm``. Audit: where they differ by more than ``norm_rtol``
(relative), a WARNING names both (once per run) and ``callback.norm_mismatches`` lists
``(step, trainer_norm, gradsentry_norm)``: frameworks have shipped global norms counted over the wrong
shards (off by sqrt(k)). With ``logging_strategy="epoch"`` the logged steps are not known in advance:
``gradsentry/global_norm`` is added only to lines whose step was recorded.

Files. Unless ``sinks`` is given, the records go to ``<output_dir>/gradsentry.jsonl`` (appended to
when the run resumes from a checkpoint, replaced otherwise). On resume the Monitor first reads the
earlier records of that file (or of a ``JsonlSink`` given), so the findings judge the whole run.

Record steps are labelled as the Trainer labels the step in its own log (``state.global_step`` after
the optimizer step, 1-based), so record ``s`` and the log entry with ``"step": s`` are the same
optimizer step, and a finding's steps read the same live and in ``gradsentry analyze`` of the
``trainer_state.json``.

Stopping. With ``stop_on=("nonfinite", "exploding")`` each recorded step is judged as it is recorded:
a NaN/inf gradient or loss (``"nonfinite"``), or an ``exploding`` finding of the diagnosis of the
recent records that includes this step (``"exploding"``). On the first such step the callback logs the
finding at WARNING and sets ``control.should_training_stop = True`` (the Trainer ends after this
step); in ``on_pre_optimizer_step`` (after the Trainer computed and logged its ``grad_norm`` and
clipped) it sets every gradient to None, so that the optimizer step the Trainer still takes leaves
the weights and the optimizer state as they were: the model keeps its last good weights.
``state.global_step`` still counts that step. The end-of-train summary is logged at WARNING when
there is a finding, at INFO when the run is healthy. ``on_nonfinite="raise"`` given to the
callback is raised from ``on_pre_optimizer_step``, before the optimizer step (the Trainer has no
exception callback: call :meth:`close`); prefer ``stop_on``, which ends the run cleanly.

Run metadata. The JSONL header's ``meta`` holds ``trainer: "hf"``, the optimizer's class name and
learning rate (``optimizer``, ``lr``) and ``max_grad_norm`` (``args.max_grad_norm``, None when the
Trainer does not clip).

Limits. Tested with single-process CPU training, with and without gradient accumulation. Under
DDP the capture runs after DDP's own end-of-backward reduction (see above) and only the main
process writes sinks. DeepSpeed and FSDP keep sharded or flattened gradients that the per-parameter
hooks do not see as the Trainer does: not covered. If training raises, call :meth:`close` (the
Trainer has no exception callback).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

try:
    from transformers import TrainerCallback
except ModuleNotFoundError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ModuleNotFoundError(
        "gradsentry.integrations.transformers needs transformers and accelerate: pip install 'gradsentry[hf]'"
    ) from exc

from gradsentry.integrations._common import (
    NORM_RTOL,
    PREFIX,
    carry_over,
    check_log_stats,
    check_stop_on,
    default_sink_path,
    drop_gradients,
    norm_mismatch,
    record_metrics,
    resumed_log,
    stop_finding,
    stop_message,
    summarize,
    summary_level,
    worst_layer,
)
from gradsentry.integrations._hf import (
    StepLoss,
    calling_handler,
    logs_at,
    sync_gradients,
    unwrap_optimizer,
)
from gradsentry.monitor import Monitor, NonFiniteGradientError
from gradsentry.records import Finding, StepRecord
from gradsentry.sinks.base import Sink
from gradsentry.sinks.jsonl import JsonlSink

log = logging.getLogger("gradsentry")

Capture = Literal["auto", "backward", "pre_optimizer_step"]


class _FrontOfLog(TrainerCallback):  # type: ignore[misc]
    """Placed first in the Trainer's callbacks: adds gradsentry's figures to ``logs`` before ``report_to``."""

    def __init__(self, owner: GradSentryCallback) -> None:
        self.owner = owner

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        self.owner._add_figures(state, logs)


class GradSentryCallback(TrainerCallback):  # type: ignore[misc]
    """Watch gradients in a ``transformers.Trainer``: pre-clip records, log history, remedy, findings.

    Args:
        every: record every ``every``-th optimizer step (the first is always recorded).
        remedy: optional gradsentry remedy ``remedy(params, norms=...)`` applied in place right
            after the statistics, before the Trainer's own clipping and optimizer step.
        sinks: where records go (e.g. :class:`gradsentry.sinks.JsonlSink`, ``TensorBoardSink``);
            written on the main process only. None (default): a ``JsonlSink`` at
            ``<output_dir>/gradsentry.jsonl``; ``()`` for none.
        capture: ``"backward"`` (end of the last micro-batch's backward: pre-clip),
            ``"pre_optimizer_step"`` (after the Trainer's clipping), or ``"auto"`` (backward, except
            under an fp16 GradScaler). See the module docstring.
        log_stats: per-layer statistics sent to the ``report_to`` integrations (LayerStats field
            names); empty for the global figures only.
        console_layers: also show the per-layer keys on the console and keep them in
            ``state.log_history`` (``trainer_state.json``); off by default (~77 keys per line for
            GPT-2 small).
        norm_rtol: relative difference between the Trainer's ``grad_norm`` and gradsentry's global
            norm of the same step beyond which the mismatch is reported.
        stop_on: finding kinds that stop training at the recorded step where they appear:
            ``"nonfinite"`` (NaN/inf gradient or loss) and/or ``"exploding"`` (runs the diagnosis
            of the last 200 records on every recorded step). See the module docstring.
        **monitor_kwargs: passed to :class:`gradsentry.Monitor` (``activations``,
            ``histogram_bins``, ``locate_nonfinite``, ``overhead_budget``, ``max_records``, ``meta``,
            ``on_nonfinite``).

    Attributes:
        monitor: the :class:`gradsentry.Monitor` of the current run (None before training).
        findings: the findings of the last run (filled at ``on_train_end``).
        stopped_by: the finding that stopped the last run (``stop_on``), else None.
        norm_mismatches: ``(step, trainer grad_norm, gradsentry global norm)`` of the logged steps
            where the two differ by more than ``norm_rtol``.

    Raises:
        ValueError: ``every`` < 1, an unknown ``capture``, an unknown ``log_stats`` name, or a
            ``stop_on`` name other than ``"nonfinite"`` and ``"exploding"``.

    Example:
        >>> trainer = Trainer(model, args, train_dataset=ds, callbacks=[GradSentryCallback()])  # doctest: +SKIP
    """

    def __init__(
        self,
        every: int = 1,
        remedy: Callable[..., Any] | None = None,
        sinks: Sequence[Sink] | None = None,
        *,
        capture: Capture = "auto",
        log_stats: Sequence[str] = ("grad_norm",),
        console_layers: bool = False,
        stop_on: Sequence[str] = (),
        norm_rtol: float = NORM_RTOL,
        **monitor_kwargs: Any,
    ) -> None:
        if int(every) < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if capture not in ("auto", "backward", "pre_optimizer_step"):
            raise ValueError(f"capture must be 'auto', 'backward' or 'pre_optimizer_step', got {capture!r}")
        self.every = int(every)
        self.remedy = remedy
        self.sinks = None if sinks is None else list(sinks)
        self.capture: Capture = capture
        self.log_stats = check_log_stats(log_stats)
        self.console_layers = bool(console_layers)
        self.norm_rtol = float(norm_rtol)
        self.norm_mismatches: list[tuple[int, float, float]] = []
        self._front: _FrontOfLog | None = None
        self._handler: Any = None
        self._added: dict[str, float] = {}  # the figures put in the current log line's ``logs``
        self._worst: str | None = None
        self.stop_on = check_stop_on(stop_on)
        self.monitor_kwargs = monitor_kwargs
        self.monitor: Monitor | None = None
        self.findings: list[Finding] = []
        self.stopped_by: Finding | None = None
        self._stop_pending = False  # a stop decided at capture: drop this step's update, tell the Trainer
        self._error: NonFiniteGradientError | None = None  # on_nonfinite="raise", raised before the step
        self.mode: Literal["backward", "pre_optimizer_step"] | None = None
        self._handles: list[RemovableHandle] = []
        self._optimizer: Any = None
        self._state: Any = None
        self._queued = False
        self._loss = StepLoss()
        self._last: StepRecord | None = None  # latest record not yet in a log entry
        self._nonfinite_since_log = 0
        self._failed = False
        self._carry: Path | None = None  # a resumed log whose earlier part the Monitor has yet to take in

    # ------------------------------------------------------------------ set-up
    def on_train_begin(
        self,
        args: Any,
        state: Any,
        control: Any,
        model: nn.Module | None = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        """Build the Monitor, hook the parameters (pre-clip capture) and the model output (loss)."""
        if model is None:
            raise ValueError("gradsentry GradSentryCallback needs the model in on_train_begin (got None)")
        self.close()
        scaler = getattr(optimizer, "scaler", None)
        mode = self.capture
        if mode == "auto":
            mode = "pre_optimizer_step" if scaler is not None else "backward"
        self.mode = mode
        if mode == "pre_optimizer_step" and args.max_grad_norm and args.max_grad_norm > 0:
            log.warning(
                "gradsentry: recording in on_pre_optimizer_step, after the Trainer clipped the gradients to "
                "max_grad_norm=%s; the per-layer figures are post-clip. Set max_grad_norm=0 (and clip with a "
                "gradsentry remedy) to record raw gradients.",
                args.max_grad_norm,
            )
        if self.remedy is not None and args.max_grad_norm and args.max_grad_norm > 0:
            log.warning(
                "gradsentry: a remedy is set and the Trainer also clips with max_grad_norm=%s; both act. "
                "Set max_grad_norm=0 to let the gradsentry remedy be the only clipping.",
                args.max_grad_norm,
            )
        kwargs_m = dict(self.monitor_kwargs)
        meta = {
            "source": "transformers",
            "trainer": "hf",
            "capture": mode,
            "max_grad_norm": float(args.max_grad_norm)
            if args.max_grad_norm and args.max_grad_norm > 0
            else None,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            **(kwargs_m.pop("meta", None) or {}),
        }
        self._optimizer = optimizer
        self._state = state
        main = getattr(state, "is_world_process_zero", True)
        sinks = self.sinks
        if sinks is None:
            path = default_sink_path(args.output_dir) if main else None
            sinks = [] if path is None else [JsonlSink(path, resume=int(state.global_step) > 0)]
        self.monitor = Monitor(
            model,
            every=self.every,
            optimizer=unwrap_optimizer(optimizer),
            sinks=sinks if main else (),  # rank 0 writes
            remedy=self.remedy,
            meta=meta,
            also_log=logs_at(args, state),
            **{"sync": "blocking", **kwargs_m},  # the trainer's loggers and stop_on read the record now
        )
        self._carry = resumed_log(sinks) if main and int(state.global_step) > 0 else None
        self.norm_mismatches = []
        self._go_first()
        self.findings = []
        self.stopped_by = None
        self._stop_pending = False
        self._error = None
        self._failed = False
        self._loss = StepLoss()
        self._handles.append(model.register_forward_hook(self._loss.hook, with_kwargs=True))
        if mode == "backward":
            for p in model.parameters():
                if p.requires_grad:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))

    # ------------------------------------------------------------------ hooks
    def _on_grad(self, param: Tensor) -> None:
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._requeue)

    def _requeue(self) -> None:
        # Run after every final callback queued during this backward (e.g. DDP's reduction).
        torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)

    def _end_of_backward(self) -> None:
        self._queued = False
        if sync_gradients(self._optimizer):
            self._record()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Start of an optimizer step: clear a capture left armed by a backward pass that raised."""
        self._queued = False

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """In ``pre_optimizer_step`` mode (fp16 GradScaler), record here on unscaled gradients; then,
        when ``stop_on`` fired on this step, drop its gradients (the update is not applied) and tell
        the Trainer to stop."""
        if self.mode == "pre_optimizer_step":
            self._record()
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        if self._stop_pending:
            self._stop_pending = False
            drop_gradients(unwrap_optimizer(self._optimizer))
            control.should_training_stop = True

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Keep the Trainer stopping once ``stop_on`` fired (also where ``on_pre_optimizer_step`` is absent)."""
        if self.stopped_by is not None:
            control.should_training_stop = True

    def _record(self) -> None:
        mon = self.monitor
        if mon is None or self._failed:
            return
        loss = self._loss.take()
        # the step the Trainer is about to take, as it will log it (global_step counts it after the update)
        step = int(self._state.global_step) + 1 if self._state is not None else None
        if self._carry is not None and step is not None:
            carry_over(mon, self._carry, step)
        self._carry = None
        try:
            record = mon.step(loss=loss, step=step)
        except NonFiniteGradientError as exc:  # on_nonfinite="raise": raised before the optimizer step
            self._error = exc
            record = exc.record
        except Exception as exc:  # gradsentry must never stop training
            self._failed = True
            log.error("gradsentry: recording failed at step %s (%s); the callback is disabled", step, exc)
            return
        if record is None:
            return
        self._last = record
        self._nonfinite_since_log += not record.finite
        if self.stop_on and self.stopped_by is None:
            finding = stop_finding(mon, record, self.stop_on)
            if finding is not None:
                self.stopped_by = finding
                self._stop_pending = True
                if getattr(self._state, "is_world_process_zero", True):
                    log.warning("%s", stop_message(record, finding))

    # ------------------------------------------------------------------ logging and the end
    def _go_first(self) -> None:
        """Put the companion that fills ``logs`` at the front of the calling Trainer's callbacks."""
        handler = calling_handler(self)
        if handler is None:
            log.warning(
                "gradsentry: could not find the Trainer's callback list; report_to integrations listed "
                "before GradSentryCallback will not get gradsentry's figures"
            )
            return
        self._front = _FrontOfLog(self)
        self._handler = handler
        # a new list: the loop over the old one (this on_train_begin event) goes on undisturbed
        handler.callbacks = [self._front, *handler.callbacks]

    def _add_figures(self, state: Any, logs: dict[str, Any] | None) -> None:
        """Add the figures of the latest record to a train log line's ``logs`` (see the module docstring)."""
        self._added = {}
        if logs is None or "loss" not in logs or (self._last is None and not self._nonfinite_since_log):
            return
        figures: dict[str, float] = {}
        record = self._last
        if record is not None and record.step == state.global_step:
            figures.update(record_metrics(record, self.log_stats))
            trainer_norm = logs.get("grad_norm")
            if isinstance(trainer_norm, (int, float)):
                self._audit(record.step, float(trainer_norm), record.global_norm)
        figures[f"{PREFIX}/nonfinite_steps"] = float(self._nonfinite_since_log)
        self._nonfinite_since_log = 0
        self._added = figures
        self._worst = worst_layer(record) if record is not None and record.step == state.global_step else None
        self._last = None
        logs.update(figures)

    def _audit(self, step: int, trainer_norm: float, ours: float) -> None:
        text = norm_mismatch(step, trainer_norm, ours, self.norm_rtol)
        if text is None:
            return
        if not self.norm_mismatches and getattr(self._state, "is_world_process_zero", True):
            log.warning("%s", text)
        self.norm_mismatches.append((step, trainer_norm, ours))

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """Keep the console's and ``trainer_state.json``'s keys few: global figures and the worst layer
        (the per-layer keys, already seen by ``report_to``, are removed unless ``console_layers``)."""
        if self._front is None:  # no companion in front: add the figures here
            self._add_figures(state, logs)
        if logs is None or not self._added:
            return
        console: dict[str, Any] = {
            k: v
            for k, v in self._added.items()
            if self.console_layers or k in (f"{PREFIX}/global_norm", f"{PREFIX}/nonfinite_steps")
        }
        if self._worst is not None:
            console[f"{PREFIX}/worst_layer"] = self._worst
        for key in self._added.keys() - console.keys():
            logs.pop(key, None)
        logs.update(console)
        self._added = {}
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(console)
        else:
            state.log_history.append({**console, "step": state.global_step})

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Diagnose the run, log the summary, remove every hook and close the sinks."""
        mon = self.monitor
        if mon is None:
            return
        try:
            self.findings = mon.diagnose() if mon.records else []
        except Exception as exc:  # diagnosis must never take the run down
            log.error("gradsentry: diagnosis failed (%s); records are kept in callback.monitor", exc)
            self.findings = []
        if state.is_world_process_zero:
            log.log(summary_level(self.findings), summarize(self.findings, len(mon.records)))
        self.close()

    def close(self) -> None:
        """Remove the hooks and the companion callback, close the Monitor (idempotent; call it if
        training raised)."""
        if self._handler is not None and self._front is not None:
            self._handler.callbacks = [c for c in self._handler.callbacks if c is not self._front]
        self._handler, self._front = None, None
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._queued = False
        if self.monitor is not None:
            self.monitor.close()
