"""Hand-made step records for the sink tests: finite, NaN/inf, frozen layers, unknown values."""

from __future__ import annotations

import math

from gradsentry.records import ActivationStats, Advice, Finding, LayerInfo, LayerStats, RunHeader, StepRecord

LAYERS = [
    LayerInfo("fc0", "Linear", 0, 20),
    LayerInfo("blocks.1.fc", "Linear", 1, 20),
    LayerInfo("", "Bias", 2, 3),
]


def header() -> RunHeader:
    return RunHeader(layers=list(LAYERS), meta={"source": "test"})


def _layer(
    name: str, depth: int, g: float, *, nonfinite: int = 0, ratio: float | None = 1e-3, has_grad: bool = True
) -> LayerStats:
    numel = 20
    return LayerStats(
        name=name,
        depth=depth,
        numel=numel,
        grad_norm=g,
        grad_rms=g / math.sqrt(numel),
        grad_max_abs=g / 2,
        nonfinite=nonfinite,
        weight_norm=3.0 + depth,
        update_ratio=ratio,
        has_grad=has_grad,
    )


def records() -> list[StepRecord]:
    """Five records: step 0 (no update ratio), 1-2 finite, 3 NaN/inf, 4 with no loss/lr and no layers."""
    out = []
    for step in range(3):
        scale = 10.0 ** (-step)
        layers = [
            _layer("fc0", 0, 0.5 * scale, ratio=None if step == 0 else 1e-3 * (step + 1)),
            _layer("blocks.1.fc", 1, 2.0 * scale, ratio=None if step == 0 else 2e-3),
            _layer("", 2, 0.0, ratio=None, has_grad=False),
        ]
        acts = [
            ActivationStats(
                "act0",
                "Sigmoid",
                0,
                pre_mean=0.1 * step,
                pre_std=1.0 + step,
                saturated_frac=0.05 * step,
                dead_frac=None,
                histogram={"edges": [-2.0, -1.0, 0.0, 1.0, 2.0], "counts": [1, 3, 4, 0]},
            ),
            ActivationStats(
                "act1", "ReLU", 1, pre_mean=-0.2, pre_std=0.5, saturated_frac=None, dead_frac=0.25
            ),
        ]
        gn = math.sqrt(sum(x.grad_norm**2 for x in layers))
        out.append(
            StepRecord(
                step=step * 2, global_norm=gn, layers=layers, loss=1.0 / (step + 1), lr=0.1, activations=acts
            )
        )
    bad = [
        _layer("fc0", 0, math.nan, nonfinite=4),
        _layer("blocks.1.fc", 1, math.inf, nonfinite=1),
        _layer("", 2, 0.0, ratio=None, has_grad=False),
    ]
    out.append(StepRecord(step=6, global_norm=math.nan, layers=bad, loss=math.inf, lr=0.1))
    out.append(StepRecord(step=8, global_norm=0.25, layers=[], loss=None, lr=None))
    return out


def findings() -> list[Finding]:
    return [
        Finding(
            kind="vanishing",
            severity="warning",
            steps=[2, 4],
            layers=["fc0"],
            evidence={"ratio": 1e-6},
            explanation="Gradients | shrink",
            remedies=[Advice("Use ReLU")],
        )
    ]


REL = 1e-6
"""Trackers keep float64; the records' statistics are float32: read back equal to 1e-6 relative."""


def same_value(got: float, want: float) -> bool:
    """A value read back from a tracker equals the record's: NaN as NaN, inf exactly, else to :data:`REL`."""
    if math.isnan(want):
        return math.isnan(got)
    return got == want if math.isinf(want) else math.isclose(got, want, rel_tol=REL, abs_tol=1e-30)
