"""The fused multi-tensor path of :mod:`gradsentry.stats`: which path a device takes, and the
(device, dtype) grouping of a tensor list, computed once and reused by every logged step.

On an accelerator every per-tensor statistic is one ``torch._foreach_*`` call per (device, dtype)
group (one or a few kernel launches whatever the number of tensors). On CPU two statistics keep a
per-tensor kernel, because the fused CPU kernels are slower or less accurate there: max |g|
(``_foreach_norm(inf)`` falls back to a scalar loop, ~13x slower than one ``torch.aminmax`` per
tensor) and the accurate float32 sums of squares (:func:`gradsentry.stats.sq_norms`). Tests and
``benchmarks/launches.py`` take the accelerator path on CPU with :func:`fused_path` to count its ops.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import Tensor

_FORCED: ContextVar[bool] = ContextVar("gradsentry_fused_path", default=False)

#: dtypes whose norms are accumulated in float32 (``_foreach_norm(..., dtype=torch.float32)``): an
#: fp16 entry of 300 has a square (9e4) beyond fp16's range, its float32 accumulation does not overflow.
LOW_PRECISION = (torch.float16, torch.bfloat16)


@contextmanager
def fused_path(on: bool = True) -> Iterator[None]:
    """Within the block, tensors on the CPU take the accelerator's fused path (``on=True``): one
    ``torch._foreach_*`` call per statistic. For counting launches on a machine without a GPU; the
    results agree with the CPU path to float32 rounding (its sums of squares are less accurate on
    large tensors, as torch's own CPU norm is)."""
    token = _FORCED.set(on)
    try:
        yield
    finally:
        _FORCED.reset(token)


def fused(device: torch.device) -> bool:
    """Whether statistics of tensors on ``device`` take the fused path (every non-CPU device; the
    CPU inside :func:`fused_path`)."""
    return device.type != "cpu" or _FORCED.get()


@dataclass(frozen=True)
class Group:
    """Tensors of one (device, dtype): their positions in the list and the ``_foreach_norm`` dtype."""

    device: torch.device
    dtype: torch.dtype
    positions: list[int]
    upcast: bool  # accumulated in float32 (fp16/bf16)


@dataclass(frozen=True)
class Groups:
    """The (device, dtype) groups of a list of N tensors, in first-seen order.

    Build it once per tensor list (:meth:`of`) and pass it to :func:`gradsentry.stats.foreach_norms`
    and :func:`gradsentry.stats.foreach_max_abs`, so that a logged step does no per-tensor Python work
    to group them. It stays valid while the tensors keep their device and dtype (the Monitor's layer
    index drops it when a parameter changes either, or when the set of gradients changes).

    Attributes:
        device: the first tensor's device (where results are gathered).
        groups: the groups; one when every tensor shares device and dtype (the common case).
        order: None with one group; else the int64 ``[N]`` permutation (on ``device``) that puts the
            groups' concatenated results back in list order.
        strided: every tensor is strided (no sparse one to convert first).
        all_cpu: every tensor is on the CPU.
        one_device: every tensor is on ``device``.
    """

    device: torch.device
    groups: list[Group]
    order: Tensor | None
    strided: bool
    all_cpu: bool
    one_device: bool

    @classmethod
    def of(cls, tensors: Sequence[Tensor]) -> Groups:
        """Group ``tensors`` (N >= 1) by (device, dtype).

        Raises:
            ValueError: ``tensors`` is empty.
        """
        if len(tensors) == 0:
            raise ValueError("a tensor group needs at least one tensor")
        device = tensors[0].device
        by_kind: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, t in enumerate(tensors):
            by_kind.setdefault((t.device, t.dtype), []).append(i)
        groups = [Group(dev, dt, pos, dt in LOW_PRECISION) for (dev, dt), pos in by_kind.items()]
        order = None
        if len(groups) > 1:
            flat = [i for g in groups for i in g.positions]
            inverse = [0] * len(flat)
            for k, i in enumerate(flat):
                inverse[i] = k
            order = torch.tensor(inverse, dtype=torch.long, device=device)
        return cls(
            device=device,
            groups=groups,
            order=order,
            strided=all(t.layout == torch.strided for t in tensors),
            all_cpu=all(t.device.type == "cpu" for t in tensors),
            one_device=all(g.device == device for g in groups),
        )

    def __len__(self) -> int:
        return sum(len(g.positions) for g in self.groups)
