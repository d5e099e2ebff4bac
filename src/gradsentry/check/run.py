"""Running the check: inputs, one forward/backward pass under a Monitor, theory, findings, and fixes."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from torch import nn

from gradsentry._extras import requires_extra
from gradsentry.check.examples import _output_tensor, per_example_rms
from gradsentry.check.profile import (
    _block_profile,
    _concentration_finding,
    _exploding_at_init,
    _fit_slope,
)
from gradsentry.check.report import (
    DEAD_UNITS_MIN_BATCH,
    FIXES,
    LOSSES,
    LSUV_THEORY_NOTE,
    CheckReport,
    CheckRow,
    FixName,
    InputFitError,
    LossName,
)
from gradsentry.diagnosis.thresholds import Thresholds

logger = logging.getLogger("gradsentry")


def digits_batch(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A real batch from scikit-learn's bundled digits (no download): ``x [n, 64]`` in [0, 1], ``y [n]``.

    Rows are drawn without replacement with ``seed``; pixel values (0..16) are divided by 16.

    Raises:
        ValueError: unless ``1 <= n <= 1797``.
        gradsentry._extras.MissingExtraError: scikit-learn is not installed (``gradsentry[lab]``).
    """
    with requires_extra("lab", "the digits batch"):
        from sklearn.datasets import load_digits

    digits = load_digits()
    if not 1 <= n <= len(digits.target):
        raise ValueError(f"the digits batch size must be in [1, {len(digits.target)}], got {n}")
    idx = np.random.default_rng(seed).choice(len(digits.target), size=n, replace=False)
    x = torch.tensor(digits.data[idx] / 16.0, dtype=torch.float32)
    return x, torch.tensor(digits.target[idx], dtype=torch.long)


# ------------------------------------------------------------------------------------------------ report


def _forward(model: nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, list[str]]:
    """Forward pass that names the innermost module running when an exception is raised."""
    names = {id(m): n for n, m in model.named_modules()}
    stack: list[str] = []
    order: list[str] = []

    def pre(m: nn.Module, _a: Any) -> None:
        name = names.get(id(m), "?")
        stack.append(name)
        if name not in order:
            order.append(name)

    def post(_m: nn.Module, _a: Any, _o: Any) -> None:
        if stack:
            stack.pop()

    handles = [m.register_forward_pre_hook(pre) for m in model.modules()]
    handles += [m.register_forward_hook(post) for m in model.modules()]
    try:
        out = model(*inputs)
    except Exception as exc:
        culprit = stack[-1] if stack else ""
        mod = dict(model.named_modules()).get(culprit)
        where = "the model's own forward" if culprit == "" else f"layer {culprit!r}"
        kind = f" ({type(mod).__name__})" if mod is not None else ""
        parts = [str(list(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__ for x in inputs]
        what = (
            f"of shape {', '.join(parts)}"
            if all(isinstance(x, torch.Tensor) for x in inputs)
            else f"({', '.join(parts)}: a batch is a tensor or a tuple of them)"
        )
        raise InputFitError(
            f"the input {what} does not fit the model: {where}{kind} rejected it: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    finally:
        for h in handles:
            h.remove()
    return out, order


def _loss(
    out: torch.Tensor, loss: str, targets: torch.Tensor | None, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The loss and the targets it used (drawn with ``gen`` when None; None for ``sum``)."""
    try:
        if loss == "ce":
            if out.dim() < 2:
                raise InputFitError(
                    f"--loss ce needs logits [N, ..., C], the model output is {list(out.shape)}"
                )
            logits = out.reshape(-1, out.shape[-1]).float()
            if targets is None:
                targets = torch.randint(0, out.shape[-1], out.shape[:-1], generator=gen)
            flat = targets.reshape(-1).to(out.device)
            if flat.numel() != logits.shape[0] or int(flat.max()) >= out.shape[-1]:
                raise InputFitError(
                    f"--loss ce: {flat.numel()} labels up to {int(flat.max())} do not fit the model "
                    f"output of shape {list(out.shape)} (classes on the last dimension)"
                )
            return nn.functional.cross_entropy(logits, flat), targets
        if loss == "mse":
            if targets is None or targets.shape != out.shape:
                targets = torch.randn(out.shape, generator=gen)
            return nn.functional.mse_loss(out.float(), targets.to(out.device).float()), targets
        if loss == "sum":
            return out.float().sum(), None
    except InputFitError:
        raise
    except Exception as exc:
        raise InputFitError(f"--loss {loss} does not fit the model output {list(out.shape)}: {exc}") from exc
    raise ValueError(f"unknown loss {loss!r}; valid: {', '.join(LOSSES)}")


def _make_inputs(
    model: nn.Module, batch: Any, input_shape: Sequence[int] | None, batch_size: int, gen: torch.Generator
) -> tuple[Any, ...]:
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)

    def place(x: Any) -> Any:  # float inputs follow the model's dtype (fp16/bf16 models)
        if not isinstance(x, torch.Tensor):
            return x
        return x.to(device, dtype) if x.is_floating_point() else x.to(device)

    if batch is not None:
        items = batch if isinstance(batch, tuple) else (batch,)
        return tuple(place(x) for x in items)
    if input_shape is None:
        raise ValueError("check_model needs a batch or an input_shape")
    if any(int(s) < 1 for s in input_shape) or batch_size < 1:
        raise ValueError(
            f"input shape and batch size must be positive, got {list(input_shape)} and {batch_size}"
        )
    shape = (batch_size, *(int(s) for s in input_shape))
    first = next((m for m in model.modules() if any(True for _ in m.parameters(recurse=False))), None)
    if isinstance(first, nn.Embedding):  # a token model: integer ids
        return (torch.randint(0, first.num_embeddings, shape, generator=gen).to(device),)
    numel = math.prod(shape)
    if numel > 2**31:
        raise ValueError(f"the random batch {list(shape)} would hold {numel:,} numbers; use a smaller shape")
    return (place(torch.randn(shape, generator=gen)),)


def _run_once(
    model: nn.Module,
    inputs: tuple[Any, ...],
    loss: str,
    targets: torch.Tensor | None,
    seed: int,
    theory_note: str | None = None,
    thresholds: Thresholds | None = None,
) -> CheckReport:
    from gradsentry import theory
    from gradsentry.diagnose import diagnose
    from gradsentry.monitor import Monitor

    pred = None
    note = theory_note
    if note is None:
        try:
            pred = theory.predict(model, example_input=inputs if len(inputs) > 1 else inputs[0])
        except theory.TheoryNotApplicable as exc:
            note = str(exc)
        except Exception as exc:  # never let the prediction hide the measurement; the forward reports it
            note = f"not computed ({type(exc).__name__})"
    gen = torch.Generator().manual_seed(seed + 1)
    model.zero_grad(set_to_none=True)
    mon = Monitor(model, every=1, thresholds=thresholds)
    try:
        out, order = _forward(model, inputs)
        value, used_targets = _loss(_output_tensor(out), loss, targets, gen)
        if not value.requires_grad:
            raise InputFitError(
                "the loss does not depend on any trainable parameter (every parameter is frozen, or the "
                "forward detaches its output): there is no gradient to check"
            )
        value.backward()
        rec = mon.step(loss=value)
        layers = mon.layers
    finally:
        mon.close(write_findings=False)
    assert rec is not None
    position = {n: i for i, n in enumerate(order)}
    layer_names = sorted((position.get(info.name, math.inf), info.name) for info in layers)
    follows: dict[str, Any] = {}
    for act in rec.activations:  # the activation belongs to the nearest layer before it in forward order
        before = [n for p, n in layer_names if p < position.get(act.name, -1)]
        if before and before[-1] not in follows:
            follows[before[-1]] = act
    info_by_name = {info.name: info for info in layers}
    rows = []
    for st in rec.layers:
        info = info_by_name.get(st.name)
        follow = follows.get(st.name)
        rows.append(
            CheckRow(
                depth=st.depth,
                name=st.name,
                type=info.type if info else "",
                params=info.params if info else st.numel,
                grad_norm=st.grad_norm,
                grad_rms=st.grad_rms,
                rel_grad=st.grad_norm / st.weight_norm if st.weight_norm else None,
                has_grad=st.has_grad,
                activation=follow.type if follow else None,
                saturated_frac=follow.saturated_frac if follow else None,
                dead_frac=follow.dead_frac if follow else None,
            )
        )
    max_dev = None
    if pred is not None:
        by_name = {r.name: r for r in rows}
        try:
            example = per_example_rms(model, inputs[0], loss, used_targets)
        except Exception as exc:  # a model torch.func cannot transform: keep the measurement, say why
            example = {}
            note = f"per-example gradients not computed ({type(exc).__name__}: {exc})"
        for name, value_rms in example.items():
            if name in by_name:
                by_name[name].example_rms = value_rms
        anchor = by_name.get(pred.layers[-1].name)
        if anchor is not None and anchor.example_rms:
            scale = anchor.example_rms / pred.layers[-1].grad_rms
            devs = []
            for lp in pred.layers:
                row = by_name.get(lp.name)
                if row is not None:
                    row.predicted_rms = lp.grad_rms * scale
                    if row.example_rms and row.predicted_rms > 0:
                        devs.append(abs(math.log10(row.predicted_rms / row.example_rms)))
            max_dev = max(devs) if devs else None
    ratio, slope, head = _fit_slope([r for r, st in zip(rows, rec.layers, strict=True) if st.has_grad])
    findings = diagnose([rec], layers=layers, thresholds=thresholds)
    n_examples = int(inputs[0].shape[0]) if isinstance(inputs[0], torch.Tensor) and inputs[0].dim() else 0
    if n_examples < DEAD_UNITS_MIN_BATCH:  # "zero for every sample" means little on a few samples
        findings = [f for f in findings if f.kind != "dead_units"]
    init_finding = _exploding_at_init(ratio, slope, rows, rec.step)
    if init_finding is not None and not any(f.kind == "exploding" for f in findings):
        findings.insert(0, init_finding)
    profile = _block_profile(model, rows)
    if profile is not None:
        concentration = _concentration_finding(profile, rec.step)
        if concentration is not None:
            findings.append(concentration)
    shape = list(inputs[0].shape) if isinstance(inputs[0], torch.Tensor) else []
    return CheckReport(
        rows=rows,
        loss=float(value.detach()),
        loss_kind=loss,
        input_shape=shape,
        first_last_ratio=ratio,
        log_slope=slope,
        head=head,
        theory_max_dev=max_dev,
        blocks=profile,
        findings=findings,
        theory=note,
        record=rec,
    )


def check_model(
    model: nn.Module,
    batch: Any = None,
    *,
    input_shape: Sequence[int] | None = None,
    targets: torch.Tensor | None = None,
    batch_size: int = 16,
    loss: LossName = "ce",
    seed: int = 0,
    fix: FixName | None = None,
    thresholds: Thresholds | None = None,
) -> CheckReport:
    """Run one forward and backward pass at init and report the per-layer gradient profile and findings.

    Args:
        model: the model (its gradients are overwritten; with ``fix`` its weights are re-initialised).
        batch: an input batch ``[N, ...]`` or a tuple of positional inputs; or None with ``input_shape``.
        input_shape: per-example input shape (e.g. ``(3, 32, 32)``) for a random batch: standard normal,
            or integer token ids in ``[0, num_embeddings)`` when the model's first layer is an Embedding.
        targets: labels ``[N]`` for ``ce`` or targets for ``mse``; random (seeded) when None.
        batch_size: rows of the random batch.
        loss: ``ce`` (cross-entropy on the last dimension), ``mse`` or ``sum`` (of the output).
        seed: seeds the random batch and targets.
        fix: ``he`` / ``xavier`` / ``xavier_gain`` (:func:`gradsentry.remedies.init.reinit`) or ``lsuv``
            (:func:`gradsentry.remedies.init.lsuv` on the batch); the check is then run again into
            ``report.fixed``.
        thresholds: a :class:`gradsentry.Thresholds` for the measurement (saturation bands) and the
            diagnosis; the defaults when None.

    Returns:
        A :class:`CheckReport`.

    Raises:
        InputFitError: the batch does not fit the model (the message names the layer that rejected it) or
            the loss does not fit its output.
        ValueError: on an unknown loss or fix, or neither ``batch`` nor ``input_shape``.
        TypeError: ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"check_model expects an nn.Module, got {type(model).__name__}")
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; valid: {', '.join(LOSSES)}")
    if fix is not None and fix not in FIXES:
        raise ValueError(f"unknown fix {fix!r}; valid: {', '.join(FIXES)}")
    gen = torch.Generator().manual_seed(seed)
    inputs = _make_inputs(model, batch, input_shape, batch_size, gen)
    report = _run_once(model, inputs, loss, targets, seed, thresholds=thresholds)
    if fix is not None:
        from gradsentry.remedies.init import lsuv, reinit

        example = inputs if len(inputs) > 1 else inputs[0]
        if fix == "lsuv":
            report.fix_report = [asdict(x) for x in lsuv(model, example).layers]
        else:
            report.fix_report = [asdict(x) for x in reinit(model, fix, example_input=example)]
        report.fix = fix
        note = LSUV_THEORY_NOTE if fix == "lsuv" else None
        report.fixed = _run_once(model, inputs, loss, targets, seed, theory_note=note, thresholds=thresholds)
    return report
