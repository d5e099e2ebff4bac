"""Reader for TensorBoard event files, through tensorboard's own ``EventAccumulator``.

Accepts one ``events.out.tfevents.*`` file or a run directory. A directory with event files in a
single sub-folder (Lightning's ``lightning_logs/version_0``, HF's ``runs/<date>``) is descended
into; several runs are an error (pass one of them). Scalars written by ``SummaryWriter.add_scalar``
are stored as float32; when a run restarted, the accumulator drops the orphaned steps.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from gradsentry._extras import requires_extra
from gradsentry.logs.errors import LogFormatError
from gradsentry.logs.series import (
    DEFAULT_KEYS,
    FieldName,
    Series,
    build_series,
    pick_key,
)

EVENT_FILE_MARK = "tfevents"


def is_event_file(path: Path) -> bool:
    """True for a file named like a TensorBoard event file (``*tfevents*``)."""
    return path.is_file() and EVENT_FILE_MARK in path.name


def event_dirs(root: Path) -> list[Path]:
    """Folders under ``root`` (itself included) that directly hold event files, sorted."""
    found = {f.parent for f in root.rglob(f"*{EVENT_FILE_MARK}*") if f.is_file()}
    return sorted(found)


def resolve_run(path: Path) -> Path:
    """The event file or single run directory to read under ``path``.

    Raises:
        LogFormatError: no event file under ``path``, or event files in several folders.
    """
    if path.is_file():
        return path
    if any(is_event_file(f) for f in path.iterdir()):
        return path
    dirs = event_dirs(path)
    if not dirs:
        raise LogFormatError(f"{path}: directory without TensorBoard event files (events.out.tfevents.*)")
    if len(dirs) > 1:
        shown = ", ".join(str(d.relative_to(path)) for d in dirs[:10])
        raise LogFormatError(f"{path}: event files in {len(dirs)} runs ({shown}); pass one run directory")
    return dirs[0]


def read_tensorboard(path: str | os.PathLike[str], *, tags: dict[str, str] | None = None) -> Series:
    """Read scalar tags from a TensorBoard event file or run directory.

    Args:
        path: an event file or a run directory.
        tags: optional ``{"loss": tag, "grad_norm": tag, "lr": tag}`` overriding the default tags
            (``train/grad_norm``, ``grad_norm``, ``train/loss``, ``loss``, ...).

    Returns:
        A :class:`~gradsentry.logs.series.Series` with ``source="tensorboard"``.

    Raises:
        LogFormatError: no event file, no scalars (not an event file, or corrupt), a requested tag is
            missing, or neither a loss nor a gradient-norm tag is present (the message lists the tags).
        gradsentry._extras.MissingExtraError: tensorboard is not installed (``gradsentry[tensorboard]``).
    """
    with requires_extra("tensorboard", "reading TensorBoard logs"):
        from tensorboard.backend.event_processing import event_accumulator as ea
        from tensorboard.util import tensor_util

    p = Path(path)
    run = resolve_run(p)
    acc = ea.EventAccumulator(str(run), size_guidance={ea.SCALARS: 0, ea.TENSORS: 0})
    tb_log = logging.getLogger("tensorboard")
    level, propagate = tb_log.level, tb_log.propagate
    damaged = _DamageLog(forward_from=tb_log.getEffectiveLevel() if propagate else None)
    tb_log.addHandler(damaged)
    # tensorboard reports a cut or corrupt record only at DEBUG: listen there, pass on what the
    # user's logging would have shown anyway
    tb_log.setLevel(logging.DEBUG)
    tb_log.propagate = False
    try:
        acc.Reload()
    except Exception as exc:  # tensorboard raises its own error types for unreadable files
        raise LogFormatError(f"{run}: could not read TensorBoard events ({exc})") from exc
    finally:
        tb_log.removeHandler(damaged)
        tb_log.setLevel(level)
        tb_log.propagate = propagate
    tag_lists = acc.Tags()
    scalar_tags = list(tag_lists.get("scalars", []))
    # tf.summary v2 (Keras) stores scalars as rank-0 tensors of the "scalars" plugin
    tensor_tags = [t for t in tag_lists.get("tensors", []) if t not in scalar_tags]
    available = scalar_tags + tensor_tags
    if not available:
        raise LogFormatError(
            f"{run}: no scalar summaries found; expected a TensorBoard event file with scalars "
            "such as train/grad_norm or train/loss"
        )
    tags = tags or {}
    # exact defaults, ordered so that "train/..." wins over bare names only where listed first
    defaults: dict[FieldName, tuple[str, ...]] = {
        "grad_norm": ("train/grad_norm", *DEFAULT_KEYS["grad_norm"]),
        "loss": ("train/loss", *DEFAULT_KEYS["loss"], "batch_loss", "epoch_loss"),
        "lr": ("train/learning_rate", *DEFAULT_KEYS["lr"]),
    }
    chosen: dict[FieldName, str | None] = {
        name: pick_key(available, tags.get(name), defaults[name], f"{name} tag", str(run))
        for name in ("loss", "grad_norm", "lr")
    }
    if chosen["loss"] is None and chosen["grad_norm"] is None:
        raise LogFormatError(
            f"{run}: no loss or gradient-norm scalar tag (tried {', '.join(defaults['loss'][:4])}, "
            f"{', '.join(defaults['grad_norm'][:3])}); available: {', '.join(available[:30])}. "
            "Name them with --loss-tag/--grad-tag"
        )
    points: dict[FieldName, dict[int, float]] = {"loss": {}, "grad_norm": {}, "lr": {}}
    for name, tag in chosen.items():
        if tag is None:
            continue
        if tag in scalar_tags:
            for ev in acc.Scalars(tag):
                points[name][int(ev.step)] = float(ev.value)
            continue
        for tev in acc.Tensors(tag):
            arr = tensor_util.make_ndarray(tev.tensor_proto)
            if arr.size != 1 or arr.dtype.kind not in "fiu":
                raise LogFormatError(
                    f"{run}: tag {tag!r} holds {arr.dtype} tensors of shape {arr.shape}, not scalars"
                )
            points[name][int(tev.step)] = float(arr.reshape(()))
    found = {name: tag for name, tag in chosen.items() if tag is not None}
    notes = ["TensorBoard scalars are stored as float32"]
    notes += [
        f"{reason}: only the events before it were read (a run killed mid-write, or a damaged file)"
        for reason in damaged.reasons
    ]
    return build_series(points, source="tensorboard", path=str(run), fields=found, notes=notes)


class _DamageLog(logging.Handler):
    """Collects tensorboard's "Truncated record in FILE (reason)" messages (a cut or corrupt record
    ends the reading of that file silently otherwise)."""

    def __init__(self, forward_from: int | None) -> None:
        super().__init__(level=logging.DEBUG)
        self.reasons: list[str] = []
        self.forward_from = forward_from

    def emit(self, record: logging.LogRecord) -> None:
        if self.forward_from is not None and record.levelno >= self.forward_from:
            logging.getLogger().handle(record)  # as propagation would have
        try:
            message = record.getMessage()
        except Exception:  # a malformed record must not break reading
            return
        if message.startswith("Truncated record in "):
            where, _, why = message[len("Truncated record in ") :].partition(" (")
            kind = "corrupt record (checksum)" if "crc" in why else "truncated record"
            self.reasons.append(f"{Path(where).name}: reading stopped at a {kind}")
