"""One logged step's statistics: declared by name in a :class:`~gradsentry._transfer.Packet` on the
device (:meth:`Measurer.launch`), moved to the host in one copy, and made into a
:class:`~gradsentry.records.StepRecord` once the copy is there (:meth:`Measurer.complete`).

Adding a statistic is one ``packet.add(name, tensor, reduction)`` in :meth:`Measurer.launch` and one
``values[name]`` in :meth:`Measurer.complete`.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gradsentry import _dist, stats
from gradsentry import histograms as layer_hist
from gradsentry._transfer import EventFactory, Packet, Reduction, Transfer
from gradsentry.monitor import rare
from gradsentry.monitor.hooks import Pending
from gradsentry.monitor.layers import LayerIndex
from gradsentry.monitor.options import MeasureOptions
from gradsentry.records import ActivationStats, LayerStats, StepRecord

log = logging.getLogger("gradsentry")

#: A layer whose mean squared gradient is below this (RMS < 1e-15) may hold entries under ~1e-19,
#: whose float32 squares lose precision or flush to zero: its norm is recomputed in float64.
TINY_MEAN_SQUARE = 1e-30

RemedyCall = Callable[[list[Tensor], Tensor | None], Any]
"""Runs the Monitor's remedy on (parameters with a gradient, their per-tensor L2 norms ``[N]``)."""


@dataclass
class InFlight:
    """A logged step whose statistics are on their way to the host."""

    label: int
    lr: float | None
    loss: float | None  # the loss when it was given as a Python number (not in the packet)
    transfer: Transfer
    pending: Pending
    numel: list[int] | None  # gradient entries per layer (None: in the packet, sharded)
    params: list[Tensor]
    grads: list[Tensor] | list[tuple[weakref.ref[Tensor], int]]  # strong, or (weak ref, version)
    flag_names: list[str]
    act_names: list[str]
    hist_names: list[str]
    host_skips: tuple[int, list[int]]
    remedy_name: str
    remedy_result: Any = None
    remedy_finalize: Callable[[list[float]], list[dict[str, Any]]] | None = None
    overhead: float | None = None


class Measurer:
    """Builds the packet of a logged step and the record from its values.

    Args:
        model: the watched module (its module names label the non-finite origin).
        index: the layer index.
        dist: the distributed context, or None.
        options: what to measure.
        histograms: per-layer |g| and |w| histograms (:mod:`gradsentry.histograms`), or None.
    """

    def __init__(
        self,
        model: nn.Module,
        index: LayerIndex,
        dist: _dist.DistContext | None,
        options: MeasureOptions,
        histograms: layer_hist.HistogramSpec | None = None,
    ) -> None:
        self.model = model
        self._layer_hist = layer_hist.LayerCounter(histograms) if histograms is not None else None
        self.index = index
        self.dist = dist
        self.options = options
        self._edges: list[float] | None = None
        self.last_norms: tuple[list[Tensor], Tensor] | None = None

    @property
    def sync(self) -> bool:
        """Whether rank-local statistics are reduced over ranks."""
        ctx = self.dist
        return ctx is not None and (ctx.sharded or self.options.sync_local)

    # ------------------------------------------------------------------ device side
    def launch(
        self,
        label: int,
        loss: Tensor | float | None,
        lr: float | None,
        pending: Pending,
        *,
        remedy: RemedyCall | None,
        remedy_name: str,
        skips: tuple[int, list[int], Tensor | None],
        proposed_every: int,
        deferred: bool,
        event: EventFactory | None = None,
    ) -> InFlight:
        """Measure the step on the device, run the remedy, and start the one copy to the host.

        Raises:
            ValueError: ``loss`` is a tensor with more than one element.
            gradsentry.DistributedError: a collective failed or timed out.
        """
        opts, ctx, idx = self.options, self.dist, self.index
        L = len(idx.layers)
        params_with_grad, g, owners, positions = idx.grad_params()
        all_params, all_index = idx.all_params()
        device = all_params[0].device
        packet = Packet(device, stats.reduce_dtype(device))
        dt = packet.dtype
        sharded = ctx is not None and ctx.sharded
        sync = self.sync
        if g:
            index = idx.grad_set(positions)[0]
        if sharded:
            # Per-tensor squared norms of the local shards over *all* parameters (0 without a
            # gradient), so that entries match on ranks that differ in which parameters have one.
            at = torch.tensor(positions, dtype=torch.long, device=device)
            g_sq = torch.zeros(len(all_params), dtype=dt, device=device)
            if g:
                g_sq.index_copy_(0, at, _dist.sq_norms(ctx, g).to(device))
            packet.add("g_sq", g_sq, "sum")
            if opts.max_abs:
                g_max = torch.zeros(L, dtype=dt, device=device)
                if g:
                    maxabs = stats.foreach_max_abs([_dist.local(t) for t in g])
                    g_max = stats.layer_max(maxabs, index.to(maxabs.device), L)
                packet.add("g_max", g_max, "max")
                packet.add("g_max_nan", torch.isnan(g_max), "max")  # a MAX may drop NaN: flag it
            keep = ctx.counted(params_with_grad)  # type: ignore[union-attr]
            sizes = [_dist.local(p).numel() * k for p, k in zip(params_with_grad, keep, strict=True)]
            numel_t = stats.layer_sum(torch.tensor(sizes, dtype=dt), torch.tensor(owners), L)
            packet.add("numel", numel_t, "sum")  # gradient entries per layer, over the ranks' shards
        elif g:
            groups = idx.grad_groups(positions, g)  # cached per gradient set: no per-tensor grouping
            g_sq = stats.sq_norms(g, all_float32=idx.all_float32, groups=groups)
            packet.add("g_sq", g_sq)
            if opts.max_abs:
                maxabs = stats.foreach_max_abs(g, groups=groups)
                packet.add("g_max", stats.layer_max(maxabs, index.to(maxabs.device), L))
        else:
            packet.add("g_sq", torch.zeros(L, dtype=dt, device=device))
            if opts.max_abs:
                packet.add("g_max", torch.zeros(L, dtype=dt, device=device))
        shard_op: Reduction = "sum" if sharded else None  # replicated: already global
        if opts.weight_norms:
            if sharded:
                w_sq = _dist.sq_norms(ctx, [p.detach() for p in all_params], like=all_params)
            else:  # no_grad inside: the parameters need no detach (one op each)
                w_sq = stats.sq_norms(all_params, all_float32=idx.all_float32, groups=idx.param_groups)
            packet.add("w_sq", stats.layer_sum(w_sq, all_index.to(w_sq.device), L), shard_op)
        if pending.update_sq is not None and pending.before_sq is not None:
            packet.add("update_sq", pending.update_sq, shard_op)
            packet.add("before_sq", pending.before_sq, shard_op)
        if isinstance(loss, Tensor) and loss.numel() != 1:
            raise ValueError(
                f"Monitor.step(loss=...) expects a scalar loss, got a tensor of shape {list(loss.shape)}; "
                "pass loss.mean() (or the value you call backward() on)"
            )
        if isinstance(loss, Tensor) or (sync and loss is not None):
            packet.add("loss", torch.as_tensor(loss).reshape(-1)[:1], "mean" if sync else None)
        act_names, hist_names, flag_names = self._add_local(packet, pending, sync)
        if self._layer_hist is not None:  # per-layer |g|, |w| counts (histograms.py), in the same copy
            counts = self._layer_hist.part(g, owners, all_params, idx.owners_all, L, device, dt)
            packet.add("layer_hist", counts, shard_op)
        # Replicated gradients (DDP) are identical on every rank after DDP's all-reduce, so their norms
        # need no collective; but a NaN/inf written into one rank's copy afterwards (a rank-local bug,
        # a hook) stays on that rank. When syncing, one indicator per layer rides on the SUM, so that
        # rank 0 (the writer) records the NaN too.
        if sync and not sharded:
            bad_here = (
                ~torch.isfinite(stats.layer_sum(g_sq, index, L)) if g else torch.zeros(L, dtype=torch.bool)
            )
            packet.add("ranks_bad", bad_here, "sum")
        if opts.agree_every:  # every rank must log the same steps: take the largest proposed `every`
            packet.add("every", torch.tensor([float(proposed_every)]), "max")

        packet.reduce(ctx)
        self.last_norms = None
        if sharded:  # whole-tensor norms of this rank's parameters with a gradient
            if g:
                self.last_norms = (params_with_grad, packet["g_sq"][at].sqrt().float())
            packet.add("g_sq", stats.layer_sum(packet["g_sq"], all_index, L))
        elif g:
            self.last_norms = (params_with_grad, g_sq.sqrt().float())
            packet.add("g_sq", stats.layer_sum(packet["g_sq"], index, L))
        if "g_max_nan" in packet:
            packet.add("g_max", torch.where(packet.pop("g_max_nan") > 0, torch.nan, packet["g_max"]))
        count, steps, device_skips = skips
        if device_skips is not None:
            packet.add("skips", device_skips)
        # The remedy runs now: after every gradient statistic above was computed from the raw
        # gradients, before the transfer, so that its figures travel in the same copy.
        remedy_result: Any = None
        finalize = None
        if remedy is not None:
            norms = self.last_norms
            remedy_result = remedy(norms[0] if norms else [], norms[1] if norms else None)
            pack = getattr(remedy_result, "pack_dicts", None)
            if callable(pack):
                tensors, finalize = pack()
                if tensors:
                    packet.add("remedy", torch.cat([t.reshape(-1).to(device) for t in tensors]))
        return InFlight(
            label=label,
            lr=lr,
            loss=None if "loss" in packet or loss is None else float(loss),
            transfer=packet.to_host(deferred=deferred, event=event),
            pending=pending,
            numel=None if sharded else idx.grad_set(positions)[1],
            params=params_with_grad,
            grads=g if not deferred else [(weakref.ref(t), t._version) for t in g],
            flag_names=flag_names,
            act_names=act_names,
            hist_names=hist_names,
            host_skips=(count, steps),
            remedy_name=remedy_name,
            remedy_result=remedy_result,
            remedy_finalize=finalize,
        )

    def _add_local(
        self, packet: Packet, pending: Pending, sync: bool
    ) -> tuple[list[str], list[str], list[str]]:
        """Add the rank-local statistics (activations, histograms, forward non-finite flags); returns
        the site names of the activations and histograms and the module names of the flags.

        Under ``sync`` (reduced over ranks) the layout is fixed — every watched site and every module,
        whether or not it ran on this rank — so that ranks whose forward took different paths still
        reduce matching entries: each site carries the count of ranks where it ran, and its statistics
        are averaged over those ranks. The modules' non-finite scores (see
        :meth:`~gradsentry.monitor.hooks.StepHooks._finite_post`) are max-reduced, so that the earliest
        module of any rank that made a NaN/inf wins.
        """
        opts, sites = self.options, self.index.sites
        if not sync:  # one stacked entry per statistic kind, not one per site
            acts = [s.name for s in sites if s.name in pending.acts]
            hists = [n for n in acts if n in pending.hists]
            if acts:
                dev = packet.device  # sites of a model split over devices: gathered on one
                packet.add("acts", torch.stack([pending.acts[n].to(dev) for n in acts]))
            if hists:
                packet.add("hists", torch.stack([pending.hists[n].to(packet.device) for n in hists]))
            if pending.flag_scores is None:
                return acts, hists, []
            packet.add("flags", pending.flag_scores)
            return acts, hists, [n for n, _ in self.model.named_modules()]
        acts = [s.name for s in sites] if opts.activations else []
        one = torch.ones(1, dtype=packet.dtype, device=packet.device)
        if acts:  # [sites, 5]: ranks where the site ran (1 or 0 here), then its 4 statistics
            zero = one.new_zeros(4)
            ran = torch.tensor([float(n in pending.acts) for n in acts], dtype=packet.dtype)
            rows = torch.stack([pending.acts[n].to(one) if n in pending.acts else zero for n in acts])
            packet.add("acts", torch.cat([ran.to(packet.device).unsqueeze(1), rows], dim=1), "sum")
        hists = acts if opts.histogram_bins > 0 else []
        if hists:
            none = one.new_zeros(opts.histogram_bins)
            packet.add("hists", torch.stack([pending.hists.get(n, none).to(one) for n in hists]), "sum")
        if not opts.locate_nonfinite:
            return acts, hists, []
        names = [n for n, _ in self.model.named_modules()]
        scores = pending.flag_scores
        packet.add("flags", scores if scores is not None else one.new_zeros(len(names)), "max")
        return acts, hists, names

    # ------------------------------------------------------------------ host side
    def complete(self, flight: InFlight) -> tuple[StepRecord, int | None]:
        """The record of a logged step from its packet's values (waits for the copy if needed), and
        the ``every`` the ranks agreed on (None unless ``agree_every``).

        Rare layers need one more read of their gradients: a non-finite norm (count the NaN/inf
        entries) or a float32 square that may have underflowed (recompute in float64). Under a
        deferred copy that read happens only while the step's gradients are still alive and
        unchanged; otherwise the count is recorded as 1 (at least one) and the float32 value is kept.
        """
        opts, ctx = self.options, self.dist
        L = len(self.index.layers)
        values = flight.transfer.values()
        g_sq_l = list(values["g_sq"])
        g_max_l: list[float | None] = list(values["g_max"]) if opts.max_abs else [None] * L
        numel = [round(n) for n in values["numel"]] if flight.numel is None else flight.numel
        w_sq_l: list[float | None] = list(values["w_sq"]) if opts.weight_norms else [None] * L
        loss_value = values["loss"][0] if "loss" in values else flight.loss
        sync = self.sync
        act_values: dict[str, list[float]] = {}
        width = 5 if sync else 4
        flat_acts = values.get("acts", [])
        for k, name in enumerate(flight.act_names):
            v = flat_acts[k * width : (k + 1) * width]
            if not sync:
                act_values[name] = v
            elif v[0] > 0:  # [ranks where the site ran, then sums of its 4 statistics]
                act_values[name] = [x / v[0] for x in v[1:]]
        bins = self.options.histogram_bins
        flat_hists = values.get("hists", [])
        hist_values = {
            n: flat_hists[k * bins : (k + 1) * bins]
            for k, n in enumerate(flight.hist_names)
            if n in act_values
        }
        flag_scores = values.get("flags", [])
        elsewhere: list[int] = []  # layers non-finite on another rank only
        replicas_differ = False  # decided from reduced figures: the same on every rank
        if "ranks_bad" in values:
            assert ctx is not None
            ranks_bad = values["ranks_bad"]
            replicas_differ = any(0 < n < ctx.world_size for n in ranks_bad)
            elsewhere = [
                i
                for i, (n, sq) in enumerate(zip(ranks_bad, g_sq_l, strict=True))
                if n > 0 and math.isfinite(sq)
            ]
            for i in elsewhere:
                g_sq_l[i] = math.nan
                if opts.max_abs:
                    g_max_l[i] = math.nan
        agreed = int(values["every"][0]) if "every" in values else None

        total_sq = math.fsum(g_sq_l)
        all_finite = math.isfinite(total_sq) and (not opts.max_abs or math.isfinite(math.fsum(g_max_l)))  # type: ignore[arg-type]
        bad_layers = (
            []
            if all_finite
            else [
                i
                for i, (sq, mx) in enumerate(zip(g_sq_l, g_max_l, strict=True))
                if numel[i] and not (math.isfinite(sq) and (mx is None or math.isfinite(mx)))
            ]
        )
        nonfinite_counts = (
            rare.count_nonfinite(self.index, ctx, flight, bad_layers, replicas_differ) if bad_layers else {}
        )
        # float32 squares underflow for entries below ~1e-19 (deep vanishing gradients) and overflow
        # for norms above ~1.8e19 with every entry finite: recompute those layers in float64.
        at_risk = [
            i
            for i, (sq, mx) in enumerate(zip(g_sq_l, g_max_l, strict=True))
            if numel[i]
            and i not in elsewhere
            and (
                (not math.isfinite(sq) and i in nonfinite_counts and nonfinite_counts[i] == 0)
                or (sq < numel[i] * TINY_MEAN_SQUARE and (mx is None or mx > 0))
            )
        ]
        if at_risk:
            exact = rare.exact_sq(self.index, ctx, flight, at_risk)
            for i, value in zip(at_risk, exact, strict=True):
                if value is not None:
                    g_sq_l[i] = value
            total_sq = math.fsum(g_sq_l)
        sqrt = math.sqrt
        gnorms = [sqrt(x) for x in g_sq_l]
        wnorms = [None if x is None else sqrt(x) for x in w_sq_l]
        ratios: list[float | None] = [None] * L
        if "update_sq" in values:
            updated = flight.pending.update_layers
            ratios = [
                None
                if not n or (updated is not None and i not in updated)
                else (sqrt(u) / sqrt(wb) if wb > 0 else (math.inf if u > 0 else 0.0))
                for i, (u, wb, n) in enumerate(
                    zip(values["update_sq"], values["before_sq"], numel, strict=True)
                )
            ]
        maxes = [(m if n else 0.0) for m, n in zip(g_max_l, numel, strict=True)] if opts.max_abs else g_max_l
        layer_stats = [
            LayerStats(
                layer.info.name,
                i,
                n,
                gn,
                gn / sqrt(n) if n else 0.0,
                mx,
                nonfinite_counts.get(i, 0) if bad_layers else 0,
                wn,
                r,
                n > 0,
            )
            for i, (layer, n, gn, mx, wn, r) in enumerate(
                zip(self.index.layers, numel, gnorms, maxes, wnorms, ratios, strict=True)
            )
        ]
        global_norm = math.sqrt(total_sq) if not math.isnan(total_sq) else math.nan
        origin = None
        if flight.flag_names and not math.isfinite(global_norm):
            best = max(range(len(flag_scores)), key=flag_scores.__getitem__)
            origin = flight.flag_names[best] if flag_scores[best] > 0 else None
            if origin is None:  # forward was finite: the deepest layer whose gradient is not
                origin = next((s.name for s in reversed(layer_stats) if not math.isfinite(s.grad_norm)), None)
        record = StepRecord(
            step=flight.label,
            global_norm=global_norm,
            layers=layer_stats,
            loss=loss_value,
            lr=flight.lr,
            activations=self._activations(act_values, hist_values),
            nonfinite_origin=origin,
        )
        if self._layer_hist is not None and "layer_hist" in values:
            record.histograms = self._layer_hist.unpack(list(values["layer_hist"]), layer_stats)
        self._add_actions(record, flight, values)
        flight.params, flight.grads = [], []  # keep no gradient alive past the record
        return record, agreed

    def _activations(
        self, act_values: dict[str, list[float]], hist_values: dict[str, list[float]]
    ) -> list[ActivationStats]:
        acts = []
        for site in self.index.sites:
            if site.name not in act_values:
                continue
            mean, std, sat, dead = act_values[site.name]
            hist = None
            if site.name in hist_values:
                if self._edges is None:  # one list shared by every record (never mutated)
                    r, bins = self.options.histogram_range, self.options.histogram_bins
                    self._edges = torch.linspace(-r, r, bins + 1).tolist()
                hist = {"edges": self._edges, "counts": hist_values[site.name]}
            acts.append(
                ActivationStats(
                    name=site.name,
                    type=site.kind,
                    depth=site.depth,
                    pre_mean=mean,
                    pre_std=std,
                    saturated_frac=None if math.isnan(sat) else sat,
                    dead_frac=None if math.isnan(dead) else dead,
                    histogram=hist,
                )
            )
        return acts

    @staticmethod
    def _add_actions(record: StepRecord, flight: InFlight, values: dict[str, list[float]]) -> None:
        """The skipped unlogged steps, then what the remedy did at this step."""
        count, steps = flight.host_skips
        count += round(values["skips"][0]) if "skips" in values else 0
        if count:
            record.actions.append(
                {
                    "remedy": flight.remedy_name,
                    "skipped_unlogged": count,  # steps between the previous logged step and this one
                    "skipped_unlogged_steps": steps,  # their labels, when known on the host
                }
            )
        if flight.remedy_finalize is not None:
            record.actions.extend(flight.remedy_finalize(values.get("remedy", [])))
        elif flight.remedy_result is not None:  # a user remedy without pack_dicts: its own copy to the host
            to_dicts = getattr(flight.remedy_result, "to_dicts", None)
            to_dict = getattr(flight.remedy_result, "to_dict", None)
            if callable(to_dicts):
                record.actions.extend(to_dicts())
            elif callable(to_dict):
                record.actions.append(to_dict())
