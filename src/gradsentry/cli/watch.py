"""``gradsentry watch RUN.jsonl``: a live view of a running job's JSONL log."""

from __future__ import annotations

import os

import typer

from gradsentry.cli import EXIT_FOUND, EXIT_OK, EXIT_USAGE


def register(app: typer.Typer) -> None:
    """Add the ``watch`` subcommand to ``app``."""

    @app.command("watch")
    def watch(
        path: str = typer.Argument(
            ..., metavar="RUN.jsonl", help="a JSONL run a Monitor is writing (JsonlSink)"
        ),
        interval: float = typer.Option(1.0, "--interval", "-i", help="seconds between refreshes (> 0)"),
        once: bool = typer.Option(
            False, "--once", help="draw one frame and exit: 1 if a finding is an error, else 0 (never waits)"
        ),
        no_wait: bool = typer.Option(False, "--no-wait", help="exit 2 if the file does not exist yet"),
        top: int = typer.Option(
            5, "--top", "-k", help="layers shown at each end of the gradient-norm ranking"
        ),
    ) -> None:
        """Follow a run's JSONL file as it grows: global norm and loss, the largest and smallest layer
        gradients, and the findings as they appear. Ctrl-C stops (exit 0).

        Each refresh reads only the complete lines appended since the last one; the findings are
        re-judged by the Monitor's rules when new steps arrived, at most ~20 % of one core.

        Exit code 0: stopped with Ctrl-C, or --once found no error; 1: --once found an error finding;
        2: bad options, a missing file with --no-wait or --once, or a file that is not a gradsentry run.

        Examples: gradsentry watch runs/train.jsonl; gradsentry watch runs/train.jsonl --once
        """
        import time

        from rich.console import Console
        from rich.live import Live
        from rich.text import Text

        from gradsentry.cli.watch_view import frame, waiting_frame
        from gradsentry.logs.errors import LogFormatError
        from gradsentry.logs.follow import JsonlFollower

        err = Console(stderr=True, soft_wrap=True)

        def fail(message: str) -> typer.Exit:
            err.print(Text.assemble(("error: ", "red"), message), highlight=False)
            return typer.Exit(EXIT_USAGE)

        if not path.strip():
            raise fail("RUN.jsonl is empty: give the path of a JSONL run")
        if not interval > 0 or interval != interval:
            raise fail(f"--interval must be a number of seconds > 0, got {interval}")
        if top < 1:
            raise fail(f"--top must be >= 1, got {top}")
        console = Console()
        follower = JsonlFollower(path)
        started = time.monotonic()

        def poll() -> bool:
            """Read what was appended; False while the file does not exist."""
            try:
                follower.poll()
            except FileNotFoundError:
                return False
            except (LogFormatError, PermissionError, IsADirectoryError) as exc:
                raise fail(str(exc)) from None
            return True

        if (once or no_wait) and not poll():
            raise fail(f"{path}: no such file")
        if once:
            if not follower.started:
                size = os.path.getsize(path)
                state = (
                    "empty file" if size == 0 else f"{size} bytes and no complete line (a header cut short?)"
                )
                raise fail(f"{path}: {state}, no gradsentry header line yet")
            findings = follower.findings()
            console.print(frame(follower, findings, top=top, width=console.width, started=started))
            raise typer.Exit(EXIT_FOUND if any(f.severity == "error" for f in findings) else EXIT_OK)
        try:
            with Live(console=console, auto_refresh=False, transient=False) as live:
                while True:
                    if not poll():
                        live.update(waiting_frame(path, f"waiting for {path} to appear"), refresh=True)
                    else:
                        view = frame(
                            follower, follower.findings(), top=top, width=console.width, started=started
                        )
                        live.update(view, refresh=True)
                    time.sleep(interval)
        except KeyboardInterrupt:  # Live has stopped and shown the cursor again
            raise typer.Exit(EXIT_OK) from None
