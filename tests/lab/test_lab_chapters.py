"""The lab's chapters beyond MLPs (issue 17): each quick chapter's claims hold on two seeds."""

from __future__ import annotations

import math

import pytest

from gradsentry import read_jsonl
from gradsentry.lab import LabConfig, read_results, run_lab, write_outputs
from gradsentry.lab.chapters import CHAPTERS, run_chapter

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.mark.parametrize("seed", [0, 1])
def test_rnn_claims(seed: int) -> None:
    c = run_chapter("rnn", quick=True, seed=seed)["claims"]
    assert c["vanishing_holds"] and c["tanh_early_late_ratio_init"] < 0.05  # dL/dh_1 << dL/dh_T
    assert c["tanh_orthogonal_holds"] and c["irnn_holds"]
    assert c["exploding_max_global_norm"] > 1e5  # W_hh = 2I: gradient norm spikes
    assert c["exploding_clip_finite"] and c["exploding_zclip_finite"]
    assert c["clip_holds"] and c["exploding_clip_test_accuracy"] > c["exploding_test_accuracy"] + 0.2


@pytest.mark.parametrize("seed", [0, 1])
def test_cnn_claims(seed: int) -> None:
    c = run_chapter("cnn", quick=True, seed=seed)["claims"]
    assert c["plain_vanishing_holds"]
    assert c["residual_beats_plain_holds"] and c["batchnorm_beats_plain_holds"]
    assert c["plain_test_accuracy"] < 0.15


@pytest.mark.parametrize("seed", [0, 1])
def test_attention_claims(seed: int) -> None:
    d = run_chapter("attention", quick=True, seed=seed)
    c = d["claims"]
    assert c["pre_ln_trains_better_holds"]
    assert c["pre_ln_final_loss"] < c["post_ln_final_loss"]
    # post-LN's gradients are largest near the output, pre-LN's are not (Xiong et al. 2020)
    assert c["post_ln_last_first_ratio_init"] > c["pre_ln_last_first_ratio_init"]
    # out_proj of nn.MultiheadAttention is counted in the block norms
    assert all(math.isfinite(v) and v > 0 for v in d["runs"]["pre_ln"]["block_grad_init"])


def test_rnn_records_each_time_step() -> None:
    import torch

    from gradsentry import Monitor
    from gradsentry.lab.chapters.rnn import SeqRNN

    m = SeqRNN(hidden=8)
    m.h_grads = [0.0] * 8
    with Monitor(m) as mon:
        torch.nn.functional.cross_entropy(m(torch.rand(4, 8, 8)), torch.zeros(4, dtype=torch.long)).backward()
        rec = mon.step()
    assert all(g > 0 for g in m.h_grads)
    assert rec is not None
    assert {a.name for a in rec.activations} >= {f"acts.{t}" for t in range(8)}


def test_chapters_in_results_and_report(tmp_path) -> None:
    cfg = LabConfig.quick(chapters=("rnn",))
    r = run_lab(cfg)
    assert r.runs == [] and set(r.chapters) == {"rnn"}
    paths = write_outputs(r, tmp_path)
    back = read_results(paths["results"])
    assert back.chapters["rnn"]["claims"] == pytest.approx(r.chapters["rnn"]["claims"], nan_ok=True)
    html = paths["report"].read_text()
    assert "fig-rnn-time" in html and "fig-rnn-exploding" in html and "Pascanu" in html


def test_chapter_names_and_validation() -> None:
    from gradsentry.cli.lab import CHAPTER_NAMES

    assert CHAPTER_NAMES == CHAPTERS
    with pytest.raises(ValueError, match="chapters"):
        LabConfig(chapters=("bogus",)).validate()


def test_cli_prints_a_table_per_chapter(tmp_path) -> None:
    import contextlib
    import io

    from gradsentry.cli import main

    capture = io.StringIO()
    with contextlib.redirect_stdout(capture):
        code = main(["lab", "--quick", "--chapters", "cnn", "--out", str(tmp_path / "lab")])
    assert code == 0
    printed = capture.getvalue()
    runs = read_results(tmp_path / "lab" / "results.json").chapters["cnn"]["runs"]
    assert "chapter cnn" in printed
    for name, run in runs.items():  # every variant's row with the accuracy results.json holds
        line = next(ln for ln in printed.splitlines() if run["title"] in ln and "%" in ln)
        assert f"{100 * run['test_accuracy']:.1f}%" in line
        # each run's Monitor records, next to results.json, with the schedule in the header
        assert run["jsonl"] == f"runs/cnn/{name}.jsonl"
        header = read_jsonl(tmp_path / "lab" / run["jsonl"]).header
        assert header.meta["schedule"] == run["schedule"] and header.meta["chapter"] == "cnn"
