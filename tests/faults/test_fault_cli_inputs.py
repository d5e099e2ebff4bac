"""Bad inputs the hostile tester gave the CLI: each must exit 2 with one clear line, no traceback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gradsentry.cli import main

pytestmark = pytest.mark.faults

DEEP = "[" * 100_000 + "]" * 100_000
HEADER = '{"gradsentry":1,"kind":"header","layers":[],"meta":{}}\n'


def _one_line_exit_2(argv: list[str], capsys, expect: str) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and expect in err, err
    assert len(err) < 400, err
    return err


def _files(tmp: Path) -> dict[str, Path]:
    files = {
        "jsonl_step": (
            tmp / "deep.jsonl",
            HEADER + '{"kind":"step","step":0,"global_norm":1,"x":' + DEEP + "}\n",
        ),
        "jsonl_header": (tmp / "hdr.jsonl", '{"gradsentry":1,"kind":"header","meta":' + DEEP + "}\n"),
        "hf_state": (tmp / "trainer_state.json", '{"log_history":' + DEEP + "}"),
        "mmengine": (tmp / "scalars.json", '{"step": 1, "loss": ' + DEEP + "}\n"),
        "lab_results": (tmp / "results.json", DEEP),
    }
    for path, text in files.values():
        path.write_text(text)
    return {k: p for k, (p, _) in files.items()}


@pytest.mark.parametrize(
    ("command", "which"),
    [
        ("analyze", "jsonl_step"),
        ("analyze", "jsonl_header"),
        ("analyze", "hf_state"),
        ("analyze", "mmengine"),
        ("report", "jsonl_step"),
        ("report", "jsonl_header"),
        ("report", "lab_results"),
    ],
)
def test_deeply_nested_json_is_bad_input(tmp_path: Path, capsys, command: str, which: str) -> None:
    path = _files(tmp_path)[which]
    _one_line_exit_2([command, str(path)], capsys, "nested too deeply")


def test_a_csv_cell_over_the_field_size_limit_is_bad_input(tmp_path: Path, capsys) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text("step,train_loss\n0,1.0\n1," + "9" * 200_000 + "\n2,0.5\n")
    _one_line_exit_2(["analyze", str(path)], capsys, "field larger than field limit")


@pytest.mark.parametrize("command", ["analyze", "report"])
def test_a_symlink_loop_is_bad_input(tmp_path: Path, capsys, command: str) -> None:
    (tmp_path / "a.jsonl").symlink_to(tmp_path / "b.jsonl")
    (tmp_path / "b.jsonl").symlink_to(tmp_path / "a.jsonl")
    err = _one_line_exit_2([command, str(tmp_path / "a.jsonl")], capsys, "a.jsonl")
    assert "loop" in err


@pytest.mark.parametrize("command", ["analyze", "report"])
def test_a_5000_character_file_name_is_bad_input(tmp_path: Path, capsys, command: str) -> None:
    err = _one_line_exit_2([command, str(tmp_path / ("x" * 5000 + ".jsonl"))], capsys, "too long")
    assert "characters)" in err  # the name is shortened in the message


@pytest.mark.skipif(
    os.geteuid() == 0, reason="running as root: chmod cannot deny root a read, no error to see"
)
@pytest.mark.parametrize("command", ["analyze", "report"])
def test_a_file_inside_an_unreadable_directory_is_bad_input(tmp_path: Path, capsys, command: str) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "run.jsonl").write_text(HEADER)
    locked.chmod(0)
    try:
        _one_line_exit_2([command, str(locked / "run.jsonl")], capsys, "ermission")
    finally:
        locked.chmod(0o755)
