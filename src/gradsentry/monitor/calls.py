"""Noticing :meth:`Monitor.step` called twice for one optimizer step (one warning)."""

from __future__ import annotations

import logging
import weakref
from typing import Any

from torch import Tensor
from torch.utils.hooks import RemovableHandle

log = logging.getLogger("gradsentry")


class DoubleCallCheck:
    """Compares a trainable parameter's gradient (object and version) between ``step()`` calls and,
    with an optimizer, counts its steps (a step post-hook: one Python increment per step).

    Args:
        probe: a trainable parameter, or None (nothing to check).
        optimizer: the optimizer, or None.
    """

    def __init__(self, probe: Tensor | None, optimizer: Any) -> None:
        self._probe = probe
        self._has_optimizer = optimizer is not None
        self._last_call: tuple[int, weakref.ref[Tensor] | None, int] | None = None
        self._opt_steps = 0
        self._warned = False
        self._handle: RemovableHandle | None = None
        if optimizer is not None:
            self._handle = optimizer.register_step_post_hook(self._count)

    def _count(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._opt_steps += 1

    def remove(self) -> None:
        """Remove the optimizer hook (idempotent)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def check(self) -> None:
        """Warn (once) when :meth:`Monitor.step` is called again for the same optimizer step.

        A second call is recognised when nothing happened in between: the gradient is the same tensor
        object, and either no ``optimizer.step()`` ran (with ``optimizer=``) or, without an optimizer,
        the gradient was not even written (same version). A new ``backward()`` after
        ``zero_grad(set_to_none=True)`` (the default) makes a new gradient object, so a step a loss
        scaler skipped is not mistaken for a second call.
        """
        probe = self._probe
        grad = probe.grad if probe is not None else None
        last = self._last_call
        if grad is None:
            self._last_call = None
            return
        version = grad._version
        if last is not None and not self._warned:
            opt_steps, ref, last_version = last
            same = ref is not None and ref() is grad
            if same and (opt_steps == self._opt_steps if self._has_optimizer else version == last_version):
                self._warned = True
                log.warning(
                    "gradsentry.Monitor.step() was called again for the same optimizer step (no "
                    "optimizer.step() and no new gradient since the previous call): every call makes a "
                    "record, so the log now holds two records for one step. Call step() once per "
                    "optimizer step (under gradient accumulation, after the last micro-batch only)."
                )
        self._last_call = (self._opt_steps, weakref.ref(grad), version)
