"""Progress bars: tqdm postfixes (accelerate/diffusers scripts, Lightning's text bar) and Keras.

Real lines read (MuseTalk #230; Lightning #4225 and #11471; image-segmentation-keras #50;
Mobilenet-ssd-keras #21)::

    Steps:   2%|▍         | 92679/5900000 [19:15:43<1185:20:02,  1.36it/s, backward=0.177, loss=nan, lr=4.99e-5]
    Epoch 0:  22%|██▏       | 4/18 [00:17<01:02,  4.47s/it, loss=10.072, v_num=193315]
    Epoch 80:  67% 10/15 [02:53<01:18, 15.76s/it, loss=0.429, v_num=l1_0, grad_2.0_norm_model.base_model.conv1.weight_step=2.510]
    512/512 [==============================] - 127s 247ms/step - loss: nan - acc: nan - val_loss: nan - val_acc: nan
      3/234 [..............................] - ETA: 33:37:24 - loss: 44.4110Batch 3: Invalid loss, terminating training

tqdm: the step is the bar's counter. A bar described ``Epoch N`` (Lightning) counts batches within
the epoch: the step is made global as epoch x batches per epoch + batch, so steps keep increasing
across epochs. Bars without a loss or norm in their postfix (evaluation bars) are not read; a
redrawn bar for the same counter is merged (the last values kept). Lightning's postfix ``loss`` is a
running mean over the last 20 batches.

Keras: the step is (epoch - 1) x batches per epoch + batch, the epoch taken from the ``Epoch k/N``
line before (else counted from the completed ``n/n`` lines); Keras prints the running mean of the
epoch so far. TerminateOnNaN's ``Batch b: Invalid loss`` is read as a NaN loss at that batch.
"""

from __future__ import annotations

import math
import re
from typing import ClassVar

from gradsentry.logs.text.engine import Dialect, Entry
from gradsentry.logs.text.keys import EpochClock, Scanner

TQDM_RE = re.compile(
    r"(?<![\d.])(?P<pct>\d+)%\s*(?:\|[^|\n]*\|)?\s*(?P<i>\d+)/(?P<n>\d+|\?)\s*\[(?P<info>[^\]]*)\]?"
)
"""A tqdm bar: ``NN%|bar| i/n [elapsed<remaining, rate, postfix]``; the description is the text before."""
EPOCH_DESC_RE = re.compile(r"Epoch\s+(\d+)")
KERAS_BAR_RE = re.compile(r"^\s*(?P<i>\d+)/(?P<n>\d+)\s+(?:\[[=>.]*\]|[━─]+)")
KERAS_EPOCH_RE = re.compile(r"^\s*Epoch (\d+)/(\d+)\s*$")
KERAS_INVALID_RE = re.compile(r"Batch (\d+): Invalid loss")
KERAS_SPLIT_RE = re.compile(r"(?=Batch \d+: Invalid loss)")


class Tqdm(Dialect):
    """tqdm progress bars with a postfix holding a loss or gradient norm (see the module docstring)."""

    name: ClassVar[str] = "tqdm"
    example: ClassVar[str] = (
        "Steps:   2%|▍ | 92679/5900000 [19:15:43<1185:20:02,  1.36it/s, loss=nan, lr=4.99e-5]"
    )

    def __init__(self, tags: dict[str, str] | None = None) -> None:
        super().__init__(tags)
        self.scanner = Scanner(self.tags)
        self.clock = EpochClock(base=0)

    def parse(self, line: str) -> Entry | None:
        if "%" not in line or "[" not in line:
            return None
        m = TQDM_RE.search(line)
        if m is None:
            return None
        info = m.group("info")
        comma = info.find(",", info.find(",") + 1)  # the postfix follows "elapsed<remaining, rate,"
        if comma < 0:
            return None
        s = self.scanner.scan(info[comma + 1 :])
        if s.loss is None and s.grad_norm is None:
            return None
        i = int(m.group("i"))
        n = m.group("n")
        e = EPOCH_DESC_RE.search(line, 0, m.start())
        if e is not None:
            step = self.clock.step(int(e.group(1)), i, int(n) if n.isdigit() else None)
            self.counts["epoch bars"] += 1
        else:
            step = i
        self.use_keys(s.keys)
        return (step, s.loss, s.grad_norm, s.lr)

    def finish(self) -> None:
        self.note("tqdm postfix values are whatever the script passed to set_postfix (often running means)")
        if self.counts["epoch bars"]:
            self.note(
                "'Epoch N' bars count batches within the epoch: step = N x batches per epoch + batch "
                "(Lightning's postfix loss is a running mean over 20 batches)"
            )

    def missing_tags(self, seen: set[str]) -> list[str]:
        return [f"{k}={v}" for k, v in self.tags.items() if v not in self.scanner.seen_tags]


class Keras(Dialect):
    """Keras ``fit`` progress lines (see the module docstring)."""

    name: ClassVar[str] = "keras"
    split_before: ClassVar[re.Pattern[str] | None] = KERAS_SPLIT_RE
    split_hint: ClassVar[str] = "Invalid loss"
    example: ClassVar[str] = (
        "512/512 [==============================] - 127s 247ms/step - loss: nan - acc: nan"
    )

    def __init__(self, tags: dict[str, str] | None = None) -> None:
        super().__init__(tags)
        self.scanner = Scanner(self.tags)
        self.epoch: int | None = None
        self.done = 0  # completed epochs seen (n/n lines) when no "Epoch k/N" line is printed
        self.per_epoch: int | None = None

    def _step(self, batch: int) -> int:
        epoch = self.epoch if self.epoch is not None else self.done + 1
        return (epoch - 1) * (self.per_epoch or 0) + batch

    def parse(self, line: str) -> Entry | None:
        if line.startswith("Batch "):  # split off the bar line by the engine (split_before)
            m = KERAS_INVALID_RE.match(line)
            if m is None:
                return None
            self.counts["invalid"] += 1
            self.use_keys({"loss": "loss"})
            return (self._step(int(m.group(1)) + 1), math.nan, None, None)
        if line.lstrip().startswith("Epoch"):
            m = KERAS_EPOCH_RE.match(line)
            if m is not None:
                self.epoch = int(m.group(1))
            return None
        if "/" not in line:
            return None
        m = KERAS_BAR_RE.match(line)
        if m is None:
            return None
        i, n = int(m.group("i")), int(m.group("n"))
        self.per_epoch = n
        s = self.scanner.scan(line[m.end() :])
        step = self._step(i)
        if i == n and self.epoch is None:
            self.done += 1
        if s.loss is None and s.grad_norm is None:
            return None
        self.use_keys(s.keys)
        return (step, s.loss, s.grad_norm, s.lr)

    def finish(self) -> None:
        self.note(
            "Keras prints the running mean over the epoch so far; step = (epoch - 1) x batches per epoch + batch"
        )
        if self.counts["invalid"]:
            self.note("TerminateOnNaN's 'Batch b: Invalid loss' is read as a NaN loss at that batch")

    def missing_tags(self, seen: set[str]) -> list[str]:
        return [f"{k}={v}" for k, v in self.tags.items() if v not in self.scanner.seen_tags]
