"""The layer index: which modules are layers and activation sites, their forward order, and the
per-parameter facts a logged step reuses (owners, gradient sets, dtype/device), cached."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from gradsentry import _dist, _taxonomy
from gradsentry._fused import Groups
from gradsentry.records import LayerInfo

log = logging.getLogger("gradsentry")

NO_PARAMS_MSG = (
    "gradsentry: the model has no parameters, so there is no gradient to watch. "
    "Pass the module that owns the trainable parameters."
)


@dataclass
class Layer:
    """A module owning parameters directly, with those parameters (tied ones at their first owner)."""

    info: LayerInfo
    module: nn.Module
    params: list[nn.Parameter]


@dataclass
class ActSite:
    """An activation module whose input statistics are recorded (see :func:`gradsentry._taxonomy.activation_kind`)."""

    name: str
    kind: str
    module: nn.Module
    depth: int = 0


def find_layers(model: nn.Module) -> list[Layer]:
    """The model's layers in module order (depth = that order until the first forward fixes it).

    Raises:
        ValueError: the model has no parameters.
        TypeError: a parameter is complex.
    """
    seen: set[int] = set()
    layers: list[Layer] = []
    for name, module in model.named_modules():
        params = []
        for p in module.parameters(recurse=False):
            if id(p) not in seen:  # tied weights belong to their first owner
                seen.add(id(p))
                params.append(p)
        if params:
            trainable = sum(p.numel() for p in params if p.requires_grad)
            info = LayerInfo(name=name, type=type(module).__name__, depth=len(layers), params=trainable)
            layers.append(Layer(info, module, params))
    if not layers:
        raise ValueError(NO_PARAMS_MSG)
    complex_params = [layer.info.name for layer in layers if any(p.is_complex() for p in layer.params)]
    if complex_params:
        raise TypeError(
            "gradsentry.Monitor measures real-valued parameters; layer(s) "
            f"{', '.join(repr(n) for n in complex_params[:3])} hold complex ones"
        )
    if not any(p.requires_grad for layer in layers for p in layer.params):
        log.warning(
            "gradsentry.Monitor: every parameter is frozen (requires_grad=False); records will "
            "show no gradient (has_grad=False) for every layer"
        )
    return layers


def _is_compiled(module: nn.Module) -> bool:
    """True for ``torch.compile(module)``'s wrapper and for a module after ``module.compile()``."""
    return (
        type(module).__name__ == "OptimizedModule" or getattr(module, "_compiled_call_impl", None) is not None
    )


def _kinds(params: list[Tensor]) -> set[tuple[torch.dtype, torch.device]]:
    return {(p.dtype, p.device) for p in params}


class LayerIndex:
    """Layers and activation sites of ``model`` in forward order, and the caches a logged step reads.

    Watches the first forward pass through pre/post hooks on every module (removed once the order is
    fixed, at the first logged step): depth is the order in which modules are first called.

    Args:
        model: the watched module.
        compiled: the model runs compiled (``torch.compile``) although none of its modules says so.

    Raises:
        ValueError: the model has no parameters.
        TypeError: a parameter is complex.
    """

    def __init__(self, model: nn.Module, compiled: bool = False) -> None:
        self.model = model
        self.layers = find_layers(model)
        self.sites = [
            ActSite(name, kind, m)
            for name, m in model.named_modules()
            if (kind := _taxonomy.activation_kind(m)) is not None
        ]
        self.depth_fixed = False
        # First-forward call order: when each module's first call begins and ends (event numbers).
        self._called_at: dict[int, int] = {}
        self._ended_at: dict[int, int] = {}
        self._events = 0
        self._grad_set_cache: dict[tuple[int, ...], tuple[Tensor, list[int]]] = {}
        self._params_cache: tuple[list[Tensor], Tensor] | None = None
        self._grad_groups: dict[tuple[int, ...], Groups] = {}
        self.param_groups: Groups | None = None  # (device, dtype) groups of all_params()
        self.owners_all: list[int] = []
        self.single_device = False
        self.all_float32 = False
        self._param_kinds: set[tuple[torch.dtype, torch.device]] = set()
        self._warned_no_grad = False
        # torch.compile: the model (or a module in it) is compiled, or a hook was traced by dynamo.
        # Hooks then record nothing (a hook's Python work would break the graph, and adding or
        # removing hooks would recompile it); depth is the module order.
        self.compiled = compiled or any(_is_compiled(m) for m in model.modules())
        self._order_handles: list[RemovableHandle] = []
        for _, module in [] if self.compiled else model.named_modules():
            self._order_handles.append(module.register_forward_pre_hook(self._order_hook))
            self._order_handles.append(module.register_forward_hook(self._order_end_hook))

    @property
    def infos(self) -> list[LayerInfo]:
        """Layers in depth order (forward order once the first forward pass has run)."""
        return [layer.info for layer in self.layers]

    def probe(self) -> Tensor | None:
        """The first trainable parameter (in layer order), or None: the one whose gradient object and
        version tell a second :meth:`Monitor.step` call for one optimizer step (see ``calls.py``)."""
        return next((p for layer in self.layers for p in layer.params if p.requires_grad), None)

    def remove_hooks(self) -> None:
        """Remove the order hooks (idempotent)."""
        for h in self._order_handles:
            h.remove()
        self._order_handles.clear()

    # ------------------------------------------------------------------ forward order
    def _order_hook(self, module: nn.Module, args: Any) -> None:
        if torch.compiler.is_compiling():  # traced by torch.compile: record nothing (compile_safe)
            self.compiled = True
            return
        self._called_at.setdefault(id(module), self._events)
        self._events += 1

    def _order_end_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if torch.compiler.is_compiling():
            return
        self._ended_at.setdefault(id(module), self._events)
        self._events += 1

    def replay(self, events: list[tuple[nn.Module, bool]]) -> None:
        """Feed a first forward seen before this index existed, as ``(module, call began)`` events in
        order (``gradsentry run`` attaches after the script's first forward)."""
        for module, at_start in events:
            if at_start:
                self._order_hook(module, ())
            else:
                self._order_end_hook(module, (), None)

    def call_order(self) -> list[nn.Module]:
        """Layers and activation sites in depth order, from the first forward's calls.

        A module is placed where its first call began. A layer that is never called as a module but
        whose parameters its owner uses directly (``nn.MultiheadAttention.out_proj``: the attention
        calls ``F.multi_head_attention_forward`` with ``out_proj.weight``) is placed where its nearest
        called ancestor's first call ended, i.e. after everything that ancestor called: the output
        projection sits after the attention, not after the model's output head. Layers with no called
        ancestor but the root land at the end of the forward (last), as do layers whose ancestors
        were never called at all.
        """
        called, ended = self._called_at, self._ended_at
        named = list(self.model.named_modules())
        by_name = dict(named)
        wanted = {id(layer.module) for layer in self.layers} | {id(site.module) for site in self.sites}
        keyed: list[tuple[tuple[int, int, int], nn.Module]] = []
        for index, (name, module) in enumerate(named):
            if id(module) not in wanted:
                continue
            if id(module) in called:
                keyed.append(((called[id(module)], 0, index), module))
                continue
            parts = name.split(".") if name else []
            while parts:
                parts.pop()
                owner = by_name.get(".".join(parts))
                if owner is not None and id(owner) in called:
                    if id(owner) in ended:  # just before the owner's call ended
                        keyed.append(((ended[id(owner)], -1, index), module))
                    break
        keyed.sort(key=lambda km: km[0])
        return [m for _, m in keyed]

    def fix_depth(self, ctx: _dist.DistContext | None, agree: bool) -> None:
        """Sort layers and activation sites by the first forward's calls (see :meth:`call_order`);
        layers never placed keep their module order, last. ``agree``: adopt rank 0's order (one
        all-reduce, once per run) so that reduced entries match on every rank."""
        if self.depth_fixed:
            return
        if not self._called_at and ctx is None and not self.compiled:  # no forward yet: keep watching
            return
        if not self.compiled:  # a compiled graph guards on its hooks: removing one would recompile it
            self.remove_hooks()
        seen = self.call_order()
        if ctx is not None and agree:
            seen = self._agree_order(seen, ctx)
        rank = {id(m): i for i, m in enumerate(seen)}
        big = len(seen)
        self.layers.sort(key=lambda L: (rank.get(id(L.module), big), L.info.depth))
        for depth, layer in enumerate(self.layers):
            layer.info.depth = depth
        self.sites.sort(key=lambda s: rank.get(id(s.module), big))
        for depth, site in enumerate(self.sites):
            site.depth = depth
        self._grad_set_cache = {}
        self._grad_groups = {}
        self._params_cache = None
        self.depth_fixed = True
        self._called_at, self._ended_at = {}, {}

    def prepare(self, ctx: _dist.DistContext | None, agree: bool, label: int) -> bool:
        """Before a logged step: fix the depth (see :meth:`fix_depth`), drop stale caches (True when
        dropped: see :meth:`revalidate`), and warn once when no parameter has a gradient."""
        self.fix_depth(ctx, agree)
        dropped = self.revalidate()
        trainable = any(p.requires_grad for p in self.all_params()[0])
        if not self._warned_no_grad and trainable and not self.grad_params()[1]:
            self._warned_no_grad = True
            log.warning(
                "gradsentry.Monitor.step(): no parameter has a gradient at step %d; call step() after "
                "loss.backward() and before optimizer.zero_grad() (the record shows has_grad=False)",
                label,
            )
        return dropped

    def _agree_order(self, seen: list[nn.Module], ctx: _dist.DistContext) -> list[nn.Module]:
        """Rank 0's first-call order of the modules, on every rank (one all-reduce, once per run).

        Ranks whose forward took different paths would otherwise order layers and activation sites
        differently, and the reduced entries would not match.
        """
        modules = [m for _, m in self.model.named_modules()]
        where = {id(m): i for i, m in enumerate(modules)}
        order = torch.zeros(len(modules), dtype=torch.float64, device=self.all_params()[0][0].device)
        if ctx.rank == 0:  # 1 + module index in call order; the others add zeros
            idx = [where[id(m)] + 1 for m in seen if id(m) in where]
            order[: len(idx)] = torch.tensor(idx, dtype=torch.float64)
        agreed = ctx.all_reduce_(order, "sum").tolist()
        return [modules[int(i) - 1] for i in agreed if i > 0]

    # ------------------------------------------------------------------ cached parameter facts
    def all_params(self) -> tuple[list[Tensor], Tensor]:
        """Every parameter in depth order and its layer index ``[P]`` (cached once the depth is fixed)."""
        if self._params_cache is None or not self.depth_fixed:
            params: list[Tensor] = []
            idx: list[int] = []
            for i, layer in enumerate(self.layers):
                for p in layer.params:
                    params.append(p)
                    idx.append(i)
            self._params_cache = (params, torch.tensor(idx, device=params[0].device))
            self.owners_all = idx
            self.single_device = all(p.device == params[0].device for p in params)
            self.all_float32 = all(p.dtype == torch.float32 for p in params)
            self._param_kinds = _kinds(params)
            self.param_groups = Groups.of(params)
        return self._params_cache

    def revalidate(self) -> bool:
        """Drop the cached parameter facts when a parameter changed dtype or device since they were
        taken (``model.to(torch.bfloat16)`` or ``.cuda()`` after the first logged step converts the
        parameters in place): a stale float32 fast path computes bf16 norms in bf16 (1e-3 errors),
        and cached index tensors would sit on the old device. One pass over the parameters' dtype
        and device per logged step. Returns True when the caches were dropped."""
        cache = self._params_cache
        if cache is not None and _kinds(cache[0]) != self._param_kinds:
            self._params_cache = None
            self._grad_set_cache = {}
            self._grad_groups = {}
            return True
        return False

    def grad_params(self) -> tuple[list[Tensor], list[Tensor], list[int], list[int]]:
        """Parameters with a gradient, their gradients, their layers, and their positions in
        :meth:`all_params`."""
        params, _ = self.all_params()
        # A frozen parameter's stale .grad (zero_grad(set_to_none=False) keeps zeros) is no gradient.
        grads_all = [p.grad if p.requires_grad else None for p in params]
        positions = [pos for pos, g in enumerate(grads_all) if g is not None]
        if len(positions) == len(params):
            return params, grads_all, self.owners_all, positions  # type: ignore[return-value]
        owners_all = self.owners_all
        return (
            [params[i] for i in positions],
            [grads_all[i] for i in positions],  # type: ignore[misc]
            [owners_all[i] for i in positions],
            positions,
        )

    def grad_set(self, positions: list[int]) -> tuple[Tensor, list[int]]:
        """For the parameters at ``positions`` in :meth:`all_params` (those with a gradient): their
        layer index ``[N]`` (int64, on the parameters' device) and the gradient entries per layer.
        Cached per gradient set (the parameter list is fixed once depth is)."""
        key = tuple(positions)
        cached = self._grad_set_cache.get(key)
        if cached is None:
            params, _ = self.all_params()
            owners = [self.owners_all[pos] for pos in positions]
            numel = [0] * len(self.layers)
            for pos, owner in zip(positions, owners, strict=True):
                numel[owner] += params[pos].numel()
            cached = (torch.tensor(owners, dtype=torch.long, device=params[0].device), numel)
            self._grad_set_cache = {key: cached}
        return cached

    def grad_groups(self, positions: list[int], grads: list[Tensor]) -> Groups:
        """The (device, dtype) groups of ``grads``, the gradients of the parameters at ``positions``
        (see :meth:`grad_set`), built at the first logged step with that gradient set and reused
        (dropped with the other caches when a parameter changes dtype or device)."""
        key = tuple(positions)
        cached = self._grad_groups.get(key)
        if cached is None:
            cached = Groups.of(grads)
            self._grad_groups = {key: cached}
        return cached
