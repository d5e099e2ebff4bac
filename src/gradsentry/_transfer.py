"""The named packet: device tensors added by name with their cross-rank reduction, reduced in at
most two collectives, moved to the host in one copy, and read back by name.

A statistic is one :meth:`Packet.add` on the device side and one ``values[name]`` on the host side;
nothing depends on the order in which statistics are added.

The copy is either blocking (``Tensor.cpu()``, the values are there when :meth:`Packet.to_host`
returns) or deferred: on an accelerator, a ``non_blocking`` copy into pinned host memory followed by
an event recorded on the current stream, so that the host never waits for the device; the values
are read once :meth:`Transfer.ready` (the event has passed) or after :meth:`Transfer.wait`. On CPU
the deferred copy is done at once and its event is :class:`Done`, unless the caller passes its own
event (tests drive completion that way).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Protocol, TypeAlias

import torch
from torch import Tensor

from gradsentry import _dist

Reduction: TypeAlias = Literal["sum", "mean", "max"] | None
"""How an entry is reduced over ranks: "sum" (each rank holds a part), "mean" (each rank measured
its own batch), "max", or None (identical on every rank already)."""


class Event(Protocol):
    """What a deferred transfer waits on: ``torch.cuda.Event`` (and other accelerators' events) has
    this shape."""

    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


class Done:
    """An event that has already passed (a copy that completed when it was made)."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None


EventFactory: TypeAlias = Callable[[torch.device], Event]


def device_event(device: torch.device) -> Event:
    """An event recorded now on ``device``'s current stream; :class:`Done` on CPU.

    Raises:
        RuntimeError: the device type has no event API in this torch build.
    """
    if device.type == "cpu":
        return Done()
    event = torch.Event(device=device)
    event.record()
    return event


class Transfer:
    """The host side of a packet: its values, available once the copy's event has passed.

    Args:
        host: the flat host tensor the copy writes into (``[N]``).
        layout: ``(name, offset, size)`` of each entry, in the flat tensor.
        event: the event marking the end of the copy.
    """

    def __init__(self, host: Tensor, layout: list[tuple[str, int, int]], event: Event) -> None:
        self._host = host
        self._layout = layout
        self._event = event
        self._values: dict[str, list[float]] | None = None

    def ready(self) -> bool:
        """True when the values can be read without waiting for the device."""
        return self._values is not None or bool(self._event.query())

    def wait(self) -> None:
        """Block until the copy has completed (a host sync when it had not)."""
        if self._values is None and not self._event.query():
            self._event.synchronize()

    def values(self) -> dict[str, list[float]]:
        """``{name: values}`` as Python floats (waits for the copy first; computed once)."""
        if self._values is None:
            self.wait()
            flat = self._host.tolist()
            self._values = {name: flat[start : start + n] for name, start, n in self._layout}
            self._host = torch.empty(0)
        return self._values


class Packet:
    """Named statistics of one logged step, on one device in one dtype, until :meth:`to_host`.

    Args:
        device: where the entries live (each added tensor is moved there).
        dtype: the dtype of the transfer (float64 on CPU, float32 on accelerators: see
            :func:`gradsentry.stats.reduce_dtype`).

    Example:
        >>> p = Packet(torch.device("cpu"), torch.float64)
        >>> p.add("loss", torch.tensor(2.5), "mean")
        >>> p.add("norms", torch.tensor([3.0, 4.0]))
        >>> p.to_host().values()["norms"]
        [3.0, 4.0]
    """

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device = device
        self.dtype = dtype
        self._items: dict[str, tuple[Tensor, Reduction]] = {}

    def add(self, name: str, value: Tensor, op: Reduction = None) -> None:
        """Add (or replace) the entry ``name``: any shape, flattened; reduced over ranks by ``op``
        in :meth:`reduce`.

        Raises:
            ValueError: ``op`` is not one of "sum", "mean", "max", None.
        """
        if op not in ("sum", "mean", "max", None):
            raise ValueError(f"a packet entry's reduction must be 'sum', 'mean', 'max' or None, got {op!r}")
        if value.requires_grad:
            value = value.detach()
        if value.dim() != 1:
            value = value.reshape(-1)
        self._items[name] = (value.to(self.device, self.dtype), op)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __getitem__(self, name: str) -> Tensor:
        return self._items[name][0]

    def pop(self, name: str) -> Tensor:
        """Remove the entry ``name`` and return its tensor."""
        return self._items.pop(name)[0]

    def reduce(self, ctx: _dist.DistContext | None) -> None:
        """Reduce every entry over ranks by its reduction (at most one ``all_reduce(SUM)`` and one
        ``all_reduce(MAX)``; see :func:`gradsentry._dist.reduce_parts`); entries become unreduced
        (op None) so that a second call does nothing.

        Raises:
            gradsentry.monitor.DistributedError: a collective failed or timed out.
        """
        names = list(self._items)
        reduced = _dist.reduce_parts(ctx, [self._items[n] for n in names])
        self._items = {n: (t, None) for n, t in zip(names, reduced, strict=True)}

    def to_host(self, *, deferred: bool = False, event: EventFactory | None = None) -> Transfer:
        """Move every entry to the host in one copy.

        Args:
            deferred: False: a blocking copy (one host sync). True: on an accelerator, a
                ``non_blocking`` copy into pinned memory and an event; no host sync.
            event: with ``deferred``, makes the event that marks the copy's end (default:
                :func:`device_event`).

        Returns:
            A :class:`Transfer`; read it with ``.values()``.
        """
        layout: list[tuple[str, int, int]] = []
        offset = 0
        for name, (t, _) in self._items.items():
            layout.append((name, offset, t.numel()))
            offset += t.numel()
        flat = (
            torch.cat([t for t, _ in self._items.values()])
            if self._items
            else torch.zeros(0, dtype=self.dtype, device=self.device)
        )
        if not deferred:
            return Transfer(flat.cpu(), layout, Done())
        if flat.device.type == "cpu":
            host = flat
        else:
            host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            host.copy_(flat, non_blocking=True)
        return Transfer(host, layout, (event or device_event)(flat.device))
