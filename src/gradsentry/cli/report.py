"""``gradsentry report``: render the HTML report of a logged run (or re-render a lab's results.json)."""

from __future__ import annotations

from pathlib import Path

import typer

from gradsentry.cli import EXIT_OK, EXIT_USAGE


def register(app: typer.Typer) -> None:
    """Add the ``report`` subcommand to ``app``."""

    @app.command("report")
    def report(
        path: Path = typer.Argument(
            ...,
            help="A gradsentry JSONL run (JsonlSink, the callbacks, gradsentry lab's `runs/*.jsonl`) "
            "or a lab results.json.",
        ),
        out: Path | None = typer.Option(
            None,
            "--out",
            "-o",
            help="HTML file to write (default: next to the input, with the suffix .html).",
        ),
    ) -> None:
        """Render a logged run (or a lab's results.json) as a self-contained HTML report.

        The report shows gradient flow over depth and over time, a heat map of layer x step log
        gradient norm, and the findings with their evidence and remedies.

        Exit code 0: written; 2: unreadable or malformed input, a run without a step record (as
        `analyze` says), or the output cannot be written.

        Example: gradsentry report gradsentry-lab/runs/sigmoid_default.jsonl --out sigmoid.html
        """
        from rich.console import Console
        from rich.text import Text

        from gradsentry._io import write_text_atomic
        from gradsentry.logs.run_jsonl import LogFormatError, scan_jsonl
        from gradsentry.records import Run
        from gradsentry.report.html import render_lab_report, render_run_report

        err = Console(stderr=True, soft_wrap=True)

        def fail(message: str) -> typer.Exit:
            err.print(Text.assemble(("error: ", "red"), message), highlight=False)
            return typer.Exit(EXIT_USAGE)

        if not path.name or path.is_dir():
            raise fail(f"{str(path)!r} is not a file: give a gradsentry .jsonl run or a lab results.json")
        if path.exists() and not path.is_file():
            raise fail(f"{str(path)!r} is not a regular file")
        target = out if out is not None else path.with_suffix(".html")
        if target.suffix.lower() not in (".html", ".htm"):
            raise fail(f"--out must end in .html (the report is an HTML page), got {target.name!r}")
        try:
            same = target.resolve() == path.resolve()
        except (RuntimeError, OSError) as exc:  # a symlink loop (RuntimeError before Python 3.13), ELOOP
            raise fail(f"{str(path)[:200]!r} cannot be resolved: {exc}") from None
        if same:
            raise fail(f"--out {str(target)!r} would overwrite the input; choose another file")
        lab_result = run = signals = None
        try:
            if path.suffix == ".json":
                from gradsentry.lab.results import read_results

                lab_result = read_results(path)
            else:  # one bounded pass: a long run keeps its last records, a sample and its series
                scanned = scan_jsonl(path)
                kept = sorted(scanned.records, key=lambda r: r.step)
                run = Run(header=scanned.header, records=kept, findings=scanned.findings)
                signals = scanned.signals() if scanned.history.absorbed else None
        except FileNotFoundError:
            raise fail(f"{path}: no such file") from None
        except (LogFormatError, ValueError, KeyError, TypeError) as exc:
            raise fail(f"{path}: not a readable gradsentry run: {exc}") from None
        except OSError as exc:
            raise fail(f"{path}: cannot read ({exc.strerror or exc})") from None
        if run is not None and not run.records:  # a header only: analyze's verdict on it, the same exit
            from gradsentry.logs.series import no_values_message

            raise fail(no_values_message(path, "jsonl"))
        html = (
            render_lab_report(lab_result)
            if lab_result is not None
            else render_run_report(run, signals=signals)  # type: ignore[arg-type]
        )
        blocking = next((d for d in (target.parent, *target.parent.parents) if d.exists()), None)
        if blocking is not None and not blocking.is_dir():
            raise fail(f"cannot write {str(target)!r}: {str(blocking)!r} is a file, not a directory")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(target, html)
        except OSError as exc:
            raise fail(f"cannot write {str(target)!r}: {exc.strerror or exc}") from None
        Console().print(Text.assemble("Report: ", (str(target), "bold")))
        raise typer.Exit(EXIT_OK)
