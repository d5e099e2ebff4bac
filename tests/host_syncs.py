"""Count device->host copies on CPU, where there is no device to wait for.

``.item()``, ``bool(t)``, ``float(t)``, ``int(t)`` dispatch to ``aten._local_scalar_dense`` (counted by a
``TorchDispatchMode``); ``.tolist()`` and ``.numpy()`` read CPU memory without an ATen call, so they are
counted by wrapping the Tensor methods. On CUDA the same calls are the host syncs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_METHODS = ("tolist", "numpy")


class HostSyncs(TorchDispatchMode):
    """``with HostSyncs() as s: ...``; then ``s.count`` and ``s.calls`` (what was called)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self._saved: dict[str, Callable[..., Any]] = {}

    @property
    def count(self) -> int:
        return len(self.calls)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.ops.aten._local_scalar_dense.default:
            self.calls.append(str(func))
        return func(*args, **(kwargs or {}))

    def __enter__(self) -> HostSyncs:
        for name in _METHODS:
            orig = getattr(torch.Tensor, name)
            self._saved[name] = orig

            def spy(
                t: torch.Tensor, *a: Any, _orig: Callable[..., Any] = orig, _n: str = name, **k: Any
            ) -> Any:
                self.calls.append(_n)
                return _orig(t, *a, **k)

            setattr(torch.Tensor, name, spy)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for name, orig in self._saved.items():
            setattr(torch.Tensor, name, orig)
        super().__exit__(*exc)


class OpCounter(TorchDispatchMode):
    """Counts ATen operator calls (``count``): a device-independent proxy for kernel launches on a GPU
    (a ``_foreach_*`` call counts once)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.count += 1
        return func(*args, **(kwargs or {}))
