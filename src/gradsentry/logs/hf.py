"""Reader for the Hugging Face Trainer's ``trainer_state.json``.

``log_history`` holds one object per log event: training entries (``loss``, ``grad_norm``,
``learning_rate``, ``step``, ``epoch``), evaluation entries (``eval_*`` keys) interleaved with them,
and a final summary (``train_loss``, ``train_runtime``). Python's ``json`` writes non-finite values
as the literals ``NaN``, ``Infinity`` and ``-Infinity``; they are parsed with ``json`` (never
evaluated) and kept. The logged ``grad_norm`` is the global norm *before* clipping
(``max_grad_norm``); where an entry has no ``grad_norm``, gradsentry's callback key
``gradsentry/global_norm`` is read instead. The logged ``loss`` is a mean over the logging window after the Trainer's
``logging_nan_inf_filter`` (see transformers PR #13619).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from gradsentry.logs.errors import LogFormatError
from gradsentry.logs.series import (
    EXPECTED_FORMATS,
    FieldName,
    Series,
    build_series,
    to_float,
    to_step,
)

HF_FIELDS: dict[FieldName, str] = {"loss": "loss", "grad_norm": "grad_norm", "lr": "learning_rate"}
GRADSENTRY_NORM = "gradsentry/global_norm"
"""The key gradsentry's HF callback adds to the log entries: read as the gradient norm where the
entry has no ``grad_norm`` (transformers before 4.38, or a step the Trainer did not log)."""


def parse_json_text(text: str, where: str) -> Any:
    """Parse JSON that may hold ``NaN``/``Infinity`` literals (``json`` accepts them; nothing is evaluated).

    Raises:
        LogFormatError: the text is not JSON.
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise LogFormatError(
            f"{where}: not valid JSON ({exc.msg} at line {exc.lineno}); expected "
            "a Hugging Face trainer_state.json"
        ) from exc


def read_hf(path: str | os.PathLike[str]) -> Series:
    """Read a Hugging Face ``trainer_state.json``.

    Args:
        path: the file (or a checkpoint folder holding ``trainer_state.json``).

    Returns:
        A :class:`~gradsentry.logs.series.Series` with ``source="hf"``; eval entries and the final
        summary are skipped (and counted in ``notes``).

    Raises:
        LogFormatError: the file is not JSON, has no ``log_history`` list, or holds no training entry.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "trainer_state.json"
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LogFormatError(f"{p}: not a text file; expected {EXPECTED_FORMATS}") from exc
    data = parse_json_text(text, str(p))
    if not isinstance(data, dict) or not isinstance(data.get("log_history"), list):
        shape = f"an object with keys {sorted(data)[:10]}" if isinstance(data, dict) else type(data).__name__
        raise LogFormatError(
            f"{p}: JSON of another shape ({shape}); expected a Hugging Face trainer_state.json "
            "(an object with a 'log_history' list)"
        )
    points: dict[FieldName, dict[int, float]] = {"loss": {}, "grad_norm": {}, "lr": {}}
    skipped_eval = 0
    duplicates = 0
    from_callback = trainer_norms = 0
    for i, entry in enumerate(data["log_history"]):
        where = f"{p}: log_history[{i}]"
        if not isinstance(entry, dict):
            raise LogFormatError(f"{where}: expected an object, got {type(entry).__name__}")
        if not any(key in entry for key in (*HF_FIELDS.values(), GRADSENTRY_NORM)):
            if any(str(k).startswith(("eval_", "test_")) for k in entry):
                skipped_eval += 1
            continue
        if "step" not in entry:
            raise LogFormatError(f"{where}: training entry without a 'step'")
        step = to_step(entry["step"], where)
        for name, key in HF_FIELDS.items():
            if name == "grad_norm" and entry.get(key) is None and entry.get(GRADSENTRY_NORM) is not None:
                key = GRADSENTRY_NORM  # the gradsentry callback's global norm, where the Trainer logged none
                from_callback += 1
            value = to_float(entry.get(key), f"{where}.{key}")
            if value is not None:
                trainer_norms += name == "grad_norm" and key == "grad_norm"
                if step in points[name]:
                    duplicates += 1
                points[name][step] = value
    notes = [
        "grad_norm is the global norm before clipping (HF Trainer); a value above max_grad_norm is "
        "clipped by the Trainer, not a clipping failure",
        "loss is the mean over each logging window, after the Trainer's NaN/Inf filter",
    ]
    if skipped_eval:
        notes.append(f"{skipped_eval} evaluation entries skipped")
    if duplicates:
        notes.append(f"{duplicates} values logged twice for one step (resumed run?): the last one is kept")
    found = {name: key for name, key in HF_FIELDS.items() if points[name]}
    if from_callback:
        found["grad_norm"] = f"grad_norm | {GRADSENTRY_NORM}" if trainer_norms else GRADSENTRY_NORM
        notes.append(
            f"{from_callback} gradient norms read from {GRADSENTRY_NORM} (gradsentry's callback: the global "
            "norm before clipping of the step before the entry's step), where the entry has no grad_norm"
        )
    if not points["loss"] and not points["grad_norm"]:
        raise LogFormatError(
            f"{p}: log_history holds no training entries (no 'loss' or 'grad_norm'); "
            f"{skipped_eval} eval entries only"
        )
    return build_series(points, source="hf", path=str(p), fields=found, notes=notes)
