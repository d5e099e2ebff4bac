"""The lab's chapters: ``mlp`` (the variant table of :mod:`gradsentry.lab.experiments`) and the
chapters beyond MLPs, each in its own module with ``run(quick=..., seed=..., runs_dir=...) -> dict`` (stored in
``results.json["chapters"][name]``; with ``runs_dir=`` each run's Monitor records also go to
``runs_dir/<name>/<variant>.jsonl``), ``claims(data) -> dict`` (the chapter's claims as measured
numbers and booleans) and ``sections(data) -> list[dict]`` (its part of the HTML report).

* ``rnn`` (:mod:`~gradsentry.lab.chapters.rnn`): through time, vanilla/orthogonal/identity RNNs,
  LSTM, GRU, an exploding RNN and clipping;
* ``cnn`` (:mod:`~gradsentry.lab.chapters.cnn`): a deep plain CNN vs residual vs batch norm;
* ``attention`` (:mod:`~gradsentry.lab.chapters.attention`): post-LN vs pre-LN transformer encoders.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any

CHAPTERS: tuple[str, ...] = ("mlp", "rnn", "cnn", "attention")
"""Every chapter, in report order (``mlp`` is the deep-MLP variant table)."""
EXTRA_CHAPTERS: tuple[str, ...] = CHAPTERS[1:]


def chapter_module(name: str) -> ModuleType:
    """The module of a chapter beyond MLPs (``rnn``, ``cnn``, ``attention``)."""
    if name not in EXTRA_CHAPTERS:
        raise ValueError(f"unknown chapter {name!r}; valid: {', '.join(EXTRA_CHAPTERS)}")
    return importlib.import_module(f"gradsentry.lab.chapters.{name}")


def run_chapter(
    name: str, *, quick: bool = False, seed: int = 0, runs_dir: str | os.PathLike[str] | None = None
) -> dict[str, Any]:
    """Run one chapter beyond MLPs on one torch thread; its result object with ``claims`` and ``time_s``
    added. With ``runs_dir``, each run's Monitor records go to ``runs_dir/<chapter>/<variant>.jsonl``."""
    import time
    from pathlib import Path

    import torch

    t0 = time.perf_counter()
    mod = chapter_module(name)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the fastest for these small tensors (as in run_lab)
    try:
        data: dict[str, Any] = mod.run(
            quick=quick, seed=seed, runs_dir=Path(runs_dir) if runs_dir is not None else None
        )
    finally:
        torch.set_num_threads(old_threads)
    data["claims"] = mod.claims(data)
    data["time_s"] = time.perf_counter() - t0
    return data


def chapter_sections(name: str, data: dict[str, Any]) -> list[dict[str, Any]]:
    """The report sections of a chapter's stored result (``[]`` for an unknown chapter)."""
    if name not in EXTRA_CHAPTERS:
        return []
    return list(chapter_module(name).sections(data))


__all__ = ["CHAPTERS", "EXTRA_CHAPTERS", "chapter_module", "chapter_sections", "run_chapter"]
