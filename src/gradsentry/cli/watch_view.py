"""The frame ``gradsentry watch`` draws: header, series sparklines, the extreme layers, the findings."""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from gradsentry.cli.render import findings_view, fmt, series_row

if TYPE_CHECKING:
    from rich.console import RenderableType
    from rich.table import Table

    from gradsentry.logs.follow import JsonlFollower
    from gradsentry.records import Finding, LayerStats

SPARK_POINTS = 20_000
"""The sparklines show the last this many logged points (a longer run says so in the row's name)."""


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def waiting_frame(path: str, what: str) -> RenderableType:
    """The frame shown before there is a run to draw: ``what`` says what is awaited."""
    from rich.text import Text

    return Text.assemble(("gradsentry watch ", "bold"), path, "\n", (f"{what} (Ctrl-C to stop)", "yellow"))


def _layer_table(title: str, layers: Sequence[LayerStats]) -> Table:
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, title_justify="left", expand=False, pad_edge=False)
    for col in ("layer", "grad norm", "grad RMS", "update/w"):
        table.add_column(col, justify="left" if col == "layer" else "right", overflow="fold")
    for layer in layers:
        bad = not math.isfinite(layer.grad_norm)
        table.add_row(
            layer.name or "(root)",
            Text(fmt(layer.grad_norm), style="red" if bad else ""),
            fmt(layer.grad_rms),
            fmt(layer.update_ratio),
        )
    return table


def extreme_layers(layers: Sequence[LayerStats], k: int) -> tuple[list[LayerStats], list[LayerStats]]:
    """The ``k`` layers with the largest gradient norms (NaN/inf first) and the ``k`` smallest, among the
    layers that had a gradient; with ``2k`` layers or fewer, all of them (largest first) and no second list."""
    live = [layer for layer in layers if layer.has_grad]
    ranked = sorted(
        live, key=lambda s: math.inf if not math.isfinite(s.grad_norm) else s.grad_norm, reverse=True
    )
    if len(ranked) <= 2 * k:
        return ranked, []
    return ranked[:k], ranked[::-1][:k]


def frame(
    follower: JsonlFollower, findings: Sequence[Finding], *, top: int, width: int, started: float
) -> RenderableType:
    """One frame of the live view of ``follower``'s run (call after :meth:`JsonlFollower.poll`).

    Args:
        follower: the run being followed; its header must have been read.
        findings: the findings to show (:meth:`JsonlFollower.findings`).
        top: how many layers to show at each end of the gradient-norm ranking.
        width: the console's width in characters (the sparklines fit in it).
        started: ``time.monotonic()`` when watching began (for the elapsed time).
    """
    from rich.columns import Columns
    from rich.console import Group
    from rich.text import Text

    run = follower.run()
    if run is None:
        return waiting_frame(str(follower.path), "waiting for the run's header line")
    sig = run.signals()
    meta = run.header.meta
    n = int(sig.steps.size)
    parts = [
        f"model {meta.get('model', '?')}",
        f"{n} logged steps" + (f" ({sig.steps[0]}..{sig.steps[-1]})" if n else ""),
    ]
    if meta.get("optimizer"):
        parts.append(f"{meta['optimizer']} lr {fmt(meta.get('lr'))}")
    parts.append(f"every {meta.get('every', '?')}")
    with contextlib.suppress(OSError):
        parts.append(f"last write {time.time() - os.stat(follower.path).st_mtime:.0f} s ago")
    parts.append(f"watching {_clock(time.monotonic() - started)}")
    head = Text.assemble(("gradsentry watch ", "bold"), str(follower.path), "\n", " · ".join(parts))
    if follower.scanner.resumed_at is not None:
        head.append(
            f"\nresumed run: the latest part restarts at step {follower.scanner.resumed_at}", style="cyan"
        )
    if follower.finished:
        head.append("\nthe run finished (its Monitor closed and wrote its findings)", style="green")
    rows: list[RenderableType] = [head]
    if n:
        cut = max(0, n - SPARK_POINTS)
        grad = [float(v) for v in sig.grad[cut:]]
        loss = [float(v) if h else None for v, h in zip(sig.loss[cut:], sig.has_loss[cut:], strict=True)]
        spark_width = max(10, min(60, width - 46))
        for name, values, log in (("grad_norm", grad, True), ("loss", loss, False)):
            if any(v is not None for v in values):
                row = series_row(name, values, spark_width, log=log)
                row.append(f"  last {fmt(values[-1])}" + (f" (last {len(values)} points)" if cut else ""))
                rows.append(row)
            else:
                rows.append(Text.assemble((f"{name:>9} ", "bold"), ("not logged", "yellow")))
    if run.window:
        last = run.window[-1]
        largest, smallest = extreme_layers(last.layers, top)
        if largest:
            tables = [_layer_table(f"largest gradient norms, step {last.step}", largest)]
            if smallest:
                tables.append(_layer_table("smallest", smallest))
            rows.append(Columns(tables))
    rows.append(findings_view(findings))
    return Group(*rows)
