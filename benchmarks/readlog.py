"""Reading a 1,000,000-line console log: time and peak memory of ``load_series`` (and ``analyze_log``).

Writes a generic step log (TorchTitan-like ``step: N  loss: X  grad_norm: Y  lr: Z`` lines, one
loss-scaler overflow line every 10,000 steps and a NaN burst near the end) to a temporary folder,
then, each in a fresh process so that the peak RSS (``resource.getrusage``, ru_maxrss) is the
reading's own: sniffs and reads it with ``load_series`` and runs ``analyze_log`` on it.

    python benchmarks/readlog.py            # 1,000,000 lines
    python benchmarks/readlog.py --lines 200000 --format hf-console
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LINE_FORMATS = {
    "steps": "[titan] 2026-02-24 19:46:17,508 - root - INFO - step: {step:6d}  loss: {loss:8.5f}  "
    "grad_norm: {gn:.4f}  lr: {lr:.4e}  memory: 66.91GiB(37.51%)  tps: 10,050  mfu: 13.99%\n",
    "hf-console": "{{'loss': {loss:.4f}, 'grad_norm': {gn}, 'learning_rate': {lr}, 'epoch': {epoch:.2f}}}\n",
    "megatron": " iteration {step:8d}/ 2000000 | consumed samples: {samples:12d} | elapsed time per iteration (ms): "
    "4247.9 | learning rate: {lr:.3E} | global batch size:     8 | lm loss: {loss:.6E} | loss scale: 1.0 | "
    "grad norm: {gn:.3f} | number of skipped iterations:   0 | number of nan iterations:   0 |\n",
    "mmengine-text": "10/30 22:19:57 - mmengine - INFO - Epoch(train) [{ep:d}][{it:d}/10000]  lr: {lr:.4e}  "
    "eta: 2:44:49  time: 2.8874  data_time: 0.0042  memory: 10762  loss: {loss:.4f}  grad_norm: {gn:.4f}\n",
    "tqdm": "Steps:   2%|▍         | {step}/5900000 [19:15:43<1185:20:02,  1.36it/s, backward=0.177, "
    "loss={loss:.4f}, lr=4.99e-5, grad_norm={gn:.4f}]\n",
    "keras": "{kb:3d}/500 [==============================] - ETA: 1s - loss: {loss:.4f} - acc: 0.5000\n",
}
OVERFLOW = (
    "[2024-09-11 17:52:18,030] [INFO] [loss_scaler.py:183:update_scale] [deepspeed] OVERFLOW! Rank 0 "
    "Skipping step. Attempted loss scale: 65536, reducing to 32768\n"
)


def write_log(path: Path, lines: int, fmt: str) -> None:
    """``lines`` training lines of format ``fmt`` (plus an overflow line every 10,000 steps)."""
    rng = random.Random(0)
    tpl = LINE_FORMATS[fmt]
    with path.open("w", encoding="utf-8") as fh:
        buf = []
        for i in range(1, lines + 1):
            loss = 2.0 * math.exp(-i / lines) + 0.5 + rng.gauss(0, 0.01)
            gn = 1.5 * math.exp(rng.gauss(0, 0.2))
            if i > lines - 50:  # the run blows up at the end
                loss, gn = math.nan, math.nan
            buf.append(
                tpl.format(
                    step=i,
                    loss=loss,
                    gn=gn,
                    lr=3e-4,
                    epoch=i / 10000 + 1,
                    ep=(i - 1) // 10000 + 1,
                    it=(i - 1) % 10000 + 1,
                    samples=8 * i,
                    kb=(i - 1) % 500 + 1,
                )
            )
            if i % 10000 == 0:
                buf.append(OVERFLOW)
            if len(buf) >= 10000:
                fh.writelines(buf)
                buf.clear()
        fh.writelines(buf)


def measure(path: str, what: str) -> dict[str, float | int | str]:
    """Run in a child process: time ``what`` ("load" or "analyze") on ``path``, report peak RSS."""
    if what == "load":
        from gradsentry.logs import load_series
    else:
        from gradsentry.analyze import analyze_log

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    out: dict[str, float | int | str]
    if what == "load":
        s = load_series(path)
        out = {"points": len(s), "source": s.source, "skipped": len(s.skipped)}
    else:
        a = analyze_log(path)
        out = {
            "points": len(a.series),
            "source": a.series.source,
            "findings": ",".join(f.kind for f in a.findings),
        }
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["rss_before_mb"] = rss0 / 1024
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--format", choices=sorted(LINE_FORMATS), default="steps")
    ap.add_argument("--child", nargs=2, metavar=("PATH", "WHAT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(measure(*args.child)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.log"
        t0 = time.perf_counter()
        write_log(path, args.lines, args.format)
        size = path.stat().st_size
        print(
            f"wrote {args.lines:,} {args.format} lines ({size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f} s"
        )
        for what in ("load", "analyze"):
            proc = subprocess.run(
                [sys.executable, __file__, "--child", str(path), what],
                capture_output=True,
                text=True,
                check=False,
                env={**os.environ},
            )
            if proc.returncode != 0:
                print(f"{what}: failed\n{proc.stderr[-2000:]}")
                return 1
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            label = "load_series" if what == "load" else "analyze_log"
            extra = (
                f", skipped steps {r['skipped']}"
                if "skipped" in r
                else f", findings: {r['findings'] or 'none'}"
            )
            print(
                f"{label:12} {r['seconds']:6.2f} s   peak RSS {r['peak_rss_mb']:6.0f} MiB "
                f"(after imports {r['rss_before_mb']:.0f} MiB; file {size / 2**20:.0f} MiB)   "
                f"{r['points']:,} points [{r['source']}]{extra}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
