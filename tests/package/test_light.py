"""A light core: what ``import gradsentry`` and the CLI load, and the one-line error of a missing extra.

Each check runs in a fresh interpreter (a subprocess), the only place where ``sys.modules`` tells what an
import loaded. A missing extra is made real with a meta path finder, installed through a
``sitecustomize`` module on ``PYTHONPATH``, that raises ``ModuleNotFoundError`` for the blocked top-level
modules, as Python does for a package that is not installed. Import times are measured in
``benchmarks/import_time.py``, not here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from gradsentry._extras import DISTRIBUTIONS, EXTRAS, MissingExtraError, require, requires_extra
from hf_states import write_state

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
TARGETS = Path(__file__).resolve().parents[1] / "check_targets.py"
OPTIONAL = ("matplotlib", "jinja2", "sklearn", "scipy", "tensorboard")

BLOCKER = '''
import os
import sys

_BLOCKED = frozenset(filter(None, os.environ.get("GRADSENTRY_TEST_BLOCK", "").split(",")))


class _NotInstalled:
    """Finds nothing for the blocked packages: the import fails as for a package not installed."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.partition(".")[0] in _BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


if _BLOCKED:
    sys.meta_path.insert(0, _NotInstalled())
'''

LOADED = "import json, sys; print(json.dumps(sorted({m.partition('.')[0] for m in sys.modules})))"


def run_python(code: str, tmp_path: Path, block: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter on this checkout's sources, with ``block`` not importable."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), str(SRC)]),
        "GRADSENTRY_TEST_BLOCK": ",".join(block),
        "MPLBACKEND": "Agg",
    }
    return subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )


def run_cli(args: list[str], tmp_path: Path, block: tuple[str, ...] = ()) -> tuple[int, str, set[str]]:
    """``gradsentry ARGS`` in a fresh interpreter: exit code, stderr and the top-level modules it loaded."""
    code = (
        "import json, sys\nfrom gradsentry.cli import main\n"
        f"rc = main({args!r})\n"
        "sys.stdout.flush()\n"
        "print('\\nLOADED ' + json.dumps(sorted({m.partition('.')[0] for m in sys.modules})))\n"
        "sys.exit(rc)"
    )
    proc = run_python(code, tmp_path, block)
    last = proc.stdout.rstrip().rsplit("\n", 1)[-1]
    assert last.startswith("LOADED "), (proc.stdout[-2000:], proc.stderr[-2000:])
    return proc.returncode, proc.stderr, set(json.loads(last.removeprefix("LOADED ")))


# ------------------------------------------------------------------------------------------ packaging
def test_core_dependencies_and_extras_match_the_error_table() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(reqs: list[str]) -> set[str]:
        return {r.split(";")[0].split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip() for r in reqs}

    assert names(project["dependencies"]) == {"torch", "numpy", "rich", "typer"}
    extras = project["optional-dependencies"]
    for extra, modules in EXTRAS.items():
        assert names(extras[extra]) == {DISTRIBUTIONS.get(m, m) for m in modules}, extra
    assert set(EXTRAS["report"]) < set(EXTRAS["lab"])
    # dev pulls every extra (CI installs '.[dev]' only) and all pulls every runtime extra
    assert "gradsentry[all]" in extras["dev"]
    (ref,) = extras["all"]
    named = ref.removeprefix("gradsentry[").removesuffix("]").split(",")
    in_all = set().union(*(names(extras[e]) for e in named))
    for extra in set(extras) - {"all", "dev"}:
        assert names(extras[extra]) <= in_all, extra
    assert "scipy" not in names(project["dependencies"])


# -------------------------------------------------------------------------------------- what loads
def test_import_gradsentry_loads_no_torch_numpy_or_extras(tmp_path: Path) -> None:
    proc = run_python(f"import gradsentry\n{LOADED}", tmp_path)
    loaded = set(json.loads(proc.stdout))
    assert "gradsentry" in loaded
    assert not loaded & {"torch", "numpy", *OPTIONAL}, loaded & {"torch", "numpy", *OPTIONAL}


def test_diagnose_stays_the_function_after_its_submodule_is_imported(tmp_path: Path) -> None:
    code = (
        "import gradsentry as gs, gradsentry.diagnose, sys\n"
        "from gradsentry.diagnose import Thresholds\n"
        "assert callable(gs.diagnose) and gs.diagnose([]) == [], gs.diagnose\n"
        "assert gs.Thresholds is Thresholds\n"
        "assert type(sys.modules['gradsentry.diagnose']).__name__ == 'module'\n"
        "print('ok')"
    )
    proc = run_python(code, tmp_path)
    assert proc.stdout.strip() == "ok", proc.stderr[-2000:]


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["-h"], ["analyze", "--help"], ["lab", "-h"]])
def test_version_and_help_import_neither_torch_nor_numpy(tmp_path: Path, args: list[str]) -> None:
    code, err, loaded = run_cli(args, tmp_path)
    assert code == 0, err
    assert not loaded & {"torch", "numpy", *OPTIONAL}, loaded & {"torch", "numpy", *OPTIONAL}


def test_analyze_without_plot_does_not_import_matplotlib(tmp_path: Path) -> None:
    log = write_state(tmp_path / "trainer_state.json", spike=True)
    code, err, loaded = run_cli(["analyze", str(log)], tmp_path)
    assert code == 1, err  # the spike is found
    assert "numpy" in loaded and not loaded & {"torch", *OPTIONAL}
    # the same run with --plot does import it: the check above can see matplotlib
    code, err, loaded = run_cli(["analyze", str(log), "--plot", str(tmp_path / "run.svg")], tmp_path)
    assert code == 1, err
    assert "matplotlib" in loaded and (tmp_path / "run.svg").stat().st_size > 0


# ------------------------------------------------------------------------------- missing extras
MISSING = [
    (  # a core-only install: README's example
        ["lab", "--quick", "--out", "lab"],
        OPTIONAL,
        "the lab needs scikit-learn: pip install 'gradsentry[lab]'",
    ),
    (
        ["lab", "--quick", "--out", "lab"],
        ("matplotlib",),
        "the lab needs matplotlib: pip install 'gradsentry[lab]'",
    ),
    (
        ["check", f"{TARGETS}:relu20_he", "--data", "digits"],
        ("sklearn",),
        "the digits batch needs scikit-learn: pip install 'gradsentry[lab]'",
    ),
    (
        ["analyze", "trainer_state.json", "--plot", "run.png"],
        ("matplotlib",),
        "plotting needs matplotlib: pip install 'gradsentry[report]'",
    ),
    (
        ["analyze", "tb"],
        ("tensorboard",),
        "reading TensorBoard logs needs tensorboard: pip install 'gradsentry[tensorboard]'",
    ),
    (["report", "run.jsonl"], ("jinja2",), "the HTML report needs jinja2: pip install 'gradsentry[report]'"),
]


@pytest.mark.parametrize(("args", "block", "line"), MISSING, ids=[f"{a[0]}-{b[0]}" for a, b, _ in MISSING])
def test_a_missing_extra_is_one_line_and_exit_2(
    tmp_path: Path, args: list[str], block: tuple[str, ...], line: str
) -> None:
    write_state(tmp_path / "trainer_state.json")
    (tmp_path / "tb").mkdir()
    (tmp_path / "tb" / "events.out.tfevents.1700000000.host.1.0").write_bytes(b"")
    (tmp_path / "run.jsonl").write_text(
        json.dumps({"type": "header", "schema_version": 1, "layers": [], "meta": {}}) + "\n"
    )
    code, err, loaded = run_cli(args, tmp_path, block)
    assert (code, err) == (2, f"error: {line}\n")
    assert not loaded & set(block)
    if args[0] == "lab":  # it stopped before training: nothing written, PyTorch's optimizers never ran
        assert not (tmp_path / "lab" / "results.json").exists()


def test_the_core_works_with_every_extra_missing(tmp_path: Path) -> None:
    """A core-only install: check a model, analyze a log, monitor a run and diagnose it."""
    code, err, loaded = run_cli(["check", f"{TARGETS}:relu20_he", "--input-shape", "64"], tmp_path, OPTIONAL)
    assert code == 0, err
    assert "torch" in loaded
    log = write_state(tmp_path / "trainer_state.json", spike=True)
    code, err, _ = run_cli(["analyze", str(log), "--json"], tmp_path, OPTIONAL)
    assert code == 1, err
    loop = (
        "import torch, gradsentry as gs\n"
        "model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Sigmoid()) "
        "for _ in range(12)])\n"
        "with gs.Monitor(model, sinks=[gs.JsonlSink('run.jsonl')]) as mon:\n"
        "    for _ in range(20):\n"
        "        model(torch.randn(8, 16)).pow(2).mean().backward(); mon.step(); model.zero_grad()\n"
        "print(sorted({f.kind for f in gs.diagnose(gs.read_jsonl('run.jsonl').records, layers=mon.layers)}))\n"
        "from gradsentry._extras import MissingExtraError\n"
        "try:\n    gs.TensorBoardSink('tb').open(mon.header)\nexcept MissingExtraError as e:\n"
        "    print(e)\n"
    )
    proc = run_python(loop, tmp_path, OPTIONAL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kinds, message = proc.stdout.strip().splitlines()
    assert "vanishing" in kinds
    assert message == "TensorBoardSink needs tensorboard: pip install 'gradsentry[tensorboard]'"


# ------------------------------------------------------------------------------------- the helper
def test_requires_extra_names_the_distribution_and_keeps_the_cause() -> None:
    with pytest.raises(MissingExtraError) as info, requires_extra("lab", "the lab"):
        import sklearn._no_such_module_for_this_test  # noqa: F401
    err = info.value
    assert str(err) == "the lab needs scikit-learn: pip install 'gradsentry[lab]'"
    assert isinstance(err, ModuleNotFoundError) and isinstance(err.__cause__, ModuleNotFoundError)
    assert (err.extra, err.distribution, err.name) == (
        "lab",
        "scikit-learn",
        "sklearn._no_such_module_for_this_test",
    )
    with pytest.raises(ValueError, match="unknown extra 'labs'; valid: report, lab, tensorboard"):
        require("labs", "the lab")
    require("report", "the HTML report")  # installed here (dev): no error


def test_run_lab_checks_its_extras_before_training(tmp_path: Path) -> None:
    code = (
        "from gradsentry.lab import LabConfig, run_lab\n"
        "from gradsentry._extras import MissingExtraError\n"
        "try:\n    run_lab(LabConfig.quick(), out_dir='lab')\nexcept MissingExtraError as e:\n"
        "    print(e)\n"
    )
    proc = run_python(code, tmp_path, ("matplotlib",))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "the lab needs matplotlib: pip install 'gradsentry[lab]'"
    assert not list(tmp_path.glob("lab/**/*.jsonl"))  # no variant was trained
