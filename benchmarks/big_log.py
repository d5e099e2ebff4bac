"""``gradsentry analyze`` (and ``report``'s reader) on a big gradsentry JSONL: time and peak memory.

Writes a JSONL run of ``--steps`` logged steps shaped like a Monitor's (a 3-layer MLP with two
activation sites, about 630 bytes per line: 1e6 steps ~ 630 MB), with a NaN at one step and a growth
at the end, then runs ``gradsentry analyze FILE --json`` in a fresh process and reports its wall time
and peak resident memory (``ru_maxrss`` of the child), and the findings. The issue's target: 1e6 steps
in under 30 s and 500 MB.

Run: ``python benchmarks/big_log.py [--steps 1000000] [--path /tmp/big.jsonl]``.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import typer


def write_log(path: Path, steps: int, seed: int = 0) -> int:
    """Write the run; returns its size in bytes."""
    rng = random.Random(seed)
    layers = [("0", 0, 64), ("2", 1, 136), ("4", 2, 9)]
    header = {
        "gradsentry": 1,
        "kind": "header",
        "layers": [{"name": n, "type": "Linear", "depth": d, "params": p} for n, d, p in layers],
        "meta": {"every": 1, "model": "Sequential", "optimizer": "adamw", "lr": 1e-3},
    }
    nan_at = steps // 3
    with path.open("w", encoding="utf-8") as fh:
        fh.write(json.dumps(header, separators=(",", ":")) + "\n")
        for s in range(steps):
            g = 1.0 + 0.1 * rng.random()
            if s > steps - steps // 50:
                g *= math.exp(5.0 * (s - (steps - steps // 50)) / (steps // 50))  # a late growth
            norm = math.nan if s == nan_at else g
            rec = {
                "step": s,
                "global_norm": norm,
                "layers": [
                    {
                        "name": n,
                        "depth": d,
                        "numel": p,
                        "grad_norm": norm / 2,
                        "grad_rms": norm / 2 / math.sqrt(p),
                        "grad_max_abs": norm / 4,
                        "nonfinite": 1 if s == nan_at else 0,
                        "weight_norm": 3.0 + rng.random(),
                        "update_ratio": 1e-3 * (1 + rng.random()),
                        "has_grad": True,
                    }
                    for n, d, p in layers
                ],
                "loss": 2.0 - s / (2 * steps),
                "lr": 1e-3,
                "activations": [],
                "overhead": 0.01,
                "nonfinite_origin": None,
                "actions": [],
                "kind": "step",
            }
            fh.write(json.dumps(rec, separators=(",", ":")) + "\n")
    return path.stat().st_size


def main(
    steps: int = typer.Option(1_000_000), path: Path = typer.Option(Path("/tmp/gradsentry-big.jsonl"))
) -> None:
    size = path.stat().st_size if path.exists() and path.stat().st_size > 0 else write_log(path, steps)
    env = {**os.environ}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "gradsentry", "analyze", str(path), "--json"],
        capture_output=True,
        text=True,
        env=env,
    )
    wall = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if proc.returncode not in (0, 1):
        raise SystemExit(f"analyze failed ({proc.returncode}): {proc.stderr[-2000:]}")
    result = json.loads(proc.stdout)
    kinds = [(f["kind"], f["steps"][0] if f["steps"] else None) for f in result["findings"]]
    print(f"{path}: {size / 1e6:.0f} MB, {result['summary']['points']} steps")
    print(f"analyze: {wall:.1f} s wall, peak RSS {peak_mb:.0f} MB, exit {proc.returncode}")
    print(f"findings: {kinds}")


if __name__ == "__main__":
    typer.run(main)
