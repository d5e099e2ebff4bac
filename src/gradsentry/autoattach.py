"""Attach a Monitor to an unmodified training script (``gradsentry run``): find the model through torch's
global hooks and measure at every optimizer step.

What is chosen and what is measured:

- **The optimizer**: the first one whose ``step()`` runs. Other optimizers (a GAN's second one) are
  not monitored; their class names are listed in :attr:`AutoMonitor.notes`.
- **The model**: until that first step, torch's global module hooks
  (``torch.nn.modules.module.register_module_forward_pre_hook`` / ``register_module_forward_hook``)
  note every module called in a forward pass. At the first step, the modules owning parameters that the
  optimizer steps are the candidates, and the outermost ones (not inside another candidate) are the
  model: one module in almost every script; several (an encoder and a decoder called one after the
  other, a model and a loss with learnable parameters) are watched together as an ``nn.ModuleDict``
  keyed by their class names. Stepped parameters no called module owns are not watched (a note says
  how many). The global module hooks are removed then (a global hook slows every module call).
- **When**: in a global optimizer step pre-hook (``torch.optim.optimizer.register_optimizer_step_pre_hook``),
  i.e. just before each ``optimizer.step()`` of that optimizer: the gradients the step is about to
  use. A script that clips before ``optimizer.step()`` is measured *after* its clipping (the global
  norm is then at most the clip threshold), unlike a hand-placed ``Monitor.step()``. Under a
  ``GradScaler``, the gradients are already unscaled there, and the steps the scaler skips (inf/NaN)
  never call ``optimizer.step()`` and are not recorded. Closure optimizers (LBFGS) compute their
  gradients inside ``step()``, after this hook: not supported (the record would hold the previous
  step's gradients).
- **The loss**: taken from the model's own output when it returns it: a 0-dim floating tensor that
  requires grad, the one such tensor in a returned tuple or list (nanoGPT's ``logits, loss``), or a
  ``loss`` key/attribute (Hugging Face ``ModelOutput``); the last such output before each step
  (under gradient accumulation: the last micro-batch's). A model returning logits, with the loss
  computed in the script, gives records without a loss: the series rules then judge the norm alone.
- **The first step**: its forward ran before the Monitor existed, so its record has no activation
  statistics; the layers' depth comes from the call order the global hooks saw in that forward.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.hooks import RemovableHandle

    from gradsentry.monitor import Monitor
    from gradsentry.records import Finding

__all__ = ["AutoMonitor", "StopRun", "scalar_loss"]

log = logging.getLogger("gradsentry")


class StopRun(BaseException):
    """Raised from the monitored ``optimizer.step()`` to stop the script (``stop_on_nonfinite=True``),
    before the optimizer applies the non-finite gradients. A ``BaseException``, so a script's
    ``except Exception`` does not swallow it.

    Attributes:
        finding: the ``nonfinite`` finding of that step.
    """

    def __init__(self, finding: Finding) -> None:
        super().__init__(finding.explanation)
        self.finding = finding


def scalar_loss(output: Any) -> torch.Tensor | None:
    """The loss a model's forward returned, detached, or None (see the module docstring for the rules)."""
    import torch

    def scalar(t: Any) -> bool:
        return isinstance(t, torch.Tensor) and t.ndim == 0 and t.is_floating_point() and t.requires_grad

    if scalar(output):
        return output.detach()  # type: ignore[no-any-return]
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor) and scalar(loss):
        return loss.detach()
    if isinstance(output, tuple | list):
        found = [t for t in output if scalar(t)]
        if len(found) == 1:
            return found[0].detach()  # type: ignore[no-any-return]
    return None


class AutoMonitor:
    """Watch the first model an unmodified script trains (see the module docstring for what is chosen).

    Use as a context manager around the script: entering installs torch's global hooks, leaving removes
    them and closes the Monitor (which writes the findings line to the JSONL file).

    Args:
        path: the JSONL file to write (replaced if it exists); written from the first step on.
        every: log every ``every``-th step of the monitored optimizer (>= 1).
        stop_on_nonfinite: raise :class:`StopRun` from the first logged ``optimizer.step()`` whose
            gradients or loss hold a NaN/inf, before the optimizer applies them.
        meta: extra metadata for the JSONL header.

    Attributes:
        monitor: the :class:`~gradsentry.Monitor`, None until the first optimizer step.
        model: the module watched, None until then.
        notes: what was chosen and what was left out, in plain words.

    Raises:
        ValueError: ``every`` is not an int >= 1.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        every: int = 1,
        stop_on_nonfinite: bool = False,
        meta: dict[str, Any] | None = None,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        self.path = Path(path)
        self.every = every
        self.stop_on_nonfinite = stop_on_nonfinite
        self.meta = dict(meta or {})
        self.monitor: Monitor | None = None
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.notes: list[str] = []
        self._ignored: set[int] = set()
        self._gave_up = False
        self._handles: list[RemovableHandle] = []
        self._module_handles: list[RemovableHandle] = []
        # First call of each module seen before the first step, in order: (module, True at its start)
        self._events: list[tuple[nn.Module, bool]] = []
        self._started: set[int] = set()
        self._ended: set[int] = set()
        self._outputs: dict[int, torch.Tensor] = {}
        self._loss: torch.Tensor | None = None

    # ------------------------------------------------------------------ hooks
    def __enter__(self) -> AutoMonitor:
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        self._module_handles = [
            register_module_forward_pre_hook(self._seen_start),
            register_module_forward_hook(self._seen_end),
        ]
        self._handles = [register_optimizer_step_pre_hook(self._before_step)]
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook and close the Monitor (idempotent)."""
        for h in [*self._handles, *self._module_handles]:
            h.remove()
        self._handles, self._module_handles = [], []
        self._events, self._outputs = [], {}
        if self.monitor is not None:
            self.monitor.close()

    def _seen_start(self, module: nn.Module, args: Any) -> None:
        if id(module) not in self._started:
            self._started.add(id(module))
            self._events.append((module, True))

    def _seen_end(self, module: nn.Module, args: Any, output: Any) -> None:
        if id(module) not in self._ended:
            self._ended.add(id(module))
            self._events.append((module, False))
        import torch

        if torch.is_grad_enabled():
            loss = scalar_loss(output)
            if loss is not None:
                self._outputs[id(module)] = loss

    def _capture_loss(self, module: nn.Module, args: Any, output: Any) -> None:
        import torch

        if torch.is_grad_enabled():
            loss = scalar_loss(output)
            if loss is not None:
                self._loss = loss

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._gave_up:
            return
        try:
            self._step(optimizer)
        except Exception as exc:  # monitoring must never kill the training (StopRun is no Exception)
            self._gave_up = True
            self.notes.append(f"monitoring stopped after an error: {type(exc).__name__}: {exc}")
            log.error("gradsentry run: %s; the script goes on unmonitored", self.notes[-1])

    def _step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.optimizer is None:
            self._start(optimizer)
            if self.monitor is None:
                return
        if optimizer is not self.optimizer:
            if id(optimizer) not in self._ignored:
                self._ignored.add(id(optimizer))
                self.notes.append(
                    f"a second optimizer ({type(optimizer).__name__}) steps too: not monitored "
                    f"(only the first, {type(self.optimizer).__name__}, is)"
                )
            return
        assert self.monitor is not None
        self.monitor.step(loss=self._loss)
        self._loss = None

    # ------------------------------------------------------------------ finding the model
    def _start(self, optimizer: torch.optim.Optimizer) -> None:
        from gradsentry.monitor import Monitor
        from gradsentry.sinks.jsonl import JsonlSink

        self.optimizer = optimizer
        for h in self._module_handles:  # every module call goes through the slow path while they exist
            h.remove()
        self._module_handles = []
        model, events = self._find_model(optimizer)
        if model is None:
            self._gave_up = True
            log.warning("gradsentry run: %s; the script runs unmonitored", self.notes[-1])
            return
        self.model = model
        self.monitor = Monitor(
            model,
            every=self.every,
            optimizer=optimizer,
            sinks=[JsonlSink(self.path, resume=False)],
            meta={"model": self.meta.pop("model", type(model).__name__), **self.meta},
            on_nonfinite=self._stop if self.stop_on_nonfinite else None,
        )
        # The first forward ran before the Monitor existed: give it the call order seen then, through
        # the Monitor's own order hooks, so that the first record's layers are in forward order.
        self.monitor._index.replay(events)
        self._loss = self._outputs.get(id(model))
        self._outputs = {}
        self._handles.append(model.register_forward_hook(self._capture_loss))

    def _find_model(
        self, optimizer: torch.optim.Optimizer
    ) -> tuple[nn.Module | None, list[tuple[nn.Module, bool]]]:
        """The outermost called module(s) owning the stepped parameters (see the module docstring)."""
        from torch import nn

        stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
        called = [m for m, at_start in self._events if at_start]
        owning = [m for m in called if any(id(p) in stepped for p in m.parameters())]
        inner = {id(sub) for m in owning for sub in m.modules() if sub is not m}
        top = [m for m in owning if id(m) not in inner]
        if not top:
            self.notes.append(
                f"no module called in a forward pass owns the parameters {type(optimizer).__name__} steps"
            )
            return None, []
        covered = {id(p) for m in top for p in m.parameters()} & stepped
        if len(covered) < len(stepped):
            self.notes.append(
                f"{len(stepped) - len(covered)} of the {len(stepped)} parameters the optimizer steps belong "
                "to no module called in a forward pass: not monitored"
            )
        wanted = {id(sub) for m in top for sub in m.modules()}
        events = [(m, s) for m, s in self._events if id(m) in wanted]
        if len(top) == 1:
            self.notes.append(f"monitoring {type(top[0]).__name__}, stepped by {type(optimizer).__name__}")
            return top[0], events
        names: dict[str, nn.Module] = {}
        for m in top:
            key, n = type(m).__name__, 1
            while key in names:
                n += 1
                key = f"{type(m).__name__}_{n}"
            names[key] = m
        self.notes.append(
            f"monitoring {', '.join(names)} together (all stepped by {type(optimizer).__name__}, called separately)"
        )
        self.meta.setdefault("model", "+".join(names))
        return nn.ModuleDict(names), events

    def _stop(self, finding: Finding) -> None:
        raise StopRun(finding)
