"""Run a Python script in this process as ``python script.py args...`` would, and report how it ended."""

from __future__ import annotations

import os
import runpy
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ScriptOutcome", "run_script"]


@dataclass(frozen=True)
class ScriptOutcome:
    """How a script ended.

    Attributes:
        exit_code: what ``python script.py`` would exit with: 0 when it ran to its end, ``SystemExit``'s
            code (None: 0; a non-integer: 1, its text in ``stderr``), 1 after an uncaught exception,
            130 after ``KeyboardInterrupt``.
        stderr: the text Python would print on the way out (the traceback, starting at the script's
            own frames, or a ``SystemExit`` message), empty when none.
    """

    exit_code: int
    stderr: str = ""


def _traceback(exc: BaseException, script: Path) -> str:
    """The traceback as Python prints it for ``python script.py``: the runner's frames left out."""
    tb = exc.__traceback__
    while tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve() != script:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb or exc.__traceback__))


def run_script(path: str | os.PathLike[str], args: Sequence[str] = ()) -> ScriptOutcome:
    """Run ``path`` as ``__main__`` with ``sys.argv = [path, *args]`` and the script's folder first on
    ``sys.path`` (as ``python path args...`` does); both are restored afterwards.

    Exceptions other than ``SystemExit``, ``KeyboardInterrupt`` and ``Exception`` subclasses (e.g. a
    ``BaseException`` a hook raises to stop the script) propagate.

    Raises:
        FileNotFoundError: ``path`` is not a file.
    """
    script = Path(path)
    if not script.is_file():
        raise FileNotFoundError(f"{script}: no such file")
    resolved = script.resolve()
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    sys.argv = [str(script), *args]
    sys.path[:1] = [str(resolved.parent)]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        code = exc.code
        if code is None:
            return ScriptOutcome(0)
        if isinstance(code, int):
            return ScriptOutcome(code)
        return ScriptOutcome(1, f"{code}\n")
    except KeyboardInterrupt as exc:
        return ScriptOutcome(130, _traceback(exc, resolved))
    except Exception as exc:
        return ScriptOutcome(1, _traceback(exc, resolved))
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    return ScriptOutcome(0)
