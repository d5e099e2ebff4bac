"""The streaming driver every text reader runs on: :func:`read_text` and :func:`sniff_text`.

A text reader is a :class:`Dialect`: it turns one line into an entry ``(step, loss, grad_norm, lr)``
or None. The driver does everything the dialects share:

- reads the file line by line (never whole; a line longer than :data:`MAX_LINE` in pieces), as UTF-8 with undecodable bytes replaced, skipping
  lines that start with ``#`` (comments, e.g. the source notes of the test fixtures);
- splits a physical line at carriage returns and backspaces (progress-bar redraws: each fragment
  is read on its own) and removes ANSI colour codes;
- reads loss-scaler overflow lines (:data:`OVERFLOW_RE`: DeepSpeed ``OVERFLOW! Rank 0 Skipping
  step``, apex ``Gradient overflow.  Skipping step``, fairseq ``overflow detected, setting loss scale
  to``) in every format, as a skipped optimizer step at the current step: the last step read, or the
  next one when none was read yet;
- keeps one line per step of multi-rank logs: lines prefixed ``[rankN]:`` are read for the first
  rank seen only;
- a step that repeats the step before (one line per rank without a prefix, a redrawn bar) is merged
  into it: later values replace earlier ones, except that a NaN/infinity is never replaced by a
  finite value (evidence is kept);
- a step lower than the one before is a restart (a run resumed from a checkpoint, or two runs in one
  file): the later segment is kept and the earlier points from that step on are dropped, with a note.
  A line that merely repeats an already read step with the same values (a lagging rank) is merged.
"""

from __future__ import annotations

import bisect
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import ClassVar

from gradsentry.logs.errors import LogFormatError
from gradsentry.logs.series import FIELDS, FieldName, Series, largest_gap

Entry = tuple[int, float | None, float | None, float | None]
"""One training point of a text line: ``(step, loss, grad_norm, lr)``."""

OVERFLOW_RE = re.compile(
    r"OVERFLOW! Rank \d+ Skipping step"
    r"|overflow! (?:Rank \d+ )?Skipping step"
    r"|Gradient overflow\.\s+Skipping step"
    r"|overflow detected, (?:ignoring gradient, )?setting loss scale to",
    re.IGNORECASE,
)
"""A loss scaler's "this optimizer step was skipped" line (DeepSpeed, apex, fairseq)."""

# DeepSpeed's "Current loss scale already at minimum" and fairseq's "Minimum loss scale reached" (fatal)

ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
RANK_RE = re.compile(r"^\[rank(\d+)\]:")
_STEP_MIN, _STEP_END = -(2**63), 2**63
MAX_LINE = 1 << 20
"""Longer physical lines are read in pieces of this many characters (memory stays bounded on a
file without newlines); each piece is parsed on its own."""
SNIFF_LINES = 400
"""How many fragments of a file's head :func:`sniff_text` parses."""


class Dialect:
    """One text format: parse a line into an :data:`Entry`, keep what the notes need.

    A fresh instance reads one file (dialects keep state: order counters, epoch clocks).

    Class attributes:
        name: the format name (``load_series(format=name)``).
        weight: multiplies the sniff score; generic dialects weigh less than specific ones, so that
            on a line both read (a Megatron line is also a step line) the specific one wins.
        example: a real line of the format, for error messages and documentation.
        split_before: where a physical line holding ``split_hint`` is cut into fragments, for
            messages printed without a newline before them (Keras' TerminateOnNaN).

    Attributes:
        fields: for each field read, the key it came from (first seen, or a list of keys).
        notes: facts for ``Series.notes`` (ordered, without duplicates).
        counts: named counters the dialect turns into notes in :meth:`finish`.
        skipped: steps the format itself says were skipped (e.g. Megatron's skipped iterations).
        continued: set by ``parse`` when its entry continues the record of the line before (a
            multi-line record): merged without being counted as a repeated step.
    """

    name: ClassVar[str] = ""
    weight: ClassVar[float] = 1.0
    example: ClassVar[str] = ""
    split_before: ClassVar[re.Pattern[str] | None] = None
    split_hint: ClassVar[str] = ""

    def __init__(self, tags: dict[str, str] | None = None) -> None:
        self.tags = {k: v for k, v in (tags or {}).items() if v}
        self.fields: dict[str, str] = {}
        self.notes: dict[str, None] = {}
        self.counts: Counter[str] = Counter()
        self.skipped: set[int] = set()
        self.continued = False
        self._last_keys: dict[FieldName, str] | None = None

    def parse(self, line: str) -> Entry | None:
        """The training point on ``line``, or None (not a training line of this format)."""
        raise NotImplementedError

    def finish(self) -> None:
        """Called once after the last line: turn counters into notes."""

    def note(self, text: str) -> None:
        """Add a note once."""
        self.notes.setdefault(text, None)

    def use_keys(self, keys: dict[FieldName, str]) -> None:
        """Remember which keys the fields came from (a field read under several keys lists them)."""
        if keys is self._last_keys:  # the same line shape as before (a shared dict): nothing new
            return
        self._last_keys = keys
        for name, key in keys.items():
            old = self.fields.get(name)
            if old is None:
                self.fields[name] = key
            elif old != key and key not in old.split(" | ") and old.count(" | ") < 4:
                self.fields[name] = f"{old} | {key}"

    def missing_tags(self, seen: set[str]) -> list[str]:
        """Tags the user asked for that no line had."""
        return [f"{k}={v}" for k, v in self.tags.items() if v not in seen]


def fragments(raw: str, dialect: Dialect | None = None) -> list[str]:
    """The pieces of one physical line: split at carriage returns and backspaces (and where
    ``dialect.split_before`` says), ANSI codes removed."""
    if dialect is not None and dialect.split_hint and dialect.split_hint in raw and dialect.split_before:
        raw = dialect.split_before.sub("\r", raw)
    if "\x1b" in raw:
        raw = ANSI_RE.sub("", raw)
    if "\r" in raw or "\b" in raw:
        return [f for f in re.split(r"[\r\b]+", raw) if f.strip()]
    return [raw]


def sniff_text(head: str, dialect: Dialect) -> float:
    """How well ``dialect`` reads the head of a file: weight x (entries / fragments), 0 when none.

    The last line of ``head`` is ignored when it is cut (no newline).
    """
    lines = head.split("\n")
    if len(lines) > 1 and not head.endswith("\n"):
        lines.pop()
    seen = hits = 0
    for raw in lines:
        if raw.startswith("#") or not raw.strip():
            continue
        for frag in fragments(raw, dialect):
            seen += 1
            try:
                if dialect.parse(frag) is not None:
                    hits += 1
            except (ValueError, OverflowError):
                pass
        if seen >= SNIFF_LINES:
            break
    return dialect.weight * hits / seen if hits else 0.0


class _Points:
    """Entries kept in step order, with the merge and restart rules of the module docstring."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.cols: dict[FieldName, list[float | None]] = {name: [] for name in FIELDS}
        self.repeats = 0
        self.restarts: list[str] = []

    def add(
        self,
        step: int,
        values: tuple[float | None, float | None, float | None],
        where: str,
        cont: bool = False,
    ) -> None:
        steps = self.steps
        if not steps or step > steps[-1]:
            steps.append(step)
            for name, v in zip(FIELDS, values, strict=True):
                self.cols[name].append(v)
            return
        i = bisect.bisect_left(steps, step)
        if i < len(steps) and steps[i] == step and (i == len(steps) - 1 or self._same(i, values)):
            self._merge(i, values)
            self.repeats += not cont
            return
        dropped = len(steps) - i
        self.restarts.append(f"{where}: step went back from {steps[-1]} to {step} ({dropped} points dropped)")
        del steps[i:]
        for col in self.cols.values():
            del col[i:]
        self.add(step, values, where)

    def _same(self, i: int, values: tuple[float | None, ...]) -> bool:
        for name, v in zip(FIELDS, values, strict=True):
            old = self.cols[name][i]
            if v is not None and old is not None and not (v == old or (math.isnan(v) and math.isnan(old))):
                return False
        return True

    def _merge(self, i: int, values: tuple[float | None, ...]) -> None:
        for name, v in zip(FIELDS, values, strict=True):
            old = self.cols[name][i]
            if v is not None and (old is None or math.isfinite(old) or not math.isfinite(v)):
                self.cols[name][i] = v


def read_text(path: str | os.PathLike[str], dialect: Dialect) -> Series:
    """Read a console text log with ``dialect``, streaming (see the module docstring for the rules).

    Returns:
        A :class:`~gradsentry.logs.series.Series` with ``source=dialect.name``.

    Raises:
        LogFormatError: ``path`` is a directory, a step does not fit in 64 bits or a number cannot be
            read (the message names the line), a tag that was asked for never appears, or no line of the file is a training line
            of this format.
    """
    p = Path(path)
    if p.is_dir():
        raise LogFormatError(f"{p}: is a directory; a {dialect.name} log is a text file")
    pts = _Points()
    steps, c_loss, c_grad, c_lr = pts.steps, pts.cols["loss"], pts.cols["grad_norm"], pts.cols["lr"]
    last = _STEP_MIN - 1  # the last step kept (steps[-1])
    overflow_lines: list[int] = []
    pending_skips = 0
    fatal: str | None = None
    rank: str | None = None
    other_ranks = 0
    lineno = 0
    hint = dialect.split_hint or "\r"
    parse = dialect.parse
    cont = False  # the piece before was cut at MAX_LINE, not at a newline
    with p.open("r", encoding="utf-8", errors="replace", newline="\n") as fh:
        readline = fh.readline
        for raw in iter(lambda: readline(MAX_LINE), ""):
            if not cont:
                lineno += 1
            cont = raw[-1:] != "\n"
            first = raw[:1]
            if first == "#":
                continue
            if first == "[" and raw.startswith("[rank"):
                m = RANK_RE.match(raw)
                if m is not None:
                    rank = rank or m.group(1)
                    if m.group(1) != rank:
                        other_ranks += 1
                        continue
                    raw = raw[m.end() :]
            special = "\r" in raw or "\x1b" in raw or "\b" in raw or hint in raw
            for line in fragments(raw, dialect) if special else (raw,):
                if ("verflow" in line or "VERFLOW" in line) and OVERFLOW_RE.search(line):
                    overflow_lines.append(lineno)
                    if steps:
                        dialect.skipped.add(steps[-1])
                    else:
                        pending_skips += 1
                if fatal is None and ("scale already" in line or "inimum loss scale" in line):
                    fatal = f"line {lineno}: {line.strip()[:160]}"
                try:
                    entry = parse(line)
                except (ValueError, OverflowError) as exc:  # e.g. a counter beyond int()'s digit limit
                    raise LogFormatError(
                        f"{p}:{lineno}: cannot read this line as {dialect.name} ({exc})"
                    ) from None
                if entry is None:
                    continue
                step, loss, grad, lr = entry
                if last < step < _STEP_END:  # the common case: the next step
                    steps.append(step)
                    c_loss.append(loss)
                    c_grad.append(grad)
                    c_lr.append(lr)
                else:
                    if not _STEP_MIN <= step < _STEP_END:
                        raise LogFormatError(
                            f"{p}:{lineno}: step {step} is out of range (steps must fit in 64 bits)"
                        )
                    pts.add(step, (loss, grad, lr), f"line {lineno}", dialect.continued)
                last = steps[-1]
                if pending_skips:
                    dialect.skipped.add(step)
                    pending_skips = 0
    lines = lineno
    dialect.finish()
    missing = dialect.missing_tags(set(dialect.fields.values()))
    if missing:
        raise LogFormatError(f"{p}: no line has the key(s) asked for: {', '.join(missing)}")
    if not pts.steps:
        raise LogFormatError(
            f"{p}: no {dialect.name} training line with a loss or gradient norm in its {lines} lines; "
            f"expected lines like {dialect.example!r}"
        )
    notes = list(dialect.notes)
    if overflow_lines:
        shown = ", ".join(map(str, overflow_lines[:5])) + (", ..." if len(overflow_lines) > 5 else "")
        notes.append(
            f"loss-scaler overflow lines (an optimizer step skipped): {len(overflow_lines)}, at lines {shown}; "
            "each is counted at the last step read before it (the next one before the first)"
        )
    if fatal is not None:
        notes.append(f"the loss scaler gave up ({fatal})")
    if pts.repeats:
        notes.append(
            f"lines repeating a step already read: {pts.repeats} (one line per rank, a redrawn progress "
            "bar or a summary line): merged, later values kept, a NaN/inf on any of them kept"
        )
    if other_ranks:
        notes.append(f"lines of other ranks skipped: {other_ranks} (rank {rank}'s lines are read)")
    for r in pts.restarts[:3]:
        notes.append(f"restart at {r}: the later segment is kept")
    if len(pts.restarts) > 3:
        notes.append(f"{len(pts.restarts) - 3} more restarts")
    gap = largest_gap(pts.steps)
    if gap is not None:
        notes.append(gap)
    fields = {name: key for name, key in dialect.fields.items() if any(v is not None for v in pts.cols[name])}  # type: ignore[index]
    return Series(
        steps=pts.steps,
        loss=pts.cols["loss"],
        grad_norm=pts.cols["grad_norm"],
        lr=pts.cols["lr"],
        source=dialect.name,
        path=str(p),
        fields=fields,
        notes=notes,
        skipped=sorted(dialect.skipped),
    )
