"""``gradsentry check TARGET``: catch vanishing/exploding gradients at initialization, before training."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import typer

from gradsentry.cli import EXIT_FOUND, EXIT_OK, EXIT_USAGE

if TYPE_CHECKING:
    from gradsentry.check import FixName, LossName


def _parse_shape(text: str) -> list[int]:
    try:
        shape = [int(part) for part in text.replace("x", ",").split(",")]
    except ValueError:
        shape = []
    if not shape or any(s < 1 for s in shape):
        raise ValueError(
            f"--input-shape must be positive integers separated by commas (e.g. 64 or 3,32,32), got {text!r}"
        )
    return shape


def register(app: typer.Typer) -> None:
    """Add the ``check`` subcommand to ``app``."""

    @app.command("check")
    def check(
        target: str = typer.Argument(
            ...,
            help="path/to/file.py:factory or package.module:factory returning an nn.Module. "
            "This imports and runs your code, by design: only check code you trust.",
        ),
        input_shape: str | None = typer.Option(
            None,
            "--input-shape",
            help="per-example input shape, e.g. 64 or 3,32,32 "
            "(token ids if the model starts with an Embedding)",
        ),
        batch: int = typer.Option(32, "--batch", help="batch size"),
        data: str | None = typer.Option(
            None,
            "--data",
            help="'digits': a real batch from scikit-learn's "
            "bundled digits (64 features in [0, 1], 10 classes)",
        ),
        loss: str = typer.Option("ce", "--loss", help="ce | mse | sum"),
        seed: int = typer.Option(
            0, "--seed", min=0, max=2**32 - 1, help="seeds the model's init, the batch and the targets"
        ),
        as_json: bool = typer.Option(
            False,
            "--json",
            help='print the report as strict JSON (for machines); NaN/inf are the strings "NaN", "Infinity", '
            '"-Infinity", as in analyze --json',
        ),
        fix: str | None = typer.Option(
            None,
            "--fix",
            help="he | xavier | xavier_gain | lsuv: re-initialise (xavier: Glorot & Bengio's gain-1 uniform init; xavier_gain: times the activation's gain), then check again and show the table after the fix",
        ),
    ) -> None:
        """One forward and backward pass at init: per-layer gradient table, mean-field prediction, findings.

        Exit codes: 0 healthy; 1 vanishing, exploding or NaN/inf gradients (after --fix when given);
        2 bad usage, a TARGET that does not import or return a Module, or an input that does not fit.

        Examples: gradsentry check model.py:build --input-shape 3,32,32 ;
        gradsentry check mypkg.models:make_mlp --data digits --fix lsuv
        """
        import torch
        from rich.console import Console
        from rich.text import Text

        from gradsentry.check import FIXES, LOSSES, InputFitError, check_model, digits_batch
        from gradsentry.cli.targets import TargetError, load_model
        from gradsentry.report.views import check_renderable

        err = Console(stderr=True, soft_wrap=True)

        def fail(message: str) -> typer.Exit:
            err.print(Text.assemble(("error: ", "red"), message), highlight=False)
            return typer.Exit(EXIT_USAGE)

        if not target.strip():
            raise fail("TARGET is empty: give path/to/file.py:factory or package.module:factory")
        if loss not in LOSSES:
            raise fail(f"--loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        if fix is not None and fix not in FIXES:
            raise fail(f"--fix must be one of {', '.join(FIXES)}, got {fix!r}")
        if data is not None and data != "digits":
            raise fail(f"--data must be 'digits', got {data!r}")
        if data is None and input_shape is None:
            raise fail("give --input-shape (e.g. 64 or 3,32,32) or --data digits")
        loss_name = cast("LossName", loss)
        fix_name = cast("FixName | None", fix)
        try:
            shape = _parse_shape(input_shape) if input_shape is not None else None
            if batch < 1:
                raise ValueError(f"--batch must be >= 1, got {batch}")
            torch.manual_seed(seed)
            model = load_model(target)
            if data == "digits":
                x, y = digits_batch(batch, seed)
                if shape is not None and shape != [64]:
                    raise ValueError(
                        f"--data digits gives 64 features per example, not --input-shape {shape}"
                    )
                report = check_model(
                    model,
                    x,
                    targets=y if loss == "ce" else None,
                    loss=loss_name,
                    seed=seed,
                    fix=fix_name,
                )
            else:
                report = check_model(
                    model,
                    input_shape=shape,
                    batch_size=batch,
                    loss=loss_name,
                    seed=seed,
                    fix=fix_name,
                )
        except (TargetError, InputFitError, ValueError) as exc:
            raise fail(str(exc)) from None
        if as_json:
            from gradsentry.records import dumps

            typer.echo(dumps(report.to_dict(), strict=True, indent=1))
        else:
            out = Console()
            if not out.is_terminal:
                out = Console(width=150)
            out.print(check_renderable(report, out.width, title=f"gradsentry check {target}"))
            if report.fixed is not None:
                out.print(Text(f"\nafter --fix {report.fix}:", style="bold"))
                out.print(check_renderable(report.fixed, out.width, title=f"gradsentry check {target}"))
        raise typer.Exit(EXIT_FOUND if report.final.problems else EXIT_OK)
