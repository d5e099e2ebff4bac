"""CSV sink: one row per logged step and layer, flushed per step.

Columns (:data:`CSV_COLUMNS`): ``step, layer, depth``, then one per per-layer statistic
(:data:`gradsentry.records.LAYER_STATS`: ``grad_norm, grad_rms, grad_max_abs, nonfinite, weight_norm,
update_ratio``), then ``global_norm, loss, lr, has_grad``. The step-level figures (``global_norm``,
``loss``, ``lr``) are repeated on every row of their step so that each row stands alone (a spreadsheet
pivot or ``pandas.read_csv`` needs no join). Unknown values (``update_ratio`` on the first step,
``loss``/``lr`` when not given) are empty cells; NaN and infinities are written as ``nan``, ``inf``
and ``-inf``, which ``float()`` and ``pandas`` read back. A step record without layers still gets
one row (empty layer cells) so that its global norm is not lost. Findings do not fit the table and
are not written (use :class:`~gradsentry.sinks.JsonlSink` alongside to keep them).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import IO, Any

from gradsentry.records import LAYER_STATS, Finding, LayerStats, RunHeader, StepRecord
from gradsentry.sinks._file import open_log, probe_lock

CSV_COLUMNS: tuple[str, ...] = (
    "step",
    "layer",
    "depth",
    *(s.name for s in LAYER_STATS),
    "global_norm",
    "loss",
    "lr",
    "has_grad",
)
"""Header row of the files written by :class:`CsvSink` (the statistics' columns come from
:data:`gradsentry.records.LAYER_STATS`)."""


def _is_csv_header(line: bytes, complete: bool) -> bool:
    """Whether a file's first line is this sink's header row (or, cut by a kill, the start of it)."""
    row = line.rstrip(b"\r").removeprefix(b"\xef\xbb\xbf")
    header = ",".join(CSV_COLUMNS).encode()
    return row == header if complete else header.startswith(row)


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # shortest round-trip text: float(repr(x)) == x, "nan"/"inf" included
    return value


class CsvSink:
    """Write a run as CSV rows (one per step and layer) to ``path``.

    Args:
        path: file to write; parent folders are created.
        resume: True (default): an existing CsvSink file is appended to, so a run restarted from a
            checkpoint keeps its earlier rows (a last row cut short by a kill is dropped first; the
            header row is not repeated, so the file stays one table, and the rows of the steps a
            restart redid appear twice, the later ones being the resumed run's). False: an existing
            file is replaced.

    While open, the file is locked (``flock``): a second sink on the same path fails to open with a
    clear error instead of interleaving rows.

    Raises:
        OSError: on ``open`` when the file cannot be created (e.g. ``path`` is a folder).
        LogInUseError: on ``open`` when another sink is writing the file.
        ValueError: on ``open`` with ``resume=True`` when the existing file is not a CsvSink table
            (another header row): it is left as it is.

    Example:
        >>> sink = CsvSink("run.csv")  # doctest: +SKIP
        >>> mon = gradsentry.Monitor(model, sinks=[sink])  # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike[str], *, resume: bool = True) -> None:
        self.path = Path(path)
        probe_lock(self.path)  # another sink writing it: refused here, not at the first step
        self.resume = resume
        self.resumed = False
        self._fh: IO[str] | None = None
        self._writer: Any = None

    def open(self, header: RunHeader) -> None:
        fd, kept = open_log(
            self.path,
            resume=self.resume,
            ours=_is_csv_header,
            what="CsvSink table",
            replace_hint="CsvSink(path, resume=False)",
        )
        self._fh = os.fdopen(fd, "a", encoding="utf-8", newline="")
        self._writer = csv.writer(self._fh)
        self.resumed = kept > 0
        if not self.resumed:
            self._writer.writerow(CSV_COLUMNS)
        self._fh.flush()

    def write(self, record: StepRecord) -> None:
        if self._fh is None:
            raise RuntimeError(f"CsvSink({self.path}) is not open")
        tail = [_cell(record.global_norm), _cell(record.loss), _cell(record.lr)]
        if not record.layers:
            self._writer.writerow([record.step, "", "", *([""] * len(LAYER_STATS)), *tail, ""])
        for layer in record.layers:
            self._writer.writerow([record.step, *self._layer_cells(layer), *tail, int(layer.has_grad)])
        self._fh.flush()

    @staticmethod
    def _layer_cells(x: LayerStats) -> list[Any]:
        return [x.name, x.depth, *(_cell(getattr(x, s.name)) for s in LAYER_STATS)]

    def write_findings(self, findings: list[Finding]) -> None:
        """Findings are not part of the CSV table; this flushes the file and writes nothing."""
        if self._fh is not None:
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            try:
                self._fh.flush()
            finally:
                self._fh.close()  # releases the lock
                self._fh = None
                self._writer = None
