"""Golden files: every text output compared with a file under ``tests/golden/``.

``pytest --update-golden`` rewrites the files from the current outputs (review the diff, then commit).
Outputs are normalized first: temporary paths become ``<tmp>`` and wall times (``1.2 s``) ``<time>``,
the only parts that change from run to run, and floats printed with their full repr are rounded to 9
significant digits (their last digits depend on the BLAS and libm builds, not on gradsentry).
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

import pytest

GOLDEN = Path(__file__).with_name("golden")

_TIME = re.compile(r"\b\d+(?:\.\d+)? ?s\b|\b\d+:\d\d:\d\d\b")
# A float written with its full repr: the last digits follow the BLAS/libm build, not the code.
_LONG_FLOAT = re.compile(r"-?\d+\.\d{9,}(?:e[+-]?\d+)?")


def _round_float(match: re.Match[str]) -> str:
    return f"{float(match.group()):.9g}"


def normalize(text: str, *paths: Path | str, squeeze: bool = False) -> str:
    """Replace the given paths by ``<tmp>`` and wall times by ``<time>``; strip trailing spaces.

    ``squeeze``: also collapse runs of spaces and of horizontal box-drawing characters, for a table whose
    column widths follow a varying wall time."""
    for p in sorted((str(p) for p in paths), key=len, reverse=True):
        text = text.replace(p, "<tmp>")
    text = _TIME.sub("<time>", text)
    text = _LONG_FLOAT.sub(_round_float, text)
    if squeeze:
        text = re.sub(r"([ ━─])\1+", r"\1", text)
    return "\n".join(line.rstrip() for line in text.splitlines()) + "\n"


def assert_golden(request: pytest.FixtureRequest, name: str, text: str) -> None:
    """Compare ``text`` with ``tests/golden/<name>``; rewrite the file under ``--update-golden``."""
    path = GOLDEN / name
    if request.config.getoption("--update-golden"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return
    if not path.exists():
        pytest.fail(f"no golden file {path}; create it with: pytest --update-golden {request.node.nodeid}")
    expected = path.read_text(encoding="utf-8")
    if text != expected:
        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(keepends=True), text.splitlines(keepends=True), "golden", "now"
            )
        )
        pytest.fail(f"{name} differs from its golden file (pytest --update-golden to accept):\n{diff}")
