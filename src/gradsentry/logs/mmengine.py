"""Reader for mmengine (OpenMMLab) JSON scalar logs, ``vis_data/scalars.json``.

One JSON object per line, written by mmengine's ``LocalVisBackend``: training lines carry ``loss``
(and ``loss_*`` parts), ``grad_norm`` when gradient clipping is configured, ``lr``, ``iter`` and
``step``; validation lines carry metrics and no loss, and are skipped. mmengine's ``LogProcessor``
logs *window means* (``window_size`` iterations, default 10), so a one-iteration spike shows up
about ``window_size`` times smaller, and a NaN poisons the whole window.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

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

MMENGINE_MARKERS = ("data_time", "time", "memory", "iter")
"""Keys mmengine writes on training lines (used to word the notes, not to accept a file)."""


def parse_json_lines(text: str, where: str) -> list[tuple[int, dict[str, Any]]]:
    """Parse JSON lines (``NaN``/``Infinity`` literals allowed; nothing is evaluated).

    Returns:
        ``(line number, object)`` for each non-empty line.

    Raises:
        LogFormatError: a line (other than a truncated last line) is not a JSON object.
    """
    out: list[tuple[int, dict[str, Any]]] = []
    lines = [(i, ln) for i, ln in enumerate(text.split("\n"), start=1) if ln.strip()]
    for k, (lineno, line) in enumerate(lines):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            if k == len(lines) - 1 and out and not text.endswith("\n"):
                break  # truncated last line of a killed run
            raise LogFormatError(
                f"{where}:{lineno}: not valid JSON ({exc.msg}); expected one JSON object per line"
            ) from exc
        if not isinstance(obj, dict):
            raise LogFormatError(f"{where}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        out.append((lineno, obj))
    return out


def read_mmengine(path: str | os.PathLike[str], *, tags: dict[str, str] | None = None) -> Series:
    """Read mmengine scalar lines (``vis_data/scalars.json``).

    Args:
        path: the file, or a work dir / timestamp folder holding ``vis_data/scalars.json``.
        tags: optional ``{"loss": key, "grad_norm": key, "lr": key}`` overriding the default key names.

    Returns:
        A :class:`~gradsentry.logs.series.Series` with ``source="mmengine"``; the step is ``step``
        (else ``iter``).

    Raises:
        LogFormatError: not JSON lines, no step key, or no training line with a loss or gradient norm.
    """
    p = Path(path)
    if p.is_dir():
        for cand in (p / "vis_data" / "scalars.json", p / "scalars.json"):
            if cand.is_file():
                p = cand
                break
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LogFormatError(f"{p}: not a text file; expected {EXPECTED_FORMATS}") from exc
    rows = parse_json_lines(text, str(p))
    if not rows:
        raise LogFormatError(f"{p}: empty file; expected mmengine JSON scalar lines")
    tags = tags or {}
    keys: set[str] = set()
    for _, obj in rows:
        keys.update(obj)
    chosen: dict[FieldName, str | None] = {
        name: pick_key(sorted(keys), tags.get(name), DEFAULT_KEYS[name], name, str(p))
        for name in ("loss", "grad_norm", "lr")
    }
    if chosen["loss"] is None and chosen["grad_norm"] is None:
        raise LogFormatError(
            f"{p}: no loss or grad_norm key in any line (keys: {', '.join(sorted(keys)[:30])}); "
            "expected mmengine training scalars"
        )
    points: dict[FieldName, dict[int, float]] = {"loss": {}, "grad_norm": {}, "lr": {}}
    skipped = 0
    marker = False
    for lineno, obj in rows:
        where = f"{p}:{lineno}"
        if not any(k is not None and k in obj for k in (chosen["loss"], chosen["grad_norm"])):
            skipped += 1
            continue
        marker = marker or any(m in obj for m in MMENGINE_MARKERS)
        step_key = "step" if "step" in obj else ("iter" if "iter" in obj else None)
        if step_key is None:
            raise LogFormatError(f"{where}: training line without a 'step' or 'iter' key")
        step = to_step(obj[step_key], where)
        for name, key in chosen.items():
            if key is not None:
                value = to_float(obj.get(key), f"{where}.{key}")
                if value is not None:
                    points[name][step] = value
    notes = []
    if marker:
        notes.append(
            "mmengine logs window means (LogProcessor window_size, default 10): a one-iteration "
            "spike appears about window_size times smaller and a NaN poisons its whole window"
        )
    if skipped:
        notes.append(f"{skipped} lines without a loss or gradient norm (validation) skipped")
    found = {name: key for name, key in chosen.items() if key is not None and points[name]}
    return build_series(points, source="mmengine", path=str(p), fields=found, notes=notes)
