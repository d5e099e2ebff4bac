"""``gradsentry analyze PATH``: find exploding/vanishing gradients in another tool's training log."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from gradsentry.cli import EXIT_FOUND, EXIT_OK, EXIT_USAGE
from gradsentry.records import dumps

if TYPE_CHECKING:
    from rich.console import Console

    from gradsentry.analyze import LogAnalysis

FORMAT_HELP = "auto | hf | tensorboard | csv | mmengine | jsonl | hf-console | mmengine-text | megatron | keras | tqdm | steps"
"""The formats of ``gradsentry.logs.registry.FORMATS`` (a test keeps them equal; kept literal so that
``--help`` does not import the readers)."""


def register(app: typer.Typer) -> None:
    """Add the ``analyze`` subcommand to ``app``."""

    @app.command("analyze")
    def analyze(
        path_arg: str = typer.Argument(
            ...,
            metavar="path",
            help="trainer_state.json, TensorBoard run dir/event file, metrics.csv, "
            "vis_data/scalars.json, a gradsentry .jsonl or a console text log (HF, mmengine, Megatron, "
            "step lines, tqdm, Keras)",
        ),
        format: str = typer.Option("auto", "--format", "-f", help=FORMAT_HELP),
        grad_tag: str | None = typer.Option(None, "--grad-tag", help="tag/column/key of the gradient norm"),
        loss_tag: str | None = typer.Option(None, "--loss-tag", help="tag/column/key of the training loss"),
        lr_tag: str | None = typer.Option(None, "--lr-tag", help="tag/column/key of the learning rate"),
        as_json: bool = typer.Option(False, "--json", help="print the analysis as JSON (for machines)"),
        plot: Path | None = typer.Option(
            None, "--plot", help="write a plot: FILE.png, FILE.svg or FILE.html"
        ),
    ) -> None:
        """Read a finished (or crashed) run's log and report exploding, vanishing and non-finite gradients.

        Exit code 0: healthy; 1: a problem was found; 2: unreadable or unrecognised input.

        Examples: gradsentry analyze out/checkpoint-500/trainer_state.json;
        gradsentry analyze lightning_logs/version_0 --grad-tag grad_2.0_norm_total --plot run.png;
        gradsentry analyze train.log  (a console log: HF dict lines, mmengine, Megatron, step lines)
        """
        from rich.console import Console
        from rich.text import Text

        from gradsentry.analyze import analyze_log
        from gradsentry.logs import FORMATS, LogFormatError
        from gradsentry.report.series_plot import PLOT_SUFFIXES

        err = Console(stderr=True, soft_wrap=True)
        if not path_arg.strip():  # Path("") would be the current directory
            err.print(Text.assemble(("error: ", "red"), "PATH is empty: give a log file or run directory"))
            raise typer.Exit(EXIT_USAGE)
        path = Path(path_arg)
        if path.is_symlink() and not path.exists():
            err.print(
                Text.assemble(
                    ("error: ", "red"), f"{path_arg[:200]!r} is a broken symlink or a symlink loop"
                ),
                highlight=False,
            )
            raise typer.Exit(EXIT_USAGE)
        if path.exists() and not (path.is_file() or path.is_dir()):
            err.print(Text.assemble(("error: ", "red"), f"{path_arg!r} is not a regular file or a directory"))
            raise typer.Exit(EXIT_USAGE)
        if format not in FORMATS:
            err.print(
                Text.assemble(
                    ("error: ", "red"), f"--format must be one of {', '.join(FORMATS)}, got {format!r}"
                )
            )
            raise typer.Exit(EXIT_USAGE)
        if plot is not None and plot.suffix.lower() not in PLOT_SUFFIXES:
            err.print(
                Text.assemble(
                    ("error: ", "red"),
                    f"--plot file must end in {', '.join(PLOT_SUFFIXES)}, got {plot.name!r}",
                )
            )
            raise typer.Exit(EXIT_USAGE)
        tags = {k: v for k, v in (("grad_norm", grad_tag), ("loss", loss_tag), ("lr", lr_tag)) if v}
        try:
            result = analyze_log(path, format=format, tags=tags)
        except (FileNotFoundError, LogFormatError, IsADirectoryError, PermissionError) as exc:
            err.print(Text.assemble(("error: ", "red"), str(exc)), highlight=False)
            raise typer.Exit(EXIT_USAGE) from None
        if plot is not None:
            from gradsentry.report.series_plot import plot_series

            try:
                plot_series(result.series, result.findings, plot)
            except OSError as exc:
                err.print(
                    Text.assemble(("error: ", "red"), f"cannot write --plot {plot}: {exc}"), highlight=False
                )
                raise typer.Exit(EXIT_USAGE) from None
        if as_json:
            typer.echo(dumps(result.to_dict(), strict=True, indent=1))
        else:
            _print_summary(result, Console(), plot)
        raise typer.Exit(EXIT_OK if result.healthy else EXIT_FOUND)


def _print_summary(result: LogAnalysis, console: Console, plot: Path | None) -> None:
    from rich.text import Text

    from gradsentry.analyze import unhide_nonfinite_loss
    from gradsentry.cli.render import findings_view, series_row

    s = unhide_nonfinite_loss(result.series)  # hidden NaN losses shown as '!', not as 0.0
    console.print(Text.assemble(("gradsentry analyze ", "bold"), (s.path, ""), (f"  [{s.source}]", "dim")))
    console.print(
        f"{len(s)} logged steps ({s.steps[0]}..{s.steps[-1]}); fields: "
        + ", ".join(f"{k}={v}" for k, v in s.fields.items()),
        highlight=False,
        markup=False,
    )
    for name, log in (("grad_norm", True), ("loss", False)):
        if s.has(name):  # type: ignore[arg-type]
            width = max(10, min(60, console.width - 32))
            console.print(series_row(name, list(getattr(s, name)), width, log=log))
        else:
            console.print(Text.assemble((f"{name:>9} ", "bold"), ("not logged", "yellow")))
    for note in s.notes:
        console.print(Text(f"note: {note}", style="dim"))
    console.print(findings_view(result.findings))
    if plot is not None:
        console.print(f"plot written to {plot}", highlight=False, markup=False)
