"""Hooks armed around a logged step: forward hooks (activation statistics, the module where a NaN/inf
first appeared) and the weight snapshot for the update-to-weight ratio. What they measure stays on
the device in a :class:`Pending` until the logged step reads it."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from gradsentry import _dist, stats
from gradsentry.monitor.layers import ActSite, LayerIndex
from gradsentry.monitor.options import MeasureOptions

log = logging.getLogger("gradsentry")

_EARLY = 1e12  # larger than the number of module calls between two logged steps (see StepHooks._finite_post)


@dataclass
class Pending:
    """Device tensors gathered between two logged steps, read with the next transfer."""

    update_sq: Tensor | None = None
    before_sq: Tensor | None = None  # squared weight norms per layer before that optimizer step
    update_layers: frozenset[int] | None = None  # layers with a gradient at that optimizer step
    acts: dict[str, Tensor] = field(default_factory=dict)
    hists: dict[str, Tensor] = field(default_factory=dict)
    # locate_nonfinite: one score per module (named_modules order), max-folded in place on the device
    # at each call, so that forwards that never reach step() (eval with grad, RL rollouts, GAN passes)
    # keep the memory and the next step's work fixed (see StepHooks._finite_post).
    flag_scores: Tensor | None = None
    calls: int = 0
    inputs_ok: dict[int, list[Tensor | None]] = field(default_factory=dict)


class StepHooks:
    """The forward hooks and the update snapshot of one Monitor; ``time`` accumulates their cost
    (seconds) until the next logged step reads and resets it.

    Args:
        model: the watched module.
        index: its layer index (sites, parameters in depth order).
        dist: the distributed context, or None.
        optimizer: the optimizer whose step the update snapshot brackets, or None.
        options: the Monitor's measuring options (what the hooks gather).
    """

    def __init__(
        self,
        model: nn.Module,
        index: LayerIndex,
        dist: _dist.DistContext | None,
        optimizer: Any,
        options: MeasureOptions,
    ) -> None:
        self.model = model
        self.index = index
        self.dist = dist
        self.optimizer = optimizer
        self.activations = options.activations
        self.locate_nonfinite = options.locate_nonfinite
        self.weight_norms = options.weight_norms
        self.histogram_bins = options.histogram_bins
        self.histogram_range = options.histogram_range
        self.sigmoid_band = options.sigmoid_band
        self.tanh_band = options.tanh_band
        self.pending = Pending()
        self.time = 0.0
        self._act_handles: list[RemovableHandle] = []
        self._opt_handles: list[RemovableHandle] = []
        self._snapshot: list[Tensor] | None = None
        self._snapshot_buffer: list[Tensor] | None = None  # CPU only: reused across logged steps
        self._update_layers: frozenset[int] | None = None

    def take_pending(self) -> Pending:
        """What the hooks gathered since the last call; a fresh :class:`Pending` takes its place."""
        pending, self.pending = self.pending, Pending()
        return pending

    def drop_buffers(self) -> None:
        """Forget the CPU snapshot buffer (parameters changed dtype or device)."""
        self._snapshot_buffer = None

    def remove(self) -> None:
        """Remove every hook and drop the snapshot (idempotent)."""
        for h in [*self._act_handles, *self._opt_handles]:
            h.remove()
        self._act_handles.clear()
        self._opt_handles.clear()
        self._snapshot = self._snapshot_buffer = None

    def arm_forward(self, logged: bool) -> None:
        """Arm the forward hooks for the coming forward when it will be logged; disarm otherwise.

        On a compiled model (:attr:`LayerIndex.compiled`) they are turned off, with one warning: a
        hook's Python work breaks dynamo's graph, and arming or disarming one recompiles it (its
        guards count the hooks). Hooks it already traced stay registered, as no-ops, until close.
        """
        if self.index.compiled and (self.activations or self.locate_nonfinite):
            log.warning(
                "gradsentry.Monitor: the model is compiled (torch.compile); activation statistics and "
                "locate_nonfinite are off, since forward hooks would break or recompile its graph. "
                "Gradient, weight and update statistics are unaffected."
            )
            self.activations = self.locate_nonfinite = False
        if self.index.compiled:  # hooks already traced stay (as no-ops) until close: no recompile
            return
        want_acts = logged and (self.activations or self.locate_nonfinite)
        if want_acts and not self._act_handles:
            if self.activations:
                for site in self.index.sites:
                    self._act_handles.append(site.module.register_forward_hook(self._make_act_hook(site)))
            if self.locate_nonfinite:
                for i, (_, module) in enumerate(self.model.named_modules()):
                    self._act_handles.append(
                        module.register_forward_pre_hook(self._finite_pre, with_kwargs=True)
                    )
                    self._act_handles.append(module.register_forward_hook(self._make_finite_hook(i)))
        elif not want_acts and self._act_handles:
            for h in self._act_handles:
                h.remove()
            self._act_handles.clear()

    def _make_act_hook(self, site: ActSite) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if torch.compiler.is_compiling():  # compile-safe: nothing is traced into the graph
                self.index.compiled = True
                return
            if not torch.is_grad_enabled() or not args or not isinstance(args[0], Tensor):
                return
            t0 = time.perf_counter()
            x = args[0]
            y = output if isinstance(output, Tensor) else None
            self.pending.acts[site.name] = stats.activation_stats(
                site.kind,
                x,
                y,
                module,
                sigmoid_band=self.sigmoid_band,
                tanh_band=self.tanh_band,
            )
            if self.histogram_bins > 0:
                self.pending.hists[site.name] = stats.histogram(x, self.histogram_bins, self.histogram_range)
            self.time += time.perf_counter() - t0

        return hook

    def _finite_pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Note whether the module's floating-point inputs are free of NaN (on the device, no sync).

        Only NaN counts against an input: ``-inf`` is a normal attention-mask value, and an inf made
        upstream was already flagged where it was made."""
        if torch.compiler.is_compiling():
            self.index.compiled = True
            return
        if not torch.is_grad_enabled():
            return
        t0 = time.perf_counter()
        inputs = [
            t
            for t in itertools.chain(args, kwargs.values())
            if isinstance(t, Tensor) and t.is_floating_point() and t.numel()
        ]
        ok: Tensor | None = None  # None: no floating-point input, nothing received
        if len(inputs) == 1:
            ok = ~torch.isnan(inputs[0]).any()
        elif inputs:
            ok = ~torch.stack([torch.isnan(t).any() for t in inputs]).any()
        stack = self.pending.inputs_ok.setdefault(id(module), [])
        if len(stack) > 64:  # calls that raised before their end hook: never let them pile up
            del stack[0]
        stack.append(ok)
        self.time += time.perf_counter() - t0

    def _make_finite_hook(self, index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if torch.compiler.is_compiling():
                return
            if not torch.is_grad_enabled():
                return
            t0 = time.perf_counter()
            stack = self.pending.inputs_ok.get(id(module))
            inputs_ok = stack.pop() if stack else None
            out = output[0] if isinstance(output, (tuple, list)) and output else output
            if isinstance(out, Tensor) and out.is_floating_point():
                self._finite_post(index, out, inputs_ok)
            self.time += time.perf_counter() - t0

        return hook

    def _finite_post(self, index: int, out: Tensor, inputs_ok: Tensor | None) -> None:
        """Fold one module call into the module's score: ``_EARLY - k`` when call ``k`` (counted since
        the last logged step) gave a NaN/inf output, plus ``_EARLY`` when its inputs held no NaN (the
        module *made* it, rather than passed on what it received); the score keeps its maximum. The
        origin is then the module with the highest score: the earliest call that made a non-finite
        value, else the earliest call that output one. Calls end inner modules first, so a NaN made
        by tensor code inside a module (a fully masked attention row) is blamed on that module, not on
        the child it was handed to (whose input already held it).
        """
        pending = self.pending
        if pending.flag_scores is None:
            n = sum(1 for _ in self.model.modules())
            pending.flag_scores = torch.zeros(n, dtype=stats.reduce_dtype(out.device), device=out.device)
        scores = pending.flag_scores
        bad = ~torch.isfinite(out).all()
        made = bad if inputs_ok is None else bad & inputs_ok.to(bad.device)
        value = bad.to(scores.dtype) * (_EARLY - pending.calls) + made.to(scores.dtype) * _EARLY
        pending.calls += 1
        slot = scores.narrow(0, index, 1)
        torch.maximum(slot, value.to(scores.device).reshape(1), out=slot)

    def arm_update(self) -> None:
        """Snapshot the weights now and measure ``||Δw||`` when the coming optimizer step ends.

        The snapshot is taken in :meth:`step` rather than in an optimizer step pre-hook, because
        trainers such as Lightning run backward (and so :meth:`step`) inside
        ``optimizer.step(closure)``, after the pre-hooks have fired; the weights do not change
        between :meth:`step` and the update.
        """
        if self.optimizer is None or not self.weight_norms:
            return
        t0 = time.perf_counter()
        params, _ = self.index.all_params()
        with torch.no_grad():  # no per-parameter detach (one op each)
            self._snapshot = self._copy_weights([_dist.local(p) for p in params] if self.dist else params)
        # A layer without a gradient at this optimizer step (a branch not taken, an unused expert)
        # gets no update-to-weight ratio rather than a 0 that reads as a stalled layer.
        self._update_layers = (
            frozenset(
                o
                for o, p in zip(self.index.owners_all, params, strict=True)
                if p.grad is not None and p.requires_grad
            )
            if self.dist is None
            else None
        )
        if not self._opt_handles:
            self._opt_handles.append(self.optimizer.register_step_post_hook(self._opt_post))
        self.time += time.perf_counter() - t0

    def _copy_weights(self, weights: list[Tensor]) -> list[Tensor]:
        """A copy of ``weights`` for the update-to-weight ratio. On CPU the copy goes into a buffer
        kept between logged steps (allocating fresh pages costs ~4x the copy there: 77 ms against
        20 ms for 50M parameters); elsewhere a fresh clone, which the caching allocator serves
        cheaply and which frees the memory between logged steps."""
        if not all(w.device.type == "cpu" for w in weights):
            # x * 1 is x exactly (NaN, inf and -0.0 included): one fused launch per (device, dtype)
            # instead of one clone per tensor.
            return list(torch._foreach_mul(weights, 1.0))
        buf = self._snapshot_buffer
        if (
            buf is None
            or [b.shape for b in buf] != [w.shape for w in weights]
            or any(b.dtype != w.dtype for b, w in zip(buf, weights, strict=True))
        ):
            buf = self._snapshot_buffer = [
                torch.empty_like(w, memory_format=torch.preserve_format) for w in weights
            ]
        torch._foreach_copy_(buf, weights)
        return buf

    def disarm_update(self) -> None:
        for h in self._opt_handles:
            h.remove()
        self._opt_handles.clear()
        self._snapshot = None

    def _opt_post(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        t0 = time.perf_counter()
        snap = self._snapshot
        if snap is not None:
            params, index = self.index.all_params()
            groups = self.index.param_groups if self.dist is None else None  # snapshots: same kinds
            # ||w|| before the update: the ratio's denominator. After it, a blow-up caps the ratio near
            # 1 (||dw|| / ||w + dw|| -> 1 as dw grows), so an update 2,500x the weights would read 1.0.
            with torch.no_grad():
                if groups is not None:
                    before = stats.sq_norms(snap, all_float32=self.index.all_float32, groups=groups)
                    torch._foreach_sub_(snap, params)
                    sq = stats.sq_norms(snap, all_float32=self.index.all_float32, groups=groups)
                else:
                    before = _dist.sq_norms(self.dist, snap, like=params)
                    torch._foreach_sub_(snap, [_dist.local(p) for p in params])
                    sq = _dist.sq_norms(self.dist, snap, like=params)
            self.pending.update_sq = stats.layer_sum(sq, index.to(sq.device), len(self.index.layers))
            self.pending.before_sq = stats.layer_sum(before, index.to(before.device), len(self.index.layers))
            self.pending.update_layers = self._update_layers
        # The hook stays registered until the next step() disarms it (or close() removes it): removing
        # a handle from inside the optimizer's post-hook loop breaks that loop ("OrderedDict mutated
        # during iteration") whenever another post-hook follows, e.g. a second Monitor's.
        self._snapshot = None
        self.time += time.perf_counter() - t0
