"""Writing output files so that a failed write (full disk, size limit, interruption) never leaves a
truncated file in place of a good one: write a temporary file beside the target, then rename it."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on a temporary path in ``path``'s directory, then replace ``path`` with it.

    Raises:
        OSError: from ``write`` or the rename; the temporary file is removed and ``path`` is unchanged.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """:func:`write_atomic` for a UTF-8 text file."""
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
