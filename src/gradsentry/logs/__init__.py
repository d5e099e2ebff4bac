"""Readers for other tools' training logs, all returning a :class:`Series` (see :func:`load_series`).

The readers are rows of one table, :data:`gradsentry.logs.registry.READERS` (name, sniff, read):
structured logs (HF ``trainer_state.json``, TensorBoard, CSV, mmengine JSON, gradsentry JSONL) and
console text (:mod:`gradsentry.logs.text`: HF console dicts, mmengine/mmcv text, Megatron, tqdm,
Keras, generic step lines), read streaming. :data:`FORMATS` lists their names.
"""

from gradsentry.logs.detect import FORMATS, load_series, sniff_format
from gradsentry.logs.series import Series
from gradsentry.sinks.jsonl import LogFormatError

__all__ = ["FORMATS", "LogFormatError", "Series", "load_series", "sniff_format"]
