"""The common shape every log reader returns: :class:`Series`, one value per logged step.

A reader finds the training loss, the global gradient norm and the learning rate in another tool's
log and aligns them on the union of their steps. A value that was not logged at a step is ``None``;
a value that was logged as NaN or infinity stays a float (it is evidence, never dropped).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from gradsentry.logs.errors import LogFormatError
from gradsentry.records import json_safe

log = logging.getLogger("gradsentry")

FieldName = Literal["loss", "grad_norm", "lr"]
FIELDS: tuple[FieldName, ...] = ("loss", "grad_norm", "lr")

EXPECTED_FORMATS = (
    "a Hugging Face trainer_state.json (an object with a 'log_history' list), "
    "a TensorBoard event file (events.out.tfevents.*) or a run directory of them, "
    "a CSV file with a step column (e.g. Lightning's CSVLogger metrics.csv), "
    "mmengine JSON scalar lines (vis_data/scalars.json), "
    "a gradsentry .jsonl run, "
    "or a console text log (HF Trainer log dicts, mmengine/mmcv, Megatron, tqdm postfixes, Keras, "
    "or lines with a step counter and a loss or gradient norm)"
)
"""What ``load_series`` can read, for error messages (shared by every reader)."""

GRAD_NORM_KEYS: tuple[str, ...] = (
    "grad_norm",
    "train/grad_norm",
    "grad_norm/total",
    "train/grad_norm_total",
    "grad_2.0_norm_total",
    "train/grad_2.0_norm_total",
    "grad_norm_total",
    "global_norm",
    "gradient_norm",
    "gradsentry/global_norm",
)
"""Names under which trainers log the global gradient norm (HF, Lightning's ``grad_norm`` util, mmengine,
gradsentry's own Lightning/HF callbacks: ``gradsentry/global_norm``), best first."""

LOSS_KEYS: tuple[str, ...] = (
    "loss",
    "train/loss",
    "train_loss",
    "train_loss_step",
    "loss_step",
    "train/loss_step",
    "loss/train",
    "Loss/train",
    "training_loss",
    "gradsentry/loss",
)
"""Names under which trainers log the training loss (first match wins; ``gradsentry/loss``: gradsentry's
``TensorBoardSink``, W&B and MLflow sinks)."""

LR_KEYS: tuple[str, ...] = (
    "learning_rate",
    "train/learning_rate",
    "lr",
    "train/lr",
    "lr-AdamW",
    "lr-Adam",
    "lr-SGD",
    "base_lr",
    "gradsentry/lr",
)
"""Names under which trainers log the learning rate (HF, mmengine, Lightning's LearningRateMonitor)."""

DEFAULT_KEYS: dict[FieldName, tuple[str, ...]] = {
    "loss": LOSS_KEYS,
    "grad_norm": GRAD_NORM_KEYS,
    "lr": LR_KEYS,
}


@dataclass
class Series:
    """Loss, global gradient norm and learning rate of one run, aligned on logged steps.

    Attributes:
        steps: logged optimizer steps, strictly increasing (length N).
        loss: training loss at each step (length N), ``None`` where not logged.
        grad_norm: global gradient L2 norm at each step (length N, same units as the gradient),
            ``None`` where not logged. Trainers log it before clipping.
        lr: learning rate at each step (length N), ``None`` where not logged.
        source: the format read, a name of ``gradsentry.logs.registry.FORMATS``: ``"hf"``,
            ``"tensorboard"``, ``"csv"``, ``"mmengine"``, ``"jsonl"`` or a console text format
            (``"hf-console"``, ``"mmengine-text"``, ``"megatron"``, ``"keras"``, ``"tqdm"``, ``"steps"``).
        path: the file or directory read.
        fields: for each field found, the key, tag or column it came from, e.g. ``{"loss": "train/loss"}``.
        notes: facts about the log a reader of the analysis should know (e.g. window means, skipped
            eval entries, large step gaps).
        skipped: steps whose optimizer step the log says was skipped (a loss scaler's overflow line:
            DeepSpeed ``OVERFLOW! Rank 0 Skipping step``, apex ``Gradient overflow.  Skipping step``,
            fairseq ``overflow detected``), sorted; a step here need not be in ``steps``.
        meta: facts about the run's set-up the log states, read by the advice: ``"optimizer"``
            (lower-case class name, e.g. ``"adamw"``, ``"sgd"``), ``"max_grad_norm"`` (the trainer's
            clipping threshold, L2 norm; absent or None when the trainer does not clip),
            ``"lr"`` (the base learning rate). Absent keys are unknown.

    Raises:
        ValueError: from the constructor when the lists differ in length, or steps are not increasing
            or do not fit in 64 bits.
    """

    steps: list[int]
    loss: list[float | None]
    grad_norm: list[float | None]
    lr: list[float | None]
    source: str = ""
    path: str = ""
    fields: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.steps)
        for name in FIELDS:
            if len(getattr(self, name)) != n:
                raise ValueError(f"Series.{name} has {len(getattr(self, name))} values for {n} steps")
        if any(b <= a for a, b in zip(self.steps, self.steps[1:], strict=False)):
            raise ValueError("Series.steps must be strictly increasing")
        if self.steps and not (self.steps[0] >= -(2**63) and self.steps[-1] < 2**63):
            bad = self.steps[-1] if self.steps[-1] >= 2**63 else self.steps[0]
            raise ValueError(f"step {bad} is out of range (steps must fit in 64 bits)")

    def __len__(self) -> int:
        return len(self.steps)

    def has(self, name: FieldName) -> bool:
        """True when at least one value of ``name`` was logged."""
        return any(v is not None for v in getattr(self, name))

    def values(self, name: FieldName) -> tuple[np.ndarray, np.ndarray]:
        """The logged points of one field.

        Args:
            name: ``"loss"``, ``"grad_norm"`` or ``"lr"``.

        Returns:
            ``(steps, values)``: int64 array [M] and float64 array [M] of the M steps where the field
            was logged (NaN and infinity kept).
        """
        pairs = [(s, v) for s, v in zip(self.steps, getattr(self, name), strict=True) if v is not None]
        steps = np.array([p[0] for p in pairs], dtype=np.int64)
        vals = np.array([p[1] for p in pairs], dtype=np.float64)
        return steps, vals

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (non-finite floats become ``"NaN"``, ``"Infinity"``, ``"-Infinity"``)."""
        return {
            "source": self.source,
            "path": self.path,
            "fields": dict(self.fields),
            "notes": list(self.notes),
            "steps": list(self.steps),
            "loss": [json_safe(v) for v in self.loss],
            "grad_norm": [json_safe(v) for v in self.grad_norm],
            "lr": [json_safe(v) for v in self.lr],
            "skipped": list(self.skipped),
            "meta": json_safe(dict(self.meta)),
        }


def to_float(value: Any, where: str) -> float | None:
    """Read one logged number: JSON numbers, NaN/Infinity, numeric strings; ``None``/``""`` mean not logged.

    Raises:
        LogFormatError: the value is not a number (e.g. a boolean, a list, ``"abc"``); ``where``
            names the file and entry.
    """
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise LogFormatError(f"{where}: expected a number, got {value!r}")
    try:
        return float(value)
    except ValueError as exc:
        raise LogFormatError(f"{where}: expected a number, got {value!r}") from exc


def to_step(value: Any, where: str) -> int:
    """Read a step number (an integer, or a float/string holding one).

    Raises:
        LogFormatError: the value is missing, fractional or not a number.
    """
    f = to_float(value, where)
    if f is None or not math.isfinite(f) or f != int(f):
        raise LogFormatError(f"{where}: expected an integer step, got {value!r}")
    return int(f)


def pick_key(
    available: Sequence[str], wanted: str | None, candidates: Sequence[str], what: str, where: str
) -> str | None:
    """Choose the key/tag/column holding ``what``.

    Args:
        available: keys present in the log.
        wanted: the key the user asked for (must exist), or None to search ``candidates`` in order.
        candidates: default names, best first.
        what: human name of the field for the error message.
        where: the file, for the error message.

    Returns:
        The chosen key, or None when no candidate is present.

    Raises:
        LogFormatError: ``wanted`` was given but is not in ``available`` (the message lists what is).
    """
    avail = list(available)
    if wanted is not None:
        if wanted not in avail:
            shown = ", ".join(sorted(avail)[:40]) or "none"
            raise LogFormatError(f"{where}: no {what} named {wanted!r}; available: {shown}")
        return wanted
    for c in candidates:
        if c in avail:
            return c
    return None


# The formats whose reader recognised the file, by ``Series.source``: for them, a file without values
# is a run that has logged nothing yet, not a file of the wrong kind.
_SOURCE_NAMES = {
    "jsonl": "gradsentry run",
    "hf": "Hugging Face trainer_state.json",
    "csv": "CSV log",
    "tensorboard": "TensorBoard log",
    "mmengine": "mmengine scalars log",
}


def no_values_message(path: str | os.PathLike[str], source: str | None = None) -> str:
    """What ``analyze`` (and ``report``) say about a log without a single loss or gradient norm value
    (e.g. a gradsentry run holding only its header). ``source``: the reader that recognised the file
    (a :attr:`Series.source`); the message then names that format instead of listing every one."""
    name = _SOURCE_NAMES.get(source or "")
    if name is not None:
        return (
            f"{path}: no training loss or gradient norm values found in this {name} "
            "(has the run logged a step yet?)"
        )
    return f"{path}: no training loss or gradient norm values found; expected {EXPECTED_FORMATS}"


def build_series(
    points: Mapping[FieldName, Mapping[int, float]],
    *,
    source: str,
    path: str,
    fields: Mapping[FieldName, str] | Mapping[str, str],
    notes: Sequence[str] = (),
    skipped: Sequence[int] = (),
    meta: Mapping[str, Any] | None = None,
) -> Series:
    """Align per-field ``{step: value}`` maps into a :class:`Series` on the union of their steps.

    Also notes step gaps larger than :data:`GAP_NOTE_FACTOR` times the median step spacing.

    Raises:
        LogFormatError: no field has any point (nothing to analyse).
    """
    all_steps = sorted({s for pts in points.values() for s in pts})
    if not all_steps:
        raise LogFormatError(no_values_message(path, source))
    cols = {name: [points.get(name, {}).get(s) for s in all_steps] for name in FIELDS}
    out_notes = list(notes)
    gap = largest_gap(all_steps)
    if gap is not None:
        out_notes.append(gap)
    try:
        return Series(
            steps=all_steps,
            loss=cols["loss"],
            grad_norm=cols["grad_norm"],
            lr=cols["lr"],
            source=source,
            path=path,
            fields={str(k): v for k, v in fields.items()},
            notes=out_notes,
            skipped=sorted(set(skipped)),
            meta=dict(meta or {}),
        )
    except ValueError as exc:  # steps out of the 64-bit range (the rest is built consistent here)
        raise LogFormatError(f"{path}: {exc}") from None


GAP_NOTE_FACTOR = 100.0
"""A step gap larger than this many median spacings is reported in ``Series.notes``."""


def largest_gap(steps: Sequence[int]) -> str | None:
    """Describe the largest step gap when it exceeds ``GAP_NOTE_FACTOR`` median spacings, else None."""
    if len(steps) < 3:
        return None
    diffs = np.diff(np.asarray(steps, dtype=np.float64))
    med = float(np.median(diffs))
    i = int(np.argmax(diffs))
    if med > 0 and diffs[i] > GAP_NOTE_FACTOR * med:
        return (
            f"huge step gap: {int(diffs[i])} steps between logged steps {steps[i]} and {steps[i + 1]} "
            f"(median spacing {med:g}); a restart or a wrong step counter? Rates are per step."
        )
    return None
