"""``gradsentry run SCRIPT.py [ARGS]...``: run an unmodified training script with a Monitor attached."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import typer

from gradsentry.cli import EXIT_FOUND, EXIT_USAGE

DEFAULT_DIR = "gradsentry-runs"
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("", "0", "false", "no", "off")


class SettingsError(ValueError):
    """An option or ``GRADSENTRY_*`` variable has a value that cannot be used (one-line message)."""


def settings(
    environ: Mapping[str, str], every: int | None, out_dir: Path | None, stop_on: str | None
) -> tuple[bool, int, Path]:
    """``(disabled, every, directory)`` from the options, else the environment, else the defaults.

    Raises:
        SettingsError: a value that is not valid, named with what was expected.
    """
    flag = environ.get("GRADSENTRY_DISABLE", "").strip().lower()
    if flag not in TRUE_WORDS + FALSE_WORDS:
        raise SettingsError(f"GRADSENTRY_DISABLE must be 1/true/yes/on or 0/false/no/off, got {flag!r}")
    if every is None and environ.get("GRADSENTRY_EVERY", "").strip():
        text = environ["GRADSENTRY_EVERY"].strip()
        try:
            every = int(text)
        except ValueError:
            raise SettingsError(f"GRADSENTRY_EVERY must be an integer >= 1, got {text!r}") from None
        if every < 1:
            raise SettingsError(f"GRADSENTRY_EVERY must be an integer >= 1, got {text!r}")
    if every is not None and every < 1:
        raise SettingsError(f"--every must be an integer >= 1, got {every}")
    if stop_on not in (None, "nonfinite"):
        raise SettingsError(f"--stop-on must be 'nonfinite', got {stop_on!r}")
    directory = out_dir or Path(environ.get("GRADSENTRY_DIR", "").strip() or DEFAULT_DIR)
    return flag in TRUE_WORDS, every or 1, directory


def dir_label(environ: Mapping[str, str], out_dir: Path | None, directory: Path) -> str:
    """The run folder as an error message names it, with where it came from: ``--dir X``,
    ``GRADSENTRY_DIR=X`` or the default."""
    if out_dir is not None:
        return f"--dir {directory}"
    if environ.get("GRADSENTRY_DIR", "").strip():
        return f"GRADSENTRY_DIR={directory}"
    return f"{directory} (the default run folder; set --dir or GRADSENTRY_DIR to use another)"


def make_run_dir(directory: Path, label: str) -> None:
    """Create ``directory`` (and its parents) if needed.

    Raises:
        SettingsError: it cannot be created (a file of that name, no permission...); the message names
            it by ``label`` (see :func:`dir_label`), so with the option or variable it came from.
    """
    if directory.exists() and not directory.is_dir():
        raise SettingsError(f"{label} is a file, not a folder: cannot write the run there")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SettingsError(f"cannot create {label}: {exc.strerror or exc}") from None


def new_log_path(directory: Path, stem: str) -> Path:
    """``directory/<stem>-<YYYYmmdd-HHMMSS>.jsonl``, with ``-2``, ``-3``... when that file exists."""
    import time

    base = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = directory / f"{base}.jsonl", 1
    while path.exists():
        n += 1
        path = directory / f"{base}-{n}.jsonl"
    return path


def register(app: typer.Typer) -> None:
    """Add the ``run`` subcommand to ``app``."""

    @app.command("run", context_settings={"allow_interspersed_args": False, "ignore_unknown_options": True})
    def run(
        script: str = typer.Argument(..., metavar="SCRIPT.py", help="the training script, run unmodified"),
        args: list[str] | None = typer.Argument(None, metavar="[ARGS]...", help="the script's own arguments"),
        every: int | None = typer.Option(
            None, "--every", help="log every N-th optimizer step (env GRADSENTRY_EVERY; default 1)"
        ),
        out_dir: Path | None = typer.Option(
            None, "--dir", help=f"folder of the JSONL run (env GRADSENTRY_DIR; default {DEFAULT_DIR})"
        ),
        stop_on: str | None = typer.Option(
            None,
            "--stop-on",
            help="nonfinite: stop the script at the first NaN/inf step, before it is applied",
        ),
    ) -> None:
        """Run SCRIPT.py as `python SCRIPT.py ARGS...` with a Monitor on the model its first optimizer
        steps, write `DIR/<script>-<time>.jsonl`, and print the findings at the end (on stderr).

        Statistics are taken just before each optimizer.step(): after the script's own clipping, if it
        clips. GRADSENTRY_DISABLE=1 runs the script untouched. Options go before SCRIPT.py; everything
        after it is the script's.

        Exit code: the script's own (SystemExit code; 1 after an uncaught exception, its traceback on
        stderr); 1 when --stop-on stopped it; 2: bad options or a missing script.

        Examples: gradsentry run train.py --lr 3e-4; GRADSENTRY_EVERY=10 gradsentry run --dir runs train.py
        """
        import os
        import sys

        from rich.console import Console
        from rich.text import Text

        from gradsentry.runscript import ScriptOutcome, run_script

        err = Console(stderr=True, soft_wrap=True)

        def fail(message: str) -> typer.Exit:
            err.print(Text.assemble(("error: ", "red"), message), highlight=False)
            return typer.Exit(EXIT_USAGE)

        try:
            disabled, n, directory = settings(os.environ, every, out_dir, stop_on)
        except SettingsError as exc:
            raise fail(str(exc)) from None
        path = Path(script)
        if script.strip() and path.is_dir():
            raise fail(
                f"{script!r} is a directory, not a script: give the training script, e.g. {script}/train.py"
            )
        if not script.strip() or not path.is_file():
            raise fail(f"{script!r}: no such script file")
        if disabled:
            untouched = run_script(path, args or [])
            sys.stderr.write(untouched.stderr)
            raise typer.Exit(untouched.exit_code)

        from gradsentry.autoattach import AutoMonitor, StopRun

        try:
            make_run_dir(directory, dir_label(os.environ, out_dir, directory))
        except SettingsError as exc:
            raise fail(str(exc)) from None
        log_path = new_log_path(directory, path.stem)
        stopped: StopRun | None = None
        outcome: ScriptOutcome | None = None
        with AutoMonitor(
            log_path, every=n, stop_on_nonfinite=stop_on is not None, meta={"script": path.name}
        ) as auto:
            try:
                outcome = run_script(path, args or [])
            except StopRun as exc:
                stopped = exc
        if outcome is not None:
            sys.stderr.write(outcome.stderr)
            sys.stderr.flush()
        _summary(err, auto, log_path, stopped, outcome.exit_code if outcome is not None else None)
        raise typer.Exit(EXIT_FOUND if outcome is None else outcome.exit_code)


def _summary(err: object, auto: object, log_path: Path, stopped: object, code: int | None) -> None:
    """Print what was monitored, where the log is and the findings (reusing analyze's table) to stderr."""
    from rich.console import Console
    from rich.text import Text

    from gradsentry.autoattach import AutoMonitor, StopRun
    from gradsentry.cli.render import findings_view

    assert isinstance(err, Console) and isinstance(auto, AutoMonitor)
    head = Text("gradsentry run: ", style="bold")
    if isinstance(stopped, StopRun):
        step = stopped.finding.steps[0] if stopped.finding.steps else "?"
        head.append(
            f"stopped the script at step {step}, before the optimizer applied NaN/inf gradients", "red"
        )
    else:
        head.append(f"the script exited with code {code}")
    err.print(head)
    for note in auto.notes:
        err.print(Text(f"note: {note}", style="dim"), highlight=False)
    mon = auto.monitor
    if mon is None:
        err.print(Text("nothing was monitored (no optimizer step reached a model)", style="yellow"))
        return
    err.print(
        f"{mon.step_count} optimizer steps, {len(mon.records)} logged -> {log_path}",
        highlight=False,
        markup=False,
    )
    err.print(findings_view(mon.diagnose()))
