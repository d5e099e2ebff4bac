"""Tensor math for the Monitor: fused per-tensor norms, per-layer reduction, activation statistics.

Everything here runs on the tensors' device without a host sync; callers decide when to move the
(small) results to the host. Statistics are computed in float32 whatever the input dtype (fp16 and
bf16 gradients are upcast), and per-tensor squared norms are reduced across tensors in float64 where
the device supports it. A float32 sum of squares still overflows for a tensor norm above ~1.8e19 and
loses entries below ~1e-19 (as torch's own norm does); the Monitor recomputes such layers in float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from gradsentry._fused import Groups, fused
from gradsentry._fused import fused_path as fused_path

# Activation kinds by rule (saturation, dead units); defined with their families in _taxonomy.
from gradsentry._taxonomy import ACTIVATIONS as ACTIVATIONS
from gradsentry._taxonomy import BOUNDED_ACTIVATIONS as BOUNDED_ACTIVATIONS
from gradsentry._taxonomy import HARDSIGMOID_SATURATION_X, RELU6_SATURATION_X
from gradsentry._taxonomy import RELU_FAMILY as RELU_FAMILY
from gradsentry._taxonomy import SIGMOID_SATURATION as SIGMOID_SATURATION
from gradsentry._taxonomy import SIGMOID_SATURATION_X as SIGMOID_SATURATION_X
from gradsentry._taxonomy import TANH_SATURATION as TANH_SATURATION
from gradsentry._taxonomy import TANH_SATURATION_Y as TANH_SATURATION_Y
from gradsentry._taxonomy import sigmoid_saturation_x as sigmoid_saturation_x


def reduce_dtype(device: torch.device) -> torch.dtype:
    """float64 where the device supports it (CPU, CUDA), float32 elsewhere (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def entries(t: Tensor) -> Tensor:
    """The stored entries of ``t`` as a strided tensor with the same sum of squares and max |t|: ``t``
    itself for an ordinary (strided) tensor; for a sparse gradient (e.g. ``nn.Embedding(sparse=True)``)
    its coalesced values (duplicate indices summed), whose norms are those of the dense tensor."""
    if t.layout == torch.strided:
        return t
    if t.layout == torch.sparse_coo:
        return t.detach().coalesce().values()
    return t.detach().values()  # CSR/CSC/BSR/BSC hold no duplicates


def _strided(tensors: Sequence[Tensor]) -> Sequence[Tensor]:
    """``tensors`` with sparse ones replaced by :func:`entries` (the same list when none is sparse)."""
    for t in tensors:
        if t.layout != torch.strided:
            return [entries(x) for x in tensors]
    return tensors


@torch.no_grad()
def foreach_norms(
    tensors: Sequence[Tensor],
    ord: float = 2.0,
    *,
    same_device: bool = False,
    all_float32: bool = False,
    groups: Groups | None = None,
    promote: bool = False,
) -> Tensor:
    """Norm of every tensor: one fused ``torch._foreach_norm`` per (device, dtype) group.

    The one per-tensor norm helper of the package (``gradsentry.remedies.per_tensor_norms`` and
    ``gradsentry._dist.global_per_tensor_norms`` call it). These are torch's own norms (those of
    ``clip_grad_norm_``, bit for bit for float32 and float64 tensors): on CPU their float32 sums
    accumulate sequentially (~1e-3 relative on a 16M-entry tensor); :func:`sq_norms` is the accurate
    L2 one. fp16/bf16 tensors are accumulated in float32 (no overflow where their squares would).

    Args:
        tensors: N tensors of any shapes and floating dtypes, possibly on several devices.
        ord: the vector norm order (2.0 for L2, ``math.inf`` for max-abs).
        same_device: the caller knows every tensor is on one device (skips the per-tensor check).
        all_float32: the caller knows every tensor is float32 (with ``same_device``: one call, no
            grouping).
        groups: the tensors' (device, dtype) grouping, built once by the caller
            (:meth:`gradsentry._fused.Groups.of`) so that no per-tensor Python work is repeated.
        promote: return float64 when a tensor is float64 (its norm is not narrowed), as
            ``clip_grad_norm_`` does.

    Returns:
        Tensor of shape ``[N]``, float32 (float64 under ``promote`` with a float64 tensor), on the
        first tensor's device: entry i is the ``ord``-norm of ``tensors[i]`` flattened (same units as
        the tensor). NaN/inf entries propagate: the norm of a tensor holding NaN is NaN, holding inf
        is inf (or NaN), so one pass finds them.

    Raises:
        ValueError: if ``tensors`` is empty.

    Example:
        >>> foreach_norms([torch.tensor([3.0, 4.0]), torch.tensor([1.0], dtype=torch.float16)])
        tensor([5., 1.])
    """
    if len(tensors) == 0:
        raise ValueError("foreach_norms needs at least one tensor")
    if groups is None or not groups.strided:
        tensors = _strided(tensors)
    if groups is None:
        if same_device and all_float32:
            return torch.stack(torch._foreach_norm(list(tensors), ord))
        groups = Groups.of(tensors)
    parts = []
    single = len(groups.groups) == 1
    for g in groups.groups:
        ts = list(tensors) if single else [tensors[i] for i in g.positions]
        if g.upcast:
            parts.append(torch.stack(torch._foreach_norm(ts, ord, dtype=torch.float32)))
        else:
            parts.append(torch.stack(torch._foreach_norm(ts, ord)))
    out = torch.float64 if promote and any(p.dtype == torch.float64 for p in parts) else torch.float32
    if single:
        return parts[0] if parts[0].dtype == out else parts[0].to(out)
    joined = torch.cat([p.to(groups.device, out, non_blocking=True) for p in parts])
    assert groups.order is not None
    return joined[groups.order]


#: On CPU, :func:`sq_norms` reduces tensors of at most this many entries (and the tails of larger
#: ones) in one fused ``_foreach_norm`` call in float64: each is upcast whole (~1 us per tensor), so
#: its squares and their sum are exact to ~1e-15.
CPU_SMALL = 1 << 13
#: Row length of the per-row float32 norms of larger tensors on CPU (whose squares are then summed
#: in float64): a row's float32 accumulation is short whatever the SIMD width or thread count, so
#: it stays within ~1e-7 relative even if done one entry at a time (measured: ~1e-9 on heavy-tailed
#: data, against 5e-8 for rows of 4096), and the rows' norms (1/256 of the entries) cost little.
CPU_ROW = 256
#: fp16/bf16 tensors are upcast to float32 in chunks of this many entries (256 KiB: the upcast
#: chunk stays in cache), not whole.
CPU_UPCAST_CHUNK = 1 << 16


def sq_norms(
    tensors: Sequence[Tensor],
    *,
    same_device: bool = False,
    all_float32: bool = False,
    groups: Groups | None = None,
) -> Tensor:
    """Squared L2 norm of every tensor, accurate to ~1e-7 relative whatever its size, and fast.

    On accelerators this is one fused ``torch._foreach_norm`` (a tree reduction), squared in float64.
    On CPU, ``torch._foreach_norm`` and ``torch.linalg.vector_norm`` (hence ``clip_grad_norm_``)
    accumulate float32 squares sequentially in a few SIMD lanes, so their error grows with the size
    (~1e-3 relative on a 16M-entry tensor), and a BLAS float32 ``torch.dot`` is no better where its
    kernel keeps few partial sums (MKL on an AVX512 AMD CPU: 3e-6 on 256K entries at 2 threads, 9e-6
    at 1). Here a tensor of more than :data:`CPU_SMALL` entries is viewed (without a copy) as rows of
    :data:`CPU_ROW` entries, whose float32 norms come from one ``vector_norm(rows, dim=1)`` (one read
    of the tensor, split among the threads), and the squares of the row norms are summed in float64;
    fp16/bf16 tensors are upcast in chunks of :data:`CPU_UPCAST_CHUNK`. Smaller tensors, the last
    ``numel % CPU_ROW`` entries of larger ones and the row norms share one ``_foreach_norm`` in
    float64. Measured (``benchmarks/RESULTS.md``): within ~1e-8 of a float64 recomputation on
    tensors of any size; 0.55-0.8x the time of torch's norm on large tensors with 2 threads (~1.1x
    with 1), ~1x on a transformer's gradients, ~1.9x on many 32K-entry tensors (per-call overhead).

    Args:
        tensors: N tensors of any shapes and floating dtypes, possibly on several devices.
        same_device: the caller knows every tensor is on one device (skips the per-tensor check).
        all_float32: the caller knows every tensor is float32.
        groups: their (device, dtype) grouping, built once (see :func:`foreach_norms`).

    Returns:
        ``[N]`` in :func:`reduce_dtype` precision on the first tensor's device: entry i is
        ``sum(tensors[i] ** 2)`` (units: the tensor's, squared). NaN/inf entries propagate. As in
        ``torch.nn.utils.clip_grad_norm_``, squares are float32 (float64 for float64 tensors, and on
        CPU for tensors of at most :data:`CPU_SMALL` entries): a norm beyond ~1.8e19 may overflow to
        inf (on CPU, where a row of :data:`CPU_ROW` entries does) and entries below ~1e-19 may be
        lost; the Monitor recomputes such layers in float64.

    Raises:
        ValueError: if ``tensors`` is empty.

    Example:
        >>> sq_norms([torch.tensor([3.0, 4.0]), torch.ones(200_000, dtype=torch.bfloat16)]).tolist()
        [25.0, 200000.0]
    """
    if len(tensors) == 0:
        raise ValueError("sq_norms needs at least one tensor")
    device = tensors[0].device
    dt = reduce_dtype(device)
    if groups is not None:
        one_device = groups.one_device
    else:
        one_device = same_device or all(t.device == device for t in tensors)
    if fused(device) or not one_device:  # one _foreach_norm per (device, dtype)
        norms = foreach_norms(tensors, same_device=one_device, all_float32=all_float32, groups=groups)
        return norms.to(dt).square()
    with torch.no_grad():  # weights may require grad: no graph (cheaper than a detach per tensor)
        return _cpu_sq_norms(tensors)


def _cpu_sq_norms(tensors: Sequence[Tensor]) -> Tensor:
    """:func:`sq_norms` on CPU (float64 ``[N]``), all tensors on the CPU."""
    # One fused float64 norm of the small tensors, the tails of large ones and the per-row norms of
    # large ones (the norm of a tensor's row norms is its norm).
    pieces: list[Tensor] = []
    owners: list[int] = []
    other: list[int] = []  # not floating point (e.g. complex): foreach_norms
    vector_norm = torch.linalg.vector_norm
    for i, t in enumerate(tensors):
        if t.layout != torch.strided:
            t = entries(t)
        if not t.is_floating_point():
            other.append(i)
            continue
        n = t.numel()
        if n <= CPU_SMALL:
            pieces.append(t)
            owners.append(i)
        elif n % CPU_ROW == 0 and t.is_contiguous() and t.dtype not in _LOW_PRECISION:
            pieces.append(vector_norm(t.view(-1, CPU_ROW), dim=1))
            owners.append(i)
        else:
            flat = _memory_order(t).reshape(-1)  # a view (maybe strided) unless the tensor has gaps
            upcast = flat.dtype in _LOW_PRECISION
            for piece in flat.split(CPU_UPCAST_CHUNK) if upcast else (flat,):
                if upcast:
                    piece = piece.float()
                k = piece.numel()
                m = k - k % CPU_ROW
                if m:
                    pieces.append(vector_norm((piece if m == k else piece[:m]).view(-1, CPU_ROW), dim=1))
                    owners.append(i)
                if m < k:
                    pieces.append(piece[m:])
                    owners.append(i)
    parts: list[Tensor] = []
    if pieces:
        parts.append(torch.stack(torch._foreach_norm(pieces, dtype=torch.float64)).square())
        if not other and len(pieces) == len(tensors):  # one piece per tensor, in order
            return parts[0]
    if other:
        parts.append(foreach_norms([tensors[i] for i in other], same_device=True).double().square())
        owners += other
    values = torch.cat(parts) if len(parts) > 1 else parts[0]
    return torch.zeros(len(tensors), dtype=torch.float64).index_add_(0, torch.tensor(owners), values)


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _memory_order(t: Tensor) -> Tensor:
    """``t`` permuted so that its dims run in memory order (a transposed or channels-last tensor
    becomes contiguous without a copy); unchanged if no permutation does that."""
    if t.is_contiguous():
        return t
    dims = sorted(range(t.dim()), key=lambda d: -t.stride()[d])
    p = t.permute(dims)
    return p if p.is_contiguous() else t


@torch.no_grad()
def foreach_max_abs(tensors: Sequence[Tensor], *, groups: Groups | None = None) -> Tensor:
    """Largest absolute entry (``max |t|``) of every tensor.

    On accelerators this is one fused ``torch._foreach_norm(tensors, inf)`` per (device, dtype)
    group (:func:`foreach_norms`); on CPU, where that falls back to a scalar loop ~13x slower than
    one ``torch.aminmax`` per tensor (24 tensors of 512x512: 130 ms against 10 ms), each tensor's
    ``aminmax`` is used instead (one vectorised pass, no temporary). NaN propagates.

    Args:
        tensors: N tensors of any shapes and floating dtypes.
        groups: their (device, dtype) grouping, built once (see :func:`foreach_norms`).

    Returns:
        float32 ``[N]`` on the first tensor's device, same units as the tensors.

    Example:
        >>> foreach_max_abs([torch.tensor([1.0, -3.0]), torch.tensor([2.0])])
        tensor([3., 2.])
    """
    if len(tensors) == 0:
        raise ValueError("foreach_max_abs needs at least one tensor")
    all_cpu = groups.all_cpu if groups is not None else all(t.device.type == "cpu" for t in tensors)
    if not all_cpu or fused(tensors[0].device):
        return foreach_norms(tensors, math.inf, groups=groups)
    los, his = [], []
    for t in _strided(tensors):
        lo, hi = torch.aminmax(t) if t.numel() else (t.new_zeros(()), t.new_zeros(()))
        los.append(lo)
        his.append(hi)
    lo_t, hi_t = torch.stack(los), torch.stack(his)  # one op per tensor above, three here
    if lo_t.dtype != torch.float32:
        lo_t, hi_t = lo_t.float(), hi_t.float()
    return torch.maximum(hi_t, -lo_t)


def layer_sum(values: Tensor, index: Tensor, num_layers: int) -> Tensor:
    """Per-layer sums of per-tensor values (e.g. squared norms: the square root of the sum is the
    layer's L2 norm).

    Args:
        values: ``[N]`` one value per tensor.
        index: ``[N]`` int64 layer index of each tensor, in ``[0, num_layers)``.
        num_layers: L.

    Returns:
        ``[L]`` on ``values``' device and dtype; layers without tensors get 0.

    Example:
        >>> layer_sum(torch.tensor([1.0, 4.0, 9.0]), torch.tensor([0, 0, 2]), 3)
        tensor([5., 0., 9.])
    """
    out = torch.zeros(num_layers, dtype=values.dtype, device=values.device)
    return out.index_add_(0, index.to(values.device), values)


def layer_max(values: Tensor, index: Tensor, num_layers: int) -> Tensor:
    """Per-layer maximum of ``values`` (``[N]`` → ``[L]``); NaN propagates, empty layers get 0."""
    out = torch.zeros(num_layers, dtype=values.dtype, device=values.device)
    return out.scatter_reduce_(0, index, values, reduce="amax", include_self=True)


@torch.no_grad()
def activation_stats(
    kind: str,
    x: Tensor,
    y: Tensor | None,
    module: torch.nn.Module | None = None,
    *,
    sigmoid_band: float = SIGMOID_SATURATION,
    tanh_band: float = TANH_SATURATION,
) -> Tensor:
    """On-device statistics of one activation call, fused: about six ops per call (mean, std, the
    saturation or dead-unit reduction, one ``stack``) whatever the input's size.

    Args:
        kind: the activation's kind, a torch.nn class name (:func:`gradsentry._taxonomy.activation_kind`).
        x: its input (the pre-activation), shape ``[B, F]``, ``[B, C, *spatial]`` or ``[B, T, F]``.
        y: its output, same shape (used for tanh/softsign saturation), or None.
        module: the module (for Hardtanh's bounds), optional.
        sigmoid_band: a sigmoid output below this or above one minus it is saturated (in (0, 0.5)).
        tanh_band: a tanh/softsign output with ``|y| > 1 - tanh_band`` is saturated (in (0, 0.5)).

    Returns:
        float32 ``[4]``: pre-activation mean, pre-activation std (unbiased), saturated fraction in
        [0, 1] (NaN when the activation is unbounded), dead-unit fraction in [0, 1] (NaN outside the
        ReLU family). A unit is one feature (dim 1 of 2-D and conv inputs, the last dim of 3-D sequence
        inputs); it is dead when ``x <= 0`` for every sample (and position) of the batch.
    """
    xf = x if x.dtype == torch.float32 else x.float()
    nan = _nan(xf.device)
    # mean() and std() rather than one std_mean(): its mean rounds differently (last bits), and the
    # records (and the golden files of `gradsentry check`) keep the values they had.
    mean = xf.mean()
    std = xf.std() if xf.numel() > 1 else torch.zeros((), device=xf.device)
    sat = nan
    if kind == "Sigmoid":
        limit = (
            SIGMOID_SATURATION_X if sigmoid_band == SIGMOID_SATURATION else sigmoid_saturation_x(sigmoid_band)
        )
        sat = _frac(xf.abs() > limit)
    elif kind in ("Tanh", "Softsign"):
        if y is not None:
            yf = y if y.dtype == torch.float32 else y.float()
        else:
            yf = torch.tanh(xf) if kind == "Tanh" else xf / (1 + xf.abs())
        sat = _frac(yf.abs() > 1.0 - tanh_band)
    elif kind == "Hardtanh":
        lo = float(getattr(module, "min_val", -1.0))
        hi = float(getattr(module, "max_val", 1.0))
        sat = _frac((xf <= lo) | (xf >= hi))
    elif kind == "Hardsigmoid":
        sat = _frac(xf.abs() >= HARDSIGMOID_SATURATION_X)
    elif kind == "ReLU6":
        sat = _frac(xf >= RELU6_SATURATION_X)
    dead = nan
    if kind in RELU_FAMILY and xf.dim() >= 1 and xf.numel():
        # A unit's largest input over the batch (and positions) is <= 0: one amax per call. NaN
        # entries make the max NaN, and NaN <= 0 is False: not dead, as before.
        if xf.dim() == 1:
            dead = _frac(xf <= 0)
        else:
            dims = (0, 1) if xf.dim() == 3 else (0, *range(2, xf.dim()))
            dead = _frac(xf.amax(dim=dims) <= 0)
    elif kind in RELU_FAMILY and xf.dim() >= 1:  # no entry: as all() over an empty batch
        units = xf.reshape(-1, xf.shape[-1]) if xf.dim() >= 2 else xf.reshape(1, -1)
        dead = (units <= 0).all(dim=0).float().mean()
    return torch.stack([mean, std, sat, dead])


def _frac(mask: Tensor) -> Tensor:
    """Fraction of True entries of a bool tensor (float32 0-d), in one op."""
    return torch.mean(mask, dtype=torch.float32)


_NAN: dict[torch.device, Tensor] = {}


def _nan(device: torch.device) -> Tensor:
    """A float32 NaN scalar on ``device``, made once (not one ``full`` per call)."""
    t = _NAN.get(device)
    if t is None:
        t = _NAN[device] = torch.full((), math.nan, device=device)
    return t


def histogram(x: Tensor, bins: int, limit: float) -> Tensor:
    """Histogram of ``x`` on ``bins`` equal bins over ``[-limit, limit]``; values outside are
    counted in the end bins. Returns float32 ``[bins]`` counts on ``x``'s device."""
    with torch.no_grad():
        xf = (x if x.dtype == torch.float32 else x.float()).clamp(-limit, limit)
        return torch.histc(xf, bins=bins, min=-limit, max=limit)
