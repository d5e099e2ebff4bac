"""Megatron-LM / Megatron-DeepSpeed iteration lines.

Real lines read (Megatron-LLM #33; Megatron-DeepSpeed #396, which has no loss field)::

    iteration     3383/    8000 | consumed samples:       216512 | elapsed time per iteration (ms): 7613.1 | learning rate: 6.680E-06 | global batch size:    64 | lm loss: 7.334521E-01 | loss scale: 1.0 | grad norm: 0.752 | number of skipped iterations:   0 | number of nan iterations:   0 |
     iteration     5426/  250000 | ... | learning rate: 2.999E-04 | ... | loss scale: 1.0 | grad norm: nan | ... | number of skipped iterations:   0 | number of nan iterations:   0 | ...

The step is the iteration. ``number of skipped iterations: N`` (N > 0: the loss scaler or the NaN
check skipped N optimizer steps in the logging interval ending here) and ``number of nan
iterations: N`` mark the line's step as skipped; which steps of the interval were skipped is not
logged. The printed losses are means over the logging interval; ``grad norm`` is the last
iteration's global norm before clipping.
"""

from __future__ import annotations

import re
from typing import ClassVar

from gradsentry.logs.text.engine import Dialect, Entry
from gradsentry.logs.text.keys import Scanner

ITERATION_RE = re.compile(r"(?<![\w])iteration\s+(\d+)\s*/\s*(\d+)\s*\|")
SKIPPED_RE = re.compile(r"number of (skipped|nan) iterations:\s*(\d+)")
BAD_NORM = "Bad grad_norm detected"


class Megatron(Dialect):
    """Megatron ``iteration N/ M | … |`` lines (see the module docstring)."""

    name: ClassVar[str] = "megatron"
    example: ClassVar[str] = (
        "iteration     3383/    8000 | lm loss: 7.334521E-01 | loss scale: 1.0 | grad norm: 0.752 |"
    )

    def __init__(self, tags: dict[str, str] | None = None) -> None:
        super().__init__(tags)
        self.scanner = Scanner(self.tags)

    def parse(self, line: str) -> Entry | None:
        if "iteration" not in line:
            if BAD_NORM in line:
                self.counts["bad norm"] += 1
            return None
        m = ITERATION_RE.search(line)
        if m is None:
            return None
        step = int(m.group(1))
        rest = line[m.end() :]
        s = self.scanner.scan(rest)
        for kind, n in SKIPPED_RE.findall(rest):
            if int(n) > 0:
                self.skipped.add(step)
                self.counts[kind] += int(n)
        if s.loss is None and s.grad_norm is None:
            return None
        self.use_keys(s.keys)
        return (step, s.loss, s.grad_norm, s.lr)

    def finish(self) -> None:
        self.note(
            "Megatron prints the loss averaged over each logging interval and the last iteration's grad norm"
        )
        for kind in ("skipped", "nan"):
            if self.counts[kind]:
                self.note(
                    f"Megatron counted {self.counts[kind]} {kind} iterations; each is marked skipped at the "
                    "logged iteration ending its interval"
                )
        if self.counts["bad norm"]:
            self.note(f"{self.counts['bad norm']} 'Bad grad_norm detected' warnings")

    def missing_tags(self, seen: set[str]) -> list[str]:
        return [f"{k}={v}" for k, v in self.tags.items() if v not in self.scanner.seen_tags]
