"""The ``gradsentry`` command: a thin shell over the library.

Each subcommand lives in its own module (``cli/lab.py``, ``cli/check.py``, ...) exposing
``register(app)``, and imports what it needs (PyTorch, the library's modules) inside its command
function, so that ``gradsentry --help`` and ``--version`` import neither PyTorch nor NumPy. Exit codes:
0 success, 1 a problem was found that the user asked about, 2 bad usage, unreadable input or a missing
optional dependency (one line naming the pip command, see ``gradsentry._extras``).
"""

from __future__ import annotations

import sys

import typer

from gradsentry._extras import MissingExtraError
from gradsentry._version import __version__

EXIT_OK = 0
EXIT_FOUND = 1
EXIT_USAGE = 2


def _short(name: object, limit: int = 120) -> str:
    """A file name for a one-line message: a very long one keeps its start and end."""
    text = str(name)
    return text if len(text) <= limit else f"{text[: limit - 30]}...{text[-25:]} ({len(text)} characters)"


def input_error(exc: BaseException) -> str:
    """One line saying what was wrong with the input, for an error no command caught itself: a JSON
    nested too deeply to parse, a file that cannot be opened (a symlink loop, a name too long, no
    permission, a directory where a file was expected) or text that is not UTF-8."""
    if isinstance(exc, RecursionError):
        return "the input is nested too deeply to be a training log (JSON nesting beyond Python's recursion limit)"
    if isinstance(exc, OSError):
        what = exc.strerror or str(exc) or type(exc).__name__
        where = f"{_short(exc.filename)}: " if exc.filename is not None else ""
        return f"{where}{what}".rstrip(".")
    return f"the input is not readable text ({_short(exc, 200)})"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"gradsentry {__version__}")
        raise typer.Exit(EXIT_OK)


def build_app() -> typer.Typer:
    """Create the Typer application with every subcommand registered."""
    app = typer.Typer(
        name="gradsentry",
        help="Find, explain and fix vanishing and exploding gradients in PyTorch training.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode="markdown",
        context_settings={"help_option_names": ["-h", "--help"]},
    )

    @app.callback()
    def _root(
        version: bool = typer.Option(
            False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ) -> None:
        """Find, explain and fix vanishing and exploding gradients in PyTorch training."""

    from gradsentry.cli import subcommands

    for register in subcommands.REGISTRY:
        register(app)
    return app


def main(argv: list[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default ``sys.argv[1:]``) and return the exit code.

    Usage errors (unknown option, bad value) print click's usage message and return 2; so does a
    missing optional dependency, with one line: ``error: the lab needs scikit-learn: pip install
    'gradsentry[lab]'``.
    """
    app = build_app()
    try:
        rv = app(
            args=argv if argv is not None else sys.argv[1:], prog_name="gradsentry", standalone_mode=True
        )
    except MissingExtraError as exc:  # an optional dependency this command needs is not installed
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_USAGE
    except (RecursionError, OSError, UnicodeError) as exc:  # bad input that slipped past a command's checks
        sys.stderr.write(f"error: {input_error(exc)}\n")
        return EXIT_USAGE
    except SystemExit as exc:
        code = exc.code
        if code is None:
            return EXIT_OK
        if isinstance(code, int):
            return code
        sys.stderr.write(f"{code}\n")
        return EXIT_USAGE
    return int(rv) if isinstance(rv, int) else EXIT_OK
