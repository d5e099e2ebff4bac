"""Weights & Biases sink: each record as one ``run.log`` call at the record's step.

Keys are the TensorBoard sink's tags (:func:`gradsentry.sinks.tensorboard.record_scalars`):
``P/global_norm``, ``P/loss``, ``P/lr``, ``P/<stat>/<layer>`` for the per-layer statistics and
``P/<stat>/<activation>`` for the activation statistics (``P`` is the ``prefix``, ``(root)`` names
the root module). With ``Monitor(histograms=...)``, ``P/grad_hist/<layer>`` and
``P/weight_hist/<layer>`` hold ``wandb.Histogram``s of log10|x| (see :mod:`gradsentry.histograms`).

**W&B's step rule.** A run's step only goes up: ``run.log(..., step=s)`` with ``s`` lower than the
run's current step is dropped by W&B with a warning, and logs at the same step are merged into one
row. This sink logs with ``step=record.step``, so (1) if your own code also calls ``run.log`` on the
same run, pass it the same optimizer step (``step=global_step``) rather than letting W&B count calls,
or log yours with ``commit=False`` before :meth:`gradsentry.Monitor.step`; (2) a resumed W&B run
(``wandb.init(id=..., resume="allow")``) continues from its last step, so label the Monitor's
records with the trainer's global step (``mon.step(loss, step=global_step)``): records of steps the
run already passed are dropped by W&B, not by gradsentry.
"""

from __future__ import annotations

import logging
from typing import Any

from gradsentry._extras import import_extra
from gradsentry.records import Finding, RunHeader, StepRecord
from gradsentry.report.text import finding_cells
from gradsentry.sinks.tensorboard import record_histograms, record_scalars

log = logging.getLogger("gradsentry")

FINDING_COLUMNS: tuple[str, ...] = ("severity", "kind", "first_step", "steps", "layers", "explanation")
"""Columns of the findings table (``P/findings`` in the run's summary)."""


class WandbSink:
    """Log step records to a Weights & Biases run.

    Args:
        run: the ``wandb`` run to log to. None (default): the active run (``wandb.run``) when there
            is one, else a run started at :meth:`open` with ``wandb.init(project=project,
            **init_kwargs)``. Only a run this sink started is finished by :meth:`close`.
        project: project of a run this sink starts (default ``"gradsentry"``).
        prefix: first component of every key (default ``"gradsentry"``; non-empty, no ``/``).
        **init_kwargs: passed to ``wandb.init`` when this sink starts the run (``name``, ``dir``,
            ``mode="offline"``, ``id`` + ``resume="allow"`` to resume, ...).

    What is written: one ``run.log(values, step=record.step)`` per record (keys above; NaN and inf
    as they are); at :meth:`open`, the run header into ``run.config["gradsentry"]`` (the Monitor's
    metadata and the layers in depth order); at :meth:`write_findings`, a ``wandb.Table`` of the
    findings (columns :data:`FINDING_COLUMNS`) in ``run.summary["P/findings"]`` and their number in
    ``run.summary["P/findings_count"]``. See the module docstring for W&B's step rule and resumed
    runs.

    Raises:
        MissingExtraError: (an ``ImportError``) when ``wandb`` is not installed; names ``pip install 'gradsentry[wandb]'``.
        ValueError: ``prefix`` is empty or holds ``/``.

    Example:
        >>> sink = WandbSink(project="my-project")  # doctest: +SKIP
        >>> mon = gradsentry.Monitor(model, every=10, sinks=[sink])  # doctest: +SKIP
    """

    def __init__(
        self, run: Any = None, project: str = "gradsentry", *, prefix: str = "gradsentry", **init_kwargs: Any
    ) -> None:
        if not prefix or "/" in prefix:
            raise ValueError(f"prefix must be a non-empty key component without '/', got {prefix!r}")
        self._wandb = import_extra("wandb", "wandb", "WandbSink")
        self.run = run
        self.project = project
        self.prefix = prefix
        self.init_kwargs = init_kwargs
        self._started = False

    def open(self, header: RunHeader) -> None:
        if self.run is None:
            self.run = self._wandb.run
        if self.run is None:
            self.run = self._wandb.init(project=self.project, **self.init_kwargs)
            self._started = True
        config = {
            "schema": header.schema_version,
            "meta": header.meta,
            "layers": [x.to_dict() for x in header.layers],
        }
        self.run.config.update({self.prefix: config}, allow_val_change=True)

    def _run(self) -> Any:
        if self.run is None:
            raise RuntimeError("WandbSink is not open")
        return self.run

    def write(self, record: StepRecord) -> None:
        values: dict[str, Any] = dict(record_scalars(record, self.prefix))
        for tag, counts, edges in record_histograms(record, self.prefix):
            values[tag] = self._wandb.Histogram(np_histogram=(counts, edges))
        self._run().log(values, step=int(record.step))

    def write_findings(self, findings: list[Finding]) -> None:
        rows = []
        for f in findings:
            severity, kind, _, layers, explanation = finding_cells(f, max_layers=10)
            first = f.steps[0] if f.steps else None
            rows.append([severity, kind, first, ", ".join(str(s) for s in f.steps[:20]), layers, explanation])
        run = self._run()
        run.summary[f"{self.prefix}/findings"] = self._wandb.Table(columns=list(FINDING_COLUMNS), data=rows)
        run.summary[f"{self.prefix}/findings_count"] = len(findings)

    def close(self) -> None:
        """Finish the run if this sink started it; a run given to it (or active before) stays open."""
        if self._started and self.run is not None:
            self.run.finish()
        self._started = False
