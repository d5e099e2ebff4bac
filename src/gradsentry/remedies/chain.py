"""Compose remedies: run them in order on the same parameters."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from gradsentry.remedies.base import Remedy, RemedyResult

__all__ = ["Chain"]


class Chain:
    """Run remedies one after another; stop early when one skips the step.

    The per-tensor norms given to the chain go to the first remedy; each later remedy receives the
    norms after the previous one when that remedy could report them for free (scaling clippers can:
    ``norms × scale``), else None (it recomputes them). A remedy whose result is a host-side skip
    (e.g. :class:`NonFiniteGuard` with ``sync=True``) ends the chain: later remedies would only see the
    gradients it removed.

    Args:
        *remedies: the remedies, in the order they run.

    Raises:
        TypeError: if an argument is not callable.

    Example:
        >>> from gradsentry.remedies import ClipGlobalNorm, NonFiniteGuard
        >>> fix = Chain(NonFiniteGuard(), ClipGlobalNorm(1.0))
    """

    def __init__(self, *remedies: Remedy) -> None:
        for r in remedies:
            if not callable(r):
                raise TypeError(f"Chain takes remedies (callables), got {type(r).__name__}")
        self.remedies = tuple(remedies)

    def __repr__(self) -> str:
        return f"Chain({', '.join(map(repr, self.remedies))})"

    def __call__(
        self, params: Iterable[Tensor], *, norms: Tensor | None = None, loss: Tensor | float | None = None
    ) -> RemedyResult:
        ps = list(params)
        children: list[RemedyResult] = []
        for remedy in self.remedies:
            res = remedy(ps, norms=norms, loss=loss)
            children.append(res)
            if res.skipped is True:
                break
            norms = res.next_norms(norms)
        skipped: Tensor | bool = False
        for c in children:
            if isinstance(c.skipped, Tensor):
                skipped = (
                    c.skipped if skipped is False else torch.logical_or(torch.as_tensor(skipped), c.skipped)
                )
            elif c.skipped:
                skipped = True
        first, last = (
            (children[0], children[-1]) if children else (RemedyResult("Chain"), RemedyResult("Chain"))
        )
        return RemedyResult(
            "Chain",
            norm_before=first.norm_before,
            norm_after=last.norm_after,
            skipped=skipped,
            children=children,
            composite=True,
            norms_after=norms,
        )
