"""Hugging Face ``Trainer`` console lines (also TRL, LLaMA-Factory, axolotl): printed log dicts.

Real lines read (ModernBERT #233; transformers #35207; Chinese-LLaMA-Alpaca #534, after a tqdm bar
and a DeepSpeed overflow line)::

    {'loss': 0.0, 'grad_norm': nan, 'learning_rate': 9.773696745450087e-06, 'epoch': 0.53}
    {'loss': 10.5949, 'grad_norm': 188.28981018066406, 'learning_rate': 4.5833333333333334e-05, 'epoch': 0.25}

The dict is Python's ``repr``: single-quoted keys, bare ``nan``/``inf``, and in newer versions quoted
numbers (``'loss': '0.6931'``). It is parsed by a small tokenizer, never evaluated: a value that is
not a number (or a quoted number) is ignored. The lines have no step: they are numbered 1, 2, ...
in order (one per ``logging_steps`` optimizer steps) unless a ``'step'``/``'global_step'`` key is
present. Dicts with ``eval_*`` keys are evaluation entries and the final ``train_loss`` summary is
not a training point; both are skipped. ``grad_norm`` is the pre-clip global norm; the loss is a mean
over the logging window after the Trainer's NaN/Inf filter (a NaN step can show as ``loss 0.0`` next
to ``grad_norm nan``). ``gradsentry/global_norm`` (the gradsentry callback's key) is read as the
gradient norm when ``grad_norm`` is absent.
"""

from __future__ import annotations

import math
import re
from typing import Any, ClassVar

from gradsentry.logs.text.engine import Dialect, Entry
from gradsentry.logs.text.keys import NUM
from gradsentry.logs.text.shapes import FLOAT, LineShapes

DICT_START = "{'"
ITEM_RE = re.compile(
    r"\s*(?P<q>['\"])(?P<key>[^'\"]{1,200})(?P=q)\s*:\s*"
    r"(?P<val>'[^']*'|\"[^\"]*\"|[^,{}\[\]()'\"]+)\s*(?P<end>[,}])"
)
"""One ``'key': value`` item of a printed dict; a value is a quoted string or a bare token."""
NUM_RE = re.compile(NUM + r"\Z")

LOSS_KEYS = ("loss",)
GRAD_KEYS = ("grad_norm", "gradsentry/global_norm")
LR_KEYS = ("learning_rate", "lr")
STEP_KEYS = ("step", "global_step")


def parse_dict(text: str, start: int) -> dict[str, tuple[str, tuple[int, int]]] | None:
    """The items of the printed dict at ``text[start]`` (``{``): value as written and its span (inside
    quotes for a quoted value); None if malformed.

    >>> parse_dict("{'loss': 0.0, 'grad_norm': nan, 'note': 'x'}", 0)
    {'loss': ('0.0', (9, 12)), 'grad_norm': ('nan', (27, 30)), 'note': ("'x'", (41, 42))}
    """
    items: dict[str, tuple[str, tuple[int, int]]] = {}
    pos = start + 1
    while True:
        m = ITEM_RE.match(text, pos)
        if m is None:
            return None
        a, b = m.span("val")
        value = m.group("val")
        stripped = value.rstrip()
        b -= len(value) - len(stripped)
        if stripped[:1] in "'\"":
            a, b = a + 1, b - 1
        items[m.group("key")] = (stripped, (a, b))
        pos = m.end()
        if m.group("end") == "}":
            return items


def number(value: str | None) -> float | None:
    """A bare or quoted number as a float (``nan``/``inf`` included), else None."""
    if value is None:
        return None
    if value[:1] in "'\"":
        value = value[1:-1].strip()
    return float(value) if NUM_RE.match(value) else None


class HfConsole(Dialect):
    """Printed Trainer log dicts (see the module docstring)."""

    name: ClassVar[str] = "hf-console"
    example: ClassVar[str] = "{'loss': 0.0, 'grad_norm': nan, 'learning_rate': 9.77e-06, 'epoch': 0.53}"

    def __init__(self, tags: dict[str, str] | None = None) -> None:
        super().__init__(tags)
        self.last = 0
        self.keys: dict[str, tuple[str, ...]] = {
            "loss": (self.tags["loss"],) if "loss" in self.tags else LOSS_KEYS,
            "grad_norm": (self.tags["grad_norm"],) if "grad_norm" in self.tags else GRAD_KEYS,
            "lr": (self.tags["lr"],) if "lr" in self.tags else LR_KEYS,
            "step": STEP_KEYS,
        }
        self.seen: set[str] = set()
        self.shapes = LineShapes()

    def parse(self, line: str) -> Entry | None:
        i = line.find(DICT_START)
        if i < 0:
            return None
        vals = self.shapes.match(line)
        if vals is None:
            vals = self._read_dict(line, i)
            if vals is None:
                return None
        kind = vals[4]
        if kind != "train":
            self.counts[kind] += 1
            return None
        self.use_keys(vals[5])
        raw_step = vals[3]
        if raw_step is not None and math.isfinite(raw_step) and raw_step == int(raw_step) and raw_step >= 0:
            step = int(raw_step)
        else:
            step = self.last + 1
            self.counts["numbered"] += 1
        self.last = step
        return (step, vals[0], vals[1], vals[2])

    def _read_dict(self, line: str, start: int) -> list[Any] | None:
        """``[loss, grad_norm, lr, step, kind, keys]`` of a printed dict (learning its shape), or None."""
        items = parse_dict(line, start)
        if items is None:
            return None
        vals: list[Any] = [None] * 6
        keys: dict[str, str] = {}
        spans: list[tuple[int, tuple[int, int], int]] = []
        if any(k.startswith(("eval_", "test_")) for k in items):
            kind = "eval"
        else:
            for slot, name in enumerate(("loss", "grad_norm", "lr", "step")):
                for key in self.keys[name]:
                    text, span = items.get(key, (None, (0, 0)))
                    value = number(text)
                    if value is not None:
                        vals[slot] = value
                        spans.append((slot, span, FLOAT))
                        if name != "step":
                            keys[name] = key
                            self.seen.add(key)
                        break
            if vals[0] is not None or vals[1] is not None:
                kind = "train"
            else:
                kind = "summary" if ("train_loss" in items or "train_runtime" in items) else "other"
        vals[4] = kind
        vals[5] = keys
        self.shapes.learn(line, spans, [None, None, None, None, kind, keys])
        return vals

    def finish(self) -> None:
        if self.counts["numbered"]:
            self.note(
                "console lines carry no step: they are numbered 1, 2, ... in order (one per logging_steps "
                f"optimizer steps; {self.counts['numbered']} numbered)"
            )
        self.note(
            "grad_norm is the global norm before clipping (HF Trainer); the loss is a mean over the logging "
            "window after the Trainer's NaN/Inf filter"
        )
        if self.counts["eval"]:
            self.note(f"evaluation entries skipped: {self.counts['eval']}")
        if self.counts["summary"]:
            self.note("the final train_loss summary is not a training point: skipped")

    def missing_tags(self, seen: set[str]) -> list[str]:
        return [f"{k}={v}" for k, v in self.tags.items() if v not in self.seen]
