"""``gradsentry analyze``: exit codes 0/1/2, --json fields, --plot files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gradsentry.cli import main
from hf_states import N, write_state


def test_healthy_exit_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = write_state(tmp_path / "trainer_state.json")
    assert main(["analyze", str(p)]) == 0
    out = capsys.readouterr().out
    assert "healthy" in out and "grad_norm" in out
    assert main(["analyze", str(p), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["healthy"] is True and d["findings"] == [] and d["format"] == "hf"
    assert (
        d["summary"]["points"] == N and d["summary"]["first_step"] == 5 and d["summary"]["last_step"] == 5 * N
    )


def test_problem_exit_1_and_json_fields(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = write_state(tmp_path / "trainer_state.json", spike=True, nan_from=170)
    assert main(["analyze", str(p), "--json"]) == 1
    raw = capsys.readouterr().out
    d = json.loads(raw, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert d["healthy"] is False
    by_kind = {f["kind"]: f for f in d["findings"]}
    assert set(by_kind) == {"nonfinite", "hidden_nonfinite", "exploding"}
    assert by_kind["nonfinite"]["evidence"]["first_nonfinite_grad_norm_step"] == 5 * 171
    assert by_kind["nonfinite"]["evidence"]["first_nonfinite_grad_norm"] == "NaN"
    assert by_kind["exploding"]["evidence"]["largest_step"] == 5 * 121
    assert by_kind["exploding"]["evidence"]["largest_norm"] == 70.0
    assert d["summary"]["grad_norm"]["nonfinite"] == N - 170
    # the rich summary: findings table and sparklines, exit 1 too
    assert main(["analyze", str(p)]) == 1
    out = capsys.readouterr().out
    assert "hidden_nonfinite" in out and "!" in out


@pytest.mark.parametrize(
    ("content", "match"),
    [(b"", "empty file"), (b'{"a": 1}', "JSON of another shape"), (b"\x00\x01\x02\x03", "binary file")],
    ids=["empty", "other-json", "binary"],
)
def test_unreadable_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, match: str
) -> None:
    p = tmp_path / "log.json"
    p.write_bytes(content)
    assert main(["analyze", str(p)]) == 2
    err = capsys.readouterr().err
    assert match in err and "expected" in err


def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", str(tmp_path / "missing.json")]) == 2
    assert "no such file" in capsys.readouterr().err
    p = write_state(tmp_path / "trainer_state.json")
    assert main(["analyze", str(p), "--format", "wandb"]) == 2
    assert "--format must be one of" in capsys.readouterr().err
    assert main(["analyze", str(p), "--plot", str(tmp_path / "x.pdf")]) == 2
    assert "--plot file must end in" in capsys.readouterr().err
    empty = tmp_path / "emptydir"
    empty.mkdir()
    assert main(["analyze", str(empty)]) == 2
    assert "directory without a log" in capsys.readouterr().err


def test_tags_and_format_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "metrics.csv"
    rows = ["step,my_loss,my_gn"] + [f"{i},{2.0 - i / 100},{1.0 + 0.01 * (i % 3)}" for i in range(100)]
    p.write_text("\n".join(rows) + "\n")
    assert (
        main(["analyze", str(p), "--format", "csv", "--loss-tag", "my_loss", "--grad-tag", "my_gn", "--json"])
        == 0
    )
    d = json.loads(capsys.readouterr().out)
    assert d["fields"] == {"loss": "my_loss", "grad_norm": "my_gn"}
    assert main(["analyze", str(p), "--grad-tag", "nope"]) == 2
    assert "no grad_norm column named 'nope'" in capsys.readouterr().err
    # without a gradient norm: an info finding only, exit 0
    assert main(["analyze", str(p), "--loss-tag", "my_loss", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert [f["kind"] for f in d["findings"]] == ["no_grad_norm"]


@pytest.mark.parametrize("suffix", [".png", ".svg", ".html"])
def test_plot_files(tmp_path: Path, suffix: str, capsys: pytest.CaptureFixture[str]) -> None:
    p = write_state(tmp_path / "run<b>.json", spike=True)
    out = tmp_path / f"plot{suffix}"
    assert main(["analyze", str(p), "--plot", str(out)]) == 1
    data = out.read_bytes()
    if suffix == ".png":
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
    elif suffix == ".svg":
        assert b"<svg" in data[:2000]
    else:
        text = data.decode()
        assert text.startswith("<!doctype html>") and "<svg" in text
        assert "run&lt;b&gt;.json" in text and "run<b>.json" not in text


def test_one_remedy_is_listed_once_even_when_tailored_per_finding() -> None:
    """Two exploding findings at steps with different learning rates used to list 'Lower the learning
    rate' twice (the recorded rate differs); the first finding's text is kept."""
    from rich.console import Console

    from gradsentry.cli.render import findings_view
    from gradsentry.diagnosis.advice import RemedyContext, remedies_for
    from gradsentry.records import Finding

    findings = [
        Finding(
            "exploding",
            "error",
            [i],
            [],
            {},
            "x",
            remedies_for("exploding", RemedyContext(lr=lr, early=True)),
        )
        for i, lr in enumerate((0.01, 0.0095))
    ]
    console = Console(width=200, record=True)
    console.print(findings_view(findings))
    text = console.export_text()
    assert text.count("Lower the learning rate") == 1, text
    assert "was 0.01;" in text
