"""``gradsentry lab``: reproduce vanishing and exploding gradients and their fixes on real data."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from gradsentry.cli import EXIT_OK, EXIT_USAGE

if TYPE_CHECKING:
    from gradsentry.lab import LabResult


def _table(result: LabResult) -> Any:
    from rich.table import Table

    from gradsentry.report.text import severity_look

    table = Table(title="gradsentry lab", title_justify="left", header_style="bold")
    table.add_column("variant", no_wrap=True)
    table.add_column("first/last grad RMS at init", justify="right")
    table.add_column("test accuracy", justify="right")
    table.add_column("findings")
    table.add_column("time", justify="right")
    for r in result.runs:
        ratio = r.first_last_rms_ratio_init
        ratio_s = f"{ratio:.2e}" if math.isfinite(ratio) else "n/a"
        acc = f"{100 * r.test_accuracy:.1f}%"
        if r.diverged:
            acc += f" [red](NaN from step {r.first_nonfinite_step})[/red]"
        elif r.test_accuracy > 0.85:
            acc = f"[green]{acc}[/green]"
        sev: dict[str, str] = {}
        for f in r.findings:
            sev.setdefault(str(f.get("kind")), str(f.get("severity")))
        kinds = ", ".join(f"[{severity_look(s).rich}]{k}[/]" for k, s in sev.items()) or "[green]none[/green]"
        table.add_row(r.name, ratio_s, acc, kinds, f"{r.time_s:.1f} s")
    return table


VARIANT_NAMES: tuple[str, ...] = (
    "sigmoid_default",
    "tanh_default",
    "relu_default",
    "relu_he",
    "sigmoid_residual",
    "sigmoid_batchnorm",
    "exploding",
    "exploding_clip",
    "exploding_wd",
    "exploding_agc",
    "exploding_zclip",
)
"""``gradsentry.lab.experiments.DEFAULT_VARIANTS``, spelled out so that building the CLI does not import
PyTorch (``analyze`` and ``report`` never need it; a test keeps the two equal)."""


CHAPTER_NAMES: tuple[str, ...] = ("mlp", "rnn", "cnn", "attention")
"""``gradsentry.lab.chapters.CHAPTERS``, spelled out for the same reason (a test keeps the two equal)."""


def _chapter_table(name: str, chapter: dict[str, Any]) -> Any:
    """One row per run of a chapter beyond the MLP: its title, test accuracy and the Monitor's findings."""
    from rich.table import Table

    table = Table(
        title=f"chapter {name}: {chapter.get('title', name)}", title_justify="left", header_style="bold"
    )
    table.add_column("variant", no_wrap=True)
    table.add_column("test accuracy", justify="right")
    table.add_column("findings")
    for run in chapter["runs"].values():
        acc = run.get("test_accuracy")
        table.add_row(
            str(run.get("title", "")),
            f"{100 * acc:.1f}%" if isinstance(acc, float) else "-",
            ", ".join(run.get("finding_kinds", [])) or "none",
        )
    return table


def _variant_names() -> tuple[str, ...]:
    return VARIANT_NAMES


def register(app: typer.Typer) -> None:
    """Add the ``lab`` subcommand to ``app``."""

    @app.command("lab")
    def lab(
        depth: int | None = typer.Option(
            None, "--depth", min=2, help="Hidden blocks per network (default 20; 12 with --quick)."
        ),
        width: int | None = typer.Option(
            None, "--width", min=1, help="Units per hidden block (default 64; 32 with --quick)."
        ),
        epochs: int | None = typer.Option(
            None,
            "--epochs",
            min=1,
            help="Passes over the 1,437 training digits (default 40; 3 with --quick).",
        ),
        variants: str | None = typer.Option(
            None,
            "--variants",
            help="Comma-separated subset of variants to run (default: all): "
            + ", ".join(_variant_names())
            + ".",
        ),
        chapters: str | None = typer.Option(
            None,
            "--chapters",
            help="Comma-separated chapters to run (default: all; only mlp when --variants is given): "
            + ", ".join(CHAPTER_NAMES)
            + " (mlp: the deep-MLP variants; rnn: through time; cnn: deep plain vs residual vs batch-norm "
            "CNNs; attention: post-LN vs pre-LN transformers).",
        ),
        seed: int = typer.Option(
            0, "--seed", min=0, max=2**32 - 1, help="Seed of the initial weights and the batch order."
        ),
        out: Path = typer.Option(
            Path("gradsentry-lab"),
            "--out",
            help="Output folder: report.html, results.json, `runs/<variant>.jsonl` (MLP chapter) and "
            "`runs/<chapter>/<variant>.jsonl` (the other chapters).",
        ),
        quick: bool = typer.Option(False, "--quick", help="A small, fast configuration for smoke tests."),
    ) -> None:
        """Train deep networks on scikit-learn's digits to show vanishing and exploding gradients and their fixes.

        Chapters: deep MLPs (mlp), recurrent nets through time (rnn), deep plain vs residual vs batch-norm
        CNNs (cnn) and post-LN vs pre-LN transformers (attention). In the MLP chapter, each variant (sigmoid/tanh/ReLU with default init, ReLU with He init, sigmoid with residual
        connections or batch norm, an oversized-init ReLU net that explodes, and that net with
        global-norm clipping, weight decay, AGC or ZClip) is trained with the same optimizer and budget
        under a gradsentry Monitor. Writes a self-contained HTML report.

        Example: gradsentry lab --out gradsentry-lab && open gradsentry-lab/report.html
        """
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        from rich.text import Text

        from gradsentry._extras import require
        from gradsentry.lab import LabConfig, ProgressEvent, check_writable, run_lab, write_outputs
        from gradsentry.lab.experiments import DEFAULT_VARIANTS

        err = Console(stderr=True, soft_wrap=True)
        console = Console()
        names = (
            tuple(v.strip() for v in variants.split(",") if v.strip())
            if variants is not None
            else DEFAULT_VARIANTS
        )
        if not names:
            err.print(Text.assemble(("error: ", "red"), "--variants is empty: name at least one variant"))
            raise typer.Exit(EXIT_USAGE)
        chapter_names = (
            tuple(c.strip() for c in chapters.split(",") if c.strip())
            if chapters is not None
            else ("mlp",)
            if variants is not None  # MLP variants named: the MLP chapter only
            else CHAPTER_NAMES
        )
        overrides: dict[str, Any] = {"seed": seed, "variants": names, "chapters": chapter_names}
        for key, value in (("depth", depth), ("width", width), ("epochs", epochs)):
            if value is not None:
                overrides[key] = value
        try:
            config = (LabConfig.quick(**overrides) if quick else LabConfig(**overrides)).validate()
        except ValueError as exc:
            err.print(Text.assemble(("error: ", "red"), str(exc)), highlight=False)
            raise typer.Exit(EXIT_USAGE) from None
        try:
            check_writable(out)
        except OSError as exc:
            err.print(Text.assemble(("error: ", "red"), str(exc)), highlight=False)
            raise typer.Exit(EXIT_USAGE) from None
        require("lab", "the lab")  # now, not after minutes of training when the report is written

        columns = (
            TextColumn("{task.description:<18}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("steps"),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=console, transient=False) as progress:
            tasks: dict[str, Any] = {}

            def on_progress(ev: ProgressEvent) -> None:
                if ev.variant not in tasks:
                    tasks[ev.variant] = progress.add_task(ev.variant, total=ev.total, status="")
                task = tasks[ev.variant]
                loss = "" if ev.loss is None else f"loss {ev.loss:.3g}"
                if ev.done:
                    status = f"[red]stopped: NaN/inf[/red] {loss}" if ev.step < ev.total else loss
                    progress.update(
                        task, completed=ev.total if ev.step >= ev.total else ev.step, status=status
                    )
                    progress.stop_task(task)
                else:
                    progress.update(task, completed=ev.step, status=loss)

            result = run_lab(config, out_dir=out, progress=on_progress)
        paths = write_outputs(result, out)
        if result.runs:
            console.print(_table(result))
        for name, chapter in result.chapters.items():
            if chapter.get("runs"):
                console.print(_chapter_table(name, chapter))
            claims = chapter.get("claims", {})
            holds = [k for k, v in claims.items() if k.endswith("_holds")]
            ok = sum(1 for k in holds if claims[k])
            console.print(
                f"chapter {name}: {chapter.get('title', name)}: {ok}/{len(holds)} claims hold "
                f"({', '.join(k.removesuffix('_holds') + ('' if claims[k] else ' [red]NOT[/red]') for k in holds)}); "
                f"{chapter.get('time_s', 0.0):.1f} s"
            )
        console.print(
            f"{len(result.runs)} runs in {result.wall_time_s:.1f} s; re-render with: gradsentry report "
            f"{paths['results']}"
        )
        console.print(
            Text.assemble("Report: ", (str(paths["report"]), "bold"), f"  (data: {paths['results']})")
        )
        raise typer.Exit(EXIT_OK)
