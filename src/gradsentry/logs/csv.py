"""Reader for CSV metric logs: Lightning's ``CSVLogger`` ``metrics.csv`` and plain CSV with a step column.

Lightning writes one row per ``log`` flush with the union of all keys as columns, so columns are
sparse (empty cells where a metric was not logged at that row) and the same step can appear on a
training row and a validation row; rows are merged per step. Cells such as ``nan`` and ``inf`` are
kept as non-finite floats. Lightning's ``grad_norm`` utility logs the global norm as
``grad_2.0_norm_total``, computed before clipping (in ``on_before_optimizer_step``).
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

from gradsentry.logs.errors import LogFormatError
from gradsentry.logs.series import (
    DEFAULT_KEYS,
    EXPECTED_FORMATS,
    FieldName,
    Series,
    build_series,
    pick_key,
    to_float,
    to_step,
)

log = logging.getLogger("gradsentry")

STEP_COLUMNS: tuple[str, ...] = ("step", "global_step", "Step", "iter", "iteration", "trainer/global_step")
"""Columns accepted as the step counter, best first."""


def find_step_column(columns: list[str]) -> str | None:
    """The step column among ``columns``, or None."""
    for c in STEP_COLUMNS:
        if c in columns:
            return c
    return None


def is_csvsink_header(columns: list[str]) -> bool:
    """True for the header of a file written by :class:`gradsentry.sinks.CsvSink` (one row per step
    and layer: ``grad_norm`` is the layer's norm, ``global_norm`` the step's)."""
    return {"layer", "global_norm", "grad_norm", "step"} <= set(columns)


def read_csv(path: str | os.PathLike[str], *, tags: dict[str, str] | None = None) -> Series:
    """Read a CSV metrics file, row by row (the file is never held whole).

    A gradsentry :class:`~gradsentry.sinks.CsvSink` file (a ``layer`` column, one row per step and
    layer) gives the step's ``global_norm`` as the gradient norm, not a layer's ``grad_norm``.

    Args:
        path: the file, or a Lightning version folder holding ``metrics.csv``.
        tags: optional ``{"loss": column, "grad_norm": column, "lr": column}`` overriding the defaults.

    Returns:
        A :class:`~gradsentry.logs.series.Series` with ``source="csv"``.

    Raises:
        LogFormatError: not UTF-8 text, no header, no step column, a row with more or fewer cells
            than the header, a non-numeric cell in a used column, or neither a loss nor a
            gradient-norm column; the message names the file and line.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.csv"
    try:
        # utf-8-sig: a byte-order mark is not part of the header
        with p.open(encoding="utf-8-sig", newline="") as fh:
            return _read_rows(p, csv.DictReader(fh), tags or {})
    except UnicodeDecodeError as exc:
        raise LogFormatError(f"{p}: not a text file; expected {EXPECTED_FORMATS}") from exc


def _ends_mid_line(p: Path) -> bool:
    """The file's last byte is not a line end (a writer killed mid-row)."""
    with p.open("rb") as fh:
        fh.seek(0, os.SEEK_END)
        if fh.tell() == 0:
            return False
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) not in (b"\n", b"\r")


def _at_end(rows: object) -> bool:
    """No row follows (the failing row was the last one)."""
    try:
        next(rows)  # type: ignore[call-overload]
    except StopIteration:
        return True
    except csv.Error:
        return False
    return False


def _read_rows(p: Path, reader: csv.DictReader[str], tags: dict[str, str]) -> Series:
    try:
        columns = [c for c in (reader.fieldnames or []) if c is not None]
    except csv.Error as exc:  # e.g. a header cell over csv.field_size_limit
        raise LogFormatError(f"{p}:1: not a readable CSV header ({exc})") from None
    if not columns or not any(c.strip() for c in columns):
        raise LogFormatError(f"{p}: empty file; expected a CSV header with a step column")
    step_col = find_step_column(columns)
    if step_col is None:
        raise LogFormatError(
            f"{p}: no step column (expected one of {', '.join(STEP_COLUMNS)}); "
            f"columns: {', '.join(columns[:30])}"
        )
    sink = is_csvsink_header(columns)
    defaults = dict(DEFAULT_KEYS)
    if sink:
        defaults["grad_norm"] = ("global_norm",)
    chosen: dict[FieldName, str | None] = {
        name: pick_key(columns, tags.get(name), defaults[name], f"{name} column", str(p))
        for name in ("loss", "grad_norm", "lr")
    }
    if chosen["loss"] is None and chosen["grad_norm"] is None:
        raise LogFormatError(
            f"{p}: no loss or gradient-norm column (expected e.g. train_loss, loss, grad_norm, "
            f"grad_2.0_norm_total); columns: {', '.join(columns[:30])}"
        )
    points: dict[FieldName, dict[int, float]] = {"loss": {}, "grad_norm": {}, "lr": {}}
    cut = _ends_mid_line(p)  # a kill mid-row leaves the last row short
    rows = iter(reader)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            break
        except csv.Error as exc:  # a cell over csv.field_size_limit, an unterminated quote
            if cut and _at_end(rows):
                log.warning(
                    "%s:%d: last row cut short skipped (the run was probably killed)", p, reader.line_num
                )
                break
            raise LogFormatError(f"{p}:{reader.line_num}: not a readable CSV row ({exc})") from None
        lineno = reader.line_num
        try:
            _read_row(row, str(p), lineno, columns, chosen, step_col, points)
        except LogFormatError:
            if cut and _at_end(rows):
                log.warning("%s:%d: last row cut short skipped (the run was probably killed)", p, lineno)
                break
            raise
    found = {name: col for name, col in chosen.items() if col is not None and points[name]}
    notes = []
    if sink:
        notes.append(
            "a gradsentry CsvSink file (one row per step and layer): the gradient norm is the step's "
            "global_norm (before clipping), not a layer's grad_norm"
        )
    if "grad_2.0_norm_total" in found.values():
        notes.append("grad_2.0_norm_total is Lightning's pre-clip global norm (grad_norm utility)")
    if "gradsentry/global_norm" in found.values():
        notes.append("gradsentry/global_norm is gradsentry's callback's global norm before clipping")
    return build_series(points, source="csv", path=str(p), fields=found, notes=notes)


def _read_row(
    row: dict[str | None, str | None],
    p: str,
    lineno: int,
    columns: list[str],
    chosen: dict[FieldName, str | None],
    step_col: str,
    points: dict[FieldName, dict[int, float]],
) -> None:
    """Add one CSV row's values to ``points``; raises :class:`LogFormatError` naming the line."""
    where = f"{p}:{lineno}"
    if None in row or any(v is None for v in row.values()):  # more or fewer cells than the header
        extra = len(row.get(None) or [])  # type: ignore[call-overload]
        missing = sum(v is None for k, v in row.items() if k is not None)
        raise LogFormatError(
            f"{where}: {len(columns) + extra - missing} cells for {len(columns)} header columns; "
            "a CSV log needs one cell per column on every row"
        )
    cells = {name: row.get(col) if col is not None else None for name, col in chosen.items()}
    if all(c is None or c.strip() == "" for c in cells.values()):
        return  # a validation-only row
    step = to_step(row.get(step_col), f"{where} column {step_col!r}")
    for name, cell in cells.items():
        value = to_float(cell, f"{where} column {chosen[name]!r}")
        if value is not None:
            points[name][step] = value
