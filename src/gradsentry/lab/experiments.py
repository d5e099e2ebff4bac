"""The lab's experiments: :func:`run_variant` trains one variant, :func:`run_lab` the selection and chapters.

The variant table is :mod:`gradsentry.lab.variants`, the shared budget :mod:`gradsentry.lab.config`
(both names are re-exported here).

Every variant trains the same deep MLP shape (:mod:`gradsentry.lab.models`) on the same digits split
(:mod:`gradsentry.lab.data`) with the same optimizer (SGD with momentum, cosine learning-rate decay),
the same mini-batches in the same order and the same seed, watched by a :class:`gradsentry.Monitor`
whose records give every gradient number of the result (:mod:`gradsentry.lab.recording`).
Only the variant's activation, initialisation, architecture (residual, batch norm) and fix differ,
so the differences in the results are caused by those.

A run whose loss or global gradient norm is non-finite at a logged step is stopped there: every
later step would compute NaN as well.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradsentry._extras import require
from gradsentry.lab.config import LabConfig, ProgressCallback, ProgressEvent
from gradsentry.lab.data import Digits, load_digits
from gradsentry.lab.recording import Schedule, activation, layer_norms, watch
from gradsentry.lab.results import HistogramResult, LabResult, VariantResult, first_last_rms_ratio
from gradsentry.lab.variants import (
    DEFAULT_VARIANTS,
    VARIANTS,
    Variant,
    build_remedy,
    build_variant_model,
)
from gradsentry.records import StepRecord

log = logging.getLogger("gradsentry")


def hist_layer_indices(depth: int) -> list[int]:
    """Hidden blocks whose pre-activation histograms are shown: first, middle and last."""
    return sorted({0, depth // 2, depth - 1})


class _BatchSpread:
    """Forward hooks on chosen activation modules that measure, when armed, the spread of each unit's
    input across the examples of the batch (standard deviation over the batch, mean over units).

    The Monitor records the pre-activation's standard deviation over all entries (``pre_std``), which
    mixes the spread across examples with the spread across units; the report's point (a deep sigmoid
    MLP gives every example the same pre-activations) needs the first alone, at two steps only.
    """

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.armed: str | None = None
        self.data: dict[str, dict[str, float]] = {}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if self.armed is None:
                return
            x = args[0].detach().float()
            spread = float(x.std(dim=0).mean()) if x.shape[0] > 1 else 0.0
            self.data.setdefault(name, {})[self.armed] = spread

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _histogram(
    block: int, name: str, first: StepRecord | None, last: StepRecord | None, spread: dict[str, float]
) -> HistogramResult:
    """A block's histograms at step 0 and the last step, from the Monitor's activation records."""
    a0, a1 = activation(first, name), activation(last, name)
    h0 = a0.histogram if a0 is not None else None
    h1 = a1.histogram if a1 is not None else None
    edges = (h0 or h1 or {}).get("edges", [])
    return HistogramResult(
        layer=name,
        block=block,
        edges=list(edges),
        init=list(h0["counts"]) if h0 else None,
        final=list(h1["counts"]) if h1 else None,
        saturated_frac_init=a0.saturated_frac if a0 is not None else None,
        saturated_frac_final=a1.saturated_frac if a1 is not None else None,
        sample_std_init=spread.get("init"),
        sample_std_final=spread.get("final"),
    )


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(dim=1) == y).float().mean().item()
    model.train()
    return float(acc)


def variant_schedule(variant: Variant, config: LabConfig, total: int) -> Schedule:
    """The steps a variant's Monitor logs: every ``config.log_every``-th step, or every step for the
    exploding family (whose global-norm trace is shown step by step), plus the first
    :data:`~gradsentry.lab.recording.DENSE_STEPS` steps and the last one."""
    return Schedule(every=1 if variant.family == "exploding" else config.log_every, total=total)


def run_variant(
    variant: Variant,
    config: LabConfig,
    data: Digits | None = None,
    *,
    jsonl_path: str | Path | None = None,
    progress: Callable[[int, float | None], None] | None = None,
    jsonl_name: str | None = None,
) -> VariantResult:
    """Train one variant under a Monitor and collect every number the report shows.

    Every gradient number comes from the Monitor's records (:mod:`gradsentry.lab.recording`), logged
    on :func:`variant_schedule`, which the run header holds (``meta["schedule"]``).

    Args:
        variant: the variant to run.
        config: the shared budget (see :class:`LabConfig`).
        data: the digits split (loaded once if None).
        jsonl_path: where the Monitor's JSONL record file goes (None: no file).
        progress: called as ``progress(steps_done, loss)`` at each logged step.
        jsonl_name: the name recorded for the JSONL file in the result (default: ``jsonl_path``).

    Returns:
        The :class:`~gradsentry.lab.results.VariantResult`.
    """
    data = data or load_digits()
    n = int(data.x_train.shape[0])
    steps_per_epoch = math.ceil(n / config.batch_size)
    total = config.epochs * steps_per_epoch
    if jsonl_name is None and jsonl_path is not None:
        jsonl_name = str(jsonl_path)
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = build_variant_model(variant, config, data.n_features, data.n_classes)
    opt = torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay if variant.weight_decay else 0.0,
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    schedule = variant_schedule(variant, config, total)
    hist_blocks = hist_layer_indices(config.depth)
    spread = _BatchSpread({f"blocks.{i}.act": model.hidden_blocks()[i].act for i in hist_blocks})
    mon, recorder = watch(
        model,
        schedule,
        optimizer=opt,
        remedy=build_remedy(variant, config, model),
        meta={
            "source": "gradsentry lab",
            "variant": variant.name,
            "title": variant.title,
            "config": config.to_dict(),
        },
        jsonl_path=jsonl_path,
        histogram_bins=config.hist_bins,
        histogram_range=config.hist_range,
        # name where NaN/inf starts in the runs left to diverge (an isfinite per module call at every
        # logged step: about a third of a fixed run's time when it logs every step)
        locate_nonfinite=variant.family == "exploding" and variant.remedy == "none",
    )
    losses = torch.full((total,), math.nan)
    gen = torch.Generator().manual_seed(config.seed)
    step = 0
    stopped_at: int | None = None
    try:
        for _epoch in range(config.epochs):
            perm = torch.randperm(n, generator=gen)
            for start in range(0, n, config.batch_size):
                idx = perm[start : start + config.batch_size]
                spread.armed = "init" if step == 0 else ("final" if step == total - 1 else None)
                loss = nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                losses[step] = loss.detach()
                rec = mon.step(loss=loss)  # statistics first, then the remedy (inside step)
                opt.step()
                sched.step()
                step += 1
                if rec is not None:
                    if progress is not None:
                        progress(step, rec.loss)
                    if not (rec.finite and rec.loss is not None and math.isfinite(rec.loss)):
                        stopped_at = rec.step
                        break
            if stopped_at is not None:
                break
    except BaseException:
        spread.close()
        mon.close(write_findings=False)
        raise
    spread.close()
    mon.close()  # diagnoses the run and writes the findings to the JSONL file
    findings = mon.diagnose()  # the same records, so the same findings as in the file
    records = recorder.records
    linear_names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    init_rec, final_rec = records[0], recorder.last_finite()
    ls = losses[:step].tolist()
    bad_loss = next((i for i, lo in enumerate(ls) if not math.isfinite(lo)), None)
    bad_grad = next((r.step for r in records if not r.finite), None)
    bad = [s for s in (bad_loss, bad_grad) if s is not None]
    histograms = [
        _histogram(
            i, f"blocks.{i}.act", init_rec, recorder.at(total - 1), spread.data.get(f"blocks.{i}.act", {})
        )
        for i in hist_blocks
    ]
    test_acc = _accuracy(model, data.x_test, data.y_test)
    train_acc = _accuracy(model, data.x_train, data.y_train)
    return VariantResult(
        name=variant.name,
        title=variant.title,
        shows=variant.shows,
        family=variant.family,
        spec={f.name: getattr(variant, f.name) for f in fields(variant)},
        layer_names=linear_names,
        monitored_layers=[info.name for info in mon.layers],
        first_last_rms_ratio_init=first_last_rms_ratio(init_rec),
        grad_norm_init=layer_norms(init_rec, linear_names),
        grad_norm_final=layer_norms(final_rec, linear_names),
        final_step=final_rec.step,
        logged_steps=[r.step for r in records],
        grad_norm_by_step=[[r.layer(name).grad_norm for r in records] for name in linear_names],
        global_norm=[r.global_norm for r in records],
        loss=ls,
        total_steps=total,
        steps_run=step,
        stopped_at=stopped_at,
        first_nonfinite_step=min(bad) if bad else None,
        test_accuracy=test_acc,
        train_accuracy=train_acc,
        findings=[f.to_dict() for f in findings],
        histograms=histograms,
        time_s=time.perf_counter() - t0,
        jsonl=jsonl_name,
        schedule=schedule.meta(),
    )


def run_lab(
    config: LabConfig | None = None,
    *,
    out_dir: str | Path | None = None,
    progress: ProgressCallback | None = None,
) -> LabResult:
    """Run the lab: every selected variant with the same data, optimizer and budget.

    Args:
        config: the settings (default :class:`LabConfig()`: depth 20, width 64, 40 epochs, every variant).
        out_dir: if given, one JSONL record file per run is written to ``out_dir/runs/<variant>.jsonl``
            (``out_dir/runs/<chapter>/<variant>.jsonl`` for the chapters beyond MLPs; re-render one with
            ``gradsentry report``, judge it with ``gradsentry analyze``). The HTML report and ``results.json`` are written
            by :func:`gradsentry.lab.write_outputs`.
        progress: called with a :class:`ProgressEvent` at every logged step and at the end of each run.
            The library never prints.

    Returns:
        The :class:`~gradsentry.lab.results.LabResult` with one :class:`VariantResult` per variant.

    Raises:
        ValueError: on an invalid configuration (see :meth:`LabConfig.validate`).
        gradsentry._extras.MissingExtraError: scikit-learn, matplotlib or jinja2 is not installed
            (``pip install 'gradsentry[lab]'``), raised before any training.
        OSError: when ``out_dir`` cannot be created or written.

    Example:
        >>> r = run_lab(LabConfig(depth=3, width=8, epochs=1, variants=("relu_he",)))
        >>> r.runs[0].name, len(r.runs[0].layer_names)
        ('relu_he', 4)
    """
    config = (config or LabConfig()).validate()
    require("lab", "the lab")
    runs_dir = None
    if out_dir is not None:
        runs_dir = Path(out_dir) / "runs"
        runs_dir.mkdir(parents=True, exist_ok=True)
    data = load_digits()
    t0 = time.perf_counter()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads or 1)
    results: list[VariantResult] = []
    chapters: dict[str, Any] = {}
    try:
        count = len(config.variants) if "mlp" in config.chapters else 0
        n = int(data.x_train.shape[0])
        total = config.epochs * math.ceil(n / config.batch_size)
        for index, name in enumerate(config.variants if "mlp" in config.chapters else ()):
            variant = VARIANTS[name]

            def _report(step: int, loss: float | None, _name: str = name, _i: int = index) -> None:
                if progress is not None:
                    progress(ProgressEvent(_name, _i, count, step, total, False, loss))

            path = runs_dir / f"{name}.jsonl" if runs_dir is not None else None
            res = run_variant(
                variant,
                config,
                data,
                jsonl_path=path,
                progress=_report,
                jsonl_name=f"runs/{name}.jsonl" if path is not None else None,
            )
            log.info(
                "gradsentry lab: %s done in %.1f s, test accuracy %.3f", name, res.time_s, res.test_accuracy
            )
            results.append(res)
            if progress is not None:
                progress(
                    ProgressEvent(
                        name, index, count, res.steps_run, total, True, res.loss[-1] if res.loss else None
                    )
                )
        from gradsentry.lab.chapters import EXTRA_CHAPTERS, run_chapter

        extra = [c for c in config.chapters if c in EXTRA_CHAPTERS]
        for i, chapter in enumerate(extra):
            if progress is not None:
                progress(ProgressEvent(f"chapter {chapter}", i, len(extra), 0, 1, False, None))
            chapters[chapter] = run_chapter(
                chapter, quick=config.chapter_budget == "quick", seed=config.seed, runs_dir=runs_dir
            )
            log.info("gradsentry lab: chapter %s done in %.1f s", chapter, chapters[chapter]["time_s"])
            if progress is not None:
                progress(ProgressEvent(f"chapter {chapter}", i, len(extra), 1, 1, True, None))
    finally:
        torch.set_num_threads(old_threads)
    return LabResult(
        config=config.to_dict(),
        runs=results,
        data={
            "name": "sklearn digits",
            "n_train": n,
            "n_test": int(data.x_test.shape[0]),
            "n_features": data.n_features,
            "n_classes": data.n_classes,
        },
        environment={"torch": torch.__version__, "threads": config.threads or 1},
        wall_time_s=time.perf_counter() - t0,
        chapters=chapters,
    )


__all__ = [
    "DEFAULT_VARIANTS",
    "VARIANTS",
    "LabConfig",
    "ProgressEvent",
    "Variant",
    "run_lab",
    "run_variant",
]
