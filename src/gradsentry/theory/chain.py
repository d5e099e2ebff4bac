"""The fallback for forwards ``torch.fx`` cannot trace: a plain chain of Linear/Conv layers and
elementwise activation modules, traced with forward hooks.

The forward map is the layer-by-layer variance map ``q_l = sigma_w^2 E[phi(h_{l-1})^2] + sigma_b^2`` of
Poole et al. 2016 (arXiv:1606.05340), the backward gain per layer Schoenholz et al. 2017's
``chi = sigma_w^2 E[phi'(h)^2]`` (arXiv:1611.01232), with fan-out/fan-in for non-square layers.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from gradsentry.theory.coverage import (
    ACTIVATION_TYPES,
    LINEAR_TYPES,
    NEUTRAL_TYPES,
    TheoryNotApplicable,
    not_applicable,
)
from gradsentry.theory.gaussian import Phi, moments
from gradsentry.theory.prediction import LayerPrediction, Prediction, _fans, _mix

__all__ = ["predict_chain", "trace_forward"]


def trace_forward(model: nn.Module, example_input: Any) -> tuple[list[tuple[str, nn.Module, Any, Any]], Any]:
    """Run one forward pass (no grad) and return the leaf modules as ``(name, module, input, output)``
    in the order they ran, and the model's output. Hooks are removed and the train/eval mode is untouched."""
    calls: list[tuple[str, nn.Module, Any, Any]] = []
    handles = []
    for name, mod in model.named_modules():
        if next(mod.children(), None) is None:

            def hook(m: nn.Module, args: tuple[Any, ...], out: Any, _n: str = name) -> None:
                calls.append((_n, m, args[0] if args else None, out))

            handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            result = model(*example_input) if isinstance(example_input, tuple) else model(example_input)
    finally:
        for h in handles:
            h.remove()
    return calls, result


def _chain_leaves(model: nn.Module, example_input: Any | None) -> list[tuple[str, nn.Module]]:
    if example_input is None:
        if not isinstance(model, nn.Sequential):
            raise TheoryNotApplicable(
                f"{type(model).__name__} is not an nn.Sequential: pass example_input so that the forward "
                "order and the chain structure can be traced"
            )
        return [(n, m) for n, m in model.named_modules() if next(m.children(), None) is None]
    calls, result = trace_forward(model, example_input)
    first = example_input[0] if isinstance(example_input, tuple) else example_input
    prev: Any = first
    out: list[tuple[str, nn.Module]] = []
    for name, mod, inp, outp in calls:
        if inp is not prev and not (
            isinstance(inp, torch.Tensor)
            and isinstance(prev, torch.Tensor)
            and inp.data_ptr() == prev.data_ptr()
            and inp.shape == prev.shape
        ):
            reason = (
                "it does not take the previous module's output: torch.fx could not trace the forward, "
                "and traced with hooks the model is not a plain chain (residual connection, functional op "
                "or normalization in forward)"
            )
            raise TheoryNotApplicable(
                f"no prediction at module {name!r} ({type(mod).__name__}): {reason}",
                module=name,
                reason=reason,
            )
        prev = outp
        out.append((name, mod))
    if result is not prev:
        raise TheoryNotApplicable(
            "the model's output is not its last module's output: the model is not a plain chain "
            "(residual connection or functional op after the last module)"
        )
    return out


def predict_chain(
    model: nn.Module,
    *,
    input_second_moment: float | None,
    example_input: Any | None,
    hermite_nodes: int | None,
) -> Prediction:
    """Prediction for a plain chain (see :func:`gradsentry.theory.predict`; the module docstring)."""
    for name, mod in model.named_modules():  # cheap structural check before any forward pass
        if next(mod.children(), None) is None and not isinstance(
            mod, (*LINEAR_TYPES, *ACTIVATION_TYPES, *NEUTRAL_TYPES, nn.Dropout)
        ):
            raise not_applicable(name, mod)
    leaves = _chain_leaves(model, example_input)
    if input_second_moment is None:
        if example_input is not None:
            x = example_input[0] if isinstance(example_input, tuple) else example_input
            input_second_moment = float(x.detach().double().pow(2).mean())
        else:
            input_second_moment = 1.0
    entries: list[tuple[str, nn.Module, nn.Module | None]] = []
    for name, mod in leaves:
        if isinstance(mod, LINEAR_TYPES):
            entries.append((name, mod, None))
        elif isinstance(mod, ACTIVATION_TYPES):
            if not entries or entries[-1][2] is not None:
                raise TheoryNotApplicable(
                    f"activation {name!r} does not directly follow a Linear/Conv layer",
                    module=name,
                    reason="an activation that does not directly follow a Linear/Conv layer",
                )
            entries[-1] = (entries[-1][0], entries[-1][1], mod)
        elif isinstance(mod, NEUTRAL_TYPES) or (
            isinstance(mod, nn.Dropout) and (mod.p == 0 or not mod.training)
        ):
            continue
        else:
            raise not_applicable(name, mod)
    if not entries:
        raise TheoryNotApplicable("the model has no Linear/Conv layer")
    pred = Prediction(input_second_moment=input_second_moment)
    m2 = input_second_moment
    for name, mod, act in entries:
        fan_in, fan_out = _fans(mod)
        w = mod.weight.detach().double()  # type: ignore[operator]
        sigma_w2 = float(w.var(unbiased=False)) * fan_in
        b = getattr(mod, "bias", None)
        sigma_b2 = float(b.detach().double().pow(2).mean()) if isinstance(b, torch.Tensor) else 0.0
        q = sigma_w2 * m2 + sigma_b2
        phi: Phi = act if act is not None else nn.Identity()
        _, act_m2, dphi2 = moments(phi, q, hermite_nodes=hermite_nodes)
        pred.layers.append(
            LayerPrediction(
                name=name,
                type=type(mod).__name__,
                activation=type(phi).__name__,
                fan_in=fan_in,
                fan_out=fan_out,
                sigma_w2=sigma_w2,
                sigma_b2=sigma_b2,
                q=q,
                act_second_moment=act_m2,
                dphi2=dphi2,
            )
        )
        pred.layers[-1].weight_grad_rms = math.sqrt(m2)  # input RMS, multiplied by backward RMS below
        pred.layers[-1].input_rms = math.sqrt(m2)
        pred.layers[-1].n_weight = int(mod.weight.numel())  # type: ignore[operator]
        pred.layers[-1].n_bias = int(b.numel()) if isinstance(b, torch.Tensor) else 0
        m2 = act_m2
    back2 = 1.0
    inputs_rms = [lp.weight_grad_rms for lp in pred.layers]
    for i in range(len(pred.layers) - 1, -1, -1):
        lp = pred.layers[i]
        if i < len(pred.layers) - 1:
            nxt = pred.layers[i + 1]
            lp.chi = nxt.sigma_w2 * (nxt.fan_out / nxt.fan_in) * lp.dphi2
            back2 *= lp.chi
        lp.backward_rms = math.sqrt(back2)
        lp.weight_grad_rms = lp.backward_rms * inputs_rms[i] / inputs_rms[-1]
        lp.grad_rms = lp.backward_rms * _mix(lp)
    last = _mix(pred.layers[-1])
    for lp in pred.layers:
        lp.grad_rms /= last
    return pred
