"""The layout's floors: a per-layer statistic is one definition (README's example flows everywhere), and
no library module imports the package's top level (``gradsentry/__init__.py``) except the CLI."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "gradsentry"
README = ROOT / "README.md"
CONTEXT = "     has_grad: bool = True"


def _readme_definition() -> tuple[str, str]:
    """The statistic README's "Adding a per-layer statistic" diff adds to ``records.py``: (name, its lines)."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### Adding a per-layer statistic") :]
    diff = re.search(r"```diff\n(.*?)```", section, re.S)
    assert diff is not None, "README's section has no diff block"
    lines = diff.group(1).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("--- a/src/gradsentry/records.py"))
    assert lines[start + 1] == CONTEXT, "the records.py part must start at LayerStats' has_grad line"
    added = []
    for line in lines[start + 2 :]:
        if not line.startswith("+"):
            break
        added.append(line[1:])
    name = re.match(r"\s+(\w+):", added[0])
    assert name is not None, added
    return name.group(1), "\n".join(added) + "\n"


FLOW = """
import csv, json, sys, types
from pathlib import Path

name, added, path = sys.argv[1], sys.argv[2], Path(sys.argv[3])
source = path.read_text(encoding="utf-8")
anchor = "    has_grad: bool = True\\n"
assert source.count(anchor) == 1
module = types.ModuleType("gradsentry.records")
module.__file__ = str(path)
sys.modules["gradsentry.records"] = module
exec(compile(source.replace(anchor, anchor + added), str(path), "exec"), module.__dict__)

from gradsentry.records import LAYER_STATS, LayerStats, StepRecord, RunHeader
from gradsentry.sinks.csv import CSV_COLUMNS, CsvSink
from gradsentry.sinks.tensorboard import LAYER_STATS as TB_STATS, custom_scalars_layout, record_scalars
from gradsentry.integrations._common import LOG_STATS, check_log_stats, record_metrics

stat = LAYER_STATS[-1]
live = LayerStats("fc", 0, 4, 2.0, 1.0, 1.5, 0, 3.0, None, True, **{name: 0.25})
frozen = LayerStats("emb", 1, 0, 0.0, 0.0, 0.0, 0, 1.0, None, False, **{name: 0.5})
rec = StepRecord(step=7, global_norm=2.0, layers=[live, frozen])
sink = CsvSink(Path(sys.argv[4]))
sink.open(RunHeader())
sink.write(rec)
sink.close()
rows = list(csv.DictReader(Path(sys.argv[4]).open()))
layout = custom_scalars_layout("gradsentry")["gradsentry per layer"]
check_log_stats([name])
print(json.dumps({
    "stat": [stat.name, stat.needs_grad],
    "csv": list(CSV_COLUMNS),
    "csv_cell": rows[0][name],
    "tb_stats": list(TB_STATS),
    "tags": dict(record_scalars(rec, "gradsentry")),
    "layout": name in layout,
    "log_stats": list(LOG_STATS),
    "keys": record_metrics(rec, [name]),
    "jsonl": getattr(LayerStats.from_dict(json.loads(json.dumps(live.to_dict()))), name),
    "old_file": getattr(LayerStats.from_dict({"name": "fc", "grad_norm": 1.0}), name),
}))
"""


def test_readme_statistic_flows_to_csv_tensorboard_callbacks_and_jsonl(tmp_path: Path) -> None:
    """Applying README's one-definition diff to ``records.py`` (and nothing else) is enough for the new
    statistic to appear in every writer; a frozen layer gets no value of a ``needs_grad`` statistic."""
    name, added = _readme_definition()
    proc = subprocess.run(
        [sys.executable, "-c", FLOW, name, added, str(SRC / "records.py"), str(tmp_path / "run.csv")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["stat"] == [name, True]
    assert got["csv"].index(name) == got["csv"].index("update_ratio") + 1 < got["csv"].index("global_norm")
    assert float(got["csv_cell"]) == 0.25
    assert got["tb_stats"][-1] == name and got["layout"]
    assert got["tags"][f"gradsentry/{name}/fc"] == 0.25 and f"gradsentry/{name}/emb" not in got["tags"]
    assert got["log_stats"][-1] == name and got["keys"] == {
        "gradsentry/global_norm": 2.0,
        f"gradsentry/{name}/fc": 0.25,
    }
    assert got["jsonl"] == 0.25 and got["old_file"] is None


def test_statistics_are_derived_from_one_list() -> None:
    from gradsentry import records
    from gradsentry.integrations._common import LOG_STATS
    from gradsentry.sinks import csv, tensorboard

    names = tuple(s.name for s in records.LAYER_STATS)
    assert names == ("grad_norm", "grad_rms", "grad_max_abs", "nonfinite", "weight_norm", "update_ratio")
    assert tensorboard.LAYER_STATS == LOG_STATS == names
    assert ("step", "layer", "depth", *names, "global_norm", "loss", "lr", "has_grad") == csv.CSV_COLUMNS
    assert [s.name for s in records.LAYER_STATS if not s.needs_grad] == ["weight_norm", "update_ratio"]
    assert tensorboard.ACTIVATION_STATS == ("pre_mean", "pre_std", "saturated_frac", "dead_frac")
    assert all(s.description and s.unit for s in records.LAYER_STATS + records.ACTIVATION_STATS)


def test_tensorboard_and_callbacks_agree_on_frozen_layers() -> None:
    """A layer without a gradient gets no gradient statistic (``nonfinite`` included) from either."""
    from gradsentry.integrations._common import LOG_STATS, record_metrics
    from gradsentry.records import LayerStats, StepRecord
    from gradsentry.sinks.tensorboard import record_scalars

    frozen = LayerStats("emb", 0, 0, 0.0, 0.0, 0.0, 0, 1.0, None, False)
    rec = StepRecord(step=0, global_norm=1.0, layers=[frozen])
    tb = {k: v for k, v in record_scalars(rec, "gradsentry") if k != "gradsentry/global_norm"}
    keys = record_metrics(rec, LOG_STATS)
    assert keys.pop("gradsentry/global_norm") == 1.0 and keys == tb
    assert set(tb) == {"gradsentry/weight_norm/emb"}


def test_a_statistic_of_another_type_is_refused() -> None:
    from dataclasses import dataclass, field

    from gradsentry.records import stat, stats_of

    @dataclass
    class Bad:
        x: str = field(default="", metadata=stat("text", "none"))

    with pytest.raises(TypeError, match=r"Bad.x: a statistic is float, float \| None or int, not str"):
        stats_of(Bad)


# --- no module imports the top level -------------------------------------------------------------------


def _submodules() -> set[str]:
    return {p.stem for p in SRC.glob("*.py")} | {
        p.name for p in SRC.iterdir() if (p / "__init__.py").is_file()
    }


def _top_level_imports(path: Path, submodules: set[str]) -> list[str]:
    """``import gradsentry`` and ``from gradsentry import <name>`` where the name is not a submodule (so it
    comes from ``gradsentry/__init__.py``); ``diagnose`` is the top level's function, not the module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names if a.name == "gradsentry"]
        elif isinstance(node, ast.ImportFrom) and node.module == "gradsentry" and node.level == 0:
            found += [
                f"line {node.lineno}: from gradsentry import {a.name}"
                for a in node.names
                if a.name not in submodules or a.name == "diagnose"
            ]
    return found


# Known exceptions, each owned elsewhere: remove a line when its module is fixed.
KNOWN: set[str] = set()


def test_no_library_module_imports_the_top_level() -> None:
    submodules = _submodules()
    bad = {}
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel == "__init__.py" or rel.startswith("cli/") or rel in KNOWN:
            continue
        found = _top_level_imports(path, submodules)
        if found:
            bad[rel] = found
    assert not bad, f"library modules importing gradsentry/__init__.py (only cli/ may): {bad}"


def test_the_floor_check_sees_a_top_level_import(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        textwrap.dedent(
            """
            import gradsentry
            from gradsentry import _dist, records
            from gradsentry import Monitor, diagnose

            def f():
                from gradsentry import __version__
            """
        )
    )
    found = _top_level_imports(probe, _submodules())
    assert [f.split(": ", 1)[1] for f in found] == [
        "import gradsentry",
        "from gradsentry import Monitor",
        "from gradsentry import diagnose",
        "from gradsentry import __version__",
    ]


def test_library_modules_import_without_the_top_level() -> None:
    """Every module outside cli/ imports with ``gradsentry/__init__.py`` replaced by an empty package, so
    none needs a name defined there (the same check as the ast one, at run time, for module-level code)."""
    code = textwrap.dedent(
        f"""
        import importlib, pkgutil, sys, types
        pkg = types.ModuleType("gradsentry")
        pkg.__path__ = [{str(SRC)!r}]
        sys.modules["gradsentry"] = pkg
        skip = ("gradsentry.cli", "gradsentry.__main__")  # the CLI may use the top level
        failed = []
        for info in pkgutil.walk_packages(pkg.__path__, "gradsentry."):
            if info.name.startswith(skip):
                continue
            try:
                importlib.import_module(info.name)
            except ImportError as exc:
                failed.append(f"{{info.name}}: {{exc}}")
        print("FAILED", failed)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "FAILED []"


MAX_MODULE_LINES = 500


def test_no_module_is_over_500_lines() -> None:
    """Issue 15's floor: small modules with one job each (split a module before it passes 500 lines)."""
    sizes = {
        str(p.relative_to(SRC)): len(p.read_text(encoding="utf-8").splitlines()) for p in SRC.rglob("*.py")
    }
    assert len(sizes) > 50, "the package's modules were not found"
    over = {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES}
    assert not over, f"modules over {MAX_MODULE_LINES} lines: {over}"
