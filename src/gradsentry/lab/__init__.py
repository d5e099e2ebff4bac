"""The lab: vanishing and exploding gradients and their fixes, reproduced on real data (digits)."""

from gradsentry.lab.experiments import (
    DEFAULT_VARIANTS,
    VARIANTS,
    LabConfig,
    ProgressEvent,
    Variant,
    run_lab,
    run_variant,
)
from gradsentry.lab.outputs import check_writable, write_outputs
from gradsentry.lab.results import HistogramResult, LabResult, VariantResult, read_results, write_results

__all__ = [
    "DEFAULT_VARIANTS",
    "VARIANTS",
    "HistogramResult",
    "LabConfig",
    "LabResult",
    "ProgressEvent",
    "Variant",
    "VariantResult",
    "check_writable",
    "read_results",
    "run_lab",
    "run_variant",
    "write_outputs",
    "write_results",
]
