"""mmengine (OpenMMLab 2.x) and mmcv 1.x runner text logs.

Real lines read (mmengine, xtuner #187; mmcv 1.x, TableMASTER-mmocr #32, a tab after ``]``)::

    10/30 22:19:57 - mmengine - INFO - Epoch(train) [1][240/735]  lr: 1.9813e-04  eta: 2:44:49  time: 2.8874  data_time: 0.0042  memory: 10762  loss: 2.5128  grad_norm: nan
    2021-11-22 01:32:34,502 - mmocr - INFO - Epoch [1][200/62598]	lr: 1.000e-03, eta: 7 days, 15:55:58, time: 0.705, ..., loss: 0.9186, grad_norm: 3.9772

and the iteration-based forms ``Iter(train) [  10/1000]`` / ``Iter [200/1000]``. The global step is
``(epoch - 1) x iterations per epoch + iteration`` for the epoch forms and the iteration for the
iteration forms. ``Epoch(val)``/``Epoch(test)`` lines (and mmcv's ``Epoch(val) [1][500]``) are
evaluation lines and skipped. The figures are *window means*: mmengine's ``LogProcessor`` (and mmcv's
``TextLoggerHook``) average ``window_size`` iterations (default 10 / the logging interval), so a
one-iteration spike shows about window_size times smaller and one NaN poisons its whole window.
"""

from __future__ import annotations

import re
from typing import ClassVar

from gradsentry.logs.text.engine import Dialect, Entry
from gradsentry.logs.text.keys import EpochClock, Scanner

MM_RE = re.compile(
    r"(?<![\w])(?P<mode>Epoch|Iter)(?:\((?P<phase>\w+)\))?\s*\[\s*(?P<x>\d+)\s*(?:/\s*(?P<xt>\d+)\s*)?\]"
    r"(?:\s*\[\s*(?P<i>\d+)\s*(?:/\s*(?P<n>\d+)\s*)?\])?"
)
"""``Epoch(train) [e][i/n]``, ``Iter(train) [i/n]``, mmcv's ``Epoch [e][i/n]`` and ``Iter [i/n]``."""


class MmengineText(Dialect):
    """mmengine / mmcv 1.x runner text lines (see the module docstring)."""

    name: ClassVar[str] = "mmengine-text"
    example: ClassVar[str] = "Epoch(train) [1][240/735]  lr: 1.9813e-04  loss: 2.5128  grad_norm: nan"

    def __init__(self, tags: dict[str, str] | None = None) -> None:
        super().__init__(tags)
        self.scanner = Scanner(self.tags)
        self.clock = EpochClock(base=1)

    def parse(self, line: str) -> Entry | None:
        at = line.find("Epoch")
        if at < 0:
            at = line.find("Iter")
            if at < 0:
                return None
        m = MM_RE.match(line, at) or MM_RE.search(line, at + 1)
        if m is None:
            return None
        mode, phase, x, _, i, n = m.groups()
        if phase is not None and phase != "train":
            self.counts["eval"] += 1
            return None
        if mode == "Epoch":
            if i is None:  # mmcv 1.x "Epoch(val) [1][500]" or an epoch summary
                self.counts["eval"] += 1
                return None
            step = self.clock.step(int(x), int(i), int(n) if n else None)
        else:
            step = int(x)
        s = self.scanner.scan(line[m.end() :])
        if s.loss is None and s.grad_norm is None:
            return None
        self.use_keys(s.keys)
        return (step, s.loss, s.grad_norm, s.lr)

    def finish(self) -> None:
        self.note(
            "mmengine/mmcv text logs print window means (window_size iterations, default 10): a "
            "one-iteration spike appears about window_size times smaller and a NaN poisons its window"
        )
        if self.counts["eval"]:
            self.note(f"validation/test lines skipped: {self.counts['eval']}")

    def missing_tags(self, seen: set[str]) -> list[str]:
        return [f"{k}={v}" for k, v in self.tags.items() if v not in self.scanner.seen_tags]
