"""The shared key/value scanner of the text readers: numbers, field aliases, step and epoch keys.

A console line names its figures in many ways: ``loss: 2.51``, ``loss=2.51``, ``loss 2.51``,
``lm loss: 7.3E-01``, ``[Loss] nan``, ``critic/grad_norm:nan``, ``grad_norm: 0.3922 (nan)``. One
precompiled regular expression finds every ``key [:=] number`` pair of a line whose key is a known
alias (case-insensitive, optionally prefixed by ``name/`` segments and wrapped in ``[...]``); the key
then maps to a field and a rank (:func:`classify`). Nothing is evaluated: numbers go through
``float``.

Ranks: 1 for the global names (``grad_norm``, ``gnorm``, ``optim/total_grad_norm``, ``lm loss``,
``total_loss``, ...), 2 for a prefixed name (``actor/grad_norm``; several on one line are combined
into the worst: NaN, then infinity, then the largest), 3 for a bare ``norm`` (used only when nothing
better is on the line). Keys of evaluation figures (``val loss``, ``eval/loss``, ``val_loss``) and
of other norms (``weight norm``, ``norm_average``) are never read as training figures.

>>> s = Scanner()
>>> r = s.scan("step:  4  loss:  7.62585  grad_norm: 26.6250  memory: 66.91GiB(37.51%)")
>>> r.step, r.loss, r.grad_norm
(4, 7.62585, 26.625)
>>> s.scan("step 3000: train loss 4.0390, val loss 4.0427").loss
4.039
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from gradsentry.logs.series import FieldName
from gradsentry.logs.text.shapes import FLOAT, INT, WORST, LineShapes, worse

NUM = r"[-+]?(?:(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|(?:nan|NaN|NAN|[Ii]nf(?:inity)?|INF)(?![a-z]))"
"""A number as loggers print it (``7.334521E-01``, ``nan``, ``-inf``, ``Infinity``); ``float`` reads it."""

Kind = Literal["loss", "grad_norm", "lr", "step", "iter", "epoch", "skipped", "nan_iters"]

# normalised key (lower case, spaces and dashes as "_") -> (kind, rank)
_EXACT: dict[str, tuple[Kind, int]] = {
    # training loss
    "loss": ("loss", 1),
    "lm_loss": ("loss", 1),
    "train_loss": ("loss", 1),
    "total_loss": ("loss", 1),
    "training_loss": ("loss", 1),
    "train/loss": ("loss", 1),
    "loss/train": ("loss", 1),
    "train/crossentropyloss": ("loss", 1),
    "crossentropyloss": ("loss", 2),
    # global gradient norm
    "grad_norm": ("grad_norm", 1),
    "gnorm": ("grad_norm", 1),
    "gradient_norm": ("grad_norm", 1),
    "total_grad_norm": ("grad_norm", 1),
    "grad_norm_total": ("grad_norm", 1),
    "global_norm": ("grad_norm", 1),
    "grad_2.0_norm_total": ("grad_norm", 1),
    "train/grad_norm": ("grad_norm", 1),
    "optim/total_grad_norm": ("grad_norm", 1),
    "gradsentry/global_norm": ("grad_norm", 1),
    "norm": ("grad_norm", 3),
    # learning rate
    "lr": ("lr", 1),
    "learning_rate": ("lr", 1),
    "base_lr": ("lr", 2),
    "train/lr": ("lr", 1),
    "train/learning_rate": ("lr", 1),
    "optim/learning_rate_group0": ("lr", 1),
    # step counters: global (step) and possibly per-epoch (iter)
    "num_updates": ("step", 1),
    "global_step": ("step", 1),
    "step": ("step", 2),
    "iteration": ("iter", 1),
    "iter": ("iter", 1),
    "iters": ("iter", 1),
    "epoch": ("epoch", 1),
    # Megatron's counts of skipped optimizer steps in the logging interval
    "number_of_skipped_iterations": ("skipped", 1),
    "number_of_nan_iterations": ("nan_iters", 1),
}

_ALIASES = (
    # evaluation figures and other norms: matched so that their tail ("loss", "norm") is not read
    r"(?:val|eval|valid|validation|test|dev|avg|average|mean)[ _]loss",
    r"(?:weight|param|parameter|update|embedding)[ _]norm",
    r"lm[ _]loss|train(?:ing)?[ _]loss|total[ _]loss|loss|crossentropyloss",
    r"grad(?:ient)?[ _]norm|gnorm|total_grad_norm|grad_norm_total|global_norm|grad_2\.0_norm_total|norm",
    r"learning[ _]rate|base_lr|lr|learning_rate_group0",
    r"num_updates|global_step|step|iteration|iters|iter|epoch",
    r"number of (?:skipped|nan) iterations",
)
_IGNORED_PREFIXES = frozenset({"val", "eval", "valid", "validation", "test", "dev"})

KV_RE = re.compile(
    r"(?<![\w./\-])\[?(?P<key>(?:[A-Za-z_][\w.\-]*/)*(?i:" + "|".join(_ALIASES) + r"))\]?(?![\w./\-])"
    r"\s*[:=]?\s*\[?\s*(?P<val>" + NUM + r")(?:\s*/\s*(?P<tot>\d+))?"
    r"(?:\s*\]?\s*\(\s*(?P<avg>" + NUM + r")\s*\))?"
)
"""``key [:=] value[/total] [(running average)]`` for every alias key (see :func:`classify`)."""

_memo: dict[str, tuple[Kind, int] | None] = {}


def classify(key: str) -> tuple[Kind, int] | None:
    """The field and rank a logged key stands for, or None (an evaluation figure, another norm).

    >>> classify("lm loss"), classify("actor/grad_norm"), classify("val loss"), classify("eval/loss")
    (('loss', 1), ('grad_norm', 2), None, None)
    """
    hit = _memo.get(key)
    if hit is not None or key in _memo:
        return hit
    norm = key.strip("[]").lower().replace(" ", "_").replace("-", "_")
    out: tuple[Kind, int] | None = _EXACT.get(norm)
    if out is None and "/" in norm:
        head, _, last = norm.rpartition("/")
        base = _EXACT.get(last)
        if base is not None and head.split("/", 1)[0] not in _IGNORED_PREFIXES:
            out = (base[0], max(base[1], 2))
    if len(_memo) < 4096:
        _memo[key] = out
    return out


class Scan(NamedTuple):
    """What :meth:`Scanner.scan` found on one line (None where absent)."""

    loss: float | None
    grad_norm: float | None
    lr: float | None
    step: int | None
    step_key: str | None
    step_total: int | None
    iter: int | None
    iter_total: int | None
    epoch: int | None
    skipped: int | None
    nan_iters: int | None
    averaged: bool
    keys: dict[FieldName, str]


_SLOT = {name: i for i, name in enumerate(Scan._fields)}
_INT_ATTRS = frozenset({"step", "step_total", "iter", "iter_total", "epoch", "skipped", "nan_iters"})


@dataclass(slots=True)
class _Found:
    """The mutable form of :class:`Scan` the full scan fills in."""

    loss: float | None = None
    grad_norm: float | None = None
    lr: float | None = None
    step: int | None = None
    step_key: str | None = None
    step_total: int | None = None
    iter: int | None = None
    iter_total: int | None = None
    epoch: int | None = None
    skipped: int | None = None
    nan_iters: int | None = None
    averaged: bool = False
    keys: dict[FieldName, str] = field(default_factory=dict)


class Scanner:
    """Finds the training figures of one text line.

    Args:
        tags: optional ``{"loss": key, "grad_norm": key, "lr": key}``: read exactly these keys for
            those fields (case-sensitive, as logged) instead of the aliases.

    Attributes:
        seen_tags: the tag keys that were found at least once (to report a tag that never was).
    """

    def __init__(self, tags: dict[str, str] | None = None) -> None:
        self.tags = {k: v for k, v in (tags or {}).items() if v}
        self.seen_tags: set[str] = set()
        self._by_tag: dict[str, str] = {v: k for k, v in self.tags.items()}
        self._tag_re: re.Pattern[str] | None = None
        self.shapes = LineShapes()
        if self.tags:
            alts = "|".join(re.escape(v) for v in sorted(self.tags.values(), key=len, reverse=True))
            self._tag_re = re.compile(
                r"(?<![\w./\-])\[?(?P<key>"
                + alts
                + r")\]?(?![\w./\-])\s*[:=]?\s*\[?\s*(?P<val>"
                + NUM
                + r")(?:\s*\]?\s*\(\s*(?P<avg>"
                + NUM
                + r")\s*\))?"
            )

    def scan(self, line: str) -> Scan:
        """Every known figure of ``line`` (see the module docstring for the ranks).

        A line of a shape seen before is read through its template
        (:mod:`gradsentry.logs.text.shapes`), with the same result as a full scan.
        """
        vals = self.shapes.match(line)
        if vals is not None:
            return tuple.__new__(Scan, vals)
        out, spans = self._scan_full(line)
        base: list[Any] = [None] * len(Scan._fields)
        for name in ("step_key", "averaged", "keys"):
            base[_SLOT[name]] = getattr(out, name)
        how = {name: INT for name in _INT_ATTRS} | {"grad_norm": WORST}
        self.shapes.learn(line, [(_SLOT[attr], span, how.get(attr, FLOAT)) for attr, span in spans], base)
        return out

    def _scan_full(self, line: str) -> tuple[Scan, list[tuple[str, tuple[int, int]]]]:
        out = _Found()
        ranks: dict[str, int] = {}
        spans: dict[str, list[tuple[int, int]]] = {}
        for m in KV_RE.finditer(line):
            key = m.group("key")
            cls = classify(key)
            if cls is None:
                continue
            kind, rank = cls
            if kind in ("loss", "grad_norm", "lr"):
                if kind in self.tags:
                    continue
                old = ranks.get(kind)
                if old is not None and old < rank:
                    continue
                value = float(m.group("val"))
                if old == rank == 2 and kind == "grad_norm" and out.grad_norm is not None:
                    value = worse(out.grad_norm, value)
                    key = f"{out.keys['grad_norm']}, {key}"
                    spans[kind].append(m.span("val"))
                elif old == rank:
                    continue  # the first of equal rank wins
                else:
                    spans[kind] = [m.span("val")]
                ranks[kind] = rank
                setattr(out, kind, value)
                out.keys[kind] = key
                out.averaged = out.averaged or m.group("avg") is not None
                continue
            val = m.group("val")
            if not val.isdigit():
                continue  # counters are non-negative integers
            tot = m.group("tot")
            if kind in ("epoch", "skipped", "nan_iters"):
                if getattr(out, kind) is None:
                    setattr(out, kind, int(val))
                    spans[kind] = [m.span("val")]
            elif kind == "iter":
                if out.iter is None:
                    out.iter = int(val)
                    out.iter_total = int(tot) if tot else None
                    spans["iter"] = [m.span("val")]
                    spans["iter_total"] = [m.span("tot")] if tot else []
            elif out.step is None or rank < ranks.get("step", 9):
                ranks["step"] = rank
                out.step = int(val)
                out.step_key = key
                out.step_total = int(tot) if tot else None
                spans["step"] = [m.span("val")]
                spans["step_total"] = [m.span("tot")] if tot else []
        if self._tag_re is not None:
            for m in self._tag_re.finditer(line):
                key = m.group("key")
                name = self._by_tag[key]
                if name not in out.keys:
                    setattr(out, name, float(m.group("val")))
                    out.keys[name] = key  # type: ignore[index]
                    out.averaged = out.averaged or m.group("avg") is not None
                    self.seen_tags.add(key)
                    spans[name] = [m.span("val")]
        scan = Scan(
            out.loss,
            out.grad_norm,
            out.lr,
            out.step,
            out.step_key,
            out.step_total,
            out.iter,
            out.iter_total,
            out.epoch,
            out.skipped,
            out.nan_iters,
            out.averaged,
            out.keys,
        )
        return scan, [(attr, span) for attr, lst in spans.items() for span in lst]


class EpochClock:
    """Turns (epoch, iteration within the epoch) into an increasing global step.

    With the iterations per epoch known (``[240/735]``), step = (epoch - base)·n + iteration, where
    base is 1 unless the first epoch seen is 0 (the numbering of mmengine/mmcv/Ignite is 1-based,
    timm/DeiT's MetricLogger and Lightning's are 0-based). Without it, each new epoch starts after
    the largest iteration of the epoch before.
    """

    def __init__(self, base: int | None = None) -> None:
        self.base = base
        self._epoch: int | None = None
        self._offset = 0
        self._max_iter = 0

    def step(self, epoch: int, it: int, per_epoch: int | None) -> int:
        """The global step of iteration ``it`` of ``epoch``."""
        if self.base is None:
            self.base = min(1, epoch)
        if per_epoch:
            return (epoch - self.base) * per_epoch + it
        if self._epoch is None:
            self._epoch = epoch
        elif epoch != self._epoch:
            if epoch > self._epoch:
                self._offset += self._max_iter * (epoch - self._epoch)
            self._epoch, self._max_iter = epoch, 0
        self._max_iter = max(self._max_iter, it)
        return self._offset + it
