"""The lab's results as plain data, and ``results.json``.

``results.json`` holds every number the lab report shows. Every gradient number in it is read from the
runs' Monitor records (:mod:`gradsentry.lab.recording`); the loss per step is the training loop's. It is strict JSON: a non-finite float
(NaN, +inf, -inf: evidence of a diverged run) is written as the string ``"NaN"``, ``"Infinity"`` or
``"-Infinity"``; :func:`read_results` turns them back into floats. Schema (version
:data:`RESULTS_SCHEMA_VERSION`)::

    {
      "gradsentry_lab": 1,                    # schema version
      "config": {...},                        # LabConfig fields (depth, width, epochs, batch_size, lr, ...)
      "data": {"name", "n_train", "n_test", "n_features", "n_classes"},
      "environment": {"torch", "threads"},
      "wall_time_s": float,                   # the whole lab, seconds
      "runs": [                               # one per variant, in run order
        {
          "name", "title", "shows", "family",            # family: "vanishing" | "exploding"
          "spec": {...},                                  # the Variant's fields (activation, init, ...)
          "layer_names": [str],                           # Linear layers in depth order (blocks.{i}.fc, head)
          "monitored_layers": [str],                      # every layer the Monitor watched (incl. blocks.{i}.bn)
          "first_last_rms_ratio_init": float,             # gradient RMS of the first layer / last layer, step 0
          "grad_norm_init": [float],                      # per Linear layer, L2 norm of its gradients at step 0
          "grad_norm_final": [float],                     # same at "final_step" (last finite logged step)
          "final_step": int,
          "logged_steps": [int],                          # steps the Monitor logged ("schedule")
          "grad_norm_by_step": [[float]],                 # [layer][logged step] L2 gradient norm (heat map)
          "global_norm": [float],                         # per logged step: L2 norm of all gradients, before
                                                          # any fix (the exploding family logs every step)
          "loss": [float],                                # every step: training cross-entropy (nats)
          "total_steps": int, "steps_run": int,           # budget and steps actually run
          "stopped_at": int | null,                       # logged step where a NaN/inf stopped the run
          "first_nonfinite_step": int | null,             # first step with a NaN/inf loss (any step) or
                                                          # gradient (logged steps)
          "test_accuracy": float, "train_accuracy": float,  # fraction in [0, 1] after training
          "findings": [Finding.to_dict()],                # gradsentry.diagnose over the run's records
          "histograms": [{"layer", "block", "edges": [float], "init": [float] | null,
                          "final": [float] | null,        # counts of pre-activations at step 0 / last step
                          "saturated_frac_init", "saturated_frac_final",   # the Monitor's saturated_frac
                          "sample_std_init", "sample_std_final"}],         # per-unit std over the batch
          "time_s": float,                                # this run, seconds
          "jsonl": str | null,                            # its JSONL record file, relative to results.json
          "schedule": {"every", "dense_first", "last_step", "histogram_steps", "text"}  # as in its header
        }
      ],
      "chapters": {                           # the chapters beyond MLPs that ran (absent when none ran)
        "<rnn|cnn|attention>": {"title", "settings": {...}, "cite": str, "time_s": float,
                                "claims": {...},  # measured numbers; "*_holds": the claim's direction
                                "runs": {"<variant>": {"title", "loss": [float] (every step),
                                         "global_norm": [float], "logged_steps": [int] (the Monitor's),
                                         "schedule": {...}, "jsonl": str | null,
                                         "test_accuracy", "findings": [...], ...chapter-specific}}}
      }
    }
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from gradsentry._io import write_text_atomic
from gradsentry.records import StepRecord, dumps, loads

RESULTS_SCHEMA_VERSION = 1
"""Version of the ``results.json`` schema."""


def first_last_rms_ratio(record: StepRecord) -> float:
    """Gradient RMS of the first layer divided by that of the last layer, at one step.

    The layers are those with a usable gradient (``has_grad``, elements, finite RMS > 0), in depth
    order, as in the ``vanishing`` rule of :func:`gradsentry.diagnose`. Dimensionless; NaN when fewer
    than two layers are usable.
    """
    usable = sorted(
        (
            ls
            for ls in record.layers
            if ls.has_grad and ls.numel > 0 and math.isfinite(ls.grad_rms) and ls.grad_rms > 0
        ),
        key=lambda ls: ls.depth,
    )
    if len(usable) < 2:
        return math.nan
    return usable[0].grad_rms / usable[-1].grad_rms


@dataclass
class HistogramResult:
    """Pre-activation histogram of one hidden block's activation, at step 0 and the last step.

    The counts and saturated fractions are the Monitor's (``record.activations[*]``, recorded with
    ``histogram_bins=LabConfig.hist_bins``); the per-unit spread is measured by the lab (the Monitor
    records the standard deviation over all entries, not over the batch per unit).

    Attributes:
        layer: the activation module, e.g. ``"blocks.10.act"``.
        block: the hidden block's index.
        edges: ``bins + 1`` bin edges, same units as the pre-activation.
        init: counts at step 0 (values outside the range are counted in the end bins), or None.
        final: counts at the last step of the budget, or None (run stopped early).
        saturated_frac_init: the Monitor's saturated fraction in [0, 1] at step 0 (its band for the
            activation's kind, by default sigmoid ``|x| > 4.595``, tanh ``|y| > 0.99``; None for an
            unbounded activation such as ReLU).
        saturated_frac_final: the same at the last step.
        sample_std_init: spread of one unit's pre-activation across the examples of the batch (standard
            deviation over the batch, averaged over units; same units as the pre-activation) at step 0.
        sample_std_final: the same at the last step.
    """

    layer: str
    block: int
    edges: list[float]
    init: list[float] | None = None
    final: list[float] | None = None
    saturated_frac_init: float | None = None
    saturated_frac_final: float | None = None
    sample_std_init: float | None = None
    sample_std_final: float | None = None


@dataclass
class VariantResult:
    """Every number of one lab run (see the module docstring for each field's meaning and units)."""

    name: str
    title: str
    shows: str
    family: str
    spec: dict[str, Any]
    layer_names: list[str]
    monitored_layers: list[str]
    first_last_rms_ratio_init: float
    grad_norm_init: list[float]
    grad_norm_final: list[float]
    final_step: int
    logged_steps: list[int]
    grad_norm_by_step: list[list[float]]
    global_norm: list[float]
    loss: list[float]
    total_steps: int
    steps_run: int
    stopped_at: int | None
    first_nonfinite_step: int | None
    test_accuracy: float
    train_accuracy: float
    findings: list[dict[str, Any]] = field(default_factory=list)
    histograms: list[HistogramResult] = field(default_factory=list)
    time_s: float = 0.0
    jsonl: str | None = None
    schedule: dict[str, Any] = field(default_factory=dict)

    @property
    def diverged(self) -> bool:
        """True when a NaN/inf appeared in the loss or the gradients."""
        return self.first_nonfinite_step is not None

    def finding_kinds(self) -> list[str]:
        """The kinds of the findings, in order, without repeats."""
        return list(dict.fromkeys(str(f.get("kind", "")) for f in self.findings))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VariantResult:
        """Rebuild from a ``runs[i]`` object of ``results.json`` (non-finite values already decoded)."""
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in data.items() if k in names}
        kw["histograms"] = [HistogramResult(**h) for h in kw.get("histograms", [])]
        return cls(**kw)


@dataclass
class LabResult:
    """The whole lab: configuration, data summary, environment and one result per variant."""

    config: dict[str, Any]
    runs: list[VariantResult]
    data: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    wall_time_s: float = 0.0
    chapters: dict[str, Any] = field(default_factory=dict)

    def run(self, name: str) -> VariantResult:
        """The result of variant ``name``; raises KeyError if it was not run."""
        for r in self.runs:
            if r.name == name:
                return r
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """Plain data with the schema version (see the module docstring); floats may be non-finite."""
        d = {"gradsentry_lab": RESULTS_SCHEMA_VERSION, **asdict(self)}
        if not d["chapters"]:  # MLP-only labs keep the original set of keys
            del d["chapters"]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LabResult:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: the schema version is missing or not :data:`RESULTS_SCHEMA_VERSION`.
            KeyError: a required key is missing.
        """
        version = data.get("gradsentry_lab")
        if version != RESULTS_SCHEMA_VERSION:
            raise ValueError(
                f"not a gradsentry lab results file (schema {version!r}, expected {RESULTS_SCHEMA_VERSION})"
            )
        return cls(
            config=dict(data["config"]),
            runs=[VariantResult.from_dict(r) for r in data["runs"]],
            data=dict(data.get("data", {})),
            environment=dict(data.get("environment", {})),
            wall_time_s=float(data.get("wall_time_s", 0.0)),
            chapters=dict(data.get("chapters", {})),
        )


def results_to_json(result: LabResult) -> str:
    """``results.json`` text: strict JSON, non-finite floats as strings (see the module docstring)."""
    return dumps(result.to_dict(), strict=True, indent=1)


def write_results(result: LabResult, path: str | os.PathLike[str]) -> Path:
    """Write ``results.json`` to ``path`` (atomically: a temporary file, then a rename)."""
    p = Path(path)
    write_text_atomic(p, results_to_json(result))
    return p


def read_results(path: str | os.PathLike[str]) -> LabResult:
    """Read a ``results.json`` written by :func:`write_results`.

    Raises:
        ValueError: the file is not JSON or not a lab results file of this schema version.
    """
    try:
        data = loads(Path(path).read_text(encoding="utf-8"), nonfinite_strings=True)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a gradsentry lab results file")
    return LabResult.from_dict(data)
