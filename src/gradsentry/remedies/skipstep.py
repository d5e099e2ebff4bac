"""Skip an optimizer step on a device flag, without a device→host copy.

A remedy that decides on the device whether the coming ``optimizer.step()`` must be skipped (a
non-finite gradient, a loss spike) hands its 0-d bool flag to the optimizer's :class:`DeviceSkip`
(:func:`device_skip` returns the one shared by every remedy of that optimizer, so a
:class:`~gradsentry.remedies.NonFiniteGuard` and a :class:`~gradsentry.remedies.SpikeSkip` in one
chain combine their flags). The caller then calls ``optimizer.step()`` as usual; step hooks make it a
no-op where the flag is true. Three ways, chosen per step:

``found_inf`` (fused ``torch.optim`` Adam, AdamW, SGD, Adagrad: ``fused=True``)
    The optimizer's ``found_inf`` attribute is set to the flag for the step, the protocol
    ``torch.amp.GradScaler`` uses for optimizers with ``_step_supports_amp_scaling`` (a flag
    already set by a GradScaler is combined with ours). The fused kernels then leave weights, moments
    and momentum buffers untouched, and Adam/AdamW/Adagrad subtract the flag from the step count they
    just incremented, so a skipped step changes nothing in the weights or the optimizer state
    (weight decay included). Cost: one small copy and the kernel's own test.
``restore`` (every other optimizer whose per-parameter state is made of tensors)
    Right before the step (a step pre-hook) the parameters that have a gradient and their optimizer
    state tensors are copied into buffers kept between steps (``torch._foreach_copy_``: memory for one
    copy of them); right after it (a post-hook) each is put back with ``torch.where(flag, saved,
    new)``. Restored bit for bit: the weights and every state tensor on the flag's device (moments,
    momentum buffers, device step counts). Not restored: state tensors on another device, i.e. the CPU
    ``step`` counter of non-capturable Adam/AdamW/RMSprop... on a GPU (it advances by one on a skipped
    step, so later bias corrections use a count one higher), non-tensor state, and anything the
    optimizer keeps outside ``optimizer.state`` (e.g. in ``param_groups``). The as-OLMo-core device
    step factor needs an optimizer written for it; this works on any.
``host`` (the one host sync, only where no device path exists)
    When a parameter with a gradient has no optimizer state yet (its first step, or after
    :class:`~gradsentry.remedies.ResetMoments`), or its state holds a non-tensor value, the step would
    create or change state that cannot be undone on the device (and fused SGD's first step would keep
    an uninitialised momentum buffer: ``torch.empty_like`` skipped by the kernel). Then the flag is
    read on the host once in the pre-hook and, if set, every gradient is set to None, so the step is a
    no-op as with ``NonFiniteGuard(sync=True)``.

Whatever the way, what a skipped step still does: the optimizer's step hooks run, an LR scheduler the
caller steps still advances, and the gradients are left as they were (the caller zeroes them).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor

__all__ = ["DeviceSkip", "device_skip"]

_SKIPPERS: weakref.WeakKeyDictionary[torch.optim.Optimizer, DeviceSkip] = weakref.WeakKeyDictionary()


def device_skip(optimizer: torch.optim.Optimizer) -> DeviceSkip:
    """The :class:`DeviceSkip` of ``optimizer`` (created, with its step hooks, on first use)."""
    skipper = _SKIPPERS.get(optimizer)
    if skipper is None:
        skipper = _SKIPPERS[optimizer] = DeviceSkip(optimizer)
    return skipper


def supports_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """True when every parameter group of ``optimizer`` steps through a fused kernel that reads
    ``optimizer.found_inf`` (torch's fused Adam, AdamW, SGD, Adagrad)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and all(
        g.get("fused") for g in optimizer.param_groups
    )


class DeviceSkip:
    """Turns device flags into a skipped ``optimizer.step()`` (see the module docstring).

    Use :func:`device_skip` rather than the constructor, so that one optimizer has one.

    Args:
        optimizer: the optimizer whose next step the flags control.

    Attributes:
        mode: ``"found_inf"`` or ``"restore"``, the device path this optimizer gets.
        last_way: how the last step with a flag was skipped or not: ``"found_inf"``, ``"restore"``
            or ``"host"``.
        host_syncs: how many steps needed the host path.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.mode = "found_inf" if supports_found_inf(optimizer) else "restore"
        self.last_way = ""
        self.host_syncs = 0
        self._flags: dict[int, Tensor] = {}  # owner id -> its flag for the coming step
        self._found_inf: Tensor | None = None
        self._theirs: Any = None  # a found_inf set by someone else (GradScaler) before the step
        self._saved: list[Tensor] = []
        self._live: list[Tensor] = []
        self._flag: Tensor | None = None
        optimizer.register_step_pre_hook(self._pre)
        optimizer.register_step_post_hook(self._post)

    def __repr__(self) -> str:
        return f"DeviceSkip(mode={self.mode!r})"

    def arm(self, owner: object, flag: Tensor) -> None:
        """Skip the coming step where ``flag`` (a 0-d bool tensor) is true; no host sync.

        Each ``owner`` (a remedy) holds one flag, replaced by its next call, so a flag never outlives
        the step it was set for even when the caller did not step in between.
        """
        self._flags[id(owner)] = flag.detach().reshape(())

    def disarm(self, owner: object) -> None:
        """Withdraw ``owner``'s flag."""
        self._flags.pop(id(owner), None)

    def _combined(self) -> Tensor | None:
        flags = list(self._flags.values())
        if not flags:
            return None
        flag = flags[0]
        for f in flags[1:]:
            flag = flag | f.to(flag.device)
        return flag

    def _stepping(self) -> list[Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]

    def _needs_host(self, params: list[Tensor]) -> bool:
        state = self.optimizer.state
        for p in params:
            st = state.get(p)
            if not st:
                return True
            if self.mode == "restore" and any(not isinstance(v, Tensor) for v in st.values()):
                return True
        return False

    @torch.no_grad()
    def _pre(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        flag = self._combined()
        self._flags.clear()
        if flag is None:
            return
        params = self._stepping()
        if self._needs_host(params):  # the documented host sync
            self.last_way = "host"
            self.host_syncs += 1
            if bool(flag):
                for p in params:
                    p.grad = None
            return
        self.last_way = self.mode
        if self.mode == "found_inf":
            mine = flag.to(torch.float32)
            theirs = getattr(optimizer, "found_inf", None)
            self._theirs = theirs
            if theirs is not None:  # GradScaler's overflow flag: skip on either
                mine = torch.maximum(mine.to(theirs.device), theirs.to(torch.float32))
            self._found_inf = mine
            optimizer.found_inf = mine
            return
        live = [p.detach() for p in params]
        device = flag.device
        for p in params:
            live.extend(
                v for v in optimizer.state[p].values() if isinstance(v, Tensor) and v.device == device
            )
        if len(live) != len(self._saved) or any(
            s.shape != t.shape or s.dtype != t.dtype or s.device != t.device
            for s, t in zip(self._saved, live, strict=True)
        ):
            self._saved = [torch.empty_like(t) for t in live]
        if live:
            torch._foreach_copy_(self._saved, live)
        self._live, self._flag = live, flag

    @torch.no_grad()
    def _post(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._found_inf is not None:
            if getattr(optimizer, "found_inf", None) is self._found_inf:
                if self._theirs is None:
                    del optimizer.found_inf
                else:  # give GradScaler back its own flag (it deletes it after the step)
                    optimizer.found_inf = self._theirs
            self._found_inf = self._theirs = None
        if self._flag is not None:
            for live, saved in zip(self._live, self._saved, strict=True):
                torch.where(self._flag, saved, live, out=live)
            self._live, self._flag = [], None
