"""Convert a gradsentry JSONL run (``gradsentry.logs.read_jsonl``) to a :class:`Series`."""

from __future__ import annotations

import os
from pathlib import Path

from gradsentry.logs.run_jsonl import read_jsonl
from gradsentry.logs.series import FieldName, Series, build_series
from gradsentry.records import skipped_steps_of


def read_gradsentry_jsonl(path: str | os.PathLike[str]) -> Series:
    """Read a run written by :class:`gradsentry.JsonlSink`.

    ``global_norm`` (taken by the Monitor before clipping) becomes ``grad_norm``; ``loss`` and ``lr``
    are kept where recorded.

    Raises:
        LogFormatError: from :func:`gradsentry.logs.read_jsonl` when the file is not a gradsentry run,
            or when it holds no step records.
    """
    run = read_jsonl(path)
    points: dict[FieldName, dict[int, float]] = {"loss": {}, "grad_norm": {}, "lr": {}}
    for rec in run.records:
        points["grad_norm"][rec.step] = rec.global_norm
        if rec.loss is not None:
            points["loss"][rec.step] = rec.loss
        if rec.lr is not None:
            points["lr"][rec.step] = rec.lr
    keys: dict[FieldName, str] = {"loss": "loss", "grad_norm": "global_norm", "lr": "lr"}
    found: dict[str, str] = {name: key for name, key in keys.items() if points[name]}
    return build_series(
        points,
        source="jsonl",
        path=str(Path(path)),
        fields=found,
        notes=["global_norm is the Monitor's global norm before clipping"],
        skipped=[s for r in run.records for s in skipped_steps_of(r.step, r.actions)],
        meta={k: run.header.meta[k] for k in ("optimizer", "lr", "max_grad_norm") if k in run.header.meta},
    )
