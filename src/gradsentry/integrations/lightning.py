"""Lightning callback: gradsentry statistics at the one point where gradients are final and raw.

Where it records. Lightning's precision plugins call ``on_before_optimizer_step`` after the closure
(forward and backward of every micro-batch of the optimizer step), after AMP's
``GradScaler.unscale_`` and *before* Lightning's own ``gradient_clip_val`` clipping
(``lightning/pytorch/plugins/precision/precision.py::_after_closure`` and ``amp.py::optimizer_step``).
So the statistics are unscaled and pre-clip, and under ``accumulate_grad_batches=k`` the hook fires
once per optimizer step, on the gradient summed over the k micro-batches. A gradsentry ``remedy``
(e.g. a clipper from :mod:`gradsentry.remedies`) runs in the same hook, right after the statistics
and before Lightning's clipping.

What it logs. On every logged step it sends ``gradsentry/global_norm`` and, per layer,
``gradsentry/<stat>/<layer>`` for each ``stat`` in ``log_stats`` to every logger of the trainer
(``logger.log_metrics(..., step=trainer.global_step)``, rank 0 only), on gradsentry's own cadence
``every`` rather than Lightning's ``log_every_n_steps`` (which would drop values logged on the other
steps). At the end of fit it diagnoses the run, keeps the findings in :attr:`GradSentryCallback.findings`
and logs a summary through the ``gradsentry`` logger: at WARNING when there is a finding, at INFO when
the run is healthy.

Files and charts. Unless ``sinks`` is given, the records go to ``<trainer.log_dir>/gradsentry.jsonl``
(the logger's version folder, e.g. ``lightning_logs/version_0``; appended to on resume, and then the
Monitor first reads its earlier records, so that the findings judge the whole run), which
``gradsentry report`` renders; no file when the trainer has no logger (``logger=False``). Each ``TensorBoardLogger``
of the trainer gets, once per fit, the custom-scalars layout of :class:`~gradsentry.sinks.TensorBoardSink`
(one chart per statistic with a line per layer, TensorBoard's *Custom Scalars* tab).

Stopping. With ``stop_on=("nonfinite", "exploding")`` each logged step is judged as it is recorded: a
NaN/inf gradient or loss (``"nonfinite"``), or an ``exploding`` finding of the diagnosis of the recent
records that includes this step (``"exploding"``). On the first such step the callback logs the finding
at WARNING, sets ``trainer.should_stop = True`` (Lightning ends the fit after this batch; not before
``min_steps``/``min_epochs``) and sets every gradient of the watched optimizer to None, so that the
optimizer step Lightning still takes for this batch leaves the weights and the optimizer state as they
were: the model keeps its last good weights. Lightning still counts that step in ``global_step``; hooks
that run after this one (Lightning's clipping, the LightningModule's ``on_before_optimizer_step``) see
no gradient on that step.

Run metadata. The JSONL header's ``meta`` holds ``trainer: "lightning"``, the optimizer's class name
and learning rate (``optimizer``, ``lr``), and Lightning's clipping: ``max_grad_norm`` is
``gradient_clip_val`` when it clips by norm, else None; value clipping is ``clip_value``.

Loss and update ratio. The record's loss is the sum of the losses Lightning passes to
``on_before_backward`` since the last optimizer step; under automatic optimization with
``accumulate_grad_batches=k`` each is already divided by k, so the sum is the mean micro-batch loss.
Lightning calls the hook from inside ``optimizer.step(closure)``; the Monitor snapshots the weights
in its own ``step`` and measures ``||Δw||`` in the optimizer's step post-hook, so update-to-weight
ratios are measured on the right step.

Limits. Under DDP every rank records (the gradients are already averaged) and only rank 0 writes
sinks and logs. Lightning's FSDP strategy (FSDP1, flat shards) and DeepSpeed are not covered: the
Monitor refuses FSDP1 with a clear error rather than report one rank's shard (FSDP2 ``fully_shard``
models in a plain loop are supported, see README "Distributed training"). ``state_dict`` keeps
counters and the last findings, not the records (those live in sinks).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
except ModuleNotFoundError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ModuleNotFoundError(
        "gradsentry.integrations.lightning needs Lightning: pip install 'gradsentry[lightning]'"
    ) from exc
from torch import Tensor
from torch.optim import Optimizer

from gradsentry.integrations._common import (
    carry_over,
    check_log_stats,
    check_stop_on,
    default_sink_path,
    drop_gradients,
    record_metrics,
    resumed_log,
    stop_finding,
    stop_message,
    summarize,
    summary_level,
)
from gradsentry.monitor import Monitor
from gradsentry.records import Finding
from gradsentry.sinks.base import Sink
from gradsentry.sinks.jsonl import JsonlSink
from gradsentry.sinks.tensorboard import custom_scalars_layout

log = logging.getLogger("gradsentry")


def _clipping_meta(trainer: pl.Trainer) -> dict[str, Any]:
    """Lightning's own clipping for the run header: ``max_grad_norm`` (None unless it clips by norm)
    and, for value clipping, ``clip_value``."""
    val = trainer.gradient_clip_val
    if val is None or val <= 0:
        return {"max_grad_norm": None}
    algorithm = trainer.gradient_clip_algorithm
    if str(getattr(algorithm, "value", algorithm) or "norm").lower() == "value":
        return {"max_grad_norm": None, "clip_value": float(val)}
    return {"max_grad_norm": float(val)}


def _add_chart_layout(trainer: pl.Trainer) -> None:
    """Give each TensorBoardLogger the per-layer chart layout (one chart per statistic)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_custom_scalars(custom_scalars_layout())


class GradSentryCallback(Callback):
    """Watch gradients in a ``lightning.pytorch.Trainer``: record, log, remedy and diagnose.

    Args:
        every: record every ``every``-th optimizer step (the first is always recorded).
        remedy: optional gradsentry remedy ``remedy(params, norms=...)`` applied in place to the
            gradients in ``on_before_optimizer_step``, after the statistics and before Lightning's
            own clipping (set ``gradient_clip_val`` to None when the remedy clips).
        sinks: where records go (e.g. :class:`gradsentry.sinks.JsonlSink`, ``TensorBoardSink``);
            written on global rank 0 only. None (default): a ``JsonlSink`` at
            ``<trainer.log_dir>/gradsentry.jsonl``; ``()`` for none.
        log_stats: per-layer statistics sent to the trainer's loggers (names of
            :class:`~gradsentry.records.LayerStats` fields); empty for the global norm only.
        optimizer_index: which of ``trainer.optimizers`` to watch (one record per step of it).
        stop_on: finding kinds that stop the fit at the logged step where they appear:
            ``"nonfinite"`` (NaN/inf gradient or loss) and/or ``"exploding"`` (runs the diagnosis
            of the last 200 records on every logged step). See the module docstring.
        **monitor_kwargs: passed to :class:`gradsentry.Monitor` (``activations``, ``histogram_bins``,
            ``locate_nonfinite``, ``overhead_budget``, ``max_records``, ``meta``, ``on_nonfinite``).

    Attributes:
        monitor: the :class:`gradsentry.Monitor` of the current fit (None before ``on_fit_start``).
        findings: the findings of the last fit (filled at its end or on an exception).
        stopped_by: the finding that stopped the last fit (``stop_on``), else None.

    Raises:
        ValueError: ``every`` < 1, a ``log_stats`` name that is not a LayerStats field, or a
            ``stop_on`` name other than ``"nonfinite"`` and ``"exploding"``.

    Example:
        >>> trainer = lightning.Trainer(callbacks=[GradSentryCallback(every=10)])  # doctest: +SKIP
    """

    def __init__(
        self,
        every: int = 1,
        remedy: Callable[..., Any] | None = None,
        sinks: Sequence[Sink] | None = None,
        *,
        log_stats: Sequence[str] = ("grad_norm",),
        optimizer_index: int = 0,
        stop_on: Sequence[str] = (),
        **monitor_kwargs: Any,
    ) -> None:
        if int(every) < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = int(every)
        self.remedy = remedy
        self.sinks = None if sinks is None else list(sinks)
        self.log_stats = check_log_stats(log_stats)
        self.optimizer_index = int(optimizer_index)
        self.stop_on = check_stop_on(stop_on)
        self.monitor_kwargs = monitor_kwargs
        self.monitor: Monitor | None = None
        self.findings: list[Finding] = []
        self.stopped_by: Finding | None = None
        self._loss: Tensor | None = None
        self._steps_seen = 0
        self._finished = False
        self._carry: Path | None = None  # a resumed log whose earlier part the Monitor has yet to take in

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build the Monitor on the module (now on its device, optimizers configured)."""
        if self.monitor is not None:
            self.monitor.close()
        kwargs = dict(self.monitor_kwargs)
        meta = {
            "source": "lightning",
            "trainer": "lightning",
            "precision": str(trainer.precision),
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
            **_clipping_meta(trainer),
            **(kwargs.pop("meta", None) or {}),
        }
        opt = self._watched(trainer)
        sinks = self.sinks
        if sinks is None:  # trainer.log_dir broadcasts: every rank reads it, rank 0 writes
            folder = trainer.log_dir if trainer.loggers else None
            path = default_sink_path(folder) if trainer.is_global_zero else None
            sinks = [] if path is None else [JsonlSink(path)]
        if trainer.is_global_zero:
            _add_chart_layout(trainer)
        self.monitor = Monitor(
            pl_module,
            every=self.every,
            optimizer=opt,
            sinks=sinks if trainer.is_global_zero else (),  # one writer per file under DDP
            remedy=self.remedy,
            meta=meta,
            **{"sync": "blocking", **kwargs},  # the trainer's loggers and stop_on read the record now
        )
        # a log appended to on resume: the Monitor starts from its earlier part (at its first record)
        self._carry = resumed_log(sinks) if trainer.is_global_zero else None
        self.findings = []
        self.stopped_by = None
        self._loss = None
        self._finished = False

    def _watched(self, trainer: pl.Trainer) -> Optimizer | None:
        opts = trainer.optimizers
        return opts[self.optimizer_index] if len(opts) > self.optimizer_index else None

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        """Add up the micro-batch losses of the optimizer step (no host sync)."""
        d = loss.detach()
        self._loss = d if self._loss is None else self._loss + d

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        """Record statistics (unscaled, pre-clip) and apply the remedy, once per optimizer step."""
        mon = self.monitor
        if mon is None or optimizer is not self._watched(trainer):
            return
        loss, self._loss = self._loss, None
        self._steps_seen += 1
        if self._carry is not None:
            carry_over(mon, self._carry, trainer.global_step)
            self._carry = None
        record = mon.step(loss=loss, step=trainer.global_step)
        if record is None:
            return
        if trainer.is_global_zero and trainer.loggers:
            metrics = record_metrics(record, self.log_stats)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        if self.stop_on and self.stopped_by is None:
            finding = stop_finding(mon, record, self.stop_on)
            if finding is not None:
                self.stopped_by = finding
                if trainer.is_global_zero:
                    log.warning("%s", stop_message(record, finding))
                drop_gradients(optimizer)  # the update Lightning still takes for this batch is a no-op
                trainer.should_stop = True

    def _finish(self, trainer: pl.Trainer) -> None:
        mon = self.monitor
        if mon is None or self._finished:
            return
        self._finished = True
        try:
            self.findings = mon.diagnose() if mon.records else []
        except Exception as exc:  # diagnosis must never take the run down
            log.error("gradsentry: diagnosis failed (%s); records are kept in callback.monitor", exc)
            self.findings = []
        mon.close()
        if trainer.is_global_zero:
            log.log(summary_level(self.findings), summarize(self.findings, len(mon.records)))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Diagnose the run, log the summary, close the Monitor and its sinks."""
        self._finish(trainer)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Diagnose what was recorded before the exception and close (hooks removed, sinks closed)."""
        self._finish(trainer)

    def state_dict(self) -> dict[str, Any]:
        """Settings and counters saved in checkpoints (records live in the sinks, not here)."""
        return {
            "every": self.every,
            "steps_seen": self._steps_seen,
            "findings": [f.to_dict() for f in self.findings],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the counters and last findings saved by :meth:`state_dict`."""
        self._steps_seen = int(state_dict.get("steps_seen", 0))
        self.findings = [Finding.from_dict(f) for f in state_dict.get("findings", [])]
