"""Roll model and optimizer back to the last good snapshot after a divergence.

Snapshots are deep copies of ``model.state_dict()`` and ``optimizer.state_dict()`` kept in memory, or
``torch.save`` files in a directory, read back with ``torch.load(weights_only=True)`` (never
unpickling arbitrary objects). On disk they survive the crash they exist for: each is written to a
temporary file, ``fsync``-ed and renamed (never a torn file under a snapshot's name); a new
``Rollback`` on the same directory takes over the snapshots there, removes the temporary files of
killed writes and goes on numbering from the newest step; a failed write (a full disk) keeps the older
snapshots and warns instead of stopping training.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import statistics
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gradsentry import _dist
from gradsentry._io import stale_temp_files, write_atomic
from gradsentry.remedies.base import (
    RemedyResult,
    check_optimizer,
    check_positive,
    grads_of,
    per_tensor_norms,
    total_norm,
)
from gradsentry.remedies.guard import scale_lr_

__all__ = ["Rollback", "RollbackError", "SnapshotError", "load_snapshot"]

log = logging.getLogger("gradsentry")

SNAPSHOT_KEY = "gradsentry_snapshot"
SNAPSHOT_VERSION = 1


class RollbackError(RuntimeError):
    """Training cannot be rescued: no snapshot yet, or too many restores in a row."""


class SnapshotError(ValueError):
    """A snapshot file is missing, cut short, or not a gradsentry snapshot."""


def load_snapshot(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a snapshot written by :class:`Rollback` (``torch.load(weights_only=True)``, on the CPU).

    Args:
        path: the ``.pt`` file.

    Returns:
        ``{"gradsentry_snapshot": 1, "step": int, "model": state_dict, "optimizer": state_dict}``.

    Raises:
        SnapshotError: the file does not exist, is cut short or corrupt, holds something other than a
            gradsentry snapshot, or would need unsafe unpickling.
    """
    p = Path(path)
    if not p.is_file():
        raise SnapshotError(f"snapshot file {str(p)!r} does not exist")
    with p.open("rb") as fh:
        magic = fh.read(4)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types on bad input (RuntimeError, KeyError, ...)
        if magic == b"PK\x03\x04":
            raise SnapshotError(
                f"snapshot file {str(p)!r} is cut short or corrupt (not a complete torch.save archive): "
                f"{_first_line(exc)}"
            ) from exc
        raise SnapshotError(
            f"{str(p)!r} is not a gradsentry snapshot (not a torch.save file): {_first_line(exc)}"
        ) from exc
    if not isinstance(obj, dict) or SNAPSHOT_KEY not in obj:
        raise SnapshotError(
            f"{str(p)!r} is not a gradsentry snapshot (expected a dict with key {SNAPSHOT_KEY!r}, "
            f"got {type(obj).__name__})"
        )
    version = obj[SNAPSHOT_KEY]
    if version != SNAPSHOT_VERSION or not {"model", "optimizer", "step"} <= obj.keys():
        raise SnapshotError(
            f"{str(p)!r}: unsupported snapshot version {version!r} or missing model/optimizer"
        )
    return obj


def _first_line(exc: BaseException) -> str:
    """torch.load's error without its advice to retry with ``weights_only=False`` (unsafe on a file that
    is not ours: it would run pickled code)."""
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


class Rollback:
    """Snapshot model and optimizer every ``every`` steps; restore the last good one on divergence.

    Call it after ``backward()`` and before ``optimizer.step()`` with the step's loss. A step diverges
    when the loss or a gradient is non-finite, or the loss rises above the median of the last
    ``window`` good losses by more than ``loss_factor - 1`` times their scale (once ``min_history``
    losses are known). The scale is ``|median|``, or the losses' spread (1.4826 x MAD) when larger:
    for positive losses this is ``loss > loss_factor * median``; it also holds for losses that are
    negative or near zero (log-likelihoods, RL objectives), and constant losses are never a spike. On divergence it (1) calls
    ``replay`` (if given) while the diverged weights are still in place, e.g. a closure that reruns the
    failing batch with the Monitor's non-finite origin location on, so a finding names where the
    NaN/inf came from; (2) restores the latest snapshot bit for bit (the k-th restore in a row without a
    new snapshot goes k snapshots back, as far as ``keep`` allows); (3) multiplies the learning rate in
    force before the restore by ``lr_factor``; (4) sets every gradient to None, so the caller's
    ``optimizer.step()`` is a no-op (``result.skip`` is True). More than ``max_retries`` restores in a
    row raise :class:`RollbackError`. A good step is snapshotted when its index is a multiple of
    ``every`` (the weights before this step's update, which just gave a finite loss and gradients).

    One host sync per call (the loss value and the finite flag of the gradients, copied together).
    Memory: each kept in-memory snapshot is one more copy of the model and optimizer state on their
    device; use ``directory`` to keep snapshots on disk instead.
    Learning-rate schedulers overwrite ``group["lr"]``; with one, lower its base rates yourself.

    Args:
        model: the model whose ``state_dict`` is saved and restored in place.
        optimizer: its optimizer (state and learning rates are saved and restored).
        every: steps between snapshots (>= 1).
        keep: snapshots kept (>= 1); older ones are dropped (files deleted).
        directory: write snapshots there with ``torch.save`` instead of keeping them in memory. The
            directory belongs to this Rollback: snapshots already there (a run restarted after a crash)
            are taken over (the newest ``keep``; older ones are deleted), ``restore`` can load them,
            the step counter goes on from the newest one, and temporary files left by killed writes
            are removed. A snapshot that cannot be written (disk full, file-size limit) is logged as
            a warning; the older snapshots stay and training goes on.
        loss_factor: divergence threshold as a multiple of the recent median loss (> 1).
        window: number of recent good losses for the median.
        min_history: losses needed before the median test applies.
        max_retries: restores in a row allowed before giving up.
        lr_factor: learning-rate multiplier applied after each restore, in (0, 1].
        replay: optional callable run before restoring (see above).

    Raises:
        ValueError: an argument out of range.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        every: int = 100,
        keep: int = 1,
        directory: str | os.PathLike[str] | None = None,
        loss_factor: float = 10.0,
        window: int = 50,
        min_history: int = 5,
        max_retries: int = 3,
        lr_factor: float = 0.5,
        replay: Callable[[], Any] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Rollback expects the model (an nn.Module), got {type(model).__name__}")
        check_optimizer("Rollback", optimizer)
        for name, v in (("every", every), ("keep", keep), ("window", window)):
            if int(v) < 1:
                raise ValueError(f"{name} must be >= 1, got {v!r}")
        if int(max_retries) < 0 or int(min_history) < 0:
            raise ValueError("max_retries and min_history must be >= 0")
        if not float(loss_factor) > 1.0:
            raise ValueError(f"loss_factor must be > 1, got {loss_factor!r}")
        if not 0.0 < float(lr_factor) <= 1.0:
            raise ValueError(f"lr_factor must be in (0, 1], got {lr_factor!r}")
        self.model = model
        self.optimizer = optimizer
        self.every = int(every)
        self.keep = int(keep)
        self.directory = Path(directory) if directory is not None else None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self.loss_factor = check_positive("loss_factor", loss_factor)
        self.min_history = int(min_history)
        self.max_retries = int(max_retries)
        self.lr_factor = float(lr_factor)
        self.replay = replay
        self.step = 0
        self.restores = 0
        self.retries = 0
        self.losses: deque[float] = deque(maxlen=int(window))
        self._snapshots: deque[dict[str, Any] | Path] = deque()
        self.failed_snapshots = 0
        self._retry_at: int | None = None  # after a failed write: the next due step, not every step
        if self.directory is not None:
            self._take_over(self.directory)

    def _take_over(self, directory: Path) -> None:
        """Adopt the snapshots a previous run left in ``directory`` (see ``directory`` above)."""
        for tmp in stale_temp_files(directory, "snapshot-*.pt"):
            log.warning("Rollback: removing %s, left by a snapshot write that was killed", tmp)
            tmp.unlink(missing_ok=True)
        found: list[tuple[int, Path]] = []
        for path in directory.glob("snapshot-*.pt"):
            if not path.is_file() or path.is_symlink():  # a folder or link by that name is not ours
                continue
            try:
                found.append((int(path.stem.split("-")[-1]), path))
            except ValueError:
                continue
        found.sort()
        for _, old in found[: max(0, len(found) - self.keep)]:
            old.unlink(missing_ok=True)
        kept = found[-self.keep :]
        self._snapshots.extend(path for _, path in kept)
        if kept:
            self.step = kept[-1][0] + 1
            log.info(
                "Rollback: took over %d snapshot(s) in %s (steps %s); counting on from step %d",
                len(kept),
                directory,
                ", ".join(str(s) for s, _ in kept),
                self.step,
            )

    def __repr__(self) -> str:
        return f"Rollback(every={self.every}, keep={self.keep}, directory={self.directory})"

    # -- snapshots -------------------------------------------------------------------------------
    @property
    def snapshot_steps(self) -> list[int]:
        """Step indices of the snapshots kept, oldest first."""
        out = []
        for s in self._snapshots:
            out.append(int(s.stem.split("-")[-1]) if isinstance(s, Path) else int(s["step"]))
        return out

    def snapshot(self, step: int | None = None) -> bool:
        """Save the current model and optimizer state now (``step`` defaults to the call counter).

        Returns:
            True when saved. False when the file could not be written (disk full, a file-size limit,
            an I/O error): a warning is logged, the older snapshots are kept and nothing is raised.
        """
        snap = {
            SNAPSHOT_KEY: SNAPSHOT_VERSION,
            "step": self.step if step is None else int(step),
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
        }
        if self.directory is None:
            self._snapshots.append(snap)
        else:
            path = self.directory / f"snapshot-{snap['step']:08d}.pt"
            try:
                write_atomic(path, lambda tmp: torch.save(snap, tmp), durable=True)
            except (OSError, RuntimeError) as exc:  # torch.save reports a failed write as RuntimeError
                self.failed_snapshots += 1
                log.warning(
                    "Rollback: could not write the snapshot of step %d to %s (%s); the older snapshot(s) "
                    "%s are kept and training goes on",
                    snap["step"],
                    path,
                    str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
                    self.snapshot_steps or "(none yet)",
                )
                return False
            if path in self._snapshots:
                self._snapshots.remove(path)
            self._snapshots.append(path)
        while len(self._snapshots) > self.keep:
            old = self._snapshots.popleft()
            if isinstance(old, Path):
                old.unlink(missing_ok=True)
        self.retries = 0
        return True

    def restore(self, back: int = 1) -> int:
        """Load the ``back``-th latest snapshot into the model and optimizer; returns its step.

        Raises:
            RollbackError: if no snapshot exists yet.
            SnapshotError: if a snapshot file is unreadable.
        """
        if not self._snapshots:
            raise RollbackError("training diverged before the first snapshot; nothing to roll back to")
        pos = len(self._snapshots) - min(back, len(self._snapshots))
        errors: list[str] = []
        while True:
            entry = self._snapshots[pos]
            try:
                snap = load_snapshot(entry) if isinstance(entry, Path) else entry
                break
            except SnapshotError as exc:  # a corrupt file (a disk fault): fall back to an older snapshot
                errors.append(str(exc))
                if pos == 0:
                    raise SnapshotError("no readable snapshot: " + "; ".join(errors)) from None
                log.warning("gradsentry: Rollback: %s; restoring the snapshot before it instead", exc)
                pos -= 1
        self.model.load_state_dict(snap["model"])
        # optimizer.load_state_dict keeps same-device tensors by reference: hand it a copy.
        self.optimizer.load_state_dict(copy.deepcopy(snap["optimizer"]))
        return int(snap["step"])

    # -- the remedy ------------------------------------------------------------------------------
    def diverged(self, loss: float | None, grads_finite: bool) -> str | None:
        """Why the step diverged (``"nonfinite_grad"``, ``"nonfinite_loss"``, ``"loss_spike"``) or None."""
        if not grads_finite:
            return "nonfinite_grad"
        if loss is None:
            return None
        if not math.isfinite(loss):
            return "nonfinite_loss"
        if len(self.losses) >= max(self.min_history, 1):
            med = statistics.median(self.losses)
            spread = 1.4826 * statistics.median(abs(x - med) for x in self.losses)
            scale = max(abs(med), spread)  # |median| for positive losses: loss > loss_factor * median
            if scale > 0 and loss - med > (self.loss_factor - 1.0) * scale:
                return "loss_spike"
        return None

    def good_step(self, loss: float | None) -> bool:
        """Record a good step (its loss, and a snapshot when due); returns True if it snapshotted."""
        if loss is not None:
            self.losses.append(loss)
        due = self.step % self.every == 0 or (not self._snapshots and self._retry_at is None)
        saved = False
        if due:
            saved = self.snapshot()
            # after a failed write, the next try waits for the next multiple of `every`
            self._retry_at = None if saved else self.step + self.every - self.step % self.every
        self.step += 1
        return saved

    def rescue(self, params: list[Tensor], reason: str) -> dict[str, Any]:
        """Replay, restore, lower the learning rate and drop the gradients; returns the action record."""
        self.retries += 1
        if self.retries > self.max_retries:
            raise RollbackError(
                f"training diverged ({reason}) {self.retries} times in a row at step {self.step} despite "
                f"{self.max_retries} restores; lower the learning rate or inspect the data"
            )
        if self.replay is not None:
            self.replay()
        lrs_before = [g["lr"] for g in self.optimizer.param_groups]
        restored = self.restore(self.retries)
        for group, lr in zip(self.optimizer.param_groups, lrs_before, strict=True):
            group["lr"] = lr.clone() if isinstance(lr, Tensor) else lr
        lr_now = scale_lr_(self.optimizer, self.lr_factor)
        for p in params:
            p.grad = None
        self.restores += 1
        log.warning(
            "Rollback: %s at step %d, restored the snapshot of step %d, lr now %s",
            reason,
            self.step,
            restored,
            lr_now,
        )
        action = {
            "remedy": "Rollback",
            "reason": reason,
            "step": self.step,
            "restored_step": restored,
            "lr": lr_now,
            "retries": self.retries,
        }
        self.step += 1
        return action

    @torch.no_grad()
    def __call__(
        self, params: Iterable[Tensor], *, norms: Tensor | None = None, loss: Tensor | float | None = None
    ) -> RemedyResult:
        ps, grads = grads_of(params)
        if norms is None and grads:
            norms = per_tensor_norms(grads)
        finite = torch.isfinite(norms).all() if norms is not None else torch.ones((), dtype=torch.bool)
        if isinstance(loss, Tensor) or _dist.world_size() > 1:
            # Under torch.distributed: the mean loss and "all finite" of all ranks, so that every rank
            # takes the same decision (one all_reduce).
            loss_t = torch.as_tensor(math.nan if loss is None else loss, dtype=torch.float64)
            loss_t, bad = _dist.agree(loss_t.detach().reshape(()).to(finite.device), ~finite)
            host = torch.stack([loss_t.double().reshape(()), (~bad).double()]).tolist()
            loss_v: float | None = host[0] if loss is not None else None
            ok = bool(host[1])
        else:
            loss_v = None if loss is None else float(loss)
            ok = bool(finite)
        reason = self.diverged(loss_v, ok)
        before = total_norm(norms) if norms is not None else None
        if reason is None:
            snapped = self.good_step(loss_v)
            return RemedyResult("Rollback", norm_before=before, extra={"snapshot": snapped, "loss": loss_v})
        action = self.rescue(ps, reason)
        action.pop("remedy")
        return RemedyResult("Rollback", norm_before=before, skipped=True, extra=action)
