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
model's own loss for the step (read from the model output's ``loss`` by a forward hook, mean over
the micro-batches; None when the loss is computed outside the model) and the raw global norm, so a
NaN/inf step shows in the records, the sinks and the findings.

What it logs. On each Trainer log (``on_log``), the train log entry just appended to
``state.log_history`` (and saved in ``trainer_state.json``) gets ``gradsentry/global_norm`` (latest
record), ``gradsentry/nonfinite_steps`` (records with a non-finite global norm since the previous
log) and per layer ``gradsentry/<stat>/<layer>`` for ``stat`` in ``log_stats``. ``report_to``
integrations that run before this callback do not see these keys; give gradsentry a
:class:`~gradsentry.sinks.TensorBoardSink` for TensorBoard.

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
from collections.abc import Callable, Mapping, Sequence
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
    check_log_stats,
    check_stop_on,
    drop_gradients,
    record_metrics,
    stop_finding,
    stop_message,
    summarize,
    summary_level,
)
from gradsentry.monitor import Monitor, NonFiniteGradientError
from gradsentry.records import Finding, StepRecord
from gradsentry.sinks.base import Sink

log = logging.getLogger("gradsentry")

Capture = Literal["auto", "backward", "pre_optimizer_step"]


def _unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (which holds it as ``.optimizer``)."""
    inner = optimizer
    while isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer):
        inner = inner.optimizer
    return inner


def _sync_gradients(optimizer: Any) -> bool:
    """accelerate's flag: True on the last micro-batch of an optimizer step."""
    state = getattr(optimizer, "gradient_state", None)
    if state is None:
        from accelerate.state import GradientState

        state = GradientState()
    return bool(state.sync_gradients)


def _output_loss(output: Any) -> Tensor | None:
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if loss is None and isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        loss = output[0] if output[0].ndim == 0 else None
    return loss if isinstance(loss, Tensor) and loss.numel() == 1 else None


class GradSentryCallback(TrainerCallback):  # type: ignore[misc]
    """Watch gradients in a ``transformers.Trainer``: pre-clip records, log history, remedy, findings.

    Args:
        every: record every ``every``-th optimizer step (the first is always recorded).
        remedy: optional gradsentry remedy ``remedy(params, norms=...)`` applied in place right
            after the statistics, before the Trainer's own clipping and optimizer step.
        sinks: where records go (e.g. :class:`gradsentry.sinks.JsonlSink`, ``TensorBoardSink``); written on the main process only.
        capture: ``"backward"`` (end of the last micro-batch's backward: pre-clip),
            ``"pre_optimizer_step"`` (after the Trainer's clipping), or ``"auto"`` (backward, except
            under an fp16 GradScaler). See the module docstring.
        log_stats: per-layer statistics added to the log history (LayerStats field names); empty
            for the global figures only.
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
        sinks: Sequence[Sink] = (),
        *,
        capture: Capture = "auto",
        log_stats: Sequence[str] = ("grad_norm",),
        stop_on: Sequence[str] = (),
        **monitor_kwargs: Any,
    ) -> None:
        if int(every) < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if capture not in ("auto", "backward", "pre_optimizer_step"):
            raise ValueError(f"capture must be 'auto', 'backward' or 'pre_optimizer_step', got {capture!r}")
        self.every = int(every)
        self.remedy = remedy
        self.sinks = list(sinks)
        self.capture: Capture = capture
        self.log_stats = check_log_stats(log_stats)
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
        self._loss_sum: Tensor | None = None
        self._loss_count = 0
        self._last: StepRecord | None = None  # latest record not yet in a log entry
        self._nonfinite_since_log = 0
        self._failed = False

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
        self.monitor = Monitor(
            model,
            every=self.every,
            optimizer=_unwrap_optimizer(optimizer),
            sinks=self.sinks if getattr(state, "is_world_process_zero", True) else (),  # rank 0 writes
            remedy=self.remedy,
            meta=meta,
            **{"sync": "blocking", **kwargs_m},  # the trainer's loggers and stop_on read the record now
        )
        self.findings = []
        self.stopped_by = None
        self._stop_pending = False
        self._error = None
        self._failed = False
        self._handles.append(model.register_forward_hook(self._capture_loss))
        if mode == "backward":
            for p in model.parameters():
                if p.requires_grad:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))

    # ------------------------------------------------------------------ hooks
    def _capture_loss(self, module: nn.Module, args: Any, output: Any) -> None:
        if not module.training or not torch.is_grad_enabled():
            return
        loss = _output_loss(output)
        if loss is not None:
            d = loss.detach().float().reshape(())
            self._loss_sum = d if self._loss_sum is None else self._loss_sum + d
            self._loss_count += 1

    def _on_grad(self, param: Tensor) -> None:
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._requeue)

    def _requeue(self) -> None:
        # Run after every final callback queued during this backward (e.g. DDP's reduction).
        torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)

    def _end_of_backward(self) -> None:
        self._queued = False
        if _sync_gradients(self._optimizer):
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
            drop_gradients(_unwrap_optimizer(self._optimizer))
            control.should_training_stop = True

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Keep the Trainer stopping once ``stop_on`` fired (also where ``on_pre_optimizer_step`` is absent)."""
        if self.stopped_by is not None:
            control.should_training_stop = True

    def _record(self) -> None:
        mon = self.monitor
        if mon is None or self._failed:
            return
        loss = None
        if self._loss_sum is not None and self._loss_count:
            loss = self._loss_sum / self._loss_count
        self._loss_sum, self._loss_count = None, 0
        # the step the Trainer is about to take, as it will log it (global_step counts it after the update)
        step = int(self._state.global_step) + 1 if self._state is not None else None
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
    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """Add gradsentry figures to the log entry the Trainer just appended to ``state.log_history``."""
        if self._last is None:
            return
        metrics: dict[str, float] = dict(record_metrics(self._last, self.log_stats))
        metrics["gradsentry/nonfinite_steps"] = float(self._nonfinite_since_log)
        self._last, self._nonfinite_since_log = None, 0
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)
        else:
            state.log_history.append({**metrics, "step": state.global_step})
        if logs is not None:
            logs.update(metrics)

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
        """Remove the hooks and close the Monitor (idempotent; call it if training raised)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._queued = False
        if self.monitor is not None:
            self.monitor.close()
