"""The one JSON codec of gradsentry, and the helpers that declare statistics and read records.

Import these names from :mod:`gradsentry.records`, which re-exports them; this module exists so that the
record classes (in ``records`` and ``_run_records``) share them without importing each other. The list of
statistics itself is :data:`gradsentry.records.LAYER_STATS` (the fields of ``LayerStats``).

Non-finite floats (NaN, +inf, -inf) are evidence and are never dropped. They are written in one of two ways:

- **literals** (the default): ``NaN``, ``Infinity``, ``-Infinity``, as Python's ``json`` writes and reads them.
  Every gradsentry JSONL line and MLflow artifact uses this form; it is compact and exact, but not strict JSON.
- **strings** (``strict=True``): ``"NaN"``, ``"Infinity"``, ``"-Infinity"``, so that the text is strict JSON
  (RFC 8259) for other tools: ``gradsentry check --json``, ``gradsentry analyze --json``, a lab's
  ``results.json``. :func:`loads` with ``nonfinite_strings=True`` turns them back into floats.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

SCHEMA_VERSION = 1
"""Version of the JSONL schema written by :class:`gradsentry.sinks.JsonlSink`."""

NONFINITE: dict[str, float] = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
"""The JSON spelling of each non-finite float (as a literal, or as a string with ``strict=True``)."""


class RecordError(ValueError):
    """A dict or file line could not be read as a gradsentry record."""


def _plain(x: Any) -> Any:
    """JSON stand-in for a value json cannot write (user metadata): a scalar's value, else its str."""
    item = getattr(x, "item", None)  # numpy / torch scalars
    if callable(item):
        try:
            value = item()
        except (TypeError, ValueError, RuntimeError):
            return str(x)
        if isinstance(value, (int, float, bool, str)):
            return value
    return str(x)


def json_safe(value: Any) -> Any:
    """Make ``value`` strict-JSON safe: non-finite floats become ``"NaN"``/``"Infinity"``/``"-Infinity"``.

    Containers (dict, list, tuple) are converted recursively (dict keys become strings); numpy and torch
    scalars become Python scalars.

    Example:
        >>> json_safe({"a": [1.0, float("inf")], "b": float("nan")})
        {'a': [1.0, 'Infinity'], 'b': 'NaN'}
    """
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if not isinstance(value, (int, float, str, bool)) and value is not None:
        item = getattr(value, "item", None)  # numpy / torch scalars
        if callable(item) and getattr(value, "ndim", 0) == 0:
            value = item()
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def dumps(obj: Any, *, strict: bool = False, indent: int | None = None, compact: bool | None = None) -> str:
    """Write ``obj`` as JSON text, keeping NaN and infinities (see the module docstring).

    Args:
        obj: plain data (dicts, lists, numbers, strings; numpy/torch scalars are written as their value,
            anything else json cannot write as its ``str``).
        strict: False (default): non-finite floats as the literals ``NaN``/``Infinity``/``-Infinity``
            (the JSONL form). True: as strings, so that the text is strict JSON.
        indent: None (default): one line; an integer: pretty-printed with that indent.
        compact: no space after ``,`` and ``:``; None (default): compact for a one-line literal-form text
            (a JSONL line), spaced otherwise (``json``'s own layout).

    Returns:
        The JSON text (no trailing newline).

    Example:
        >>> dumps({"g": float("nan"), "r": [float("inf"), 1.5]})
        '{"g":NaN,"r":[Infinity,1.5]}'
        >>> dumps({"g": float("nan")}, strict=True)
        '{"g": "NaN"}'
    """
    if compact is None:
        compact = indent is None and not strict
    separators = (",", ":") if compact else None
    if strict:
        return json.dumps(
            json_safe(obj), allow_nan=False, indent=indent, separators=separators, default=_plain
        )
    return json.dumps(obj, allow_nan=True, indent=indent, separators=separators, default=_plain)


_DECODE = json.JSONDecoder(parse_constant=NONFINITE.__getitem__).decode  # one decoder for every call


def _strings_to_floats(obj: Any) -> Any:
    if isinstance(obj, str):
        return NONFINITE.get(obj, obj)
    if isinstance(obj, dict):
        return {k: _strings_to_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_strings_to_floats(v) for v in obj]
    return obj


def loads(text: str | bytes, *, nonfinite_strings: bool = False) -> Any:
    """Read JSON text written by :func:`dumps` (either form); never executes content.

    Args:
        text: one JSON document (a JSONL line, a whole ``.json`` file).
        nonfinite_strings: also turn the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` back into
            floats, wherever they are (for text written with ``strict=True``; a string value that is
            exactly one of these words is read as the number).

    Raises:
        json.JSONDecodeError: (a ``ValueError``) the text is not JSON.

    Example:
        >>> loads('{"g":NaN,"r":[-Infinity]}')
        {'g': nan, 'r': [-inf]}
        >>> loads('{"g": "Infinity"}', nonfinite_strings=True)
        {'g': inf}
    """
    obj = _DECODE(text.decode("utf-8") if isinstance(text, bytes) else text)
    return _strings_to_floats(obj) if nonfinite_strings else obj


def num(value: Any) -> float | None:
    """Coerce a JSON value to ``float`` (``None`` stays ``None``); strings like "NaN" are accepted.

    Raises:
        RecordError: a boolean, or a value ``float()`` does not take.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise RecordError(f"expected a number, got a boolean {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise RecordError(f"expected a number, got {value!r}") from exc


_FIELD_NAMES: dict[type, frozenset[str]] = {}


def from_fields(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``data`` that are fields of the dataclass ``cls`` (unknown keys are ignored).

    Raises:
        RecordError: ``data`` is not a mapping.
    """
    if not isinstance(data, Mapping):
        raise RecordError(f"expected an object for {cls.__name__}, got {type(data).__name__}")
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = frozenset(f.name for f in fields(cls))
    return {k: v for k, v in data.items() if k in names}


_STAT = "gradsentry.stat"  # the metadata key of a statistic's definition


@dataclass(frozen=True)
class StatDef:
    """One statistic written by the sinks and callbacks: a field of :class:`LayerStats` (or
    :class:`ActivationStats`) declared with ``stat(...)`` metadata.

    Attributes:
        name: the field's name, also the statistic's name in every file and logger
            (``gradsentry/<name>/<layer>``, the CSV column).
        description: what it measures, in a few words.
        unit: its unit or range (``"gradient units"``, ``"fraction in [0, 1]"``, ``"count"``).
        needs_grad: True when the figure comes from the gradient: a layer without one
            (``has_grad=False``, frozen or unused) has no value, and sinks and callbacks leave it out.
        kind: how a file's value is read: ``"float"`` (missing reads 0.0), ``"optional"`` (missing or
            null reads None) or ``"count"`` (an integer, missing reads 0).
        required: a record without it is malformed (:class:`RecordError`).
    """

    name: str
    description: str
    unit: str
    needs_grad: bool
    kind: Literal["float", "optional", "count"]
    required: bool = False


def stat(description: str, unit: str, *, needs_grad: bool = False, required: bool = False) -> dict[str, Any]:
    """The ``field(metadata=...)`` that declares a dataclass field a statistic (see :class:`StatDef`)."""
    return {_STAT: (description, unit, needs_grad, required)}


_KINDS: dict[str, Literal["float", "optional", "count"]] = {
    "float": "float",
    "float | None": "optional",
    "int": "count",
}


def stats_of(cls: type) -> tuple[StatDef, ...]:
    """The statistics declared on the dataclass ``cls``, in field order.

    Raises:
        TypeError: a statistic's annotation is not ``float``, ``float | None`` or ``int``.
    """
    out = []
    for f in fields(cls):
        if _STAT not in f.metadata:
            continue
        description, unit, needs_grad, required = f.metadata[_STAT]
        kind = _KINDS.get(str(f.type))
        if kind is None:
            raise TypeError(
                f"{cls.__name__}.{f.name}: a statistic is float, float | None or int, not {f.type}"
            )
        out.append(StatDef(f.name, description, unit, needs_grad, kind, required))
    return tuple(out)


def read_stat(s: StatDef, d: Mapping[str, Any]) -> Any:
    """The value of statistic ``s`` in the decoded record ``d``, read as its ``kind`` says.

    Raises:
        KeyError: a required statistic is missing.
        RecordError: the value is not a number.
    """
    if s.kind == "count":
        return int(d.get(s.name, 0))
    value = num(d[s.name] if s.required else d.get(s.name))
    return value if s.kind == "optional" else (value or 0.0)
