"""Mean-field propagation through a traced model graph: residual sums, normalization, pooling.

:func:`gradsentry.theory.predict` calls :func:`predict_graph` first (formerly ``gradsentry.propagation``). It traces the model with
``torch.fx.symbolic_trace`` (modules of ``torch.nn`` are leaves) and carries three numbers per tensor
through the graph, forward, from the input:

* ``m2``: second moment of an entry, ``E[x^2]`` (what feeds the next pre-activation, Poole et al. 2016);
* ``mu``: mean of an entry, ``E[x]``;
* ``v``: variance of a unit across the examples of a batch (what batch normalization divides by).

Then the squared per-unit backward signal ``b2 = E[(dL/dx)^2]``, backward from the output (``b2 = 1``),
summed over every consumer of a tensor (independent paths: cross terms vanish in the mean-field limit).
The rules, node by node:

=========================  ==============================================  ==========================
node                       forward                                         backward gain on ``b2``
=========================  ==============================================  ==========================
Linear / Conv              ``m2 = sw2 m2_in + sb2``, ``mu = 0``,           ``sw2 fan_out / fan_in``
                           ``v = sw2 v_in``
activation ``phi``         ``E[phi(h)^2]``, ``h ~ N(0, m2_in)``            ``E[phi'(h)^2]``
residual sum ``a + b``     ``m2 = m2_a + m2_b + 2 mu_a mu_b``              1 to each summand
scale ``c x``              ``m2 c^2``                                      ``c^2``
BatchNorm (train)          ``m2 = <g^2> + <b^2>``, ``v = <g^2>``           ``<g^2> / v_in``
LayerNorm / GroupNorm      ``m2 = <g^2> + <b^2>``                          ``<g^2> / (m2_in - mu_in^2)``
RMSNorm                    ``m2 = <g^2>``                                  ``<g^2> / m2_in``
dropout ``p`` (train)      ``m2 / (1 - p)``                                ``1 / (1 - p)``
reshape, dropout (eval),   unchanged                                       1
average pooling, ``mean``
=========================  ==============================================  ==========================

The residual rule is Yang & Schoenholz 2017 ("Mean field residual networks: on the edge of chaos",
arXiv:1712.08969): the variance of the stream grows additively, and the backward signal gains
``1 + chi_branch`` per block instead of ``chi``, which is why a deep residual network does not vanish.
Normalization resets the forward map to ``<gamma^2> + <beta^2>`` whatever came in, and divides the
backward signal by the standard deviation it divided the forward one by (Ioffe & Szegedy 2015; the
two projection terms of the exact batch-norm backward, of order ``1/N``, are ignored). Average pooling
and ``mean`` over positions are taken as neutral: spatial positions are assumed fully correlated, the
fixed point ``c* = 1`` of deep ReLU convolutional networks (Xiao et al. 2018, arXiv:1806.05393), so a
mean keeps the per-unit second moment and a convolution's per-example weight gradient, summed over
positions, behaves as a linear layer's.

What gets no prediction, and why, is listed in :mod:`gradsentry.theory.coverage`.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.nn import functional as F

from gradsentry import _taxonomy
from gradsentry.theory.coverage import (
    ACTIVATION_TYPES,
    LINEAR_TYPES,
    NEUTRAL_TYPES,
    POOL_TYPES,
    TheoryNotApplicable,
    check_supported,
    is_norm,
    not_applicable,
)
from gradsentry.theory.gaussian import moments
from gradsentry.theory.prediction import LayerPrediction, Prediction, _fans, _mix

__all__ = ["predict_graph"]

_FUNCTIONAL_ACTS: dict[Any, Callable[..., Any]] = {
    torch.relu: torch.relu,
    F.relu: F.relu,
    torch.tanh: torch.tanh,
    F.tanh: torch.tanh,
    torch.sigmoid: torch.sigmoid,
    F.sigmoid: torch.sigmoid,
    F.gelu: F.gelu,
    F.silu: F.silu,
    F.elu: F.elu,
    F.leaky_relu: F.leaky_relu,
    F.softplus: F.softplus,
    F.mish: F.mish,
    F.hardtanh: F.hardtanh,
    F.relu6: F.relu6,
}
_METHOD_ACTS: dict[str, Callable[..., Any]] = {
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}
_ADD = {operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub}
_SCALE = {operator.mul, operator.imul, torch.mul, operator.truediv, operator.itruediv, torch.div}
_NEUTRAL_FUNCTIONS = {
    torch.flatten,
    torch.reshape,
    torch.squeeze,
    torch.unsqueeze,
    torch.permute,
    torch.transpose,
}
_NEUTRAL_METHODS = {
    "view",
    "reshape",
    "flatten",
    "contiguous",
    "squeeze",
    "unsqueeze",
    "permute",
    "transpose",
    "clone",
    "float",
    "to",
    "type_as",
}
_POOL_FUNCTIONS = {
    torch.mean,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.avg_pool1d,
    F.avg_pool2d,
}
_META_METHODS = {"size", "dim"}  # results are not tensors


@dataclass
class _Moments:
    """Per-tensor statistics carried forward (see the module docstring)."""

    m2: float
    mu: float
    v: float


def _input_moments(x: Any, default_m2: float | None) -> _Moments:
    if isinstance(x, torch.Tensor) and x.numel() > 0 and x.is_floating_point():
        xd = x.detach().double()
        m2 = float(xd.pow(2).mean()) if default_m2 is None else default_m2
        mu = float(xd.mean())
        v = float(xd.var(dim=0, unbiased=False).mean()) if xd.dim() >= 1 and xd.shape[0] > 1 else m2 - mu * mu
        return _Moments(m2, mu, max(v, 0.0))
    m2 = 1.0 if default_m2 is None else default_m2
    return _Moments(m2, 0.0, m2)


def _affine(mod: nn.Module) -> tuple[float, float]:
    """Mean of gamma^2 and of beta^2 of a normalization layer (1 and 0 without affine parameters)."""
    w, b = getattr(mod, "weight", None), getattr(mod, "bias", None)
    g2 = float(w.detach().double().pow(2).mean()) if isinstance(w, torch.Tensor) else 1.0
    b2 = float(b.detach().double().pow(2).mean()) if isinstance(b, torch.Tensor) else 0.0
    return g2, b2


def _scalar(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class _Tracer(torch.fx.Tracer):
    """``torch.fx``'s tracer, with normalization layers recognised by name (Hugging Face RMS norms) kept
    as leaves, so that their ``x * rsqrt(mean(x^2))`` is not judged op by op."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return super().is_leaf_module(m, module_qualified_name) or is_norm(m)


class _Walk:
    """One forward and one backward sweep of the moments over a traced graph."""

    def __init__(
        self, model: nn.Module, gm: torch.fx.GraphModule, inputs: list[_Moments], hermite_nodes: int | None
    ) -> None:
        self.model = model
        self.hermite_nodes = hermite_nodes
        self.gm = gm
        self.inputs = inputs
        self.stats: dict[torch.fx.Node, _Moments | None] = {}
        # backward edges: (consumer, producer, gain on b2)
        self.edges: list[tuple[torch.fx.Node, torch.fx.Node, float]] = []
        self.layers: list[torch.fx.Node] = []
        self.layer_module: dict[torch.fx.Node, nn.Module] = {}
        self.layer_sw2: dict[torch.fx.Node, tuple[float, float]] = {}
        self.act_of: dict[torch.fx.Node, tuple[str, float, float]] = {}  # act node -> (name, m2_out, dphi2)

    def _tensor_args(self, node: torch.fx.Node) -> list[torch.fx.Node]:
        return [a for a in node.all_input_nodes if self.stats.get(a) is not None]

    def _fail(self, node: torch.fx.Node, what: str) -> TheoryNotApplicable:
        stack = node.meta.get("nn_module_stack") or {}
        owner = str(next(reversed(stack))) if stack else ""  # the innermost module the op ran in
        where = f" in module {owner!r}" if owner else ""
        return TheoryNotApplicable(
            f"no prediction: {what} at node {node.name!r}{where} is outside the mean-field rules",
            module=owner or node.name,
            reason=f"{what} is outside the mean-field rules",
        )

    def forward(self) -> None:
        placeholders = 0
        calls: dict[str, int] = {}
        for node in self.gm.graph.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1
        for target, count in calls.items():
            if count > 1:
                reason = (
                    f"called {count} times in one forward (weights shared across time steps or positions, "
                    "as in a recurrence); the theory assumes independent weights per layer"
                )
                raise TheoryNotApplicable(
                    f"no prediction: module {target!r} is {reason}", module=str(target), reason=reason
                )
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.stats[node] = self.inputs[placeholders] if placeholders < len(self.inputs) else None
                placeholders += 1
            elif node.op == "output":
                continue
            elif node.op == "get_attr":
                raise self._fail(
                    node,
                    f"a parameter or buffer used directly in forward ({node.target}, e.g. a learned position embedding)",
                )
            elif node.op == "call_module":
                self.stats[node] = self._module(node, self.model.get_submodule(node.target))
            else:
                self.stats[node] = self._function(node)

    def _one_input(self, node: torch.fx.Node) -> torch.fx.Node:
        args = self._tensor_args(node)
        if len(args) != 1:
            raise self._fail(node, f"{node.target} on {len(args)} tensors")
        return args[0]

    def _act(self, node: torch.fx.Node, phi: Callable[..., Any], name: str) -> _Moments:
        src = self._one_input(node)
        s = self.stats[src]
        assert s is not None
        mean, m2, dphi2 = moments(phi, max(s.m2, 0.0), hermite_nodes=self.hermite_nodes)
        self.edges.append((node, src, dphi2))
        self.act_of[node] = (name, m2, dphi2)
        return _Moments(m2, mean, max(m2 - mean * mean, 0.0))

    def _module(self, node: torch.fx.Node, mod: nn.Module) -> _Moments | None:
        if isinstance(mod, LINEAR_TYPES):
            src = self._one_input(node)
            s = self.stats[src]
            assert s is not None
            fan_in, fan_out = _fans(mod)
            sw2 = float(mod.weight.detach().double().var(unbiased=False)) * fan_in  # type: ignore[operator]
            b = getattr(mod, "bias", None)
            sb2 = float(b.detach().double().pow(2).mean()) if isinstance(b, torch.Tensor) else 0.0
            self.edges.append((node, src, sw2 * fan_out / fan_in))
            self.layers.append(node)
            self.layer_module[node] = mod
            self.layer_sw2[node] = (sw2, sb2)
            return _Moments(sw2 * s.m2 + sb2, 0.0, sw2 * s.v)
        if isinstance(mod, ACTIVATION_TYPES):
            return self._act(node, mod, type(mod).__name__)
        if is_norm(mod):
            src = self._one_input(node)
            s = self.stats[src]
            assert s is not None
            g2, b2 = _affine(mod)
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                if mod.training or not mod.track_running_stats:
                    var = s.v
                    out = _Moments(g2 + b2, 0.0, g2)
                else:  # eval: running statistics, an affine map at init (mean 0, var 1)
                    rv = float(mod.running_var.double().mean()) if mod.running_var is not None else 1.0
                    var = rv + mod.eps
                    out = _Moments(g2 * s.m2 / var + b2, 0.0, g2 * s.v / var)
            elif _taxonomy.normalization_kind(mod) == _taxonomy.RMS:  # not centred
                var = s.m2
                out = _Moments(g2, 0.0, g2 * s.v / max(var, 1e-300))
            else:
                var = s.m2 - s.mu * s.mu
                out = _Moments(g2 + b2, 0.0, g2 * s.v / max(var, 1e-300))
            if var <= 0:
                raise self._fail(node, f"{type(mod).__name__} of a constant input")
            self.edges.append((node, src, g2 / var))
            return out
        if isinstance(mod, nn.modules.dropout._DropoutNd) and mod.training and 0 < mod.p < 1:
            if type(mod) is not nn.Dropout:  # alpha/feature dropout: other masks and scalings
                raise not_applicable(str(node.target), mod)
            src = self._one_input(node)
            s = self.stats[src]
            assert s is not None
            keep = 1.0 - float(mod.p)  # y = x m / keep, m ~ Bernoulli(keep): E[y^2] = E[x^2] / keep
            self.edges.append((node, src, 1.0 / keep))
            return _Moments(s.m2 / keep, s.mu, s.v + s.m2 * (1.0 / keep - 1.0))
        if isinstance(mod, (*NEUTRAL_TYPES, *POOL_TYPES)) or (
            isinstance(mod, nn.modules.dropout._DropoutNd) and (mod.p == 0 or not mod.training)
        ):
            src = self._one_input(node)
            self.edges.append((node, src, 1.0))
            return self.stats[src]
        raise not_applicable(str(node.target), mod)

    def _function(self, node: torch.fx.Node) -> _Moments | None:
        target = node.target
        if node.op == "call_method" and target in _META_METHODS:
            return None
        if (
            node.op == "call_function"
            and target is getattr
            and node.args[1] in ("shape", "dtype", "device", "ndim")
        ):
            return None  # x.shape: not a tensor
        if node.op == "call_function" and target is operator.getitem:
            if all(self.stats.get(a) is None for a in node.all_input_nodes):
                return None  # x.shape[0]
            raise self._fail(node, "indexing a tensor")
        if node.op == "call_function" and target in _FUNCTIONAL_ACTS:
            phi = _FUNCTIONAL_ACTS[target]
            extra = {k: v for k, v in node.kwargs.items() if k != "inplace"}
            if extra or len(node.args) > 1:
                positional = [a for a in node.args[1:] if not isinstance(a, bool)]
                phi = partial(phi, *positional, **extra)
            return self._act(node, phi, getattr(target, "__name__", str(target)))
        if node.op == "call_method" and target in _METHOD_ACTS:
            return self._act(node, _METHOD_ACTS[target], str(target))
        if target in _ADD or (node.op == "call_method" and target in ("add", "add_", "sub", "sub_")):
            tensors = self._tensor_args(node)
            if len(tensors) == 2:
                a, b = (self.stats[t] for t in tensors)
                assert a is not None and b is not None
                sign = -1.0 if target in (operator.sub, operator.isub, torch.sub, "sub", "sub_") else 1.0
                for t in tensors:
                    self.edges.append((node, t, 1.0))
                return _Moments(a.m2 + b.m2 + 2 * sign * a.mu * b.mu, a.mu + sign * b.mu, a.v + b.v)
            raise self._fail(node, "adding a constant to a tensor (a shift the theory does not follow)")
        if target in _SCALE or (node.op == "call_method" and target in ("mul", "mul_", "div", "div_")):
            tensors = self._tensor_args(node)
            consts = [_scalar(a) for a in node.args if not isinstance(a, torch.fx.Node)]
            if len(tensors) == 1 and len(consts) == 1 and consts[0] is not None:
                c = consts[0]
                if target in (operator.truediv, operator.itruediv, torch.div, "div", "div_"):
                    c = 1.0 / c
                s = self.stats[tensors[0]]
                assert s is not None
                self.edges.append((node, tensors[0], c * c))
                return _Moments(s.m2 * c * c, s.mu * c, s.v * c * c)
            raise self._fail(node, "a product of two tensors (gating or attention)")
        neutral = (node.op == "call_function" and target in (_NEUTRAL_FUNCTIONS | _POOL_FUNCTIONS)) or (
            node.op == "call_method" and (target in _NEUTRAL_METHODS or target == "mean")
        )
        if neutral:
            src = self._one_input(node)
            self.edges.append((node, src, 1.0))
            return self.stats[src]
        name = getattr(target, "__name__", str(target))
        raise self._fail(node, f"the operation {name!r}")

    def backward(self) -> dict[torch.fx.Node, float]:
        out = next(n for n in self.gm.graph.nodes if n.op == "output")
        results = [a for a in out.all_input_nodes if self.stats.get(a) is not None]
        if len(results) != 1:
            raise TheoryNotApplicable(
                f"no prediction: the model returns {len(results)} tensors (one is needed)"
            )
        b2: dict[torch.fx.Node, float] = {results[0]: 1.0}
        for consumer, producer, gain in reversed(self.edges):
            if consumer in b2:
                b2[producer] = b2.get(producer, 0.0) + b2[consumer] * gain
        return b2

    def following_activation(self, node: torch.fx.Node) -> torch.fx.Node | None:
        """The activation a layer's output reaches through single-consumer normalization/reshape nodes."""
        cur = node
        for _ in range(8):
            users = list(cur.users)
            if len(users) != 1:
                return None
            nxt = users[0]
            if nxt in self.act_of:
                return nxt
            if (
                nxt.op == "call_module"
                and isinstance(self.model.get_submodule(str(nxt.target)), (*NEUTRAL_TYPES, nn.Dropout))
            ) or (nxt.op == "call_module" and is_norm(self.model.get_submodule(str(nxt.target)))):
                cur = nxt
                continue
            if nxt.op == "call_method" and nxt.target in _NEUTRAL_METHODS:
                cur = nxt
                continue
            return None
        return None


def predict_graph(
    model: nn.Module,
    *,
    example_input: Any | None,
    input_second_moment: float | None,
    hermite_nodes: int | None = None,
) -> Prediction:
    """Mean-field prediction over the traced graph of ``model`` (see the module docstring).

    Args:
        model: any module ``torch.fx.symbolic_trace`` can trace (no data-dependent control flow).
        example_input: a batch ``[N, ...]`` or a tuple of positional inputs; gives the input moments.
        input_second_moment: overrides the input's ``E[x^2]`` (default: from ``example_input``, else 1).
        hermite_nodes: quadrature rule of :func:`gradsentry.theory.moments`.

    Returns:
        A :class:`~gradsentry.theory.Prediction` with one entry per Linear/Conv layer in forward order;
        ``chi`` of a layer is the ratio of its squared backward signal to the next layer's.

    Raises:
        TheoryNotApplicable: a module or operation outside the rules (the message says which and why).
        torch.fx.proxy.TraceError (or another exception from tracing): the forward cannot be traced
            symbolically; the caller falls back to tracing a plain chain with hooks.
    """
    check_supported(model)
    gm = torch.fx.GraphModule(model, _Tracer().trace(model))
    xs = example_input if isinstance(example_input, tuple) else (example_input,)
    inputs = [_input_moments(x, input_second_moment) for x in xs]
    walk = _Walk(model, gm, inputs, hermite_nodes)
    walk.forward()
    if not walk.layers:
        raise TheoryNotApplicable("the model has no Linear/Conv layer")
    b2 = walk.backward()
    first = inputs[0]
    pred = Prediction(input_second_moment=first.m2)
    last_b2 = b2.get(walk.layers[-1], 0.0)
    if last_b2 <= 0:
        raise TheoryNotApplicable("no prediction: the last Linear/Conv layer does not reach the output")
    for node in walk.layers:
        mod = walk.layer_module[node]
        src = next(a for a in node.all_input_nodes if walk.stats.get(a) is not None)
        s_in, s_out = walk.stats[src], walk.stats[node]
        assert s_in is not None and s_out is not None
        fan_in, fan_out = _fans(mod)
        sw2, sb2 = walk.layer_sw2[node]
        act = walk.following_activation(node)
        act_name, act_m2, dphi2 = walk.act_of[act] if act is not None else ("Identity", s_out.m2, 1.0)
        b = getattr(mod, "bias", None)
        pred.layers.append(
            LayerPrediction(
                name=str(node.target),
                type=type(mod).__name__,
                activation=act_name,
                fan_in=fan_in,
                fan_out=fan_out,
                sigma_w2=sw2,
                sigma_b2=sb2,
                q=s_out.m2,
                act_second_moment=act_m2,
                dphi2=dphi2,
                backward_rms=math.sqrt(b2.get(node, 0.0) / last_b2),
                input_rms=math.sqrt(max(s_in.m2, 0.0)),
                n_weight=int(mod.weight.numel()),  # type: ignore[operator]
                n_bias=int(b.numel()) if isinstance(b, torch.Tensor) else 0,
            )
        )
    for i, lp in enumerate(pred.layers):
        if i + 1 < len(pred.layers):
            nxt = pred.layers[i + 1].backward_rms
            lp.chi = (lp.backward_rms / nxt) ** 2 if nxt > 0 else math.inf
    last_in = pred.layers[-1].input_rms
    last_mix = _mix(pred.layers[-1])
    for lp in pred.layers:
        lp.weight_grad_rms = lp.backward_rms * lp.input_rms / last_in if last_in > 0 else math.nan
        lp.grad_rms = lp.backward_rms * _mix(lp) / last_mix
    return pred
