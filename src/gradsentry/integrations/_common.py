"""Framework-free helpers shared by the callbacks: metric keys, stopping on a finding, the summary."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gradsentry.monitor import ALERT_WINDOW, Monitor, alert_finding, alert_message, nonfinite_step
from gradsentry.records import LAYER_STATS, Finding, StepRecord
from gradsentry.report.text import finding_line

log = logging.getLogger("gradsentry")

PREFIX = "gradsentry"
"""First component of every metric key the callbacks log."""

LOG_STATS: tuple[str, ...] = tuple(s.name for s in LAYER_STATS)
"""Per-layer statistics a callback can log: the names of :data:`gradsentry.records.LAYER_STATS`."""

_NEEDS_GRAD = frozenset(s.name for s in LAYER_STATS if s.needs_grad)


def check_log_stats(log_stats: Sequence[str]) -> tuple[str, ...]:
    """Return ``log_stats`` as a tuple; raises ValueError naming the unknown entries and the choices."""
    bad = [s for s in log_stats if s not in LOG_STATS]
    if bad:
        raise ValueError(f"unknown log_stats {bad}; choose from {list(LOG_STATS)}")
    return tuple(log_stats)


def record_metrics(record: StepRecord, log_stats: Sequence[str] = ("grad_norm",)) -> dict[str, float]:
    """Flatten a record into metrics: ``gradsentry/global_norm`` and ``gradsentry/<stat>/<layer>``.

    Layers without a gradient (``has_grad=False``) get no gradient figures (the statistics with
    ``needs_grad``); unknown values (None) are left out. The root module is named ``(root)``.

    Example:
        >>> from gradsentry.records import LayerStats
        >>> rec = StepRecord(step=0, global_norm=2.0, layers=[LayerStats("fc", 0, 4, 2.0, 1.0, 1.5, 0, 3.0)])
        >>> record_metrics(rec)
        {'gradsentry/global_norm': 2.0, 'gradsentry/grad_norm/fc': 2.0}
    """
    out = {f"{PREFIX}/global_norm": record.global_norm}
    for layer in record.layers:
        for stat in log_stats:
            value = getattr(layer, stat)
            if value is None or (stat in _NEEDS_GRAD and not layer.has_grad):
                continue
            out[f"{PREFIX}/{stat}/{layer.name or '(root)'}"] = float(value)
    return out


DEFAULT_SINK_NAME = "gradsentry.jsonl"
"""File name of the JSONL record file a callback writes in the trainer's output folder by default."""


def default_sink_path(folder: str | Path | None) -> Path | None:
    """Where a callback's default :class:`~gradsentry.sinks.JsonlSink` goes: ``folder/gradsentry.jsonl``
    (None when the trainer has no output folder)."""
    return None if folder is None else Path(folder) / DEFAULT_SINK_NAME


def resumed_log(sinks: Sequence[Any]) -> Path | None:
    """The file of the first :class:`~gradsentry.sinks.JsonlSink` in ``sinks`` that will append to an
    earlier run (``resume=True`` and a non-empty file), or None."""
    from gradsentry.sinks.jsonl import JsonlSink

    for sink in sinks:
        if isinstance(sink, JsonlSink) and sink.resume and sink.path.is_file() and sink.path.stat().st_size:
            return sink.path
    return None


def carry_over(mon: Monitor, path: Path, first_step: int) -> None:
    """Give ``mon`` the earlier part of a resumed run: the records of ``path`` before ``first_step``
    (the first step this part records; the steps from it on are redone), read as ``gradsentry analyze``
    reads the joined log. Called before the Monitor's first record (its sinks have not appended yet), so
    its findings, its summary and ``stop_on`` judge the whole run, as ``analyze`` of either log does.
    A log that cannot be read is left to the sink (which reports it) and the Monitor starts empty."""
    from gradsentry.logs.run_jsonl import scan_jsonl

    store = mon._store  # the record store, seeded before the first record
    try:
        run = scan_jsonl(path, window=store.max_records, sample=store.history.sample_size)
    except (OSError, ValueError) as exc:
        log.warning("gradsentry: could not read the earlier part of the run in %s (%s)", path, exc)
        return
    run.history.truncate_from(first_step)
    store.carry_over(run.history, [r for r in run.window if r.step < first_step])


def worst_layer(record: StepRecord) -> str | None:
    """One phrase naming the layer to look at first in ``record``, or None (no layer with a gradient).

    The first layer (in depth order) holding NaN/inf gradient entries; else the layer whose gradient
    RMS is furthest, in decades, from the median RMS of the layers with a gradient.

    Example:
        >>> from gradsentry.records import LayerStats
        >>> layers = [LayerStats(n, i, 100, g, g / 10, g, 0, 1.0) for i, (n, g) in enumerate(
        ...     [("fc1", 1e-6), ("fc2", 0.1), ("fc3", 0.2)])]
        >>> worst_layer(StepRecord(step=3, global_norm=0.3, layers=layers))
        'fc1 (grad RMS 1e-07, 1e-05x the median)'
    """
    live = [x for x in record.layers if x.has_grad]
    for x in live:
        if x.nonfinite:
            return f"{x.name or '(root)'} (NaN/inf gradient)"
    rms = sorted(x.grad_rms for x in live if x.grad_rms > 0 and math.isfinite(x.grad_rms))
    if not rms:
        return None
    median = rms[len(rms) // 2]
    scored = [x for x in live if x.grad_rms > 0 and math.isfinite(x.grad_rms)]
    worst = max(scored, key=lambda x: abs(math.log10(x.grad_rms / median)))
    return (
        f"{worst.name or '(root)'} (grad RMS {worst.grad_rms:.2g}, {worst.grad_rms / median:.2g}x the median)"
    )


NORM_RTOL = 1e-2
"""Relative difference between a trainer's logged global norm and gradsentry's beyond which the
callbacks report a mismatch: float32 norms of the same gradient agree to ~1e-6 (torch's CPU norm drifts
by up to 1e-3 on 16M-entry layers), while a norm counted over the wrong shards is off by sqrt(k)."""


def norm_mismatch(step: int, trainer_norm: float, ours: float, rtol: float = NORM_RTOL) -> str | None:
    """A WARNING text when the trainer's logged global norm and gradsentry's differ beyond ``rtol``.

    Both non-finite (NaN/inf on both sides) is agreement. The text names both values, their ratio and,
    when the ratio is close to sqrt(k) for a small integer k >= 2, the likely sqrt(shards) counting bug.

    Example:
        >>> norm_mismatch(10, 2.0, 2.0 * 1.000001) is None
        True
        >>> print(norm_mismatch(10, 2.0 * 2**0.5, 2.0))
        gradsentry: at step 10 the trainer logged grad_norm 2.828 but the gradient's global norm is 2 (ratio 1.414 = sqrt(2.00), as if the norm were counted over 2 shards or replicas); one of the two does not measure the whole gradient
    """
    a, b = float(trainer_norm), float(ours)
    if not (math.isfinite(a) and math.isfinite(b)):
        return None if math.isfinite(a) == math.isfinite(b) else _mismatch_text(step, a, b, "")
    if abs(a - b) <= rtol * max(abs(a), abs(b)):
        return None
    hint = ""
    if a > 0 and b > 0:
        k = (max(a, b) / min(a, b)) ** 2
        if round(k) >= 2 and abs(k - round(k)) < 0.02 * k:
            hint = (
                f" (ratio {a / b:.4g} = sqrt({k:.2f}), as if the norm were counted over "
                f"{round(k)} shards or replicas)"
            )
        else:
            hint = f" (ratio {a / b:.4g})"
    return _mismatch_text(step, a, b, hint)


def _mismatch_text(step: int, a: float, b: float, hint: str) -> str:
    return (
        f"gradsentry: at step {step} the trainer logged grad_norm {a:.4g} but the gradient's global norm "
        f"is {b:.4g}{hint}; one of the two does not measure the whole gradient"
    )


def summarize(findings: list[Finding], n_records: int) -> str:
    """The end-of-run summary: a count line, then one line per finding."""
    head = f"gradsentry: {len(findings)} finding(s) over {n_records} logged step(s)"
    return "\n".join([head, *(f"  {finding_line(f)}" for f in findings)])


STOP_ON: tuple[str, ...] = ("nonfinite", "exploding")
"""Finding kinds a callback's ``stop_on`` can name."""


def check_stop_on(stop_on: Sequence[str] | str) -> tuple[str, ...]:
    """Return ``stop_on`` as a tuple (a single name is accepted as is); raises ValueError naming the
    unknown entries and the valid ones."""
    names = (stop_on,) if isinstance(stop_on, str) else tuple(stop_on)
    bad = [s for s in names if s not in STOP_ON]
    if bad:
        raise ValueError(f"unknown stop_on {bad}; valid names: {list(STOP_ON)}")
    return names


def stop_finding(mon: Monitor, record: StepRecord, stop_on: Sequence[str]) -> Finding | None:
    """The finding that should stop the run at ``record`` (the Monitor's newest), or None.

    ``"nonfinite"``: the record holds a NaN/inf gradient or loss. ``"exploding"``: the diagnosis of the
    last :data:`~gradsentry.monitor.ALERT_WINDOW` records has an ``exploding`` finding whose steps
    include this record's step (the diagnosis runs on every logged step, only when ``"exploding"`` is
    asked for). Either way the finding is the one :func:`gradsentry.diagnose` gives.
    """
    if "nonfinite" in stop_on and nonfinite_step(record):
        return alert_finding(mon.recent(ALERT_WINDOW), mon.layers, "nonfinite", mon.header.meta)
    if "exploding" in stop_on:
        return alert_finding(mon.recent(ALERT_WINDOW), mon.layers, "exploding", mon.header.meta)
    return None


def stop_message(record: StepRecord, finding: Finding) -> str:
    """The WARNING a callback logs when it stops the run."""
    return (
        f"{alert_message(record, finding)} Stopping the run (stop_on {finding.kind!r}); the optimizer "
        f"update of step {record.step} is not applied."
    )


def drop_gradients(optimizer: Any) -> None:
    """Set every gradient of the optimizer's parameters to None: its next ``step()`` leaves those
    weights and their optimizer state unchanged (torch optimizers skip parameters without a gradient)."""
    for group in getattr(optimizer, "param_groups", None) or []:
        for p in group["params"]:
            p.grad = None


def summary_level(findings: Sequence[Finding]) -> int:
    """WARNING when there is any finding, INFO when the run is healthy."""
    return logging.WARNING if findings else logging.INFO
