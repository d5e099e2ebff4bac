"""The depth profile of a check: the fitted slope, the init-time exploding rules, the per-block profile
of repeated normalized blocks and its ``gradient_concentration`` finding."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
from torch import nn

from gradsentry import _taxonomy
from gradsentry.check.report import (
    EXPLODING_RATIO,
    MIN_BLOCKS,
    REL_GRAD_MAX,
    BlockProfile,
    CheckRow,
)
from gradsentry.records import Finding

logger = logging.getLogger("gradsentry")


def _fit_slope(rows: Sequence[CheckRow]) -> tuple[float | None, float | None, str | None]:
    """First/last gradient RMS ratio (all usable layers), the log10-RMS slope over the hidden layers (the
    output head, the last usable layer, left out when three or more remain) and the head's name."""
    usable = [r for r in rows if math.isfinite(r.grad_rms) and r.grad_rms > 0]
    if len(usable) < 2:
        return None, None, None
    head = usable[-1].name if len(usable) >= 3 else None
    hidden = usable[:-1] if head is not None else usable
    x = np.array([r.depth for r in hidden], dtype=np.float64)
    y = np.log10([r.grad_rms for r in hidden])
    slope = float(np.polyfit(x, y, 1)[0])
    return usable[0].grad_rms / usable[-1].grad_rms, slope, head


def _exploding_at_init(
    ratio: float | None, slope: float | None, rows: Sequence[CheckRow], step: int
) -> Finding | None:
    """The two init-time exploding rules (see :data:`EXPLODING_RATIO` and :data:`REL_GRAD_MAX`)."""
    from gradsentry.diagnosis.advice import remedies_for

    rel = [r.rel_grad for r in rows if r.rel_grad is not None and math.isfinite(r.rel_grad)]
    median_rel = float(np.median(rel)) if rel else None
    by_profile = ratio is not None and ratio > EXPLODING_RATIO
    by_size = median_rel is not None and median_rel > REL_GRAD_MAX
    if not (by_profile or by_size):
        return None
    biggest = sorted((r for r in rows if r.grad_rms > 0), key=lambda r: -r.grad_rms)[:3]
    parts = []
    if by_profile:
        parts.append(
            f"the gradient reaching the first layer is {ratio:.3g} times the gradient at the last layer (more "
            f"than {EXPLODING_RATIO:g}): going back towards the input it grows by about "
            f"{10 ** -(slope or 0.0):.3g}x per layer (mean-field gain chi > 1, the chaotic phase)"
        )
    if by_size:
        parts.append(
            f"the median relative gradient ||g||/||w|| over the layers is {median_rel:.3g} (more than "
            f"{REL_GRAD_MAX:g}): one SGD step at a learning rate of 1e-3 would change the weights by "
            f"{1e-3 * median_rel:.3g} times their norm"  # type: ignore[operator]
        )
    severe = (ratio is not None and ratio > EXPLODING_RATIO**2) or (
        median_rel is not None and median_rel > REL_GRAD_MAX**2
    )
    return Finding(
        kind="exploding",
        severity="error" if severe else "warning",
        steps=[step],
        layers=[r.name for r in biggest],
        evidence={
            "first_last_rms_ratio": ratio,
            "log10_rms_slope_per_layer": slope,
            "median_rel_grad": median_rel,
            "ratio_threshold": EXPLODING_RATIO,
            "rel_grad_threshold": REL_GRAD_MAX,
        },
        explanation="At initialization " + "; and ".join(parts) + ". The weights are initialised too large.",
        remedies=remedies_for("exploding"),
    )


def _block_profile(model: nn.Module, rows: Sequence[CheckRow]) -> BlockProfile | None:
    """The gradient profile over the largest set of repeated blocks (a ``ModuleList``/``Sequential`` whose
    numbered children hold layers), or None when the model has fewer than :data:`MIN_BLOCKS` such blocks."""
    modules = dict(model.named_modules())
    groups: dict[str, dict[int, dict[str, CheckRow]]] = {}
    for row in rows:
        parts = row.name.split(".")
        for i, part in enumerate(parts[:-1]):
            prefix = ".".join(parts[:i])
            if part.isdigit() and isinstance(modules.get(prefix), nn.ModuleList | nn.Sequential):
                role = ".".join(parts[i + 1 :])
                groups.setdefault(prefix, {}).setdefault(int(part), {})[role] = row
                break
    best = max(groups, key=lambda k: len(groups[k]), default=None)
    if best is None or len(groups[best]) < MIN_BLOCKS:
        return None
    blocks = [groups[best][i] for i in sorted(groups[best])]
    roles = [r for r in blocks[0] if all(r in b and b[r].has_grad for b in blocks)]
    norms = {role: [b[role].grad_norm for b in blocks] for role in roles}
    ratios = {
        role: v[-1] / v[0]
        for role, v in norms.items()
        if v[0] > 0 and math.isfinite(v[0]) and math.isfinite(v[-1])
    }
    first = sorted(blocks[0].values(), key=lambda r: r.depth)
    norm_rows = [r for r in first if _taxonomy.is_normalization(r.type)]
    other_rows = [r for r in first if not _taxonomy.is_normalization(r.type)]
    placement = None
    if norm_rows and other_rows:
        placement = "pre" if norm_rows[0].depth < other_rows[0].depth else "post"
    norm_roles = [role for role in roles if _taxonomy.is_normalization(blocks[0][role].type)]
    main = [v for role, v in ratios.items() if role not in norm_roles]
    return BlockProfile(
        container=best,
        blocks=len(blocks),
        norm_placement=placement,
        norms=norms,
        ratios=ratios,
        ratio=float(np.median(main)) if main else None,
        norm_roles=norm_roles,
    )


def _concentration_finding(profile: BlockProfile, step: int) -> Finding | None:
    """An info finding on the per-block gradient profile of normalized blocks (pre-LN vs post-LN)."""
    if profile.norm_placement is None or profile.ratio is None:
        return None
    n, ratio = profile.blocks, profile.ratio
    last = f"{profile.container}.{n - 1}"
    main = [role for role in profile.ratios if role not in profile.norm_roles]
    head = (
        f"{n} {profile.norm_placement}-LN blocks in {profile.container}: from the first block to the last the "
        f"gradient norm changes by a factor of {ratio:.2f} (median over {len(main)} parameter layers per "
        "block, normalization layers left out)"
    )
    if profile.norm_placement == "post":
        text = (
            f"{head}. Post-LN blocks do not damp the gradient near the output: Xiong et al. 2020 (Theorem 1) "
            f"show that at init the gradient of a post-LN transformer's last layers is about sqrt(L) = "
            f"{math.sqrt(n):.1f} times that of the same pre-LN model, which is why post-LN training needs a "
            "learning-rate warm-up (or pre-LN) to stay stable."
        )
    else:
        agrees = ratio < 1.0
        text = (
            f"{head}. In pre-LN blocks the residual stream grows with depth and each block's LayerNorm "
            "divides by it, so the early blocks are expected to get the larger gradients (NormFormer, Shleifer "
            "et al. 2021) and the gradient near the output about 1/sqrt(L) of a post-LN model's (Xiong et al. "
            "2020). "
            + (
                "This model shows that: its gradient falls towards the output."
                if agrees
                else "This model does not show it at init: the last block's gradient is not smaller than the "
                "first's (measured here, whatever the papers' picture)."
            )
        )
    return Finding(
        kind="gradient_concentration",
        severity="info",
        steps=[step],
        layers=[f"{last}.{role}" for role in sorted(main, key=lambda r: -profile.ratios[r])][:5],
        evidence={
            "container": profile.container,
            "blocks": n,
            "norm_placement": profile.norm_placement,
            "last_first_ratio": ratio,
            "role_ratios": dict(profile.ratios),
        },
        explanation=text,
        remedies=[],
    )
