"""Trust benchmark: gradsentry's verdicts on a labeled corpus of real training logs.

Reads ``benchmarks/verdicts/labels.tsv`` (made with ``benchmarks/verdicts/make_corpus.py``), runs
``gradsentry analyze``'s logic (:func:`gradsentry.analyze.analyze_log`, in process) on every run, and
for the gradsentry JSONL runs also the Monitor's own verdict
(``gradsentry.diagnose(read_jsonl(path).records, layers=header.layers)``). Prints, per format and per
expected kind: runs, logs read, exit code correct, kind correct (the expected kind among the findings of
severity warning or error), first bad step within tolerance, false alarms on the healthy controls.

Exit code of a run: 0 when the analysis is healthy, 1 when it has a problem finding, 2 when the log could
not be read (``LogFormatError`` or any other exception), as ``gradsentry analyze`` does.

Floors (issue 12): recall >= 95 % (problem runs flagged with the right kind), 0 false alarms on the
healthy controls, every file read; the Monitor's verdict on the JSONL runs meets the same floors. The
script exits 0 when every floor is met, else 1.

Usage::

    PYTHONPATH=src python benchmarks/verdicts.py [--format FMT] [--kind KIND] [--verbose] [--json OUT]
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import logging
import math
import sys
import time
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent / "verdicts"
LABELS = HERE / "labels.tsv"
RUNS = HERE / "runs"

RECALL_FLOOR = 0.95
FALSE_ALARM_FLOOR = 0

KIND_ALIASES: dict[str, frozenset[str]] = {
    "exploding": frozenset({"exploding", "loss_divergence"}),
    "nonfinite": frozenset({"nonfinite", "hidden_nonfinite"}),
    "vanishing": frozenset({"vanishing"}),
    "zero_grad_norm": frozenset({"zero_grad_norm"}),
    "skipped_steps": frozenset({"skipped_steps"}),
}
"""Finding kinds that count as naming a label's kind. ``loss_divergence`` is the loss side of an
exploding run (issue 12: "divergence in the first logged points is exploding/divergence");
``hidden_nonfinite`` is a NaN that the HF Trainer logged as loss 0.0."""

PROBLEM_SEVERITIES = frozenset({"warning", "error"})


@dataclass
class Label:
    run: str
    format: str
    path: str
    expected_exit: int
    kind: str
    first_bad_step: int | None
    cause: str


@dataclass
class Verdict:
    """What one engine (``analyze`` or ``monitor``) said about one run, scored against its label."""

    run: str
    engine: str
    format: str
    kind: str
    expected_exit: int
    exit: int
    read_ok: bool
    found: list[tuple[str, str, int | None]] = field(default_factory=list)  # (kind, severity, first step)
    kind_ok: bool = False
    step: int | None = None
    step_ok: bool = False
    tolerance: float = 0.0
    error: str = ""

    @property
    def problem(self) -> bool:
        return self.expected_exit == 1

    @property
    def exit_ok(self) -> bool:
        return self.exit == self.expected_exit

    @property
    def false_alarm(self) -> bool:
        return not self.problem and self.exit == 1

    @property
    def recalled(self) -> bool:
        return self.problem and self.exit == 1 and self.kind_ok


def read_labels(path: Path = LABELS) -> list[Label]:
    with path.open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    return [
        Label(
            run=r["run"],
            format=r["format"],
            path=r["path"],
            expected_exit=int(r["expected_exit"]),
            kind=r["kind"],
            first_bad_step=None if r["first_bad_step"] in ("-", "") else int(r["first_bad_step"]),
            cause=r["cause"],
        )
        for r in rows
    ]


def tolerance(steps: list[int]) -> float:
    """Allowed distance of a reported first step: max(2 logged intervals, 10 % of the run's steps)."""
    if len(steps) < 2:
        return 2.0
    gaps = sorted(b - a for a, b in itertools.pairwise(steps))
    return max(2.0 * gaps[len(gaps) // 2], 0.1 * (steps[-1] - steps[0]))


def score(label: Label, v: Verdict, findings: Iterable[Any], steps: list[int]) -> Verdict:
    """Fill the kind and step fields of ``v`` from the problem findings."""
    problems = [f for f in findings if f.severity in PROBLEM_SEVERITIES]
    v.found = [(f.kind, f.severity, f.steps[0] if f.steps else None) for f in problems]
    if label.kind == "healthy":
        return v
    names = KIND_ALIASES.get(label.kind, frozenset({label.kind}))
    matching = [f for f in problems if f.kind in names]
    v.kind_ok = bool(matching)
    v.tolerance = tolerance(steps)
    first = [f.steps[0] for f in matching if f.steps]
    if first:
        v.step = min(first)
        v.step_ok = label.first_bad_step is not None and abs(v.step - label.first_bad_step) <= v.tolerance
    return v


def run_analyze(label: Label) -> Verdict:
    from gradsentry.analyze import analyze_log
    from gradsentry.logs.run_jsonl import LogFormatError

    v = Verdict(label.run, "analyze", label.format, label.kind, label.expected_exit, exit=2, read_ok=False)
    try:
        res = analyze_log(RUNS / label.path)
    except LogFormatError as exc:
        v.error = f"LogFormatError: {exc}"
        return v
    except Exception as exc:  # a crash is unreadable too (exit 2), named as such
        v.error = f"crash {type(exc).__name__}: {exc}"
        return v
    v.read_ok = True
    v.exit = 0 if res.healthy else 1
    return score(label, v, res.findings, list(res.series.steps))


def run_monitor(label: Label) -> Verdict:
    """The Monitor's own verdict on a JSONL run: diagnose(records, layers=header.layers)."""
    from gradsentry import diagnose, read_jsonl

    v = Verdict(label.run, "monitor", label.format, label.kind, label.expected_exit, exit=2, read_ok=False)
    try:
        run = read_jsonl(RUNS / label.path)
        findings = diagnose(run.records, layers=run.header.layers)
    except Exception as exc:
        v.error = f"{type(exc).__name__}: {exc}"
        return v
    v.read_ok = True
    problems = [f for f in findings if f.severity in PROBLEM_SEVERITIES]
    v.exit = 1 if problems else 0
    return score(label, v, findings, sorted(r.step for r in run.records))


# ----------------------------------------------------------------------------- tables


def _pct(a: int, b: int) -> str:
    return f"{a}/{b} ({100 * a / b:.0f} %)" if b else "-"


def summary_row(name: str, vs: list[Verdict]) -> list[str]:
    prob = [v for v in vs if v.problem]
    healthy = [v for v in vs if not v.problem]
    kind_ok = [v for v in prob if v.recalled]
    return [
        name,
        str(len(vs)),
        _pct(sum(v.read_ok for v in vs), len(vs)),
        _pct(sum(v.exit_ok for v in vs), len(vs)),
        _pct(len(kind_ok), len(prob)),
        _pct(sum(v.step_ok for v in kind_ok), len(kind_ok)),
        f"{sum(v.false_alarm for v in healthy)}/{len(healthy)}" if healthy else "-",
    ]


HEADER = ["", "runs", "read OK", "exit correct", "recall (kind correct)", "first step OK", "false alarms"]


def table(title: str, rows: list[list[str]]) -> str:
    head = [title, *HEADER[1:]]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(HEADER))]

    def line(r: list[str]) -> str:
        return (
            "| "
            + " | ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
            + " |"
        )

    sep = "| " + " | ".join("-" * w if i == 0 else "-" * (w - 1) + ":" for i, w in enumerate(widths)) + " |"
    return "\n".join([line(head), sep, *(line(r) for r in rows)])


def group_table(title: str, vs: list[Verdict], key: str) -> str:
    groups: dict[str, list[Verdict]] = {}
    for v in vs:
        groups.setdefault(getattr(v, key), []).append(v)
    rows = [summary_row(k, groups[k]) for k in sorted(groups)]
    rows.append(summary_row("all", vs))
    return table(title, rows)


def floors(vs: list[Verdict]) -> tuple[bool, str]:
    prob = [v for v in vs if v.problem]
    healthy = [v for v in vs if not v.problem]
    recall = sum(v.recalled for v in prob) / len(prob) if prob else 1.0
    fa = sum(v.false_alarm for v in healthy)
    unread = sum(not v.read_ok for v in vs)
    ok = recall >= RECALL_FLOOR and fa <= FALSE_ALARM_FLOOR and unread == 0
    text = (
        f"recall {100 * recall:.1f} % (floor {100 * RECALL_FLOOR:.0f} %) "
        f"{'OK' if recall >= RECALL_FLOOR else 'MISSED'}; "
        f"false alarms {fa}/{len(healthy)} (floor {FALSE_ALARM_FLOOR}) {'OK' if fa <= FALSE_ALARM_FLOOR else 'MISSED'}; "
        f"unread {unread}/{len(vs)} (floor 0) {'OK' if unread == 0 else 'MISSED'}"
    )
    return ok, text


def verbose_line(label: Label, v: Verdict) -> str:
    if not v.read_ok:
        mark = "UNREAD"
    elif v.problem:
        mark = "hit" if v.recalled else "MISS"
        if v.recalled and not v.step_ok:
            mark = "hit, step off"
    else:
        mark = "FALSE ALARM" if v.false_alarm else "ok"
    found = ", ".join(f"{k}/{s}@{st}" for k, s, st in v.found) or "no problem"
    want = f"{label.kind}@{label.first_bad_step if label.first_bad_step is not None else '-'}"
    got = v.error[:160] if not v.read_ok else found
    return f"  {v.engine:7s} {label.run:40s} want exit {label.expected_exit} {want:22s} got exit {v.exit}: {got}  [{mark}]"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="gradsentry's verdicts on the labeled corpus benchmarks/verdicts"
    )
    ap.add_argument("--format", help="only runs of this format (e.g. hf_state, jsonl, mmengine_text)")
    ap.add_argument("--kind", help="only runs of this expected kind (e.g. healthy, exploding)")
    ap.add_argument("--run", help="only runs whose name contains this text")
    ap.add_argument("--verbose", "-v", action="store_true", help="one line per run with the findings")
    ap.add_argument("--json", type=Path, help="also write every verdict to this JSON file")
    a = ap.parse_args(argv)
    labels = read_labels()
    if a.format:
        labels = [x for x in labels if x.format == a.format]
    if a.kind:
        labels = [x for x in labels if x.kind == a.kind]
    if a.run:
        labels = [x for x in labels if a.run in x.run]
    if not labels:
        print("no run matches", file=sys.stderr)
        return 2
    logging.getLogger("gradsentry").setLevel(logging.CRITICAL)  # the findings are the output
    t0 = time.perf_counter()
    analyze: list[Verdict] = []
    monitor: list[Verdict] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for label in labels:
            analyze.append(run_analyze(label))
            if label.format == "jsonl":
                monitor.append(run_monitor(label))
    elapsed = time.perf_counter() - t0
    by_run = {x.run: x for x in labels}
    if a.verbose:
        print("Per run (kind/severity@first step of each warning/error finding):")
        for v in sorted(analyze + monitor, key=lambda v: (v.run, v.engine)):
            print(verbose_line(by_run[v.run], v))
        print()
    n_prob = sum(x.expected_exit == 1 for x in labels)
    print(
        f"gradsentry verdicts on {len(labels)} labeled runs ({n_prob} problem runs, {len(labels) - n_prob} "
        f"healthy controls); analyzed in {elapsed:.1f} s\n"
    )
    print(group_table("analyze, by format", analyze, "format"))
    print()
    print(group_table("analyze, by kind", analyze, "kind"))
    print()
    ok, text = floors(analyze)
    print(f"analyze floors: {text}")
    all_ok = ok
    if monitor:
        print()
        print(group_table("Monitor diagnose (JSONL), by kind", monitor, "kind"))
        print()
        mok, mtext = floors(monitor)
        print(f"Monitor floors: {mtext}")
        all_ok = all_ok and mok
    print(f"\nfloors {'met' if all_ok else 'NOT met'}")
    if a.json:
        out = [
            {
                **asdict(v),
                "recalled": v.recalled,
                "false_alarm": v.false_alarm,
                "first_bad_step": by_run[v.run].first_bad_step,
            }
            for v in analyze + monitor
        ]
        a.json.write_text(
            json.dumps(
                out, indent=1, default=lambda x: None if isinstance(x, float) and math.isnan(x) else str(x)
            )
        )
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
