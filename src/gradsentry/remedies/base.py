"""The remedy protocol, its result record and the shared gradient-norm helpers.

A remedy is a callable object run after ``loss.backward()`` (and after ``GradScaler.unscale_``) and
before ``optimizer.step()``. It acts in place on ``p.grad`` and returns a :class:`RemedyResult` that
holds what it did as *device tensors*, so that calling a remedy never forces a device→host copy;
:meth:`RemedyResult.to_dict` (or reading :attr:`RemedyResult.skip`) is where the copy happens, once.

Alignment convention (shared with the Monitor): ``norms``, when given, is a 1-D float tensor of
per-tensor gradient L2 norms aligned with ``[p for p in params if p.grad is not None]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from gradsentry import _dist, stats

__all__ = [
    "Remedy",
    "RemedyResult",
    "grads_of",
    "param_names",
    "per_tensor_norms",
    "scale_grads_",
]

Scalar = Tensor | float | bool | None


@runtime_checkable
class Remedy(Protocol):
    """What every remedy looks like: ``remedy(params, *, norms=None, loss=None) -> RemedyResult``.

    ``params`` is an iterable of parameters (their ``.grad`` is changed in place); ``norms`` is an
    optional 1-D tensor of per-tensor L2 gradient norms aligned with the parameters that have a
    gradient (a Monitor computes them anyway, so a clipper reuses them instead of a second pass);
    ``loss`` is the step's loss (a tensor or float) for remedies that watch it (Rollback, Ladder);
    the others ignore it.
    """

    def __call__(
        self, params: Iterable[Tensor], *, norms: Tensor | None = None, loss: Tensor | float | None = None
    ) -> RemedyResult: ...


def _is_true(x: Scalar) -> bool | None:
    """Host value of a flag when it is known without a device copy, else None."""
    if x is None or isinstance(x, bool):
        return bool(x)
    if isinstance(x, float | int):
        return bool(x)
    return None


@dataclass
class RemedyResult:
    """What one remedy did at one step; tensor fields stay on the device until :meth:`to_dict`.

    Attributes:
        name: the remedy's class name, e.g. ``"ClipGlobalNorm"``.
        norm_before: global gradient norm before the remedy (0-d tensor or float; same units as the
            gradient), or None when the remedy did not need it.
        norm_after: global gradient norm after the remedy, or None. Left None by scaling clippers:
            :meth:`to_dict` derives it as ``norm_before × scale`` (not re-measured).
        clipped: whether any gradient was scaled down or clamped (bool or 0-d bool tensor); None means
            "derive it from ``scale < 1``" in :meth:`to_dict`.
        skipped: True when the caller must not call ``optimizer.step()`` on this step (bool or 0-d
            bool tensor; see :attr:`skip`).
        threshold: the clipping threshold used at this step (adaptive clippers), or None.
        affected: optional 1-D bool tensor marking the affected entries of ``names``.
        names: one name per entry of ``affected`` (layer or parameter names); duplicates are merged
            in :meth:`to_dict`.
        extra: further fields for the record (floats, ints, strings or 0-d tensors).
        children: the results of the inner remedies of a :class:`~gradsentry.remedies.Chain` or
            :class:`~gradsentry.remedies.Ladder`.
        norms_after: per-tensor gradient norms after the remedy (aligned as the input ``norms``) when
            known for free, so that the next remedy of a chain can reuse them; not part of the record.
        composite: True for Chain/Ladder results, whose records are their children's.
        scale: the factor every gradient was multiplied by (0-d tensor), for uniform scaling clippers.
            Derived figures (``norm_after``, ``clipped``, the next remedy's norms) are computed from it
            only when asked for, so the clipper itself launches no extra kernels.
    """

    name: str
    norm_before: Scalar = None
    norm_after: Scalar = None
    clipped: Scalar = False
    skipped: Scalar = False
    threshold: Scalar = None
    affected: Tensor | None = None
    names: Sequence[str] = ()
    extra: dict[str, Any] = field(default_factory=dict)
    children: list[RemedyResult] = field(default_factory=list)
    norms_after: Tensor | None = field(default=None, repr=False)
    composite: bool = field(default=False, repr=False)
    scale: Tensor | None = field(default=None, repr=False)

    @property
    def skip(self) -> bool:
        """True when the caller must not call ``optimizer.step()`` (copies one flag to the host)."""
        own = _is_true(self.skipped)
        if own is None:
            own = bool(torch.as_tensor(self.skipped).item())
        return own or any(c.skip for c in self.children)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data record of this result (one device→host copy for all its tensors).

        Returns:
            ``{"remedy": name, "norm_before": float|None, "norm_after": ..., "clipped": bool,
            "skipped": bool, "threshold": ..., "layers": [...], **extra}`` plus ``"children"`` (a list
            of such dicts) for composite remedies. Non-finite norms are kept as floats.
        """
        tensors, finalize = self._pack()
        out = finalize(torch.cat(tensors).tolist() if tensors else [])
        if self.children:
            out["children"] = [c.to_dict() for c in self.children]
        return out

    def pack_dicts(self) -> tuple[list[Tensor], Callable[[list[float]], list[dict[str, Any]]]]:
        """The tensors behind :meth:`to_dicts` and a function building the records from their values.

        Lets a caller (the Monitor) fold a remedy's figures into its own single device→host copy:
        ``finalize(torch.cat([t.reshape(-1) for t in tensors]).tolist())`` equals :meth:`to_dicts`.

        Returns:
            ``(tensors, finalize)``: 1-D float64 tensors (all on one device), and a function taking
            their concatenated values as Python floats.
        """
        packs = [leaf._pack() for leaf in self._leaves()]
        sizes = [sum(t.numel() for t in ts) for ts, _ in packs]
        tensors = [t for ts, _ in packs for t in ts]
        if tensors:
            tensors = [t.to(tensors[0].device) for t in tensors]

        def finalize(values: list[float]) -> list[dict[str, Any]]:
            out, pos = [], 0
            for (_, fin), n in zip(packs, sizes, strict=True):
                out.append(fin(values[pos : pos + n]))
                pos += n
            return out

        return tensors, finalize

    def _leaves(self) -> list[RemedyResult]:
        if self.children or self.composite:
            return [leaf for c in self.children for leaf in c._leaves()]
        return [self]

    def _pack(self) -> tuple[list[Tensor], Callable[[list[float]], dict[str, Any]]]:
        """This result's tensors as one flat float64 tensor (none if it has no tensor fields) and a
        function building its record from their values.

        With ``scale`` set, ``norm_after`` and ``clipped`` (when left None) are derived on the host
        from the copied ``norm_before`` and ``scale``, so packing launches one concatenation only.
        """
        values: list[Tensor] = []
        slots: list[tuple[str, int, int, bool]] = []
        offset = 0

        def put(key: str, value: Tensor) -> None:
            nonlocal offset
            flat = value.detach().reshape(-1)
            slots.append((key, offset, flat.numel(), value.dtype == torch.bool))
            offset += flat.numel()
            values.append(flat)

        derive_after = self.scale is not None and self.norm_after is None
        derive_clipped = self.scale is not None and self.clipped is None
        scalars = {
            "norm_before": self.norm_before,
            "norm_after": None if derive_after else self.norm_after,
            "clipped": False if derive_clipped else self.clipped,
            "skipped": self.skipped,
            "threshold": self.threshold,
        }
        base: dict[str, Any] = {"remedy": self.name}
        for key, value in scalars.items():
            if isinstance(value, Tensor):
                put(key, value)
            else:
                base[key] = value
        if derive_after or derive_clipped:
            put("scale", self.scale)  # type: ignore[arg-type]
        for key, value in self.extra.items():
            if isinstance(value, Tensor):
                put("extra:" + key, value)
            else:
                base[key] = value
        if self.affected is not None:
            put("affected", self.affected)
        names = list(self.names)

        def finalize(host: list[float]) -> dict[str, Any]:
            out = dict(base)
            for key, start, n, is_bool in slots:
                vals: list[Any] = host[start : start + n]
                if is_bool:
                    vals = [bool(v) for v in vals]
                if key == "affected":
                    seen: dict[str, None] = {}
                    for flag, name in zip(vals, names, strict=False):
                        if flag:
                            seen.setdefault(name, None)
                    out["layers"] = list(seen)
                elif key == "scale":
                    if derive_after and out.get("norm_before") is not None:
                        out["norm_after"] = out["norm_before"] * vals[0]
                    if derive_clipped:
                        out["clipped"] = vals[0] < 1.0
                elif key.startswith("extra:"):
                    out[key[6:]] = vals[0] if n == 1 else vals
                else:
                    out[key] = vals[0]
            for key in ("clipped", "skipped"):
                out[key] = bool(out[key])
            out.setdefault("layers", [])
            return out

        if not values:
            return [], finalize
        device = values[0].device
        if any(v.device != device for v in values):
            values = [v.to(device) for v in values]
        return [torch.cat(values).to(torch.float64)], finalize

    def next_norms(self, norms: Tensor | None) -> Tensor | None:
        """Per-tensor L2 norms after this remedy, given those before it (None when unknown)."""
        if self.norms_after is not None:
            return self.norms_after
        if self.scale is not None and norms is not None:
            return norms * self.scale.to(norms.device)
        return None

    def to_dicts(self) -> list[dict[str, Any]]:
        """Flat list of action records: the children's records for a composite, else ``[to_dict()]``.

        This is what a Monitor appends to ``StepRecord.actions``.
        """
        tensors, finalize = self.pack_dicts()
        return finalize(torch.cat(tensors).tolist() if tensors else [])


def grads_of(params: Iterable[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Split ``params`` into the parameters that have a gradient and their gradients (same order).

    Args:
        params: parameters (a generator is consumed once), or a single tensor.

    Returns:
        ``(params_with_grad, grads)``, two lists of equal length.

    Raises:
        TypeError: if an element is not a tensor (e.g. a module was passed instead of its parameters),
            or a gradient is sparse.
    """
    if isinstance(params, Tensor):  # as torch.nn.utils.clip_grad_norm_: one tensor is a list of one
        params = [params]
    if isinstance(params, (list, tuple)):  # fast path; anything without .grad gets the check below
        try:
            pairs = [(p, p.grad) for p in params]
        except AttributeError:
            pass
        else:
            if all(isinstance(p, Tensor) and g.layout == torch.strided for p, g in pairs if g is not None):
                return [p for p, g in pairs if g is not None], [g for _, g in pairs if g is not None]
    with_grad: list[Tensor] = []
    grads: list[Tensor] = []
    for p in params:
        if not isinstance(p, Tensor):
            raise TypeError(
                f"expected parameters (tensors), got {type(p).__name__}; "
                "pass model.parameters(), not the model"
            )
        if p.grad is not None:
            if p.grad.layout != torch.strided:
                raise TypeError(
                    f"gradsentry remedies need dense gradients; got a {p.grad.layout} gradient of shape "
                    f"{list(p.shape)} (e.g. nn.Embedding(sparse=True)), which torch.nn.utils.clip_grad_norm_ "
                    "does not support either: use dense gradients or leave that parameter out"
                )
            with_grad.append(p)
            grads.append(p.grad)
    return with_grad, grads


def group_by_device_dtype(tensors: Sequence[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype), in first-seen order."""
    first = tensors[0]
    device, dtype = first.device, first.dtype
    for t in tensors:
        if t.dtype != dtype or t.device != device:
            break
    else:
        return {(device, dtype): list(range(len(tensors)))}
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return groups


def per_tensor_norms(grads: Sequence[Tensor], norm_type: float = 2.0) -> Tensor:
    """Per-tensor p-norms of ``grads`` as one 1-D tensor, without a host sync.

    A thin wrapper over :func:`gradsentry.stats.foreach_norms` (the package's one per-tensor norm):
    one ``torch._foreach_norm`` per (device, dtype) group, like ``torch.nn.utils.get_total_norm``.
    fp16/bf16 gradients are reduced in float32 (so a norm above 65504 does not overflow in fp16);
    float32 and float64 gradients are reduced in their own dtype, which makes the result bit-identical
    to what ``torch.nn.utils.clip_grad_norm_`` computes for them.

    Args:
        grads: N gradient tensors (any shapes; may live on several devices).
        norm_type: the p of the p-norm; ``math.inf`` for the max-abs norm.

    Returns:
        Tensor of shape [N] on the first gradient's device (float32, or float64 if any gradient is
        float64), same units as the gradient. Empty float32 tensor when N == 0. For DTensor
        gradients (FSDP2 shards) the norms are those of the whole tensors, reduced over ranks with one
        ``all_reduce`` (float32).
    """
    if not grads:
        return torch.zeros(0)
    if any(_dist.is_dtensor(g) for g in grads):  # FSDP2 shards: norms of the whole tensors, float32
        return _dist.global_per_tensor_norms(grads, norm_type)
    return stats.foreach_norms(grads, norm_type, promote=True)


def total_norm(norms: Tensor, norm_type: float = 2.0) -> Tensor:
    """Global norm from per-tensor norms (a 0-d tensor; 0 for an empty list)."""
    if norms.numel() == 0:
        return torch.zeros((), dtype=norms.dtype, device=norms.device)
    return torch.linalg.vector_norm(norms, norm_type)


@torch.no_grad()
def scale_grads_(grads: Sequence[Tensor], scale: Tensor | Sequence[Tensor]) -> None:
    """Multiply every gradient in place by ``scale`` (one 0-d tensor, or one 0-d tensor per gradient).

    Uses ``torch._foreach_mul_`` per (device, dtype) group; no host sync.
    """
    if not grads:
        return
    for (dev, _), idx in group_by_device_dtype(grads).items():
        group = [grads[i] for i in idx]
        if isinstance(scale, Tensor):
            torch._foreach_mul_(group, scale.to(dev))
        else:
            torch._foreach_mul_(group, [scale[i].to(dev) for i in idx])


def param_names(model: nn.Module) -> dict[int, tuple[str, str]]:
    """Map ``id(parameter)`` to ``(layer name, qualified parameter name)`` for ``model``.

    The layer is the module that owns the parameter directly (``""`` for the root); a parameter
    shared by several modules keeps its first owner (``named_modules`` order).
    """
    names: dict[int, tuple[str, str]] = {}
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            names.setdefault(id(p), (mod_name, f"{mod_name}.{p_name}" if mod_name else p_name))
    return names


#: Parameter names lent by a caller that knows the model (the Monitor, while it runs its remedy),
#: used by remedies constructed without ``model=``.
_LENT_NAMES: ContextVar[Mapping[int, tuple[str, str]] | None] = ContextVar("gradsentry_names", default=None)


@contextmanager
def lend_names(names: Mapping[int, tuple[str, str]] | None) -> Iterator[None]:
    """Within the block, remedies without a model of their own name layers from ``names``
    (``id(parameter) -> (layer name, parameter name)``, as :func:`param_names` builds)."""
    token = _LENT_NAMES.set(names)
    try:
        yield
    finally:
        _LENT_NAMES.reset(token)


def names_for(
    params: Sequence[Tensor], names: Mapping[int, tuple[str, str]] | None, *, layer: bool
) -> list[str]:
    """Layer (``layer=True``) or parameter names of ``params``; ``"param[i]"`` when no model is known
    (neither given to the remedy nor lent by :func:`lend_names`)."""
    names = names or _LENT_NAMES.get()
    out = []
    for i, p in enumerate(params):
        entry = names.get(id(p)) if names else None
        out.append((entry[0] or "<root>") if entry and layer else entry[1] if entry else f"param[{i}]")
    return out


def check_optimizer(owner: str, optimizer: Any, *, optional: bool = False) -> None:
    """Raise TypeError, naming ``owner``, unless ``optimizer`` looks like a ``torch.optim.Optimizer`` (or a
    wrapper of one: parameter groups and step hooks); None passes with ``optional``."""
    if optional and optimizer is None:
        return
    if not (hasattr(optimizer, "param_groups") and hasattr(optimizer, "register_step_post_hook")):
        raise TypeError(f"{owner} expects a torch.optim.Optimizer, got {type(optimizer).__name__}")


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    """Return ``float(value)`` or raise ValueError naming the argument."""
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a number, got {value!r}") from exc
    if math.isnan(v) or v < 0 or (v == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return v
