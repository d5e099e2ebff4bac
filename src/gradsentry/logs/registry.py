"""The table of log readers: one :class:`Reader` row per format.

Each row names the format, says how much a file looks like it (``sniff``) and reads it (``read``).
:func:`gradsentry.logs.load_series` picks the row with the highest sniff score (ties: the earlier
row), ``load_series(format=name)`` reads with that row, and :data:`FORMATS` lists the names.
Adding a format is one reader module and one row here.

Sniff contract: ``sniff(path, head, tags)`` is called first with ``head=None`` (only the path is known:
the TensorBoard row claims files named ``*tfevents*`` here, before any byte is read), then with the
first 64 KiB of a text file decoded as UTF-8. It returns a score in [0, 1]; 0 means "not this
format". Structured formats answer 1.0 (certain) or 0.9; text dialects answer their weight times
the share of the head's lines they read (:func:`~gradsentry.logs.text.engine.sniff_text`); a
multi-line JSON document of unknown shape gets 0.01 from the HF row so that its reader can say what
is wrong with it. ``tags`` are the keys the user named (``--loss-tag`` ...): text dialects look for
them too, so a log with custom key names is recognised.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradsentry.logs.csv import find_step_column, read_csv
from gradsentry.logs.hf import read_hf
from gradsentry.logs.jsonl import read_gradsentry_jsonl
from gradsentry.logs.mmengine import read_mmengine
from gradsentry.logs.series import Series
from gradsentry.logs.tensorboard import is_event_file, read_tensorboard
from gradsentry.logs.text.engine import Dialect, read_text, sniff_text
from gradsentry.logs.text.hf_console import HfConsole
from gradsentry.logs.text.megatron import Megatron
from gradsentry.logs.text.mmengine_text import MmengineText
from gradsentry.logs.text.progress import Keras, Tqdm
from gradsentry.logs.text.steps import StepLines

Sniff = Callable[[Path, str | None, dict[str, str]], float]
Read = Callable[[Path, dict[str, str]], Series]


@dataclass(frozen=True)
class Reader:
    """One row of the readers table.

    Attributes:
        name: the format name (``--format``, ``Series.source``).
        sniff: ``(path, head or None, tags) -> score in [0, 1]`` (see the module docstring).
        read: ``(path, tags) -> Series``; raises ``LogFormatError`` on input it cannot read.
        example: what the format looks like (a file name or a real line), for messages and docs.
        takes_tags: whether ``tags`` (``--loss-tag`` ...) apply; False for formats with fixed keys.
        text: a console text format (read streaming by a :class:`~gradsentry.logs.text.engine.Dialect`).
    """

    name: str
    sniff: Sniff
    read: Read
    example: str
    takes_tags: bool = True
    text: bool = False


def first_json(head: str) -> Any:
    """The first line of ``head`` parsed as JSON, or None when it is not JSON."""
    try:
        return json.loads(head.lstrip().split("\n", 1)[0])
    except json.JSONDecodeError:
        return None


def _sniff_hf(path: Path, head: str | None, tags: dict[str, str]) -> float:
    if head is None:
        return 0.0
    stripped = head.lstrip()
    if not stripped.startswith("{"):
        return 0.0
    if '"log_history"' in head:
        return 1.0
    # a multi-line JSON document: the HF reader judges its shape and says what it expected
    return 0.01 if first_json(stripped) is None else 0.0


def _sniff_jsonl(path: Path, head: str | None, tags: dict[str, str]) -> float:
    first = first_json(head) if head else None
    return 1.0 if isinstance(first, dict) and "gradsentry" in first else 0.0


def _sniff_mmengine(path: Path, head: str | None, tags: dict[str, str]) -> float:
    first = first_json(head) if head else None
    if isinstance(first, dict) and ("step" in first or "iter" in first) and "log_history" not in first:
        return 0.9
    return 0.0


def _sniff_csv(path: Path, head: str | None, tags: dict[str, str]) -> float:
    if not head:
        return 0.0
    first_line = head.lstrip().split("\n", 1)[0]
    if "," not in first_line and "\t" not in first_line:
        return 0.0
    return 0.9 if find_step_column([c.strip() for c in first_line.split(",")]) is not None else 0.0


def _sniff_tensorboard(path: Path, head: str | None, tags: dict[str, str]) -> float:
    return 1.0 if is_event_file(path) else 0.0


def _read_hf(path: Path, tags: dict[str, str]) -> Series:
    return read_hf(path)


def _read_jsonl(path: Path, tags: dict[str, str]) -> Series:
    return read_gradsentry_jsonl(path)


def text_row(dialect: type[Dialect]) -> Reader:
    """A table row for a text dialect: sniffed on the head's lines, read streaming."""

    def sniff(path: Path, head: str | None, tags: dict[str, str]) -> float:
        return sniff_text(head, dialect(tags)) if head else 0.0

    def read(path: Path, tags: dict[str, str]) -> Series:
        return read_text(path, dialect(tags))

    return Reader(dialect.name, sniff, read, dialect.example, takes_tags=True, text=True)


READERS: tuple[Reader, ...] = (
    Reader(
        "hf",
        _sniff_hf,
        _read_hf,
        "trainer_state.json (an object with a 'log_history' list)",
        takes_tags=False,
    ),
    Reader(
        "tensorboard", _sniff_tensorboard, lambda p, t: read_tensorboard(p, tags=t), "events.out.tfevents.*"
    ),
    Reader(
        "csv", _sniff_csv, lambda p, t: read_csv(p, tags=t), "metrics.csv (a CSV file with a step column)"
    ),
    Reader("mmengine", _sniff_mmengine, lambda p, t: read_mmengine(p, tags=t), "vis_data/scalars.json"),
    Reader("jsonl", _sniff_jsonl, _read_jsonl, "a gradsentry .jsonl run", takes_tags=False),
    text_row(HfConsole),
    text_row(MmengineText),
    text_row(Megatron),
    text_row(Keras),
    text_row(Tqdm),
    text_row(StepLines),
)
"""The readers, in tie-break order (specific before generic)."""

BY_NAME: dict[str, Reader] = {r.name: r for r in READERS}
FORMATS: tuple[str, ...] = ("auto", *BY_NAME)
"""The values ``load_series(format=...)`` and ``gradsentry analyze --format`` accept."""
TEXT_FORMATS: tuple[str, ...] = tuple(r.name for r in READERS if r.text)
"""The console text formats, in the order they are tried."""
