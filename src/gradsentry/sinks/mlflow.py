"""MLflow sink: each record as one ``log_batch`` of metrics at the record's step.

Metric keys are the TensorBoard sink's tags (:func:`gradsentry.sinks.tensorboard.record_scalars`)
made valid for MLflow by :func:`metric_key`: MLflow accepts only letters, digits, ``_ - . /``,
spaces (and ``:`` outside Windows) and refuses a key that is not a normalized path (an empty, ``.``
or ``..`` component) or is longer than 250 characters. Every other character becomes ``_`` (the root
module's ``(root)`` reads ``_root_``), a bad component becomes ``_``, and a key over 250 characters
keeps its first 241 and a hash of the whole. Two layer names differing only in such characters
would share a key (MLflow would then hold both series under it); module paths never do.
Histograms (``Monitor(histograms=...)``) are not written: MLflow has no histogram type (they stay
in the JSONL log).
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from typing import Any

from gradsentry._extras import import_extra
from gradsentry.records import Finding, RunHeader, StepRecord, dumps
from gradsentry.sinks.tensorboard import record_scalars

log = logging.getLogger("gradsentry")

MAX_KEY_LENGTH = 250
"""MLflow's limit on metric and parameter keys (``mlflow.utils.validation.MAX_ENTITY_KEY_LENGTH``)."""
MAX_PARAM_VALUE_LENGTH = 6000
"""MLflow's limit on a parameter value (``MAX_PARAM_VAL_LENGTH``); longer values are cut, ending ``...``."""
MAX_METRICS_PER_BATCH = 1000
"""MLflow's limit on metrics per ``log_batch`` call; a record with more is sent in several batches."""
MAX_PARAMS_PER_BATCH = 100
"""MLflow's limit on parameters (and tags) per ``log_batch`` call."""
FINDINGS_ARTIFACT = "gradsentry/findings.json"
"""Artifact path of the findings (``{"findings": [Finding.to_dict(), ...]}``, NaN/inf as JSON literals)."""
HEADER_ARTIFACT = "gradsentry/header.json"
"""Artifact path of the whole run header (the parameters hold a cut-down copy)."""

_BAD_CHAR = re.compile(r"[^A-Za-z0-9_.\- /]")


def metric_key(tag: str) -> str:
    """``tag`` as a key MLflow accepts on every platform (see the module docstring for the rules).

    Example:
        >>> metric_key("gradsentry/grad_norm/(root)")
        'gradsentry/grad_norm/_root_'
        >>> metric_key("a//b/../c:d")
        'a/_/b/_/c_d'
    """
    parts = [_BAD_CHAR.sub("_", part) for part in tag.split("/")]
    key = "/".join("_" if part in ("", ".", "..") else part for part in parts)
    if len(key) > MAX_KEY_LENGTH:
        key = key[: MAX_KEY_LENGTH - 9] + "-" + hashlib.sha1(tag.encode()).hexdigest()[:8]
    return key


def param_value(value: Any) -> str:
    """A parameter value as MLflow stores it: a string of at most :data:`MAX_PARAM_VALUE_LENGTH`."""
    text = value if isinstance(value, str) else dumps(value, compact=False)
    if len(text) > MAX_PARAM_VALUE_LENGTH:
        text = text[: MAX_PARAM_VALUE_LENGTH - 3] + "..."
    return text


class MlflowSink:
    """Log step records to an MLflow run.

    Args:
        run_id: the run to log to. None (default): the active run (``mlflow.active_run()``, e.g.
            inside ``with mlflow.start_run():``) when there is one and ``tracking_uri`` is None, else
            a new run created at :meth:`open` in ``experiment``. Only a run this sink created is ended by :meth:`close`
            (status ``FINISHED``).
        experiment: name of the experiment of a run this sink creates (created if missing).
        tracking_uri: where runs are stored (``"sqlite:///mlflow.db"``, ``"http://host:5000"``, a
            ``file:`` folder); None uses MLflow's current one (``MLFLOW_TRACKING_URI``,
            ``mlflow.set_tracking_uri``). MLflow 3 refuses ``file:`` stores unless
            ``MLFLOW_ALLOW_FILE_STORE=true`` is set.
        prefix: first component of every key (default ``"gradsentry"``; non-empty, no ``/``).

    What is written: per record, one ``log_batch`` of its scalars (keys: :func:`metric_key` of the
    TensorBoard tags; ``step=record.step``; NaN and inf as they are); at :meth:`open`, the header as
    parameters ``P/<meta key>`` (values cut to :data:`MAX_PARAM_VALUE_LENGTH`; on a run that already
    holds a parameter with another value, a resumed run, the old value is kept and a warning logged:
    MLflow parameters cannot change) plus ``P/layers`` (their number), and the whole header as the
    artifact :data:`HEADER_ARTIFACT`; at :meth:`close`, the findings given to
    :meth:`write_findings` as the artifact :data:`FINDINGS_ARTIFACT`.

    Raises:
        MissingExtraError: (an ``ImportError``) when ``mlflow`` is not installed; names ``pip install 'gradsentry[mlflow]'``.
        ValueError: ``prefix`` is empty or holds ``/``.

    Example:
        >>> sink = MlflowSink(experiment="my-experiment")  # doctest: +SKIP
        >>> mon = gradsentry.Monitor(model, every=10, sinks=[sink])  # doctest: +SKIP
    """

    def __init__(
        self,
        run_id: str | None = None,
        experiment: str = "gradsentry",
        tracking_uri: str | None = None,
        *,
        prefix: str = "gradsentry",
    ) -> None:
        if not prefix or "/" in prefix:
            raise ValueError(f"prefix must be a non-empty key component without '/', got {prefix!r}")
        self._mlflow = import_extra("mlflow", "mlflow", "MlflowSink")
        self.run_id = run_id
        self.experiment = experiment
        self.tracking_uri = tracking_uri
        self.prefix = prefix
        self._client: Any = None
        self._started = False
        self._findings: list[Finding] | None = None

    def open(self, header: RunHeader) -> None:
        from mlflow import MlflowClient

        self._client = client = MlflowClient(tracking_uri=self.tracking_uri)
        if self.run_id is None:
            active = self._mlflow.active_run()
            if active is not None and self.tracking_uri is None:
                self.run_id = active.info.run_id
            else:
                exp = client.get_experiment_by_name(self.experiment)
                exp_id = exp.experiment_id if exp is not None else client.create_experiment(self.experiment)
                self.run_id = client.create_run(exp_id, tags={"mlflow.source.name": "gradsentry"}).info.run_id
                self._started = True
        self._log_params(header)
        client.log_text(self.run_id, dumps(header.to_dict()), HEADER_ARTIFACT)

    def _log_params(self, header: RunHeader) -> None:
        from mlflow.entities import Param

        wanted = {metric_key(f"{self.prefix}/{k}"): param_value(v) for k, v in header.meta.items()}
        wanted[metric_key(f"{self.prefix}/layers")] = str(len(header.layers))
        have = self._client.get_run(self.run_id).data.params
        for key in sorted(k for k in wanted if k in have and have[k] != wanted[k]):
            log.warning(
                "gradsentry: MLflow run %s keeps parameter %s=%r (now %r)",
                self.run_id,
                key,
                have[key],
                wanted[key],
            )
        params = [Param(k, v) for k, v in wanted.items() if k not in have]
        for i in range(0, len(params), MAX_PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=params[i : i + MAX_PARAMS_PER_BATCH])

    def _c(self) -> Any:
        if self._client is None:
            raise RuntimeError("MlflowSink is not open")
        return self._client

    def write(self, record: StepRecord) -> None:
        from mlflow.entities import Metric

        client = self._c()
        ts = int(time.time() * 1000)
        step = int(record.step)
        metrics = [
            Metric(metric_key(tag), value, ts, step) for tag, value in record_scalars(record, self.prefix)
        ]
        for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            client.log_batch(self.run_id, metrics=metrics[i : i + MAX_METRICS_PER_BATCH])

    def write_findings(self, findings: list[Finding]) -> None:
        """Keep the findings; they are written as one artifact at :meth:`close`."""
        self._findings = list(findings)

    def close(self) -> None:
        """Write the findings artifact; end the run if this sink created it (a given run stays open)."""
        if self._client is None:
            return
        try:
            if self._findings is not None:
                text = dumps({"findings": [f.to_dict() for f in self._findings]})
                self._client.log_text(self.run_id, text, FINDINGS_ARTIFACT)
                self._findings = None
        finally:
            if self._started:
                self._client.set_terminated(self.run_id)
                self._started = False
