"""Write the lab's outputs: ``report.html`` and ``results.json`` (the JSONL files are written by the runs)."""

from __future__ import annotations

import os
from pathlib import Path

from gradsentry._io import write_text_atomic
from gradsentry.lab.results import LabResult, write_results


def check_writable(out_dir: str | os.PathLike[str]) -> Path:
    """Create ``out_dir`` if needed and check that a file can be written in it, before any training.

    Returns:
        The folder as a :class:`~pathlib.Path`.

    Raises:
        OSError: (``PermissionError``, ``NotADirectoryError``, ...) with a message naming the folder,
            when it cannot be created or written.
    """
    p = Path(out_dir)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / ".gradsentry-write-test"
        probe.write_text("ok", encoding="utf-8")
        probe.unlink()
    except OSError as exc:
        raise type(exc)(f"cannot write to the output folder {str(p)!r}: {exc.strerror or exc}") from exc
    return p


def write_outputs(result: LabResult, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``results.json`` and the self-contained ``report.html`` into ``out_dir``.

    Returns:
        ``{"report": path, "results": path}``.

    Raises:
        OSError: when the folder or a file cannot be written.
    """
    from gradsentry.report.html import render_lab_report

    p = check_writable(out_dir)
    results = write_results(result, p / "results.json")
    report = p / "report.html"
    write_text_atomic(report, render_lab_report(result))
    return {"report": report, "results": results}
