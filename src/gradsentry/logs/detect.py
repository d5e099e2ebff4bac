"""Guess a log's format and read it: :func:`load_series`.

Reading never executes the file: JSON goes through ``json``, CSV through ``csv``, event files
through tensorboard's reader.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from gradsentry.logs.csv import find_step_column, read_csv
from gradsentry.logs.hf import read_hf
from gradsentry.logs.jsonl import read_gradsentry_jsonl
from gradsentry.logs.mmengine import read_mmengine
from gradsentry.logs.series import EXPECTED_FORMATS, Series
from gradsentry.logs.tensorboard import event_dirs, is_event_file, read_tensorboard
from gradsentry.sinks.jsonl import LogFormatError

LogFormat = Literal["auto", "hf", "tensorboard", "csv", "mmengine", "jsonl"]
FORMATS: tuple[str, ...] = ("auto", "hf", "tensorboard", "csv", "mmengine", "jsonl")

_SNIFF_BYTES = 1 << 16


def _ckpt_number(d: Path) -> int:
    tail = d.name.rsplit("-", 1)[-1]
    return int(tail) if d.name.startswith("checkpoint-") and tail.isdigit() else -1


def _dir_candidates(p: Path) -> list[tuple[str, Path]]:
    """Logs directly in ``p`` (first match wins), else every log found below it."""
    if (p / "trainer_state.json").is_file():
        return [("hf", p / "trainer_state.json")]
    for cand in (p / "vis_data" / "scalars.json", p / "scalars.json"):
        if cand.is_file():
            return [("mmengine", cand)]
    if (p / "metrics.csv").is_file():
        return [("csv", p / "metrics.csv")]
    if any(is_event_file(f) for f in p.iterdir()):
        return [("tensorboard", p)]
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


def resolve(path: str | os.PathLike[str]) -> tuple[str, Path]:
    """The format and the file (or TensorBoard run directory) to read for ``path``.

    A directory is searched for one log: ``trainer_state.json`` (the latest ``checkpoint-N`` of an
    output dir), ``vis_data/scalars.json``, ``metrics.csv`` or a folder of event files.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        LogFormatError: unrecognised input, or a directory holding no log or several.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory")
    if not p.is_dir():
        return sniff_format(p), p
    cands = _dir_candidates(p)
    if not cands:
        raise LogFormatError(
            f"{p}: directory without a log gradsentry can read (no trainer_state.json, "
            "vis_data/scalars.json, metrics.csv or TensorBoard event files); expected "
            f"{EXPECTED_FORMATS}"
        )
    if len(cands) > 1:
        shown = ", ".join(f"{c[1].relative_to(p)} ({c[0]})" for c in cands[:10])
        raise LogFormatError(f"{p}: {len(cands)} logs found ({shown}); pass one of them")
    return cands[0]


def sniff_format(path: str | os.PathLike[str]) -> str:
    """Guess the format of ``path`` from its name and first bytes.

    Returns:
        One of ``"hf"``, ``"tensorboard"``, ``"csv"``, ``"mmengine"``, ``"jsonl"``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        LogFormatError: empty, binary, JSON of another shape, or otherwise unrecognised; the message
            says what was expected.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory")
    if p.is_dir():
        return resolve(p)[0]
    if is_event_file(p):
        return "tensorboard"
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
    stripped = text_head.lstrip()
    if stripped.startswith(("{", "[")):
        first_line = stripped.split("\n", 1)[0]
        try:
            first = json.loads(first_line)
        except json.JSONDecodeError:
            first = None
        if isinstance(first, dict) and "gradsentry" in first:
            return "jsonl"
        if isinstance(first, dict) and ("step" in first or "iter" in first) and "log_history" not in first:
            return "mmengine"
        if stripped.startswith("{") and "log_history" in text_head:
            return "hf"
        if first is None and stripped.startswith("{"):
            return "hf"  # a multi-line JSON document: let the HF reader judge its shape
        shape = (
            f"an object with keys {sorted(first)[:10]}"
            if isinstance(first, dict)
            else f"a JSON {type(first).__name__}"
        )
        raise LogFormatError(f"{p}: JSON of another shape ({shape}); expected {EXPECTED_FORMATS}")
    first_line = stripped.split("\n", 1)[0]
    if "," in first_line or "\t" in first_line:
        cols = [c.strip() for c in first_line.split(",")]
        if find_step_column(cols) is not None:
            return "csv"
        raise LogFormatError(
            f"{p}: CSV without a step column (header: {first_line[:200]!r}); expected a column "
            "named step, global_step, Step, iter or iteration"
        )
    raise LogFormatError(f"{p}: unrecognised text file; expected {EXPECTED_FORMATS}")


def load_series(
    path: str | os.PathLike[str], format: str = "auto", tags: dict[str, str] | None = None
) -> Series:
    """Read another tool's training log as a :class:`~gradsentry.logs.series.Series`.

    Args:
        path: a file or directory (see :data:`~gradsentry.logs.series.EXPECTED_FORMATS`). A directory
            must hold one log (searched recursively); an HF output dir with both a checkpoint's
            ``trainer_state.json`` and TensorBoard events gives the one reaching the later step.
        format: ``"auto"`` (guess from name and content), ``"hf"``, ``"tensorboard"``, ``"csv"``,
            ``"mmengine"`` or ``"jsonl"``.
        tags: optional ``{"loss": name, "grad_norm": name, "lr": name}``: the tag, column or key to
            read (TensorBoard, CSV, mmengine). A name given here must exist.

    Returns:
        The aligned loss, gradient norm and learning rate, with ``notes`` about the source.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``format`` is not one of :data:`FORMATS`.
        LogFormatError: the input is unreadable or unrecognised; the message says what was expected.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory")
    tags = {k: v for k, v in (tags or {}).items() if v}
    if format == "auto":
        if p.is_dir():
            cands = _dir_candidates(p)
            if len(cands) == 2 and {c[0] for c in cands} == {"hf", "tensorboard"}:
                return _most_complete(p, cands, tags)
        fmt, p = resolve(p)
    else:
        fmt = format
    return _read(fmt, p, tags)


def _most_complete(root: Path, cands: list[tuple[str, Path]], tags: dict[str, str]) -> Series:
    """An HF output dir with both a checkpoint's trainer_state.json and TensorBoard events (report_to):
    read the one that reaches the later step (the events, written continuously, outlive the last
    checkpoint of a crashed run); ties go to trainer_state.json."""
    read: list[tuple[str, Path, Series]] = []
    errors: list[str] = []
    for fmt, path in sorted(cands, key=lambda c: c[0] != "hf"):
        try:
            read.append((fmt, path, _read(fmt, path, tags)))
        except LogFormatError as exc:
            errors.append(str(exc))
    if not read:
        raise LogFormatError(f"{root}: none of its logs could be read: " + "; ".join(errors))
    best = max(read, key=lambda r: r[2].steps[-1])  # max keeps the first (hf) on ties
    for fmt, path, series in read:
        if series is not best[2]:
            best[2].notes.append(
                f"also found {path.relative_to(root)} ({fmt}, last step {series.steps[-1]}); read "
                f"{best[1].relative_to(root)}, which reaches step {best[2].steps[-1]}"
            )
    for err in errors:
        best[2].notes.append(f"could not read another log: {err}")
    return best[2]


def _read(fmt: str, p: Path, tags: dict[str, str]) -> Series:
    if tags and fmt in ("hf", "jsonl"):
        raise LogFormatError(
            f"{p}: tag/column names ({', '.join(f'{k}={v}' for k, v in tags.items())}) apply to TensorBoard, "
            f"CSV and mmengine logs; a {fmt} log has fixed keys"
        )
    if fmt == "hf":
        if p.is_dir():
            cands = [c for c in _dir_candidates(p) if c[0] == "hf"]
            if len(cands) != 1:
                raise LogFormatError(f"{p}: expected one Hugging Face trainer_state.json, found {len(cands)}")
            p = cands[0][1]
        return read_hf(p)
    if fmt == "tensorboard":
        return read_tensorboard(p, tags=tags)
    if fmt == "csv":
        return read_csv(p, tags=tags)
    if fmt == "mmengine":
        return read_mmengine(p, tags=tags)
    if p.is_dir():
        raise LogFormatError(f"{p}: is a directory, expected a gradsentry .jsonl file")
    return read_gradsentry_jsonl(p)
