"""Start-up cost: ``import torch`` against ``import gradsentry``, and the CLI's quick answers.

Each case is a fresh interpreter (``subprocess``, wall time from start to exit, interpreter start-up
included); the cases run interleaved in a shuffled order per round, and the table shows the median of
each over the rounds. ``import gradsentry`` after ``import torch`` is also timed inside the process
(``time.perf_counter`` around the import; median over the rounds), which is the cost the package adds
to a training script. ``--baseline DIR`` runs every case a second time on another checkout's sources
(e.g. the main branch's ``src``) in the same rounds, side by side.

Run: ``python benchmarks/import_time.py [--rounds 15] [--baseline ../main/src]``.
"""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

SRC = Path(__file__).resolve().parents[1] / "src"

IN_PROCESS = {
    "import gradsentry after torch (in process)": "import gradsentry",
    "gradsentry.Monitor after torch (in process)": "import gradsentry; gradsentry.Monitor",
}
"""Timed inside a process that imported torch first: what the package adds to a training script."""


def write_trainer_state(path: Path, steps: int = 500) -> Path:
    """A Hugging Face ``trainer_state.json`` of ``steps`` logged steps with one harmful spike."""
    rng = random.Random(0)
    entries = []
    for i in range(steps):
        grad = 1.5 * math.exp(rng.gauss(0, 0.2)) * (40.0 if i == steps // 2 else 1.0)
        loss = 2.0 * math.exp(-i / 150) + 0.4 + (1.5 if steps // 2 < i <= steps // 2 + 3 else 0.0)
        entries.append(
            {"epoch": i / steps, "grad_norm": grad, "learning_rate": 2e-5, "loss": loss, "step": i + 1}
        )
    path.write_text(json.dumps({"global_step": steps, "log_history": entries}, indent=2))  # as HF writes it
    return path


def cases(log: Path) -> dict[str, list[str]]:
    """name -> the arguments after the interpreter."""
    cli = ["-m", "gradsentry"]
    return {
        "python -c pass (floor)": ["-c", "pass"],
        "import torch": ["-c", "import torch"],
        "import gradsentry": ["-c", "import gradsentry"],
        "import torch, gradsentry": ["-c", "import torch, gradsentry"],
        "... and gradsentry.Monitor": ["-c", "import torch, gradsentry; gradsentry.Monitor"],
        "gradsentry --version": [*cli, "--version"],
        "gradsentry --help": [*cli, "--help"],
        "gradsentry analyze trainer_state.json": [*cli, "analyze", str(log)],
        "gradsentry analyze ... --plot run.svg": [
            *cli,
            "analyze",
            str(log),
            "--plot",
            str(log.with_name("run.svg")),
        ],
    }


def wall(args: list[str], src: Path) -> float:
    """Seconds from starting ``python ARGS`` (with ``src`` first on the path) to its exit."""
    env = {**os.environ, "PYTHONPATH": str(src), "MPLBACKEND": "Agg"}
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False
    )
    return time.perf_counter() - t


def in_process(code: str, src: Path) -> float:
    """Seconds ``code`` takes in a process that has imported torch."""
    timed = f"import time; import torch; t = time.perf_counter(); {code}; print(time.perf_counter() - t)"
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run([sys.executable, "-c", timed], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout)


def main(
    rounds: int = typer.Option(15, "--rounds", min=1, help="Rounds; each runs every case once."),
    baseline: Path | None = typer.Option(
        None, "--baseline", help="Another checkout's src folder, run side by side."
    ),
) -> None:
    """Time ``import gradsentry`` and the CLI's start-up; print a table of medians."""
    trees = {"this": SRC} | ({"baseline": baseline.resolve()} if baseline is not None else {})
    with tempfile.TemporaryDirectory() as tmp:
        log = write_trainer_state(Path(tmp) / "trainer_state.json")
        table_cases = cases(log) | {name: [] for name in IN_PROCESS}
        times: dict[tuple[str, str], list[float]] = {(c, t): [] for c in table_cases for t in trees}
        rng = random.Random(0)
        for _ in range(rounds):
            jobs = list(times)
            rng.shuffle(jobs)
            for case, tree in jobs:
                if case in IN_PROCESS:
                    times[case, tree].append(in_process(IN_PROCESS[case], trees[tree]))
                else:
                    times[case, tree].append(wall(table_cases[case], trees[tree]))
    table = Table(title=f"start-up, median of {rounds} rounds (seconds)", title_justify="left")
    table.add_column("case")
    for tree in trees:
        table.add_column(f"{tree} s", justify="right")
    if baseline is not None:
        table.add_column("this / baseline", justify="right")
    for case in table_cases:
        med = [statistics.median(times[case, t]) for t in trees]
        ratio = [f"{med[0] / med[1]:.2f}"] if baseline is not None else []
        table.add_row(case, *(f"{m:.3f}" for m in med), *ratio)
    Console(width=120).print(table)


if __name__ == "__main__":
    typer.run(main)
