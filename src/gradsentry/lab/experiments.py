"""The lab's experiments: the variant table, the shared training budget, and :func:`run_lab`.

Every variant trains the same deep MLP shape (:mod:`gradsentry.lab.models`) on the same digits split
(:mod:`gradsentry.lab.data`) with the same optimizer (SGD with momentum, cosine learning-rate decay),
the same mini-batches in the same order and the same seed, watched by a :class:`gradsentry.Monitor`.
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
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from gradsentry._extras import require
from gradsentry.lab.data import Digits, load_digits
from gradsentry.lab.models import Activation, DeepMLP, Init, build_mlp
from gradsentry.lab.results import HistogramResult, LabResult, VariantResult, first_last_rms_ratio
from gradsentry.sinks.jsonl import JsonlSink

log = logging.getLogger("gradsentry")

RemedyName = Literal["none", "clip", "agc", "zclip"]

SIGMOID_LINEAR_BAND = 4.6
"""``|x|`` below which the sigmoid is not saturated: ``sigmoid(4.6) ≈ 0.99``, ``sigmoid'(4.6) ≈ 0.0099``."""


DENSE_START = 16
"""The lab logs each of the first steps: an oversized init explodes within them."""


@dataclass(frozen=True)
class Variant:
    """One row of the lab's table: what is trained and what it shows.

    Attributes:
        name: identifier used on the command line (``--variants``) and in file names.
        title: short label for plots and tables.
        shows: what the variant demonstrates, in one sentence.
        activation: ``"sigmoid"``, ``"tanh"`` or ``"relu"``.
        init: ``"default"`` (PyTorch), ``"he"`` or ``"oversized"`` (He times ``LabConfig.oversized_gain``).
        residual: identity shortcuts ``x + F(x)`` around each hidden block.
        batchnorm: batch normalization before each hidden activation.
        weight_decay: use ``LabConfig.weight_decay`` as the optimizer's L2 weight decay.
        remedy: gradient fix applied after ``backward()``: ``"clip"`` (global-norm clipping,
            :class:`gradsentry.remedies.ClipGlobalNorm`), ``"agc"`` (adaptive gradient clipping,
            :class:`gradsentry.remedies.AGC`), ``"zclip"`` (:class:`gradsentry.remedies.ZClip`), or ``"none"``.
        family: ``"vanishing"`` (the activation/init/architecture comparison) or ``"exploding"`` (the
            oversized-init run and its fixes).
    """

    name: str
    title: str
    shows: str
    activation: Activation
    init: Init = "default"
    residual: bool = False
    batchnorm: bool = False
    weight_decay: bool = False
    remedy: RemedyName = "none"
    family: Literal["vanishing", "exploding"] = "vanishing"


_EXPLODE = "ReLU, oversized He init"
VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("sigmoid_default", "sigmoid, default init", "vanishing gradients: the seed case", "sigmoid"),
        Variant("tanh_default", "tanh, default init", "vanishing gradients, milder than sigmoid", "tanh"),
        Variant(
            "relu_default",
            "ReLU, default init",
            "ReLU alone is not enough: PyTorch's default init still shrinks the signal",
            "relu",
        ),
        Variant("relu_he", "ReLU, He init", "the activation fix done right (He et al. 2015)", "relu", "he"),
        Variant(
            "sigmoid_residual",
            "sigmoid + residual",
            "the residual fix: x + F(x) (He et al. 2016)",
            "sigmoid",
            residual=True,
        ),
        Variant(
            "sigmoid_batchnorm",
            "sigmoid + batch norm",
            "the normalization fix: batch norm before the activation (Ioffe & Szegedy 2015)",
            "sigmoid",
            batchnorm=True,
        ),
        Variant(
            "exploding",
            _EXPLODE,
            "exploding gradients, ending in inf/NaN",
            "relu",
            "oversized",
            family="exploding",
        ),
        Variant(
            "exploding_clip",
            _EXPLODE + " + global-norm clipping",
            "global-norm clipping rescues it (Pascanu et al. 2013)",
            "relu",
            "oversized",
            remedy="clip",
            family="exploding",
        ),
        Variant(
            "exploding_wd",
            _EXPLODE + " + weight decay",
            "weight decay (L2 regularization) on its own",
            "relu",
            "oversized",
            weight_decay=True,
            family="exploding",
        ),
        Variant(
            "exploding_agc",
            _EXPLODE + " + AGC",
            "adaptive gradient clipping, unit-wise (Brock et al. 2021)",
            "relu",
            "oversized",
            remedy="agc",
            family="exploding",
        ),
        Variant(
            "exploding_zclip",
            _EXPLODE + " + ZClip",
            "z-score spike clipping with a warm-up cap (Kumar et al. 2025)",
            "relu",
            "oversized",
            remedy="zclip",
            family="exploding",
        ),
    )
}
"""Every lab variant by name, in report order."""

DEFAULT_VARIANTS: tuple[str, ...] = tuple(VARIANTS)


@dataclass(frozen=True)
class LabConfig:
    """The lab's shared settings: model shape, training budget, optimizer and fixes.

    Attributes:
        depth: hidden blocks per MLP (>= 2).
        width: units per hidden block.
        epochs: passes over the 1,437 training digits.
        batch_size: examples per mini-batch (the last batch of an epoch may be smaller).
        lr: peak learning rate of SGD, decayed to 0 by a cosine schedule over the whole budget.
        momentum: SGD momentum.
        seed: seed of the initial weights and of the mini-batch order (the same for every variant).
        variants: names of the variants to run, in order (see :data:`VARIANTS`).
        log_every: the Monitor logs every ``log_every``-th step after the first :data:`DENSE_START`
            steps, which it logs all.
        oversized_gain: factor on the He standard deviation for the exploding variants (dimensionless).
        clip_norm: ``max_norm`` of global-norm clipping, same units as the gradient; also ZClip's
            ``max_grad_norm``, its cap during warm-up and (``cap_after_warmup=True``) its ceiling after.
        agc_clip_factor: AGC's λ, the largest ratio of unit gradient norm to unit weight norm.
        weight_decay: L2 weight decay of the ``exploding_wd`` variant.
        hist_bins: bins of the pre-activation histograms.
        hist_range: the histograms cover ``[-hist_range, hist_range]``; values outside fall in the end bins.
        threads: torch intra-op threads during the lab (restored afterwards); None = 1, which is the
            fastest for these small matrices.
        chapters: the chapters to run, among :data:`gradsentry.lab.chapters.CHAPTERS`: ``"mlp"`` (the
            variants above) and the chapters beyond MLPs ``"rnn"``, ``"cnn"``, ``"attention"`` (each
            with its own fixed models and budget, sized by ``quick``; their results go to
            :attr:`LabResult.chapters`). The library default is ``("mlp",)``; ``gradsentry lab`` runs
            every chapter unless ``--chapters`` says otherwise.
        chapter_budget: ``"full"`` or ``"quick"`` (set by :meth:`quick`): the budget of the chapters
            beyond MLPs.

    Raises:
        ValueError: from :meth:`validate` (called by :func:`run_lab`) on an unknown variant name or a
            value out of range; the message lists the valid names.
    """

    depth: int = 20
    width: int = 64
    epochs: int = 40
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    seed: int = 0
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    log_every: int = 4
    oversized_gain: float = 1.3
    clip_norm: float = 5.0
    agc_clip_factor: float = 0.1
    weight_decay: float = 5e-4
    hist_bins: int = 80
    hist_range: float = 10.0
    threads: int | None = None
    chapters: tuple[str, ...] = ("mlp",)
    chapter_budget: str = "full"

    @classmethod
    def quick(cls, **overrides: Any) -> LabConfig:
        """A small configuration for smoke tests: still deep (depth 12) but narrow and a short budget.

        The oversized init gain is raised to 1.5 so that the shallower exploding run still diverges.
        """
        base: dict[str, Any] = {
            "depth": 12,
            "width": 32,
            "epochs": 3,
            "log_every": 2,
            "oversized_gain": 1.5,
            "chapter_budget": "quick",
        }
        base.update(overrides)
        return cls(**base)

    def validate(self) -> LabConfig:
        """Check every field; return ``self`` (see the class for the errors raised)."""
        from gradsentry.lab.chapters import CHAPTERS

        bad = [c for c in self.chapters if c not in CHAPTERS]
        if bad or not self.chapters or len(set(self.chapters)) != len(self.chapters):
            raise ValueError(
                f"chapters must be distinct names among {', '.join(CHAPTERS)}, got {', '.join(self.chapters) or 'none'}"
            )
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(
                f"unknown variant(s) {', '.join(repr(u) for u in unknown)}; valid: {', '.join(VARIANTS)}"
            )
        if not self.variants:
            raise ValueError(f"no variants selected; valid: {', '.join(VARIANTS)}")
        if len(set(self.variants)) != len(self.variants):
            raise ValueError(f"variants must not repeat, got {', '.join(self.variants)}")
        for name in ("depth", "width", "epochs", "batch_size", "log_every", "hist_bins"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (2 if name == "depth" else 1):
                raise ValueError(f"{name} must be an integer >= {2 if name == 'depth' else 1}, got {value!r}")
        for name in ("lr", "clip_norm", "agc_clip_factor", "oversized_gain", "hist_range"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise ValueError(
                f"need 0 <= momentum < 1 and weight_decay >= 0, got {self.momentum}, {self.weight_decay}"
            )
        if self.chapter_budget not in ("full", "quick"):
            raise ValueError(f"chapter_budget must be 'full' or 'quick', got {self.chapter_budget!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {self.threads}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain JSON-serialisable data (``variants`` as a list)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["variants"] = list(self.variants)
        d["chapters"] = list(self.chapters)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LabConfig:
        """Inverse of :meth:`to_dict`; unknown keys are ignored (call :meth:`validate` to check values)."""
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in data.items() if k in names}
        for key in ("variants", "chapters"):
            if key in kw:
                kw[key] = tuple(kw[key])
        return cls(**kw)


@dataclass(frozen=True)
class ProgressEvent:
    """What :func:`run_lab` reports to its progress callback.

    Attributes:
        variant: the variant's name.
        index: its position among the selected variants (0-based).
        count: how many variants are selected.
        step: optimizer steps done so far in this run.
        total: the run's step budget.
        done: True once for each run, when it has finished (``step`` may be < ``total`` for a run
            stopped on NaN/inf).
        loss: training loss at the last logged step, if known.
    """

    variant: str
    index: int
    count: int
    step: int
    total: int
    done: bool = False
    loss: float | None = None


ProgressCallback = Callable[[ProgressEvent], None]


def build_variant_model(
    variant: Variant, config: LabConfig, in_features: int = 64, n_classes: int = 10
) -> DeepMLP:
    """The variant's model with the config's depth and width (weights drawn from torch's global RNG)."""
    return build_mlp(
        depth=config.depth,
        width=config.width,
        activation=variant.activation,
        init=variant.init,
        init_gain=config.oversized_gain,
        residual=variant.residual,
        batchnorm=variant.batchnorm,
        in_features=in_features,
        n_classes=n_classes,
    )


def build_remedy(variant: Variant, config: LabConfig, model: DeepMLP) -> Any:
    """The gradsentry remedy of a variant (None for ``remedy="none"``)."""
    if variant.remedy == "none":
        return None
    from gradsentry import remedies

    if variant.remedy == "clip":
        return remedies.ClipGlobalNorm(config.clip_norm)
    if variant.remedy == "agc":
        return remedies.AGC(config.agc_clip_factor, exclude=model.head)
    if variant.remedy == "zclip":
        return remedies.ZClip(max_grad_norm=config.clip_norm, cap_after_warmup=True)
    raise ValueError(f"unknown remedy {variant.remedy!r}")


def hist_layer_indices(depth: int) -> list[int]:
    """Hidden blocks whose pre-activations are histogrammed: first, middle and last."""
    return sorted({0, depth // 2, depth - 1})


class _PreActCapture:
    """Forward hooks that histogram the input of chosen activation modules when armed."""

    def __init__(self, modules: dict[str, nn.Module], bins: int, limit: float) -> None:
        self.bins, self.limit = bins, limit
        self.armed: str | None = None
        self.data: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if self.armed is None:
                return
            x = args[0].detach().float()
            counts = torch.histc(x.clamp(-self.limit, self.limit), self.bins, -self.limit, self.limit)
            sat = (x.abs() > SIGMOID_LINEAR_BAND).float().mean()
            spread = x.std(dim=0).mean() if x.shape[0] > 1 else torch.zeros(())
            self.data.setdefault(name, {})[self.armed] = (counts, sat, spread)

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(dim=1) == y).float().mean().item()
    model.train()
    return float(acc)


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
    from gradsentry.monitor import Monitor

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
    remedy = build_remedy(variant, config, model)
    sinks = [JsonlSink(jsonl_path, resume=False)] if jsonl_path is not None else []
    meta = {
        "source": "gradsentry lab",
        "variant": variant.name,
        "title": variant.title,
        "config": config.to_dict(),
    }
    hist_blocks = hist_layer_indices(config.depth)
    capture = _PreActCapture(
        {f"blocks.{i}.act": model.hidden_blocks()[i].act for i in hist_blocks},
        config.hist_bins,
        config.hist_range,
    )
    global_norms = torch.full((total,), math.nan)
    losses = torch.full((total,), math.nan)
    gen = torch.Generator().manual_seed(config.seed)
    mon = Monitor(
        model,
        every=1,  # every step at first, where explosions happen, so that findings name the exact step
        optimizer=opt,
        sinks=sinks,
        remedy=remedy,
        meta=meta,
        locate_nonfinite=variant.family == "exploding",  # name where NaN/inf starts
    )
    params = [p for p in model.parameters() if p.requires_grad]
    step = 0
    stopped_at: int | None = None
    try:
        for _epoch in range(config.epochs):
            perm = torch.randperm(n, generator=gen)
            for start in range(0, n, config.batch_size):
                idx = perm[start : start + config.batch_size]
                if step == DENSE_START:
                    mon.every = config.log_every
                capture.armed = "init" if step == 0 else ("final" if step == total - 1 else None)
                loss = nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                grads = [p.grad for p in params if p.grad is not None]
                global_norms[step] = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
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
        capture.close()
        mon.close(write_findings=False)
        raise
    capture.close()
    mon.close()  # diagnoses the run and writes the findings to the JSONL file
    findings = mon.diagnose()  # the same records, so the same findings as in the file
    records = mon.records
    layers = mon.layers
    linear_names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    by_step = {rec.step: {ls.name: ls for ls in rec.layers} for rec in records}
    logged = [rec.step for rec in records]
    grad_by_step = [[by_step[s][name].grad_norm for s in logged] for name in linear_names]
    init_rec = records[0]
    final_rec = next((r for r in reversed(records) if r.finite), records[0])
    gn = global_norms[:step].tolist()
    ls = losses[:step].tolist()
    nonfinite_steps = [
        i
        for i, (g, lo) in enumerate(zip(gn, ls, strict=True))
        if not (math.isfinite(g) and math.isfinite(lo))
    ]
    histograms = []
    for i in hist_blocks:
        name = f"blocks.{i}.act"
        got = capture.data.get(name, {})
        init_c = got.get("init")
        final_c = got.get("final")
        histograms.append(
            HistogramResult(
                layer=name,
                block=i,
                edges=torch.linspace(-config.hist_range, config.hist_range, config.hist_bins + 1).tolist(),
                init=init_c[0].tolist() if init_c else None,
                final=final_c[0].tolist() if final_c else None,
                saturated_frac_init=float(init_c[1]) if init_c else None,
                saturated_frac_final=float(final_c[1]) if final_c else None,
                sample_std_init=float(init_c[2]) if init_c else None,
                sample_std_final=float(final_c[2]) if final_c else None,
            )
        )
    test_acc = _accuracy(model, data.x_test, data.y_test)
    train_acc = _accuracy(model, data.x_train, data.y_train)
    return VariantResult(
        name=variant.name,
        title=variant.title,
        shows=variant.shows,
        family=variant.family,
        spec={f.name: getattr(variant, f.name) for f in fields(variant)},
        layer_names=linear_names,
        monitored_layers=[info.name for info in layers],
        first_last_rms_ratio_init=first_last_rms_ratio(init_rec),
        grad_norm_init=[by_step[init_rec.step][name].grad_norm for name in linear_names],
        grad_norm_final=[by_step[final_rec.step][name].grad_norm for name in linear_names],
        final_step=final_rec.step,
        logged_steps=logged,
        grad_norm_by_step=grad_by_step,
        global_norm=gn,
        loss=ls,
        total_steps=total,
        steps_run=step,
        stopped_at=stopped_at,
        first_nonfinite_step=nonfinite_steps[0] if nonfinite_steps else None,
        test_accuracy=test_acc,
        train_accuracy=train_acc,
        findings=[f.to_dict() for f in findings],
        histograms=histograms,
        time_s=time.perf_counter() - t0,
        jsonl=jsonl_name,
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
            (re-render one with ``gradsentry report``). The HTML report and ``results.json`` are written
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
            chapters[chapter] = run_chapter(chapter, quick=config.chapter_budget == "quick", seed=config.seed)
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
