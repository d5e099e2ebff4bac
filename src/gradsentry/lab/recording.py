"""How every lab run is recorded: one :class:`gradsentry.Monitor` on a schedule written in the run header.

Every gradient trace, depth profile and activation histogram the lab shows is read from the Monitor's
:class:`~gradsentry.records.StepRecord` objects: per-layer gradient norms from ``record.layers[*].grad_norm``
(a block's norm is the root of the sum of its layers' squared norms, :func:`group_norms`), the global
norm from ``record.global_norm`` and the pre-activation histograms from ``record.activations[*].histogram``
(the Monitor's ``histogram_bins=`` / ``histogram_range=``). The lab's own code measures no gradient.

The schedule (:class:`Schedule`) is the Monitor's ``every`` plus each of the first :data:`DENSE_STEPS`
steps (where an oversized init explodes) and the last step of the budget (the "after training" profile
and histogram), given to the Monitor as ``also_log``. It is written in the run header:
``header.meta["every"]`` (the Monitor's own key) and ``header.meta["schedule"]`` (:meth:`Schedule.meta`).

Each run's records go to a :class:`LabRecorder` sink, which keeps them for the lab and writes them to
the run's JSONL file, so that ``gradsentry report`` and ``gradsentry analyze`` work on a lab run and
judge it as its Monitor did. Activation histograms are kept (in memory and in the file) only at the
steps the report shows (:attr:`Schedule.histogram_steps`): the Monitor counts them at every logged step,
and writing 80 bins per activation per logged step would make the files about ten times larger.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from gradsentry.records import ActivationStats, Finding, RunHeader, StepRecord

if TYPE_CHECKING:
    import torch

    from gradsentry.monitor import Monitor

DENSE_STEPS = 16
"""Each of a run's first steps is logged: an oversized init explodes within them."""


@dataclass(frozen=True)
class Schedule:
    """Which steps a lab run's Monitor logs.

    Attributes:
        every: the Monitor's ``every``: steps 0, ``every``, ``2 every``, ... are logged.
        total: the run's step budget; its last step, ``total - 1``, is logged too.
        dense: each of the first ``dense`` steps is logged too.

    Example:
        >>> s = Schedule(every=4, total=30)
        >>> [c for c in range(30) if c % s.every == 0 or s.also_log(c)][-4:]
        [20, 24, 28, 29]
    """

    every: int
    total: int
    dense: int = DENSE_STEPS

    def also_log(self, call: int) -> bool:
        """The Monitor's ``also_log``: True for the first :attr:`dense` steps and the last step."""
        return call < self.dense or call == self.total - 1

    def regular(self, step: int) -> bool:
        """Whether ``step`` is on the ``every`` grid (0, every, 2 every, ...)."""
        return step % self.every == 0

    @property
    def histogram_steps(self) -> tuple[int, int]:
        """The steps whose activation histograms are kept: the first and the last of the budget."""
        return (0, self.total - 1)

    def meta(self) -> dict[str, Any]:
        """The schedule as written in the run header's ``meta["schedule"]``."""
        return {
            "every": self.every,
            "dense_first": self.dense,
            "last_step": self.total - 1,
            "histogram_steps": list(self.histogram_steps),
            "text": f"every {self.every} step(s), each of the first {self.dense} and the last ({self.total - 1})",
        }


def _without_histograms(record: StepRecord) -> StepRecord:
    """A shallow copy of ``record`` whose activation statistics carry no histogram."""
    if all(a.histogram is None for a in record.activations):
        return record
    acts: list[ActivationStats] = [dataclasses.replace(a, histogram=None) for a in record.activations]
    return dataclasses.replace(record, activations=acts)


class LabRecorder:
    """The lab's sink: keeps every record of a run and writes it to the run's JSONL file (if any).

    Activation histograms are dropped from the records of steps outside ``histogram_steps`` (in memory
    and in the file). Implements :class:`gradsentry.sinks.Sink`. A failing file (disk full) is reported
    once and disabled (:class:`gradsentry.sinks.base.SafeSink`); the records are still kept, so the
    lab's results do not depend on the file.

    Args:
        jsonl_path: the run's JSONL file, or None for none.
        histogram_steps: the steps whose activation histograms are kept.
    """

    def __init__(self, jsonl_path: str | Path | None, histogram_steps: Sequence[int]) -> None:
        from gradsentry.sinks.base import SafeSink
        from gradsentry.sinks.jsonl import JsonlSink

        self.records: list[StepRecord] = []
        self.header: RunHeader | None = None
        self._keep = set(histogram_steps)
        self._file = SafeSink(JsonlSink(jsonl_path, resume=False)) if jsonl_path is not None else None

    def open(self, header: RunHeader) -> None:
        """Keep the header and open the file."""
        self.header = header
        if self._file is not None:
            self._file.open(header)

    def write(self, record: StepRecord) -> None:
        """Keep the record (histograms only at the kept steps) and write that to the file."""
        if record.step not in self._keep:
            record = _without_histograms(record)
        self.records.append(record)
        if self._file is not None:
            self._file.write(record)

    def write_findings(self, findings: list[Finding]) -> None:
        """Write the run's findings to the file."""
        if self._file is not None:
            self._file.write_findings(findings)

    def flush(self) -> None:
        """Flush the file."""
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        """Close the file."""
        if self._file is not None:
            self._file.close()

    def at(self, step: int) -> StepRecord | None:
        """The record of ``step``, or None if that step was not logged."""
        return next((r for r in self.records if r.step == step), None)

    def last_finite(self) -> StepRecord:
        """The last record whose global gradient norm is finite (else the first record).

        Raises:
            ValueError: no record was written.
        """
        if not self.records:
            raise ValueError("the run logged no step")
        return next((r for r in reversed(self.records) if r.finite), self.records[0])


def watch(
    model: nn.Module,
    schedule: Schedule,
    *,
    optimizer: torch.optim.Optimizer,
    remedy: Any = None,
    meta: dict[str, Any] | None = None,
    jsonl_path: str | Path | None = None,
    histogram_bins: int = 0,
    histogram_range: float = 8.0,
    locate_nonfinite: bool = False,
) -> tuple[Monitor, LabRecorder]:
    """The Monitor of one lab run, on ``schedule`` (written in ``meta["schedule"]``), and its recorder.

    Args:
        model: the model (before its first forward pass, so that depth is the forward order).
        schedule: which steps are logged.
        optimizer: its optimizer (update ratios, learning rate).
        remedy: a gradient fix applied inside :meth:`Monitor.step`, after the statistics.
        meta: metadata for the header (``"schedule"`` is added).
        jsonl_path: the run's JSONL file, or None.
        histogram_bins: bins of the activation-input histograms (0: none), over
            ``[-histogram_range, histogram_range]``.
        histogram_range: see ``histogram_bins``.
        locate_nonfinite: name the module where a NaN/inf first appears.

    Returns:
        ``(monitor, recorder)``; call ``monitor.close()`` at the end (it closes the recorder).
    """
    from gradsentry.monitor import Monitor

    recorder = LabRecorder(jsonl_path, schedule.histogram_steps)
    mon = Monitor(
        model,
        every=schedule.every,
        also_log=schedule.also_log,
        optimizer=optimizer,
        sinks=[recorder],
        remedy=remedy,
        meta={**(meta or {}), "schedule": schedule.meta()},
        histogram_bins=histogram_bins,
        histogram_range=histogram_range,
        locate_nonfinite=locate_nonfinite,
    )
    return mon, recorder


def layer_norms(record: StepRecord, names: Sequence[str]) -> list[float]:
    """The gradient L2 norm of each named layer at ``record`` (``record.layer(name).grad_norm``)."""
    return [record.layer(name).grad_norm for name in names]


def group_norms(record: StepRecord, prefixes: Sequence[str]) -> list[float]:
    """The gradient L2 norm of each group of layers: those named ``prefix`` or ``prefix.*``.

    ``sqrt(sum of the layers' squared grad_norm)``, which is the norm of all the group's gradients
    together: a layer owns its parameters directly, so no parameter is counted twice. The Monitor
    records ``nn.MultiheadAttention``'s ``out_proj`` as a layer although it is not called as a module.
    """
    out = []
    for prefix in prefixes:
        sq = sum(
            ls.grad_norm**2 for ls in record.layers if ls.name == prefix or ls.name.startswith(prefix + ".")
        )
        out.append(math.sqrt(sq))
    return out


def activation(record: StepRecord | None, name: str) -> ActivationStats | None:
    """The activation statistics of module ``name`` at ``record`` (None when absent)."""
    if record is None:
        return None
    return next((a for a in record.activations if a.name == name), None)


__all__ = [
    "DENSE_STEPS",
    "LabRecorder",
    "Schedule",
    "activation",
    "group_norms",
    "layer_norms",
    "watch",
]
