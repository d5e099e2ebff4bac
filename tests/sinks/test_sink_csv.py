"""CsvSink: the file read back with the csv module equals the records, row by row."""

from __future__ import annotations

import csv
import logging
import math

import pytest

from gradsentry.sinks import CsvSink, SafeSink
from gradsentry.sinks.csv import CSV_COLUMNS
from sink_records import findings, header, records


def _num(text: str) -> float | None:
    return None if text == "" else float(text)


def _same(got: float | None, want: float | None) -> bool:
    if want is None or got is None:
        return got is want
    return (math.isnan(got) and math.isnan(want)) or got == want  # exact: repr round-trips floats


def test_rows_equal_records(tmp_path):
    path = tmp_path / "sub" / "run.csv"
    sink = CsvSink(path)
    sink.open(header())
    recs = records()
    for rec in recs:
        sink.write(rec)
    sink.write_findings(findings())
    sink.close()

    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
        fh.seek(0)
        assert next(csv.reader(fh)) == list(CSV_COLUMNS)
    expected = [(rec, layer) for rec in recs for layer in (rec.layers or [None])]
    assert len(rows) == len(expected) == 3 * 4 + 1
    for row, (rec, layer) in zip(rows, expected, strict=True):
        assert int(row["step"]) == rec.step
        assert _same(_num(row["global_norm"]), rec.global_norm)
        assert _same(_num(row["loss"]), rec.loss)
        assert _same(_num(row["lr"]), rec.lr)
        if layer is None:
            assert row["layer"] == "" and row["grad_norm"] == "" and row["has_grad"] == ""
            continue
        assert row["layer"] == layer.name and int(row["depth"]) == layer.depth
        for col in ("grad_norm", "grad_rms", "grad_max_abs", "weight_norm", "update_ratio"):
            assert _same(_num(row[col]), getattr(layer, col)), (rec.step, layer.name, col)
        assert int(row["nonfinite"]) == layer.nonfinite
        assert bool(int(row["has_grad"])) is layer.has_grad
    nan_row = next(r for r in rows if r["step"] == "6" and r["layer"] == "fc0")
    assert nan_row["grad_norm"] == "nan" and nan_row["global_norm"] == "nan" and nan_row["loss"] == "inf"


def test_rows_are_on_disk_after_each_write(tmp_path):
    path = tmp_path / "run.csv"
    sink = CsvSink(path)
    sink.open(header())
    sink.write(records()[0])
    # not closed: a killed run keeps every written step
    assert len(path.read_text(encoding="utf-8").splitlines()) == 1 + 3
    sink.close()


def test_open_on_a_folder_raises_and_write_before_open(tmp_path):
    with pytest.raises(IsADirectoryError):
        CsvSink(tmp_path).open(header())
    with pytest.raises(RuntimeError, match=r"CsvSink\(.*\) is not open"):
        CsvSink(tmp_path / "x.csv").write(records()[0])


def test_closed_file_is_reported_once_and_training_goes_on(tmp_path, caplog):
    sink = CsvSink(tmp_path / "run.csv")
    safe = SafeSink(sink)
    safe.open(header())
    safe.write(records()[0])
    assert sink._fh is not None
    sink._fh.close()  # the file is closed under the sink (e.g. by a stray cleanup)
    with caplog.at_level(logging.ERROR, logger="gradsentry"):
        for rec in records()[1:]:
            safe.write(rec)
        safe.write_findings(findings())
        safe.close()
    errors = [r for r in caplog.records if "CsvSink failed" in r.getMessage()]
    assert len(errors) == 1
    assert isinstance(safe.error, ValueError)  # "I/O operation on closed file"
    with (tmp_path / "run.csv").open(newline="") as fh:
        assert len(list(csv.reader(fh))) == 1 + 3  # the rows written before the failure survive
