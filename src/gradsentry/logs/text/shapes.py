"""The fast path of the text readers: line shapes seen before, read with one ``fullmatch``.

Training logs repeat one line layout with other numbers. The first line of each *shape* is read in
full (the dialect's own parsing); its numbers and white space then become a compiled regular
expression, the :class:`Template`, and the dialect says which number is which field (its *plan*).
A later line that the template matches has the same text around the same places, so its fields are
read straight from the groups, with the same result as a full read. A line that does not match, or
whose counter group is not a plain integer, takes the full path.

>>> shapes = LineShapes()
>>> shapes.learn("step 10 loss 2.5 time 3.1", [(0, (5, 7), INT), (1, (13, 16), FLOAT)], [None, None])
>>> shapes.match("step 11 loss nan time 2.9")
[11, nan]
>>> shapes.match("step 11 loss nan time 2.9 extra") is None
True
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

INT, FLOAT, WORST = 0, 1, 2
"""How a group is read: a non-negative integer counter, a float, or a float combined with the value
already in its slot into the more alarming one (NaN, then infinity, then the larger)."""

TOKEN_RE = re.compile(
    r"(?<![A-Za-z_\d.])(?P<num>[-+]?(?:(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
    r"|(?:nan|NaN|NAN|[Ii]nf(?:inity)?|INF)(?![a-z])))|(?P<ws>\s+)"
)
"""The variable parts of a line's shape: numbers (not inside a word) and runs of white space."""
WILD = r"[-+]?+(?:\d++(?:\.\d*+)?+|\.\d++)(?:[eE][-+]?+\d++)?+|[-+]?(?:[Nn]a[Nn]|NAN|[Ii]nf(?:inity)?|INF)(?![a-z])"
"""A number in a template: exactly what ``float`` reads (possessive, so failing lines fail fast)."""
INT_WILD = r"\d++"
NONINT_WILD = r"(?!\d++(?!\.|[eE][-+]?\d))(?:" + WILD + ")"
"""A plain integer stays a plain integer and any other number stays one that is not: the readers
treat ``step: 7`` (a counter) and ``step: 7.0`` (not one) differently, so a shape keeps the kind."""

MAX_TEMPLATES = 8
"""Shapes kept per file (most recently used first)."""


def worse(a: float, b: float) -> float:
    """The more alarming of two norms: NaN, then infinity, then the larger."""
    if math.isnan(a) or math.isnan(b):
        return math.nan
    return max(a, b)


@dataclass(slots=True)
class Template:
    """One line shape: its text with each number a wildcard and each white-space run ``\\s+``.

    Attributes:
        regex: the compiled shape; only the numbers in the plan are capturing groups.
        plan: ``(slot, group index in m.groups(), how)`` for each field read (``how``: INT, FLOAT,
            WORST).
        base: the result every line of the shape starts from (shape-wide facts in their slots).
        hits: lines read through this template.
    """

    regex: re.Pattern[str]
    plan: tuple[tuple[int, int, int], ...]
    base: list[Any]
    hits: int = 0

    @classmethod
    def build(
        cls, line: str, spans: Sequence[tuple[int, tuple[int, int], int]], base: list[Any]
    ) -> Template | None:
        """The template of ``line``, or None when a field's span is not one number token."""
        used = {span for _, span, _ in spans}
        parts: list[str] = []
        groups: dict[tuple[int, int], int] = {}
        pos = 0
        for m in TOKEN_RE.finditer(line):
            parts.append(re.escape(line[pos : m.start()]))
            num = m.group("num")
            if num is None:
                parts.append(r"\s++")
                pos = m.end()
                continue
            wild = INT_WILD if num.isdigit() else NONINT_WILD
            if m.span() in used:
                groups[m.span()] = len(groups)
                parts.append(f"({wild})")
            else:
                parts.append(f"(?:{wild})")
            pos = m.end()
        parts.append(re.escape(line[pos:]))
        if len(groups) != len(used):
            return None
        plan = tuple((slot, groups[span], how) for slot, span, how in spans)
        try:
            return cls(re.compile("".join(parts)), plan, base)
        except (re.error, RecursionError, OverflowError):  # pathological lines: no fast path
            return None

    def read(self, m: re.Match[str]) -> list[Any] | None:
        """The fields of a matching line, or None when a counter group is not a plain integer."""
        vals = self.base.copy()
        texts = m.groups()
        for slot, g, how in self.plan:
            text = texts[g]
            if how == FLOAT:
                vals[slot] = float(text)  # WILD only holds float()-readable numbers
            elif how == INT:
                if not text.isdigit():
                    return None
                vals[slot] = int(text)
            else:
                old = vals[slot]
                vals[slot] = float(text) if old is None else worse(old, float(text))
        self.hits += 1
        return vals


class LineShapes:
    """The templates of one file, most recently used first (see the module docstring).

    Building stops on a log whose lines rarely repeat a shape (after 256 templates built, fewer than
    4 lines read per template), so such a log costs one full read per line and no more.
    """

    def __init__(self) -> None:
        self.templates: list[Template] = []
        self.building = True
        self.builds = 0
        self.hits = 0

    def match(self, line: str) -> list[Any] | None:
        """The fields of ``line`` when a known shape matches it, else None."""
        templates = self.templates
        for i, tpl in enumerate(templates):
            m = tpl.regex.fullmatch(line)
            if m is not None:
                vals = tpl.read(m)
                if vals is not None:
                    self.hits += 1
                    if i:
                        templates.insert(0, templates.pop(i))
                return vals
        return None

    def learn(self, line: str, spans: Sequence[tuple[int, tuple[int, int], int]], base: list[Any]) -> None:
        """Remember the shape of ``line`` (read in full) with where its fields are."""
        if not self.building:
            return
        self.builds += 1
        if self.builds > 256 and self.hits < 4 * self.builds:
            self.building = False
            return
        tpl = Template.build(line, spans, base)
        if tpl is not None:
            self.templates.insert(0, tpl)
            del self.templates[MAX_TEMPLATES:]
