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

from typing import ClassVar

from gradsentry.logs.text.engine import Dialect, Entry
from gradsentry.logs.text.keys import Scanner

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
        s = self.scanner.scan(line)
        if s.iter is None or s.iter_total is None:  # not "iteration N/ M"
            return None
        if s.skipped or s.nan_iters:
            self.skipped.add(s.iter)
            self.counts["skipped"] += s.skipped or 0
            self.counts["nan"] += s.nan_iters or 0
        if s.loss is None and s.grad_norm is None:
            return None
        self.use_keys(s.keys)
        return (s.iter, s.loss, s.grad_norm, s.lr)

    def finish(self) -> None:
        self.note(
            "Megatron prints the loss averaged over each logging interval and the last iteration's grad norm"
        )
        for kind in ("skipped", "nan"):
            if self.counts[kind]:
                self.note(
                    f"Megatron counted {self.counts[kind]} {kind} iterations; the logged iteration ending each "
                    "interval that had some is marked skipped (which iterations of the interval is not logged)"
                )
        if self.counts["bad norm"]:
            self.note(f"'Bad grad_norm detected' warnings: {self.counts['bad norm']}")

    def missing_tags(self, seen: set[str]) -> list[str]:
        return [f"{k}={v}" for k, v in self.tags.items() if v not in self.scanner.seen_tags]
