"""TensorBoard sink: per-layer statistics as one chart per statistic with a line per layer.

Tags written (``P`` is the ``prefix``, ``<layer>`` a module path such as ``blocks.3.fc``, ``(root)``
for the root module):

- ``P/global_norm``, ``P/loss``, ``P/lr``: one scalar each per logged step (loss and lr when known).
- ``P/<stat>/<layer>`` for ``stat`` in :data:`LAYER_STATS` (the names of
  :data:`gradsentry.records.LAYER_STATS`: ``grad_norm``, ``grad_rms``, ``grad_max_abs``, ``nonfinite``,
  ``weight_norm``, ``update_ratio``). A layer with no gradient at a step (``has_grad=False``: frozen or
  unused) gets no gradient scalars (the statistics with ``needs_grad``) at that step, so it is not drawn
  as a vanishing line at 0; a statistic is written only when known (``update_ratio``: not on the first step).
- ``P/<stat>/<activation>`` for ``stat`` in :data:`ACTIVATION_STATS` when the record holds
  activation statistics (``saturated_frac``/``dead_frac`` only where defined).
- With ``histograms_every=K``, on every K-th logged step: ``P/hist/log10_grad_norm`` (the
  distribution over layers of log10 per-layer gradient norms, finite non-zero norms only) and
  ``P/preact/<activation>`` (pre-activation histograms, where the record carries them).
- ``P/grad_hist/<layer>`` and ``P/weight_hist/<layer>``: on every record that carries them
  (``Monitor(histograms=...)``), histograms of log10|g| and log10|w| over the layer's entries, the
  in-range bins only (zeros, NaN/inf and entries outside the range are counted in the record, not
  drawn; see :mod:`gradsentry.histograms`).
- ``P/findings``: a Markdown table of the findings (text plugin).

How the grouping is done, and why. TensorBoard's *Scalars* dashboard draws one chart per tag and
groups charts by the tag's first path component, so ``P/grad_norm/<layer>`` alone gives one small
chart per layer. ``SummaryWriter.add_scalars`` does draw several lines in one chart, but it does so
by opening one extra event-file writer (one extra "run", in a sub-folder of ``log_dir``) per
line: with 50 layers and 6 statistics that is 300 runs cluttering the run selector, and the lines
of every statistic share the same run names. Instead this sink writes plain scalars into the one
run and, once at ``open``, a *custom scalars* layout (``SummaryWriter.add_custom_scalars``): one
``Multiline`` chart per statistic whose tag regex ``^P/<stat>/.*`` matches every layer. TensorBoard's
*Custom Scalars* dashboard then shows exactly one chart per statistic with one line per layer,
while the Scalars dashboard still lists every series. (The custom-scalars plugin matches a chart's
tags with ``re.match``, see ``tensorboard/plugins/custom_scalar/custom_scalars_plugin.py``.)

Values are stored by TensorBoard as 32-bit floats; NaN and inf are written as they are (evidence).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradsentry import records
from gradsentry._extras import requires_extra
from gradsentry.records import ActivationStats, Finding, RunHeader, StepRecord
from gradsentry.report.text import findings_markdown

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

log = logging.getLogger("gradsentry")

LAYER_STATS: tuple[str, ...] = tuple(s.name for s in records.LAYER_STATS)
"""Per-layer statistics written by :class:`TensorBoardSink`, one chart each (the names of
:data:`gradsentry.records.LAYER_STATS`)."""

ACTIVATION_STATS: tuple[str, ...] = tuple(s.name for s in records.ACTIVATION_STATS)
"""Per-activation statistics written by :class:`TensorBoardSink`, one chart each (the names of
:data:`gradsentry.records.ACTIVATION_STATS`)."""

ROOT_NAME = "(root)"
"""Tag component used for the root module, whose qualified name is the empty string."""


def layer_tag(prefix: str, stat: str, name: str) -> str:
    """Return the tag of statistic ``stat`` of layer (or activation) ``name``: ``prefix/stat/name``."""
    return f"{prefix}/{stat}/{name or ROOT_NAME}"


def custom_scalars_layout(prefix: str = "gradsentry") -> dict[str, dict[str, list[Any]]]:
    """TensorBoard's custom-scalars layout for tags ``prefix/<stat>/<layer>``: one Multiline chart per
    statistic with a line per layer (see the module docstring), for ``SummaryWriter.add_custom_scalars``.

    Returns:
        ``{category: {chart title: ["Multiline", [tag regex]]}}``.
    """
    p = re.escape(prefix)
    layers = {stat: ["Multiline", [f"{p}/{stat}/.*"]] for stat in LAYER_STATS}
    acts = {stat: ["Multiline", [f"{p}/{stat}/.*"]] for stat in ACTIVATION_STATS}
    glob = {name: ["Multiline", [f"{p}/{name}$"]] for name in ("global_norm", "loss", "lr")}
    return {f"{prefix} per layer": layers, f"{prefix} activations": acts, f"{prefix} global": glob}


def record_scalars(record: StepRecord, prefix: str) -> Iterator[tuple[str, float]]:
    """The scalars of one record as ``(tag, value)`` pairs, named as listed in this module's docstring.

    Shared by every sink that writes named scalars (TensorBoard, W&B, MLflow), so that a series has
    the same name everywhere: ``prefix/global_norm``, ``prefix/loss``, ``prefix/lr`` (when known),
    ``prefix/<stat>/<layer>`` for :data:`LAYER_STATS` (gradient statistics only where the layer has a
    gradient, values only where known) and ``prefix/<stat>/<activation>`` for
    :data:`ACTIVATION_STATS`. NaN and inf are yielded as they are.
    """
    yield f"{prefix}/global_norm", float(record.global_norm)
    if record.loss is not None:
        yield f"{prefix}/loss", float(record.loss)
    if record.lr is not None:
        yield f"{prefix}/lr", float(record.lr)
    for layer in record.layers:
        for stat in records.LAYER_STATS:
            if stat.needs_grad and not layer.has_grad:
                continue
            value = getattr(layer, stat.name)
            if value is not None:
                yield layer_tag(prefix, stat.name, layer.name), float(value)
    for act in record.activations:
        for name in ACTIVATION_STATS:
            value = getattr(act, name)
            if value is not None:
                yield layer_tag(prefix, name, act.name), float(value)


def record_histograms(record: StepRecord, prefix: str) -> Iterator[tuple[str, list[int], list[float]]]:
    """The per-layer histograms of one record as ``(tag, counts, log10 edges)``: ``prefix/grad_hist/<layer>``
    and ``prefix/weight_hist/<layer>``, in-range bins only, skipping histograms with no entry in range.

    Shared by the TensorBoard and W&B sinks (one name per series everywhere).
    """
    for h in record.histograms or []:
        for kind, hist in (("grad_hist", h.grad), ("weight_hist", h.weight)):
            if hist is not None and sum(hist.counts) > 0:
                yield layer_tag(prefix, kind, h.name), hist.counts, hist.log10_edges()


class TensorBoardSink:
    """Write step records as TensorBoard scalars (and optional histograms) under ``log_dir``.

    Args:
        log_dir: folder of the TensorBoard run (created if missing); point ``tensorboard --logdir``
            at it or at a parent folder.
        prefix: first tag component of every series (default ``"gradsentry"``); must be non-empty and
            contain no ``/``.
        histograms_every: write histograms on every K-th logged step (K >= 1), or None for none.
        flush_secs: how often the writer flushes to disk, seconds (the file is also flushed on
            :meth:`write_findings` and :meth:`close`).

    Raises:
        ValueError: ``prefix`` is empty or holds ``/``, or ``histograms_every`` < 1.
        gradsentry._extras.MissingExtraError: on :meth:`open`, when the ``tensorboard`` package is
            missing (a ``ModuleNotFoundError`` naming ``pip install 'gradsentry[tensorboard]'``).

    Example:
        >>> sink = TensorBoardSink("runs/exp1", histograms_every=10)  # doctest: +SKIP
        >>> mon = gradsentry.Monitor(model, sinks=[sink])  # doctest: +SKIP
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str],
        prefix: str = "gradsentry",
        histograms_every: int | None = None,
        *,
        flush_secs: int = 30,
    ) -> None:
        if not prefix or "/" in prefix:
            raise ValueError(f"prefix must be a non-empty tag component without '/', got {prefix!r}")
        if histograms_every is not None and int(histograms_every) < 1:
            raise ValueError(f"histograms_every must be None or an integer >= 1, got {histograms_every!r}")
        self.log_dir = Path(log_dir)
        self.prefix = prefix
        self.histograms_every = None if histograms_every is None else int(histograms_every)
        self.flush_secs = int(flush_secs)
        self._writer: SummaryWriter | None = None
        self._logged = 0

    def layout(self) -> dict[str, dict[str, list[Any]]]:
        """The custom-scalars layout: one Multiline chart per statistic, a line per layer.

        Returns:
            ``{category: {chart title: ["Multiline", [tag regex]]}}`` as taken by
            ``SummaryWriter.add_custom_scalars``.
        """
        return custom_scalars_layout(self.prefix)

    def open(self, header: RunHeader) -> None:
        with requires_extra("tensorboard", "TensorBoardSink"):
            from torch.utils.tensorboard import SummaryWriter
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=self.flush_secs)
        self._writer.add_custom_scalars(self.layout())
        self._logged = 0

    def _w(self) -> SummaryWriter:
        if self._writer is None:
            raise RuntimeError(f"TensorBoardSink({self.log_dir}) is not open")
        return self._writer

    def write(self, record: StepRecord) -> None:
        w = self._w()
        step = int(record.step)
        for tag, value in record_scalars(record, self.prefix):
            w.add_scalar(tag, value, step)
        if self.histograms_every is not None and self._logged % self.histograms_every == 0:
            self._histograms(w, record)
        for tag, counts, edges in record_histograms(record, self.prefix):
            raw = raw_histogram(edges, counts)
            if raw is not None:
                w.add_histogram_raw(tag, global_step=step, **raw)
        self._logged += 1

    def _histograms(self, w: SummaryWriter, record: StepRecord) -> None:
        import numpy as np

        norms = [
            x.grad_norm
            for x in record.layers
            if x.has_grad and math.isfinite(x.grad_norm) and x.grad_norm > 0
        ]
        if norms:
            w.add_histogram(
                f"{self.prefix}/hist/log10_grad_norm",
                np.log10(np.asarray(norms, dtype=np.float64)),
                record.step,
            )
        for act in record.activations:
            raw = _raw_histogram(act)
            if raw is not None:
                w.add_histogram_raw(
                    layer_tag(self.prefix, "preact", act.name), global_step=record.step, **raw
                )

    def write_findings(self, findings: list[Finding]) -> None:
        w = self._w()
        w.add_text(f"{self.prefix}/findings", findings_markdown(findings))
        w.flush()

    def flush(self) -> None:
        """Write the pending events to disk now (rather than within ``flush_secs``)."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None


def _raw_histogram(act: ActivationStats) -> dict[str, Any] | None:
    """Turn ``act.histogram`` (``{"edges": [n+1], "counts": [n]}``) into ``add_histogram_raw`` arguments.

    Returns None (and logs at debug level) for a missing, empty or malformed histogram.
    """
    h = act.histogram
    if not h:
        return None
    try:
        edges = [float(e) for e in h["edges"]]
        counts = [float(c) for c in h["counts"]]
    except (KeyError, TypeError, ValueError):
        log.debug("gradsentry: activation %s has a malformed histogram; skipped", act.name)
        return None
    raw = raw_histogram(edges, counts)
    if raw is None:
        log.debug(
            "gradsentry: activation %s histogram has %d edges for %d counts; skipped",
            act.name,
            len(edges),
            len(counts),
        )
    return raw


def raw_histogram(edges: list[float], counts: list[float] | list[int]) -> dict[str, Any] | None:
    """``add_histogram_raw`` arguments for ``counts`` on bins between ``edges`` (``len(counts) + 1``).

    The sum and sum of squares are estimated from the bin centres (the exact values are not kept in
    the record). Returns None when the lengths disagree or nothing is counted.
    """
    if len(edges) != len(counts) + 1 or not counts or sum(counts) <= 0:
        return None
    centres = [(a + b) / 2 for a, b in itertools.pairwise(edges)]
    nonzero = [i for i, c in enumerate(counts) if c > 0]
    return {
        "min": edges[nonzero[0]],
        "max": edges[nonzero[-1] + 1],
        "num": sum(counts),
        "sum": sum(c * x for c, x in zip(counts, centres, strict=True)),
        "sum_squares": sum(c * x * x for c, x in zip(counts, centres, strict=True)),
        "bucket_limits": edges[1:],
        "bucket_counts": counts,
    }
