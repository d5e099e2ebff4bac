"""Generic step lines: ``step N … loss X … grad_norm Y`` in any of the usual spellings.

Read with the shared :class:`~gradsentry.logs.text.keys.Scanner`: ``key: value``, ``key=value``,
``key value``, ``key:value - key:value`` (verl), ``|``-separated fields, ``[key] value``. A line is a
training point when it has a step counter and a loss or gradient norm. Real lines read:

- TorchTitan ``step:  4  loss:  7.62585  grad_norm: 26.6250  memory: 66.91GiB(37.51%)``
- nanoGPT ``iter 3010: loss nan, time 1019.95ms, mfu 14.12%`` (and ``step 3000: train loss 4.0390,
  val loss 4.0427``: the train estimate is read, the val loss is not)
- fairseq ``epoch 003:      5 / 356 loss=9.44, …, num_updates=700, lr=0.000175, gnorm=156.036``
  (the step is ``num_updates``; ``valid on 'valid' subset`` lines are skipped)
- OLMo v1 ``[step=2/739328,epoch=0]`` followed by indented ``optim/total_grad_norm=0.0002`` lines
- verl ``step:1 - … - critic/grad_norm:nan - … - actor/grad_norm:9.819``
- timm/DeiT/BEiT ``MetricLogger`` ``Epoch: [115]  [1298/1299]  … loss: 6.5993 (6.5971) …
  grad_norm: 0.3922 (nan)``: the current value (the first number) is read, not the running average
- detectron2 ``iter: 379  total_loss: 1.707`` (and ``Loss became infinite or NaN at iteration=2137``,
  read as a NaN loss at 2137), Ignite ``Epoch[1] Iteration[10/938] Loss: nan``,
  MONAI ``Epoch: 34/50, Iter: 1/2 -- train_loss: 1.1866``, ``100000 | loss nan | lr 0.0e+00``.

Steps: ``num_updates``/``global_step`` before ``step`` before ``iteration``/``iter``/``iters``; an
iteration counter on a line that also names an epoch counts within the epoch and is made global
(:class:`~gradsentry.logs.text.keys.EpochClock`); a line starting with a bare number and ``|`` uses
that number.
"""

from __future__ import annotations

import math
import re
from typing import ClassVar

from gradsentry.logs.text.engine import Dialect, Entry
from gradsentry.logs.text.keys import EpochClock, Scanner

METRIC_LOGGER_RE = re.compile(r"Epoch:\s*\[(\d+)\]\s*\[\s*(\d+)\s*/\s*(\d+)\s*\]")
"""timm/DeiT/BEiT/MAE ``MetricLogger``: ``Epoch: [epoch]  [iteration/iterations per epoch]``."""

LEADING_STEP_RE = re.compile(r"^\s*(\d+)\s*\|")
OLMO_HEADER_RE = re.compile(r"\[step=\d+")
NAN_AT_RE = re.compile(r"Loss became infinite or NaN at iteration=(\d+)")
"""detectron2's fatal ``FloatingPointError: Loss became infinite or NaN at iteration=2137!``."""
EVAL_RE = re.compile(r"valid on '|\| valid \||\bValidation\b|\bEvaluat", re.IGNORECASE)


class StepLines(Dialect):
    """Generic ``step``/``iter`` lines with ``key value`` figures (see the module docstring)."""

    name: ClassVar[str] = "steps"
    weight: ClassVar[float] = 0.6
    example: ClassVar[str] = "step:  4  loss:  7.62585  grad_norm: 26.6250"

    def __init__(self, tags: dict[str, str] | None = None) -> None:
        super().__init__(tags)
        self.scanner = Scanner(self.tags)
        self.clock = EpochClock()
        self.metric_clock = EpochClock(base=0)  # MetricLogger epochs count from 0
        self.open_step: int | None = None

    def parse(self, line: str) -> Entry | None:
        self.continued = False
        s = self.scanner.scan(line)
        if s.loss is None and s.grad_norm is None:
            if "became infinite" in line and (m := NAN_AT_RE.search(line)) is not None:
                self.note(
                    "detectron2's 'Loss became infinite or NaN at iteration=N' is read as a NaN loss at N"
                )
                self.use_keys({"loss": "loss"})
                return (int(m.group(1)), math.nan, None, None)
            if s.step is not None and OLMO_HEADER_RE.search(line):
                self.open_step = s.step  # a multi-line record: its figures follow, indented
            elif not line[:1].isspace():
                self.open_step = None
            return None
        if ("alid" in line or "valuat" in line) and EVAL_RE.search(line):
            self.counts["eval"] += 1
            return None
        if s.step is not None:
            step = s.step
        elif s.iter is not None:
            if s.epoch is not None:
                step = self.clock.step(s.epoch, s.iter, s.iter_total)
                self.note(
                    "an iteration counter within the epoch is made global: (epoch - 1) x iterations per epoch + iteration"
                )
            else:
                step = s.iter
        elif "poch" in line and (m := METRIC_LOGGER_RE.search(line)) is not None:
            step = self.metric_clock.step(int(m.group(1)), int(m.group(2)), int(m.group(3)))
            self.note("MetricLogger lines: step = epoch x iterations per epoch + iteration")
        elif (m := LEADING_STEP_RE.match(line)) is not None:
            step = int(m.group(1))
        elif self.open_step is not None and line[:1].isspace():
            step = self.open_step
            self.continued = True
        else:
            self.counts["no step"] += 1
            return None
        if s.averaged:
            self.counts["averaged"] += 1
        self.use_keys(s.keys)
        return (step, s.loss, s.grad_norm, s.lr)

    def finish(self) -> None:
        if self.counts["averaged"]:
            self.note(
                "'value (average)' pairs (MetricLogger's running average): the current value, the first "
                "number, is read; the average can be NaN while the current value is finite"
            )
        if self.counts["eval"]:
            self.note(f"validation lines skipped: {self.counts['eval']}")
        if self.counts["no step"]:
            self.note(f"lines with a loss or norm but no step counter, ignored: {self.counts['no step']}")
        if "grad_norm" in self.fields and self.fields["grad_norm"].lower() == "norm":
            self.note("the gradient norm is read from a bare 'norm' key (no better-named norm on the lines)")

    def missing_tags(self, seen: set[str]) -> list[str]:
        return [f"{k}={v}" for k, v in self.tags.items() if v not in self.scanner.seen_tags]
