"""Helpers of the ``transformers`` callback that need neither ``transformers.TrainerCallback`` nor the
callback itself: accelerate's optimizer wrapper and gradient-sync flag, a model output's loss, the
Trainer's callback handler up the stack and the Trainer's logging schedule."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any

import torch
from torch import Tensor


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (which holds it as ``.optimizer``)."""
    inner = optimizer
    while isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer):
        inner = inner.optimizer
    return inner


def sync_gradients(optimizer: Any) -> bool:
    """accelerate's flag: True on the last micro-batch of an optimizer step."""
    state = getattr(optimizer, "gradient_state", None)
    if state is None:
        from accelerate.state import GradientState

        state = GradientState()
    return bool(state.sync_gradients)


def output_loss(output: Any) -> Tensor | None:
    """The scalar loss tensor of a model's output (``.loss``, ``["loss"]`` or a 0-d first element), or None."""
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if loss is None and isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        loss = output[0] if output[0].ndim == 0 else None
    return loss if isinstance(loss, Tensor) and loss.numel() == 1 else None


class StepLoss:
    """The model's own loss of one optimizer step, from its training forward calls (a forward hook).

    Each micro-batch's loss is the model output's ``loss``. The step's loss is their mean, or their
    sum when the Trainer passed ``num_items_in_batch``: the model then divides its summed token loss by
    the token count of the whole optimizer step, so each micro-batch's loss is its share of the step's
    mean (1/k of it under ``gradient_accumulation_steps=k``), and the Trainer logs their sum.
    """

    def __init__(self) -> None:
        self.total: Tensor | None = None
        self.count = 0
        self.shares = False  # the losses are shares of the step's mean (num_items_in_batch was passed)

    def hook(self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        """``register_forward_hook(..., with_kwargs=True)`` hook: add a training call's loss."""
        if not module.training or not torch.is_grad_enabled():
            return
        loss = output_loss(output)
        if loss is not None:
            d = loss.detach().float().reshape(())
            self.total = d if self.total is None else self.total + d
            self.count += 1
            self.shares = self.shares or kwargs.get("num_items_in_batch") is not None

    def take(self) -> Tensor | None:
        """The loss of the step since the last ``take`` (None without one), and start the next step."""
        total, count, shares = self.total, self.count, self.shares
        self.total, self.count, self.shares = None, 0, False
        if total is None or not count:
            return None
        return total if shares else total / count


def calling_handler(callback: Any) -> Any:
    """The ``transformers`` ``CallbackHandler`` up the call stack whose list holds ``callback``, or None."""
    from transformers.trainer_callback import CallbackHandler

    frame: FrameType | None = sys._getframe(1)
    for _ in range(12):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, CallbackHandler) and any(c is callback for c in owner.callbacks):
            return owner
        frame = frame.f_back
    return None


def logs_at(args: Any, state: Any) -> Callable[[int], bool]:
    """Predicate on the Monitor's call index: does the Trainer log that optimizer step?

    Call ``c`` of this run is the Trainer's step ``global_step + c + 1`` (``global_step`` at
    ``on_train_begin``: 0, or the checkpoint's step on resume); ``DefaultFlowCallback.on_step_end``
    logs step 1 with ``logging_first_step`` and the multiples of ``state.logging_steps``.
    """
    start = int(state.global_step)
    by_steps = str(getattr(args.logging_strategy, "value", args.logging_strategy)) == "steps"
    every = int(getattr(state, "logging_steps", 0) or 0)
    first = bool(args.logging_first_step)

    def logs(call: int) -> bool:
        step = start + call + 1
        return (first and step == 1) or (by_steps and every > 0 and step % every == 0)

    return logs


__all__ = ["StepLoss", "calling_handler", "logs_at", "output_loss", "sync_gradients", "unwrap_optimizer"]
