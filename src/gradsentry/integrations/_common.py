"""Framework-free helpers shared by the callbacks: metric keys and the end-of-run summary."""

from __future__ import annotations

from collections.abc import Sequence

from gradsentry.records import Finding, StepRecord

PREFIX = "gradsentry"
"""First component of every metric key the callbacks log."""

LOG_STATS: tuple[str, ...] = (
    "grad_norm",
    "grad_rms",
    "grad_max_abs",
    "nonfinite",
    "weight_norm",
    "update_ratio",
)
"""Per-layer statistics a callback can log (names of :class:`~gradsentry.records.LayerStats` fields)."""


def check_log_stats(log_stats: Sequence[str]) -> tuple[str, ...]:
    """Return ``log_stats`` as a tuple; raises ValueError naming the unknown entries and the choices."""
    bad = [s for s in log_stats if s not in LOG_STATS]
    if bad:
        raise ValueError(f"unknown log_stats {bad}; choose from {list(LOG_STATS)}")
    return tuple(log_stats)


def record_metrics(record: StepRecord, log_stats: Sequence[str] = ("grad_norm",)) -> dict[str, float]:
    """Flatten a record into metrics: ``gradsentry/global_norm`` and ``gradsentry/<stat>/<layer>``.

    Layers without a gradient (``has_grad=False``) get no gradient figures; unknown values (None) are
    left out. The root module is named ``(root)``.

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
            if value is None or (stat.startswith("grad") and not layer.has_grad):
                continue
            out[f"{PREFIX}/{stat}/{layer.name or '(root)'}"] = float(value)
    return out


def summarize(findings: list[Finding], n_records: int) -> str:
    """The end-of-run summary: a count line, then one line per finding."""
    head = f"gradsentry: {len(findings)} finding(s) over {n_records} logged step(s)"
    return "\n".join([head, *(f"  {f}" for f in findings)])
