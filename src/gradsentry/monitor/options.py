"""The Monitor's argument checks and the run metadata it derives from the optimizer."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import torch
from torch import nn

from gradsentry import _dist

if TYPE_CHECKING:
    from gradsentry.monitor.layers import LayerIndex


def optimizer_meta(optimizer: Any) -> dict[str, Any]:
    """``{"optimizer": "<class name, lower case>", "lr": <first group's lr>}`` for the run header."""
    if optimizer is None:
        return {}
    meta: dict[str, Any] = {"optimizer": type(optimizer).__name__.lower()}
    groups = getattr(optimizer, "param_groups", None) or []
    try:  # a scheduler keeps the base lr as "initial_lr" (under warm-up "lr" may start at 0)
        lr = groups[0].get("initial_lr", groups[0].get("lr")) if groups else None
        meta["lr"] = float(lr) if lr is not None else None
    except (TypeError, ValueError, RuntimeError):  # an lr that is not a number (or a multi-element tensor)
        meta["lr"] = None
    return meta


MAX_IN_FLIGHT = 4
"""Deferred records waiting for their copy; beyond this the oldest is waited for."""

Sync: TypeAlias = Literal["auto", "blocking", "deferred"]
"""How a logged step's statistics reach the host (see :class:`~gradsentry.Monitor`'s ``sync``)."""


def defers(sync: Sync, device: torch.device, distributed: bool, alerts: bool) -> bool:
    """Whether a logged step's copy to the host is deferred: ``sync="auto"`` defers on an accelerator,
    outside ``torch.distributed`` and without ``on_nonfinite`` (``alerts``)."""
    if sync != "auto":
        return sync == "deferred"
    return device.type != "cpu" and not distributed and not alerts


def check_sync(sync: Sync, distributed: bool) -> None:
    """Raises ValueError for ``sync="deferred"`` under ``torch.distributed``."""
    if sync == "deferred" and distributed:
        raise ValueError(
            "Monitor(sync='deferred') is not supported under torch.distributed: ranks must complete "
            "their records at the same step; use sync='auto' or 'blocking'"
        )


def resolve_dist(
    model: nn.Module, index: LayerIndex, sync: Sync, process_group: Any, sharded: bool | None, timeout: Any
) -> _dist.DistContext | None:
    """The Monitor's distributed context for the parameters of ``index``'s layers
    (:func:`gradsentry._dist.resolve`), None outside ``torch.distributed``.

    Raises:
        ValueError: from :func:`gradsentry._dist.resolve` (an inconsistent distributed option or a bad
            ``dist_timeout``), or ``sync="deferred"`` under ``torch.distributed``.
    """
    params = [p for layer in index.layers for p in layer.params]
    ctx = _dist.resolve(model, params, process_group=process_group, sharded=sharded, timeout=timeout)
    check_sync(sync, ctx is not None)
    return ctx


def optimizer_lr(optimizer: Any) -> float | None:
    """The current learning rate of the optimizer's first parameter group (None without one)."""
    if optimizer is None or not optimizer.param_groups:
        return None
    lr = optimizer.param_groups[0].get("lr")
    return float(lr) if lr is not None else None


def _describe(value: Any) -> str:
    """``value`` for an error message: its type, and its repr when that is short."""
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {list(value.shape)}"
    text = repr(value)
    return type(value).__name__ + (f" ({text})" if len(text) <= 40 else "")


def _real_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and not (value.is_complex() or value.dtype == torch.bool)


def check_step_args(loss: Any, lr: Any, step: Any) -> None:
    """:meth:`Monitor.step`'s argument checks, made before the call is counted (types only: no read of
    a tensor's value, so no host sync).

    Raises:
        TypeError: ``loss`` is not a real number, a real tensor or None; ``lr`` is not a real number,
            a one-element real tensor or None; ``step`` is not an int or None (bools are refused).
    """
    if isinstance(loss, bool) or not (loss is None or isinstance(loss, numbers.Real) or _real_tensor(loss)):
        raise TypeError(
            "Monitor.step(loss=...) expects a float, a 0-dim tensor (e.g. the loss you call backward() "
            f"on) or None, got {_describe(loss)}"
        )
    if isinstance(lr, bool) or not (
        lr is None or isinstance(lr, numbers.Real) or (_real_tensor(lr) and lr.numel() == 1)
    ):
        raise TypeError(
            f"Monitor.step(lr=...) expects a float, a one-element tensor or None, got {_describe(lr)}"
        )
    if isinstance(step, bool) or not (step is None or isinstance(step, numbers.Integral)):
        raise TypeError(
            f"Monitor.step(step=...) expects an int (e.g. the trainer's global step) or None, got {_describe(step)}"
        )


def check_args(
    every: Any,
    overhead_budget: Any,
    histogram_bins: Any,
    histogram_range: Any,
    max_records: Any,
    on_nonfinite: Any,
) -> None:
    """The Monitor's argument checks on numbers and choices (see its Raises section)."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be an int >= 1, got {every!r}")
    if overhead_budget is not None and not 0 < overhead_budget < 1:
        raise ValueError(f"overhead_budget must be a fraction in (0, 1), got {overhead_budget}")
    if isinstance(histogram_bins, bool) or not isinstance(histogram_bins, int) or histogram_bins < 0:
        raise ValueError(f"histogram_bins must be an int >= 0 (0: no histograms), got {histogram_bins!r}")
    if not (
        isinstance(histogram_range, (int, float)) and math.isfinite(histogram_range) and histogram_range > 0
    ):
        raise ValueError(f"histogram_range must be a finite number > 0, got {histogram_range!r}")
    if max_records is not None and (
        isinstance(max_records, bool) or not isinstance(max_records, int) or max_records < 0
    ):
        raise ValueError(f"max_records must be None or an int >= 0, got {max_records!r}")
    if isinstance(on_nonfinite, str):
        if on_nonfinite not in ("warn", "raise"):
            raise ValueError(
                f"on_nonfinite must be None, 'warn', 'raise' or a callable, got {on_nonfinite!r}"
            )
    elif on_nonfinite is not None and not callable(on_nonfinite):
        raise TypeError(
            f"on_nonfinite must be None, 'warn', 'raise' or a callable, got {type(on_nonfinite).__name__}"
        )


def check_objects(sync: Any, sinks: Any, optimizer: Any, remedy: Any) -> None:
    """The Monitor's checks of ``sync`` and of the objects it is handed (see its Raises section), made
    before any hook is set."""
    if sync not in ("auto", "blocking", "deferred"):
        raise ValueError(f"sync must be 'auto', 'blocking' or 'deferred', got {sync!r}")
    if hasattr(sinks, "write") or not isinstance(sinks, Iterable):
        raise TypeError(
            "gradsentry.Monitor(sinks=...) expects a list of sinks, e.g. sinks=[JsonlSink(path)], "
            f"got a {type(sinks).__name__}"
        )
    if optimizer is not None and not is_optimizer(optimizer):
        raise TypeError(
            f"gradsentry.Monitor(optimizer=...) expects a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    if remedy is not None and not callable(remedy):
        raise TypeError(
            "gradsentry.Monitor(remedy=...) expects a remedy (a callable such as gradsentry.ClipGlobalNorm(1.0)), "
            f"got {type(remedy).__name__}"
        )


def is_optimizer(obj: Any) -> bool:
    """Whether ``obj`` looks like a ``torch.optim.Optimizer`` (or a wrapper of one): parameter groups and
    step hooks."""
    return hasattr(obj, "param_groups") and hasattr(obj, "register_step_post_hook")


@dataclass(frozen=True)
class MeasureOptions:
    """The Monitor's options that decide what a logged step measures (see :class:`Monitor`)."""

    max_abs: bool
    weight_norms: bool
    activations: bool
    locate_nonfinite: bool
    histogram_bins: int
    histogram_range: float
    sync_local: bool
    agree_every: bool  # overhead_budget under torch.distributed: ranks agree on `every`
    sigmoid_band: float  # saturation bands (gradsentry.Thresholds)
    tanh_band: float
