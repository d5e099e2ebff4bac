"""Guess a log's format and read it: :func:`load_series`, driven by the readers table.

The formats and how each is recognised live in :mod:`gradsentry.logs.registry` (one row per format).
This module finds the file to read in a directory, asks every row's ``sniff`` how much a file looks
like its format, and reads it with the best row. Reading never executes the file: JSON goes
through ``json``, CSV through ``csv``, event files through tensorboard's reader, console text
through regular expressions and ``float``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from gradsentry._io import check_path, check_tags
from gradsentry.logs.csv import STEP_COLUMNS
from gradsentry.logs.errors import LogFormatError
from gradsentry.logs.registry import BY_NAME, FORMATS, READERS, TEXT_FORMATS, first_json
from gradsentry.logs.series import EXPECTED_FORMATS, Series
from gradsentry.logs.tensorboard import event_dirs, is_event_file

__all__ = ["FORMATS", "load_series", "resolve", "sniff_format"]

_SNIFF_BYTES = 1 << 16
_SNIFF_TEXT_MAX = 1 << 22
"""How far into a text file the text formats are looked for when its first 64 KiB hold none
(long preambles: configuration dumps, model printouts, warnings)."""


def _ckpt_number(d: Path) -> int:
    tail = d.name.rsplit("-", 1)[-1]
    return int(tail) if d.name.startswith("checkpoint-") and tail.isdigit() else -1


def _dir_candidates(p: Path) -> list[tuple[str, Path]]:
    """Logs directly in ``p`` (an HF or mmengine log wins; a CSV and event files side by side are
    both returned), else every log found below it."""
    if (p / "trainer_state.json").is_file():
        return [("hf", p / "trainer_state.json")]
    for cand in (p / "vis_data" / "scalars.json", p / "scalars.json"):
        if cand.is_file():
            return [("mmengine", cand)]
    direct: list[tuple[str, Path]] = []
    if (p / "metrics.csv").is_file():
        direct.append(("csv", p / "metrics.csv"))
    if any(is_event_file(f) for f in p.iterdir()):
        direct.append(("tensorboard", p))
    if direct:
        return direct
    found: list[tuple[str, Path]] = []
    states: dict[Path, list[Path]] = {}
    for f in p.rglob("trainer_state.json"):
        # checkpoint-N folders of one output dir are one run: keep the latest checkpoint
        key = f.parent.parent if _ckpt_number(f.parent) >= 0 else f.parent
        states.setdefault(key, []).append(f)
    for files in states.values():
        found.append(("hf", max(files, key=lambda f: _ckpt_number(f.parent))))
    found += [("csv", f) for f in p.rglob("metrics.csv")]
    found += [("mmengine", f) for f in p.rglob("scalars.json") if f.parent.name == "vis_data"]
    found += [("tensorboard", d) for d in event_dirs(p)]
    return sorted(found, key=lambda c: str(c[1]))


def _run_folder(fmt: str, path: Path) -> Path:
    return path.parent if fmt == "csv" else path


def _one_run_several_loggers(cands: list[tuple[str, Path]]) -> bool:
    """True for the logs one run wrote through several loggers: an HF output dir's checkpoint
    ``trainer_state.json`` and its TensorBoard events, or a Lightning run's ``metrics.csv``
    (CSVLogger) and event files (TensorBoardLogger) in one folder or in folders of the same name
    (``csv/version_0`` and ``tb/version_0``)."""
    kinds = sorted(c[0] for c in cands)
    if kinds == ["hf", "tensorboard"]:
        return True
    if kinds != ["csv", "tensorboard"]:
        return False
    folders = [_run_folder(*c) for c in cands]
    return folders[0] == folders[1] or folders[0].name == folders[1].name


def resolve(path: str | os.PathLike[str]) -> tuple[str, Path]:
    """The format and the file (or TensorBoard run directory) to read for ``path``.

    A directory is searched for one log: ``trainer_state.json`` (the latest ``checkpoint-N`` of an
    output dir), ``vis_data/scalars.json``, ``metrics.csv`` or a folder of event files. When one run
    logged through several loggers (see :func:`load_series`), the one read is returned.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        LogFormatError: unrecognised input, or a directory holding no log or the logs of several runs.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory")
    if not p.is_dir():
        return _sniff_file(p), p
    cands = _dir_candidates(p)
    if len(cands) > 1 and _one_run_several_loggers(cands):
        series = _pick_logger(p, cands, {})
        return series.source, Path(series.path)
    return _single(p, cands)


def _single(p: Path, cands: list[tuple[str, Path]]) -> tuple[str, Path]:
    if not cands:
        raise LogFormatError(
            f"{p}: directory without a log gradsentry can read (no trainer_state.json, "
            "vis_data/scalars.json, metrics.csv or TensorBoard event files); expected "
            f"{EXPECTED_FORMATS}. Pass a console text log as a file"
        )
    if len(cands) > 1:
        shown = ", ".join(f"{c[1].relative_to(p)} ({c[0]})" for c in cands[:10])
        raise LogFormatError(f"{p}: {len(cands)} logs found ({shown}); pass one of them")
    return cands[0]


def sniff_format(path: str | os.PathLike[str]) -> str:
    """Guess the format of ``path`` from its name and first bytes (the readers table's ``sniff``).

    Returns:
        A name of :data:`~gradsentry.logs.registry.FORMATS` other than ``"auto"``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        LogFormatError: empty, binary, not UTF-8, JSON of another shape, a CSV without a step column,
            or a text file in which no line is a training line of a known format; the message names
            the formats tried.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory")
    if p.is_dir():
        return resolve(p)[0]
    return _sniff_file(p)


def _best(p: Path, head: str | None, tags: dict[str, str], rows: tuple[str, ...] | None = None) -> str | None:
    best, best_score = None, 0.0
    for r in READERS:
        if rows is not None and r.name not in rows:
            continue
        score = r.sniff(p, head, tags)
        if score > best_score:  # ties keep the earlier row
            best, best_score = r.name, score
    return best


def _sniff_file(p: Path, tags: dict[str, str] | None = None) -> str:
    tags = tags or {}
    by_name = _best(p, None, tags)
    if by_name is not None:
        return by_name
    with p.open("rb") as fh:
        head = fh.read(_SNIFF_BYTES)
    if not head.strip():
        raise LogFormatError(f"{p}: empty file; expected {EXPECTED_FORMATS}")
    if b"\x00" in head:
        raise LogFormatError(
            f"{p}: binary file (not text, not named events.out.tfevents.*); expected {EXPECTED_FORMATS}"
        )
    try:
        text_head = head.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not merely a multi-byte character cut at the sniff boundary
            raise LogFormatError(
                f"{p}: not a UTF-8 text file (byte {exc.start}); expected {EXPECTED_FORMATS}"
            ) from exc
        text_head = head[: exc.start].decode("utf-8")
    fmt = _best(p, text_head, tags)
    if fmt is None and len(head) == _SNIFF_BYTES:
        fmt = _sniff_further(p, tags)
    if fmt is None:
        raise LogFormatError(_unrecognised(p, text_head))
    return fmt


def _sniff_further(p: Path, tags: dict[str, str]) -> str | None:
    """Look for text-format lines beyond the head, chunk by chunk, up to ``_SNIFF_TEXT_MAX`` bytes."""
    read = 0
    with p.open("r", encoding="utf-8", errors="replace", newline="\n") as fh:
        while read < _SNIFF_TEXT_MAX:
            chunk: list[str] = []
            size = 0
            while size < _SNIFF_BYTES:
                line = fh.readline(_SNIFF_BYTES)  # a line without end is read in bounded pieces
                if not line:
                    break
                chunk.append(line if line.endswith("\n") else line + "\n")
                size += len(line)
            if not chunk:
                return None
            read += size
            fmt = _best(p, "".join(chunk), tags, TEXT_FORMATS)
            if fmt is not None:
                return fmt
    return None


_HEADER_CELL = re.compile(r"[\w./\-]{1,80}")


def _unrecognised(p: Path, head: str) -> str:
    lines = head.split("\n")
    while len(lines) > 1 and lines[0].startswith("#"):  # comment lines (e.g. a pasted log's notes)
        lines.pop(0)
    stripped = "\n".join(lines).lstrip()
    tried = ", ".join(f"{name} ({BY_NAME[name].example!r})" for name in TEXT_FORMATS)
    first = first_json(stripped)
    if stripped.startswith("{") or (stripped.startswith("[") and first is not None):
        shape = (
            f"an object with keys {sorted(first)[:10]}"
            if isinstance(first, dict)
            else f"a JSON {type(first).__name__}"
            if first is not None
            else "not one JSON value per line"
        )
        return f"{p}: JSON of another shape ({shape}); expected {EXPECTED_FORMATS}"
    first_line = stripped.split("\n", 1)[0]
    cells = [c.strip() for c in re.split(r"[,\t]", first_line)]
    if len(cells) > 1 and all(_HEADER_CELL.fullmatch(c) for c in cells):
        return (
            f"{p}: CSV without a step column (header: {first_line[:200]!r}); expected a column named "
            f"{', '.join(STEP_COLUMNS)}; nor is any line a console log line of a known format "
            f"(tried {', '.join(TEXT_FORMATS)})"
        )
    n = head.count("\n") + (not head.endswith("\n"))
    return (
        f"{p}: unrecognised text file: none of its first {n} lines is a training log line of a known "
        f"format (a line needs a step counter and a loss or gradient norm). Formats tried: {tried}. "
        f"Also read: {EXPECTED_FORMATS}"
    )


def load_series(
    path: str | os.PathLike[str], format: str = "auto", tags: dict[str, str] | None = None
) -> Series:
    """Read another tool's training log as a :class:`~gradsentry.logs.series.Series`.

    Args:
        path: a file or directory (see :data:`~gradsentry.logs.series.EXPECTED_FORMATS`). A directory
            must hold one run's log (searched recursively). When one run logged through several
            loggers, one log is read and a note says which: an HF output dir with both a checkpoint's
            ``trainer_state.json`` and TensorBoard events gives the one reaching the later step; a
            Lightning run with both ``metrics.csv`` and event files (in one folder or in folders of
            the same name) gives the one with more points, ``metrics.csv`` on ties.
        format: ``"auto"`` (guess from name and content) or a name of
            :data:`~gradsentry.logs.registry.FORMATS`: ``"hf"``, ``"tensorboard"``, ``"csv"``,
            ``"mmengine"``, ``"jsonl"``, or a console text format (``"hf-console"``,
            ``"mmengine-text"``, ``"megatron"``, ``"keras"``, ``"tqdm"``, ``"steps"``).
        tags: optional ``{"loss": name, "grad_norm": name, "lr": name}``: the tag, column or key to
            read (TensorBoard, CSV, mmengine and text logs). A name given here must exist.

    Returns:
        The aligned loss, gradient norm and learning rate, with ``notes`` about the source and
        ``skipped`` steps where the log says an optimizer step was skipped.

    Raises:
        TypeError: ``path`` is not a str or path, or ``tags`` not None or a dict of strings.
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``format`` is not one of :data:`FORMATS`.
        LogFormatError: the input is unreadable or unrecognised; the message says what was expected
            (for an unrecognised text file, the formats tried).
    """
    p = check_path(path, "load_series(path=...)")
    check_tags(tags, "load_series(tags=...)")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory")
    tags = {k: v for k, v in (tags or {}).items() if v}
    if format != "auto":
        return _read(format, p, tags)
    if not p.is_dir():
        return _read(_sniff_file(p, tags), p, tags)
    cands = _dir_candidates(p)
    if len(cands) > 1 and _one_run_several_loggers(cands):
        return _pick_logger(p, cands, tags)
    fmt, target = _single(p, cands)
    return _read(fmt, target, tags)


def _pick_logger(root: Path, cands: list[tuple[str, Path]], tags: dict[str, str]) -> Series:
    """Read each log of one run and keep one, with a note naming the others (see :func:`load_series`).

    HF output dir (trainer_state.json + events): the log reaching the later step (the events,
    written continuously, outlive the last checkpoint of a crashed run); ties go to trainer_state.json.
    Lightning (metrics.csv + events): the log with more points; ties go to metrics.csv.
    """
    read: list[tuple[str, Path, Series]] = []
    errors: list[str] = []
    order = {"hf": 0, "csv": 1, "tensorboard": 2}
    for fmt, path in sorted(cands, key=lambda c: order.get(c[0], 9)):
        try:
            read.append((fmt, path, _read(fmt, path, tags)))
        except LogFormatError as exc:
            errors.append(str(exc))
    if not read:
        raise LogFormatError(f"{root}: none of its logs could be read: " + "; ".join(errors))
    hf = any(fmt == "hf" for fmt, _, _ in read)

    def rank(r: tuple[str, Path, Series]) -> int:
        return r[2].steps[-1] if hf else len(r[2])

    best = max(read, key=rank)  # max keeps the first (hf, csv) on ties

    def rel(q: Path) -> str:
        return str(q.relative_to(root)) if q != root else "."

    what = "reaches step" if hf else "has"
    unit = "" if hf else " points"
    for fmt, path, series in read:
        if series is not best[2]:
            best[2].notes.append(
                f"also found {rel(path)} ({fmt}, {'last step ' if hf else ''}{rank((fmt, path, series))}"
                f"{unit}): one run logged through several loggers; read {rel(best[1])} ({best[0]}), which "
                f"{what} {rank(best)}{unit}"
            )
    for err in errors:
        best[2].notes.append(f"could not read another log: {err}")
    return best[2]


def _read(fmt: str, p: Path, tags: dict[str, str]) -> Series:
    reader = BY_NAME[fmt]
    if tags and not reader.takes_tags:
        raise LogFormatError(
            f"{p}: tag/column names ({', '.join(f'{k}={v}' for k, v in tags.items())}) apply to TensorBoard, "
            f"CSV, mmengine and console text logs; a {fmt} log has fixed keys"
        )
    if fmt == "hf" and p.is_dir():
        cands = [c for c in _dir_candidates(p) if c[0] == "hf"]
        if len(cands) != 1:
            raise LogFormatError(f"{p}: expected one Hugging Face trainer_state.json, found {len(cands)}")
        p = cands[0][1]
    if fmt == "jsonl" and p.is_dir():
        raise LogFormatError(f"{p}: is a directory, expected a gradsentry .jsonl file")
    return reader.read(p, tags)
