"""The Monitor's hand-off to its remedy: calling it with the arguments it accepts (the shared
per-tensor norms, the loss), naming the Monitor's layers in its records, and counting the unlogged
steps it skipped for the next record."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from gradsentry.remedies.base import lend_names, param_names

_MAX_LISTED_SKIPS = 1000  # labels of skipped unlogged steps listed in one record (all are counted)


class RemedyLink:
    """Calls ``remedy`` for a Monitor of ``model`` and keeps the count of skipped unlogged steps.

    Args:
        model: the watched module (its parameter names label the remedy's records).
        remedy: a callable ``remedy(params, norms=None, loss=None)`` (see :mod:`gradsentry.remedies`).
    """

    def __init__(self, model: nn.Module, remedy: Callable[..., Any]) -> None:
        self.model = model
        self.remedy = remedy
        self.name = type(remedy).__name__
        self._names: dict[int, tuple[str, str]] | None = None
        self._accepts: set[str] | None = None
        self._skipped_steps: list[int] = []  # unlogged steps the remedy skipped since the last record
        self._skipped_count = 0
        self._skips_dev: Tensor | None = None  # the same, from device flags

    def __call__(self, params: list[Tensor], *, loss: Any, norms: Tensor | None = None) -> Any:
        """Call the remedy, passing ``norms``/``loss`` only where its signature accepts them."""
        kwargs: dict[str, Any] = {}
        if norms is not None and self._takes("norms"):
            kwargs["norms"] = norms
        if self._takes("loss"):
            kwargs["loss"] = loss
        if self._names is None:
            self._names = param_names(self.model)
        with lend_names(self._names):  # so that its records name the Monitor's layers
            return self.remedy(params, **kwargs)

    def _takes(self, name: str) -> bool:
        if self._accepts is None:
            try:
                sig = inspect.signature(self.remedy)
                kinds = {p.kind for p in sig.parameters.values()}
                self._accepts = (
                    {"norms", "loss"} if inspect.Parameter.VAR_KEYWORD in kinds else set(sig.parameters)
                )
            except (TypeError, ValueError):
                self._accepts = set()
        return name in self._accepts

    def note_unlogged_skip(self, result: Any, label: int) -> None:
        """Remember that the remedy skipped this unlogged step, for the next record's actions.

        A host flag (``NonFiniteGuard()``, ``Rollback``: already copied by the remedy) keeps the
        step's label; device flags (``NonFiniteGuard(opt, sync=False)``, ``SpikeSkip``) are OR-ed over
        the result's tree and added once to a device counter, read with the next logged step's
        transfer: no sync here.
        """
        pending: list[Any] = [result]
        flags: list[Tensor] = []  # a chain's flag ORs its children's: count the step once
        while pending:
            r = pending.pop()
            flag = getattr(r, "skipped", None)
            if isinstance(flag, Tensor):
                flags.append(flag.detach().reshape(-1)[:1])
            elif flag is True:
                self._skipped_steps.append(label)
                if len(self._skipped_steps) > _MAX_LISTED_SKIPS:
                    self._skipped_steps.pop(0)
                self._skipped_count += 1
                return
            pending.extend(getattr(r, "children", None) or [])
        if flags:
            device = flags[0].device
            if self._skips_dev is None or self._skips_dev.device != device:
                self._skips_dev = torch.zeros(
                    (), dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device
                )
            hit = torch.cat([f.to(device, torch.bool) for f in flags]).any() if len(flags) > 1 else flags[0]
            self._skips_dev.add_(hit.sum().to(self._skips_dev.dtype))

    def take_skips(self) -> tuple[int, list[int], Tensor | None]:
        """The skipped unlogged steps since the last call: their count and labels known on the host,
        and the device counter of the others (None when there is none); then starts afresh."""
        out = (self._skipped_count, self._skipped_steps, self._skips_dev)
        self._skipped_steps, self._skipped_count, self._skips_dev = [], 0, None
        return out
