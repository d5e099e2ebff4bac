"""Writing output files so that a failed write (full disk, size limit, interruption) never leaves a
truncated file in place of a good one: write a temporary file beside the target, then rename it. And the
type checks of the path and tag arguments of the readers' public functions."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def check_path(value: Any, where: str) -> Path:
    """``value`` as a :class:`Path`, for the argument ``where`` (e.g. ``"analyze_log(path=...)"``).

    Raises:
        TypeError: ``value`` is not a ``str`` or an ``os.PathLike`` (None, a number, bytes, a list...).
    """
    if isinstance(value, str) or (isinstance(value, os.PathLike) and isinstance(os.fspath(value), str)):
        return Path(value)
    raise TypeError(f"{where} expects a file path (a str or pathlib.Path), got {type(value).__name__}")


def check_tags(tags: Any, where: str) -> None:
    """Checks ``tags``: None or a mapping of names (``"loss"``, ``"grad_norm"``, ``"lr"``) to strings.

    Raises:
        TypeError: ``tags`` is neither None nor a mapping of str to str (or None).
    """
    if tags is None:
        return
    if not isinstance(tags, Mapping) or not all(
        isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in tags.items()
    ):
        raise TypeError(
            f"{where} expects None or a dict such as {{'loss': 'train/loss', 'grad_norm': 'grad_norm'}}, "
            f"got {type(tags).__name__}"
        )


def write_atomic(path: Path, write: Callable[[Path], object], *, durable: bool = False) -> None:
    """Call ``write(tmp)`` on a temporary path in ``path``'s directory, then replace ``path`` with it.

    Args:
        path: the target.
        write: writes the whole file at the path it is given.
        durable: ``fsync`` the temporary file before the rename and the directory after it, so that
            after a machine crash ``path`` holds either the old or the new content, complete (without
            it the rename may reach the disk before the data: an empty or partial file under the name).

    Raises:
        OSError: from ``write``, the ``fsync`` or the rename; the temporary file is removed and ``path``
            is unchanged.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a directory: nothing to sync there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def stale_temp_files(directory: Path, name_glob: str) -> list[Path]:
    """Temporary files of :func:`write_atomic` in ``directory`` (targets matching ``name_glob``) left by
    a write that was killed: those whose process is gone (or is this one, which holds no write open)."""
    out = []
    for tmp in directory.glob(f".{name_glob}.*.tmp"):
        try:
            pid = int(tmp.name.rsplit(".", 2)[-2])
        except ValueError:
            continue
        if pid == os.getpid() or not _alive(pid):
            out.append(tmp)
    return out


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # another user's process, or no way to tell: leave its file
        return True
    return True


def write_text_atomic(path: Path, text: str) -> None:
    """:func:`write_atomic` for a UTF-8 text file."""
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
