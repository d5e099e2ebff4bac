"""Remedies: small composable objects that fix gradients in place after ``backward()``.

Each is called as ``remedy(params, *, norms=None, loss=None) -> RemedyResult`` after
``loss.backward()`` (and ``GradScaler.unscale_``) and before ``optimizer.step()``; if
``result.skip`` is True the step must be skipped (guards already set the gradients to None, so an
``optimizer.step()`` call is then a no-op).
"""

from gradsentry.remedies.adaptive import AutoClip, ZClip
from gradsentry.remedies.base import Remedy, RemedyResult, param_names, per_tensor_norms
from gradsentry.remedies.chain import Chain
from gradsentry.remedies.clip import AGC, ClipGlobalNorm, ClipLayerNorm, ClipValue, NonFiniteGradientError
from gradsentry.remedies.guard import NonFiniteGuard, ResetMoments
from gradsentry.remedies.ladder import Ladder
from gradsentry.remedies.rollback import Rollback, RollbackError, SnapshotError, load_snapshot

__all__ = (
    "AGC",
    "AutoClip",
    "Chain",
    "ClipGlobalNorm",
    "ClipLayerNorm",
    "ClipValue",
    "Ladder",
    "NonFiniteGradientError",
    "NonFiniteGuard",
    "Remedy",
    "RemedyResult",
    "ResetMoments",
    "Rollback",
    "RollbackError",
    "SnapshotError",
    "ZClip",
    "load_snapshot",
    "param_names",
    "per_tensor_norms",
)
