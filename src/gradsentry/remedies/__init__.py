"""Remedies: small composable objects that fix gradients in place after ``backward()``.

Each is called as ``remedy(params, *, norms=None, loss=None) -> RemedyResult`` after
``loss.backward()`` (and ``GradScaler.unscale_``) and before ``optimizer.step()``; if
``result.skip`` is True the step must be skipped (guards already set the gradients to None, so an
``optimizer.step()`` call is then a no-op).

Coupling with :class:`gradsentry.Monitor` (kept minimal): the Monitor calls
``remedy(params_with_grad, norms=per_tensor_l2_norms, loss=loss)`` after taking its statistics, so
norm-based clippers reuse the norms instead of a second pass, and it stores ``result.to_dict()`` in
``StepRecord.actions``. Remedies that watch the loss (:class:`Rollback`, :class:`Ladder`,
:class:`SpikeSkip`) also accept ``loss=``; :meth:`RemedyResult.to_dicts` flattens a
:class:`Chain`/:class:`Ladder` into one record per action. Remedies that skip the step on the device
(``NonFiniteGuard(opt, sync=False)``, :class:`SpikeSkip`) go through the optimizer's
:class:`DeviceSkip` (:mod:`gradsentry.remedies.skipstep`): no host sync, and their ``result.skipped``
is a device flag. Nothing here imports the Monitor. To replay a failing batch with the Monitor's
non-finite origin location on, give :class:`Rollback` a ``replay`` callable that does it.
"""

from gradsentry.remedies.adaptive import AutoClip, ZClip
from gradsentry.remedies.agc import unitwise_norm
from gradsentry.remedies.base import Remedy, RemedyResult, param_names, per_tensor_norms
from gradsentry.remedies.chain import Chain
from gradsentry.remedies.clip import AGC, ClipGlobalNorm, ClipLayerNorm, ClipValue, NonFiniteGradientError
from gradsentry.remedies.guard import NonFiniteGuard, ResetMoments
from gradsentry.remedies.init import LSUVReport, lsuv, reinit
from gradsentry.remedies.ladder import Ladder
from gradsentry.remedies.rollback import Rollback, RollbackError, SnapshotError, load_snapshot
from gradsentry.remedies.skipstep import DeviceSkip, device_skip
from gradsentry.remedies.spike import SpikeSkip

__all__ = (
    "AGC",
    "AutoClip",
    "Chain",
    "ClipGlobalNorm",
    "ClipLayerNorm",
    "ClipValue",
    "DeviceSkip",
    "LSUVReport",
    "Ladder",
    "NonFiniteGradientError",
    "NonFiniteGuard",
    "Remedy",
    "RemedyResult",
    "ResetMoments",
    "Rollback",
    "RollbackError",
    "SnapshotError",
    "SpikeSkip",
    "ZClip",
    "device_skip",
    "load_snapshot",
    "lsuv",
    "param_names",
    "per_tensor_norms",
    "reinit",
    "unitwise_norm",
)
