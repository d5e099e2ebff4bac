"""Readers for other tools' training logs, all returning a :class:`Series` (see :func:`load_series`).

The readers are rows of one table, :data:`gradsentry.logs.registry.READERS` (name, sniff, read):
structured logs (HF ``trainer_state.json``, TensorBoard, CSV, mmengine JSON, gradsentry JSONL) and
console text (:mod:`gradsentry.logs.text`: HF console dicts, mmengine/mmcv text, Megatron, tqdm,
Keras, generic step lines), read streaming. :data:`FORMATS` lists their names.

gradsentry's own runs are read whole by :func:`read_jsonl`, in one bounded pass by :func:`scan_jsonl`
(:mod:`gradsentry.logs.run_jsonl`) and live, while written, by :mod:`gradsentry.logs.follow`. Every reader
raises :class:`LogFormatError` (:mod:`gradsentry.logs.errors`) on a file it cannot read.

The names are imported on first use (PEP 562): the diagnosis core imports :mod:`gradsentry.logs.series`,
and through it this package, without loading every reader.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gradsentry._lazy import lazy_names

if TYPE_CHECKING:
    from gradsentry.logs.detect import FORMATS, load_series, sniff_format
    from gradsentry.logs.errors import LogFormatError
    from gradsentry.logs.run_jsonl import read_jsonl, scan_jsonl
    from gradsentry.logs.series import Series

_HOME = {
    "FORMATS": "gradsentry.logs.detect",
    "load_series": "gradsentry.logs.detect",
    "sniff_format": "gradsentry.logs.detect",
    "Series": "gradsentry.logs.series",
    "LogFormatError": "gradsentry.logs.errors",
    "read_jsonl": "gradsentry.logs.run_jsonl",
    "scan_jsonl": "gradsentry.logs.run_jsonl",
}


__getattr__, __dir__ = lazy_names(__name__, _HOME)


__all__ = ["FORMATS", "LogFormatError", "Series", "load_series", "read_jsonl", "scan_jsonl", "sniff_format"]
