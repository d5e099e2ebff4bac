"""Check a model at initialization: one forward and backward pass, a per-layer table, theory and findings.

Most vanishing and exploding gradients are visible before the first optimizer step. :func:`check_model`
runs one forward and backward pass on a batch, reads the per-layer statistics from a
:class:`gradsentry.Monitor`, compares the gradient profile with the mean-field prediction of
:mod:`gradsentry.theory` where the model is a plain chain, and diagnoses the record with
:func:`gradsentry.diagnose.diagnose` plus one init-time rule (a gradient that *grows* towards the input by
more than :data:`EXPLODING_RATIO`, or a relative gradient above :data:`REL_GRAD_MAX`).

Like with like: mean-field theory predicts the gradient of *one example* (samples independent), weight
and bias entries together (:attr:`gradsentry.theory.LayerPrediction.grad_rms`); the check measures
exactly that (:attr:`CheckRow.example_rms`, per-example gradients by ``torch.func``) and compares the two,
beside the batch gradient (:attr:`CheckRow.grad_rms`) that training sees, whose profile also carries the
correlations between the examples of the batch. The fitted slope is over the hidden layers only: the
output head (the last layer in forward order) receives the loss gradient directly and is left out.
Models made of repeated blocks holding a normalization layer (transformers) get their per-block gradient
profile and its LayerNorm placement reported (:class:`BlockProfile`: Xiong et al. 2020; NormFormer).
Loading a user's model factory (``gradsentry check TARGET``) is the CLI's job: :mod:`gradsentry.cli.targets`.

The package: :mod:`~gradsentry.check.report` (the records and thresholds), :mod:`~gradsentry.check.examples`
(per-example gradients), :mod:`~gradsentry.check.profile` (slope, per-block profile, init-time rules) and
:mod:`~gradsentry.check.run` (:func:`check_model`).
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from gradsentry.check.examples import _per_example_sq_loop, per_example_rms
from gradsentry.check.report import (
    DEAD_UNITS_MIN_BATCH,
    EXPLODING_RATIO,
    FIXES,
    LOSSES,
    MAX_EXAMPLES,
    REL_GRAD_MAX,
    BlockProfile,
    CheckReport,
    CheckRow,
    FixName,
    InputFitError,
    LossName,
)
from gradsentry.check.run import check_model, digits_batch

_MOVED = {"TargetError", "load_factory", "load_model"}


def __getattr__(name: str) -> Any:
    """The names moved to :mod:`gradsentry.cli.targets`, with a DeprecationWarning (one release)."""
    if name in _MOVED:
        warnings.warn(
            f"gradsentry.check.{name} moved to gradsentry.cli.targets.{name}; the old path goes in the next "
            "release",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module("gradsentry.cli.targets"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEAD_UNITS_MIN_BATCH",
    "EXPLODING_RATIO",
    "FIXES",
    "LOSSES",
    "MAX_EXAMPLES",
    "REL_GRAD_MAX",
    "BlockProfile",
    "CheckReport",
    "CheckRow",
    "FixName",
    "InputFitError",
    "LossName",
    "_per_example_sq_loop",
    "check_model",
    "digits_batch",
    "per_example_rms",
]
