"""A Hugging Face ``trainer_state.json`` written in code: 200 logged steps of a healthy run, optionally with a
gradient spike (and the loss jump after it) or NaN from a step on. Shared by the CLI and layout tests."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

N = 200


def write_state(path: Path, spike: bool = False, nan_from: int | None = None) -> Path:
    rng = np.random.default_rng(0)
    grad = 1.5 * np.exp(rng.normal(0, 0.2, N))
    loss = 2.0 * np.exp(-np.arange(N) / 60) + 0.4 + rng.normal(0, 0.01, N)
    if spike:
        grad[120] = 70.0
        loss[121:124] *= 3.0  # the loss jumps right after it: harm
    entries = []
    for i in range(N):
        g, lo = float(grad[i]), float(loss[i])
        if nan_from is not None and i >= nan_from:
            g, lo = math.nan, 0.0
        entries.append(
            {"epoch": i / N, "grad_norm": g, "learning_rate": 2e-5, "loss": lo, "step": 5 * (i + 1)}
        )
        if i % 50 == 49:
            entries.append({"epoch": i / N, "eval_loss": 0.9, "eval_runtime": 2.0, "step": 5 * (i + 1)})
    path.write_text(json.dumps({"global_step": 5 * N, "log_history": entries}, indent=2))
    return path
