"""The lab's shared settings (:class:`LabConfig`: model shape, training budget, optimizer, fixes) and the
progress events :func:`gradsentry.lab.run_lab` reports."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from gradsentry.lab.variants import DEFAULT_VARIANTS, VARIANTS


@dataclass(frozen=True)
class LabConfig:
    """The lab's shared settings: model shape, training budget, optimizer and fixes.

    Attributes:
        depth: hidden blocks per MLP (>= 2).
        width: units per hidden block.
        epochs: passes over the 1,437 training digits.
        batch_size: examples per mini-batch (the last batch of an epoch may be smaller).
        lr: peak learning rate of SGD, decayed to 0 by a cosine schedule over the whole budget.
        momentum: SGD momentum.
        seed: seed of the initial weights and of the mini-batch order (the same for every variant).
        variants: names of the variants to run, in order (see :data:`VARIANTS`).
        log_every: the Monitor's ``every`` for the vanishing family: it logs every ``log_every``-th
            step, each of the first 16 steps and the last step (:class:`gradsentry.lab.recording.Schedule`,
            written in each run's header); the exploding family logs every step.
        oversized_gain: factor on the He standard deviation for the exploding variants (dimensionless).
        clip_norm: ``max_norm`` of global-norm clipping, same units as the gradient; also ZClip's
            ``max_grad_norm``, its cap during warm-up and (``cap_after_warmup=True``) its ceiling after.
        agc_clip_factor: AGC's λ, the largest ratio of unit gradient norm to unit weight norm.
        weight_decay: L2 weight decay of the ``exploding_wd`` variant.
        hist_bins: bins of the pre-activation histograms.
        hist_range: the histograms cover ``[-hist_range, hist_range]``; values outside fall in the end bins.
        threads: torch intra-op threads during the lab (restored afterwards); None = 1, which is the
            fastest for these small matrices.
        chapters: the chapters to run, among :data:`gradsentry.lab.chapters.CHAPTERS`: ``"mlp"`` (the
            variants above) and the chapters beyond MLPs ``"rnn"``, ``"cnn"``, ``"attention"`` (each
            with its own fixed models and budget, sized by ``quick``; their results go to
            :attr:`LabResult.chapters`). The library default is ``("mlp",)``; ``gradsentry lab`` runs
            every chapter unless ``--chapters`` says otherwise.
        chapter_budget: ``"full"`` or ``"quick"`` (set by :meth:`quick`): the budget of the chapters
            beyond MLPs.

    Raises:
        ValueError: from :meth:`validate` (called by :func:`run_lab`) on an unknown variant name or a
            value out of range; the message lists the valid names.
    """

    depth: int = 20
    width: int = 64
    epochs: int = 40
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    seed: int = 0
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    log_every: int = 4
    oversized_gain: float = 1.3
    clip_norm: float = 5.0
    agc_clip_factor: float = 0.1
    weight_decay: float = 5e-4
    hist_bins: int = 80
    hist_range: float = 10.0
    threads: int | None = None
    chapters: tuple[str, ...] = ("mlp",)
    chapter_budget: str = "full"

    @classmethod
    def quick(cls, **overrides: Any) -> LabConfig:
        """A small configuration for smoke tests: still deep (depth 12) but narrow and a short budget.

        The oversized init gain is raised to 1.5 so that the shallower exploding run still diverges.
        """
        base: dict[str, Any] = {
            "depth": 12,
            "width": 32,
            "epochs": 3,
            "log_every": 2,
            "oversized_gain": 1.5,
            "chapter_budget": "quick",
        }
        base.update(overrides)
        return cls(**base)

    def validate(self) -> LabConfig:
        """Check every field; return ``self`` (see the class for the errors raised)."""
        from gradsentry.lab.chapters import CHAPTERS

        bad = [c for c in self.chapters if c not in CHAPTERS]
        if bad or not self.chapters or len(set(self.chapters)) != len(self.chapters):
            raise ValueError(
                f"chapters must be distinct names among {', '.join(CHAPTERS)}, got {', '.join(self.chapters) or 'none'}"
            )
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(
                f"unknown variant(s) {', '.join(repr(u) for u in unknown)}; valid: {', '.join(VARIANTS)}"
            )
        if not self.variants:
            raise ValueError(f"no variants selected; valid: {', '.join(VARIANTS)}")
        if len(set(self.variants)) != len(self.variants):
            raise ValueError(f"variants must not repeat, got {', '.join(self.variants)}")
        for name in ("depth", "width", "epochs", "batch_size", "log_every", "hist_bins"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (2 if name == "depth" else 1):
                raise ValueError(f"{name} must be an integer >= {2 if name == 'depth' else 1}, got {value!r}")
        for name in ("lr", "clip_norm", "agc_clip_factor", "oversized_gain", "hist_range"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise ValueError(
                f"need 0 <= momentum < 1 and weight_decay >= 0, got {self.momentum}, {self.weight_decay}"
            )
        if self.chapter_budget not in ("full", "quick"):
            raise ValueError(f"chapter_budget must be 'full' or 'quick', got {self.chapter_budget!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {self.threads}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain JSON-serialisable data (``variants`` as a list)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["variants"] = list(self.variants)
        d["chapters"] = list(self.chapters)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LabConfig:
        """Inverse of :meth:`to_dict`; unknown keys are ignored (call :meth:`validate` to check values)."""
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in data.items() if k in names}
        for key in ("variants", "chapters"):
            if key in kw:
                kw[key] = tuple(kw[key])
        return cls(**kw)


@dataclass(frozen=True)
class ProgressEvent:
    """What :func:`run_lab` reports to its progress callback.

    Attributes:
        variant: the variant's name.
        index: its position among the selected variants (0-based).
        count: how many variants are selected.
        step: optimizer steps done so far in this run.
        total: the run's step budget.
        done: True once for each run, when it has finished (``step`` may be < ``total`` for a run
            stopped on NaN/inf).
        loss: training loss at the last logged step, if known.
    """

    variant: str
    index: int
    count: int
    step: int
    total: int
    done: bool = False
    loss: float | None = None


ProgressCallback = Callable[[ProgressEvent], None]
