"""Console text readers on real lines (tests/fixtures/loglines, sources named in each file)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradsentry.cli import main
from gradsentry.logs import FORMATS, LogFormatError, load_series, sniff_format
from gradsentry.logs.registry import READERS, TEXT_FORMATS
from gradsentry.logs.text.engine import OVERFLOW_RE

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "loglines"
NAN = math.nan

# fixture -> (format, steps, loss, grad_norm, lr, skipped); every value as logged
EXPECTED: dict[str, tuple[str, list[int], list, list, list, list[int]]] = {
    "hf_console.log": (
        "hf-console",
        [1, 2],
        [10.5949, 0.0],
        [188.28981018066406, NAN],
        [4.5833333333333334e-05, 9.773696745450087e-06],
        [],
    ),
    "hf_deepspeed.log": ("hf-console", [1], [2.0491], [None], [0.0001961913563176343], [1]),
    "mmengine.log": ("mmengine-text", [240], [2.5128], [NAN], [1.9813e-04], []),
    "mmcv.log": ("mmengine-text", [200], [0.9186], [3.9772], [1.000e-03], []),
    "megatron_lm.log": ("megatron", [3383], [7.334521e-01], [0.752], [6.680e-06], []),
    "megatron_deepspeed.log": ("megatron", [5426], [None], [NAN], [2.999e-04], []),
    "fairseq.log": ("steps", [700], [9.44], [156.036], [0.000175], [700]),
    "fairseq_old.log": ("steps", [190], [14.351], [3.901], [4.84525e-06], [190]),
    "torchtitan.log": ("steps", [4], [7.62585], [26.6250], [None], []),
    "nanogpt.log": ("steps", [3000, 3010], [4.0390, NAN], [None, None], [None, None], []),
    "tiny_universe.log": ("steps", [100000], [NAN], [None], [0.0], []),
    "olmo.log": ("steps", [2], [1.7872662283480167e-06], [0.0002], [None], []),
    "verl.log": ("steps", [1], [None], [NAN], [None], []),  # critic nan, actor 9.819: the worst
    "metric_logger.log": ("steps", [115 * 1299 + 1298], [6.5993], [0.3922], [0.001435], []),
    "detectron2.log": ("steps", [379, 2137], [1.707, NAN], [None, None], [0.003796, None], []),
    "ignite.log": ("steps", [10], [NAN], [None], [None], []),
    "monai.log": ("steps", [33 * 2 + 1], [1.1866], [None], [None], []),
    "verse.log": ("steps", [100], [None], [NAN], [None], []),
    "lion.log": ("steps", [104], [NAN], [None], [None], []),
    "timellm.log": ("steps", [600], [NAN], [None], [None], []),
    "lightning_bar.log": ("tqdm", [4], [10.072], [None], [None], []),
    "lightning_gradnorm.log": (
        "tqdm",
        [80 * 15 + 10],
        [0.429],
        [None],
        [None],
        [],
    ),  # per-layer norms not global
    "accelerate_tqdm.log": ("tqdm", [92679], [NAN], [None], [4.99e-5], []),
    "keras.log": ("keras", [512], [NAN], [None], [None], []),
    "keras_terminate.log": ("keras", [3, 4], [44.4110, NAN], [None, None], [None, None], []),
}
UNREADABLE = ("loss_scaler.log", "not_a_training_log.log")


def same(a: list, b: list) -> bool:
    """Exact equality, NaN equal to NaN, None only to None."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if x is None or y is None:
            if x is not y:
                return False
        elif not (x == y or (math.isnan(x) and math.isnan(y))):
            return False
    return True


def test_every_fixture_is_covered_and_names_its_source() -> None:
    files = {f.name for f in FIXTURES.glob("*.log")}
    assert files == set(EXPECTED) | set(UNREADABLE)
    for f in FIXTURES.glob("*.log"):
        head = f.read_text(encoding="utf-8").splitlines()[:10]
        assert any(line.startswith("# source: https://github.com/") for line in head), f.name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_reader_on_real_lines(name: str) -> None:
    fmt, steps, loss, grad, lr, skipped = EXPECTED[name]
    path = FIXTURES / name
    assert sniff_format(path) == fmt
    for s in (load_series(path), load_series(path, format=fmt)):
        assert s.source == fmt and s.path == str(path)
        assert s.steps == steps
        assert same(s.loss, loss), s.loss
        assert same(s.grad_norm, grad), s.grad_norm
        assert same(s.lr, lr), s.lr
        assert s.skipped == skipped
        assert set(s.fields) == {
            k for k, v in (("loss", loss), ("grad_norm", grad), ("lr", lr)) if any(x is not None for x in v)
        }


def test_notes_say_how_the_lines_were_read() -> None:
    notes = {name: " ".join(load_series(FIXTURES / name).notes) for name in EXPECTED}
    assert "numbered 1, 2, ... in order" in notes["hf_console.log"]
    assert "window means" in notes["mmengine.log"] and "window means" in notes["mmcv.log"]
    assert "current value, the first number, is read" in notes["metric_logger.log"]
    assert "one line per rank" in notes["torchtitan.log"]
    assert "loss-scaler overflow" in notes["hf_deepspeed.log"]
    assert (
        "loss scaler gave up (line 6: Exception: Current loss scale already at minimum"
        in notes["hf_deepspeed.log"]
    )
    assert "Minimum loss scale reached" in notes["fairseq.log"]
    assert "Bad grad_norm detected" in notes["megatron_lm.log"]
    assert "bare 'norm' key" in notes["verse.log"]
    assert "Invalid loss" in notes["keras_terminate.log"]
    assert "Loss became infinite or NaN" in notes["detectron2.log"]
    assert load_series(FIXTURES / "verl.log").fields["grad_norm"] == "critic/grad_norm, actor/grad_norm"


@pytest.mark.parametrize("name", UNREADABLE)
def test_a_text_file_without_training_lines_names_the_formats_tried(name: str) -> None:
    with pytest.raises(LogFormatError, match=r"unrecognised text file.*Formats tried: hf-console") as err:
        load_series(FIXTURES / name)
    for fmt in TEXT_FORMATS:
        assert fmt in str(err.value)
    assert str(FIXTURES / name) in str(err.value)


def test_unknown_text_and_forced_format_errors(tmp_path: Path) -> None:
    p = tmp_path / "notes.txt"
    p.write_text("epoch 1 went fine\nthe loss looked ok, about 0.5\n")
    with pytest.raises(LogFormatError, match="unrecognised text file: none of its first 2 lines"):
        load_series(p)
    with pytest.raises(
        LogFormatError, match=r"no megatron training line .* in its 2 lines; expected lines like"
    ):
        load_series(p, format="megatron")
    with pytest.raises(LogFormatError, match="is a directory"):
        load_series(tmp_path, format="steps")
    big = tmp_path / "big.log"
    big.write_text(f"step {2**64} loss 1.0\n")
    with pytest.raises(LogFormatError, match=r"big.log:1: step 18446744073709551616 is out of range"):
        load_series(big)
    big.write_text("step 1 loss 2.0\nstep " + "9" * 5000 + " loss 1.0\n")
    with pytest.raises(LogFormatError, match=r"big.log:2: cannot read this line as steps"):
        load_series(big)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_analyze_exits_0_or_1_on_every_fixture(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", str(FIXTURES / name)]) in (0, 1)
    assert main(["analyze", str(FIXTURES / name), "--json"]) in (0, 1)
    capsys.readouterr()


def test_analyze_exits_2_on_a_text_file_without_training_lines(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", str(FIXTURES / "not_a_training_log.log")]) == 2
    err = capsys.readouterr().err
    assert "unrecognised text file" in err and "megatron" in err


def test_log_content_is_never_executed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    payload = "__import__('os').system('touch PWNED')"
    hf = tmp_path / "hf.log"
    hf.write_text(
        f"{{'loss': {payload}, 'grad_norm': 1.0, 'epoch': 0.1}}\n"
        f"{{'loss': 1.5, 'grad_norm': 2.0, 'note': \"{payload}\", 'epoch': 0.2}}\n"
    )
    s = load_series(hf)
    assert s.source == "hf-console" and s.loss == [1.5] and s.grad_norm == [2.0]
    steps = tmp_path / "steps.log"
    steps.write_text(f"step 1 loss {payload} grad_norm 3.0\nstep 2 loss=2.0 {payload}\n")
    s = load_series(steps)
    assert s.steps == [1, 2] and s.loss == [None, 2.0] and s.grad_norm == [3.0, None]
    assert not (tmp_path / "PWNED").exists()


def test_overflow_lines_of_every_loss_scaler_are_skipped_steps(tmp_path: Path) -> None:
    lines = [ln for ln in (FIXTURES / "loss_scaler.log").read_text().splitlines() if not ln.startswith("#")]
    overflow = [ln for ln in lines if OVERFLOW_RE.search(ln)]
    assert len(overflow) == len(lines) - 1  # all but DeepSpeed's "step=10, skipped=6" counter line
    # inside another format's log: at the last step read, or the next one before any step
    p = tmp_path / "run.log"
    p.write_text(
        "\n".join([overflow[0], "step 10 loss 2.0", *overflow[1:3], "step 20 loss 1.9", overflow[3], ""])
    )
    s = load_series(p)
    assert s.steps == [10, 20] and s.skipped == [10, 20]
    assert any("loss-scaler overflow lines (an optimizer step skipped): 4," in n for n in s.notes)


def test_tqdm_carriage_returns_and_deepspeed_on_one_physical_line(tmp_path: Path) -> None:
    """HF + DeepSpeed as written to a file: bar redraws joined by \\r, the overflow line after a bar."""
    real = (FIXTURES / "hf_deepspeed.log").read_text().splitlines()[3:]
    bar, ds = real[0].split("[2023-06-07", 1)
    p = tmp_path / "train.log"
    p.write_bytes(
        (
            "\r 13%|█▎        | 377/2724 [13:55:57<86:20:13, 132.45s/it]\r"
            + bar
            + "[2023-06-07"
            + ds
            + "\n\r"
            + bar
            + "\n"
            + real[1]
            + "\n\x1b[32m"
            + real[1].replace("2.0491", "nan")
            + "\x1b[0m\n"
        ).encode()
    )
    s = load_series(p)
    assert s.source == "hf-console" and s.steps == [1, 2] and s.loss[0] == 2.0491 and math.isnan(s.loss[1])
    assert s.skipped == [1]


def test_rank_lines_restarts_and_lagging_ranks(tmp_path: Path) -> None:
    line = "step:  {}  loss:  {}  grad_norm: {}"
    p = tmp_path / "titan.log"
    # one line per rank; rank 1 saw a NaN norm at step 2: the NaN is kept
    p.write_text(
        "\n".join([line.format(1, 7.0, 20.0)] * 2 + [line.format(2, 6.9, 21.0), line.format(2, 6.9, "nan")])
        + "\n"
    )
    s = load_series(p)
    assert (
        s.steps == [1, 2] and s.loss == [7.0, 6.9] and s.grad_norm[0] == 20.0 and math.isnan(s.grad_norm[1])
    )
    assert any("lines repeating a step already read: 2" in n for n in s.notes)
    # [rankN]: prefixes: only the first rank's lines are read
    p.write_text(
        "".join(f"[rank{r}]:" + line.format(st, 7.0 - st, 1.0 + r) + "\n" for st in (1, 2) for r in (0, 1))
    )
    s = load_series(p)
    assert s.steps == [1, 2] and s.grad_norm == [1.0, 1.0]
    assert any("lines of other ranks skipped: 2 (rank 0's" in n for n in s.notes)
    # a restart: the later segment wins from the step where the counter went back
    p.write_text(
        "\n".join(line.format(st, v, 1.0) for st, v in [(10, 5), (20, 4), (30, 3), (20, 9), (30, 8), (40, 7)])
    )
    s = load_series(p)
    assert s.steps == [10, 20, 30, 40] and s.loss == [5.0, 9.0, 8.0, 7.0]
    assert any("restart at line 4: step went back from 30 to 20 (2 points dropped)" in n for n in s.notes)
    # a lagging rank repeating an earlier step with the same values is not a restart
    p.write_text("\n".join(line.format(st, v, 1.0) for st, v in [(10, 5), (20, 4), (10, 5), (30, 3)]))
    s = load_series(p)
    assert s.steps == [10, 20, 30] and not any("restart" in n for n in s.notes)


def test_hf_console_steps_eval_entries_quoted_numbers_and_summary(tmp_path: Path) -> None:
    p = tmp_path / "trainer.log"
    p.write_text(
        "{'loss': '2.5', 'grad_norm': '12.0', 'learning_rate': '5e-05', 'epoch': '0.1', 'step': 10}\n"
        "{'eval_loss': 2.4, 'eval_runtime': 1.5, 'epoch': 0.1}\n"
        "{'loss': 2.25, 'grad_norm': inf, 'learning_rate': 4e-05, 'epoch': 0.2, 'step': 20}\n"
        "{'loss': 2.0, 'gradsentry/global_norm': 3.5, 'epoch': 0.3, 'step': 30}\n"
        "{'train_runtime': 100.0, 'train_loss': 2.2, 'epoch': 0.3}\n"
    )
    s = load_series(p)
    assert s.steps == [10, 20, 30] and s.loss == [2.5, 2.25, 2.0] and s.grad_norm == [12.0, math.inf, 3.5]
    assert s.fields["grad_norm"] == "grad_norm | gradsentry/global_norm"
    text = " ".join(s.notes)
    assert "evaluation entries skipped: 1" in text and "train_loss summary" in text and "numbered" not in text


def test_epoch_forms_make_steps_increase(tmp_path: Path) -> None:
    mm = tmp_path / "mm.log"
    mm.write_text(
        "Epoch(train) [1][730/735]  lr: 1e-04  loss: 2.0  grad_norm: 1.0\n"
        "Epoch(val) [1][10/50]    eta: 0:00:01  time: 0.1\n"
        "Epoch(train) [2][10/735]  lr: 1e-04  loss: 1.9  grad_norm: 1.1\n"
    )
    s = load_series(mm)
    assert s.steps == [730, 745] and s.loss == [2.0, 1.9]
    assert any("validation/test lines skipped: 1" in n for n in s.notes)
    mm.write_text(
        "Iter(train) [  10/1000]  lr: 1e-04  loss: 1.8  grad_norm: nan\nIter [20/1000]\tlr: 1e-04, loss: 1.7\n"
    )
    s = load_series(mm)
    assert s.steps == [10, 20] and s.loss == [1.8, 1.7] and math.isnan(s.grad_norm[0])
    bars = tmp_path / "bars.log"
    bars.write_text(
        "Epoch 0: 100%|██████████| 18/18 [00:17<00:00,  4.47s/it, loss=2.0, v_num=1]\n"
        "Validation DataLoader 0:  50%|█████     | 5/10 [00:01<00:01,  4.0it/s]\n"
        "Epoch 1:  22%|██▏       | 4/18 [00:17<01:02,  4.47s/it, loss=1.5, v_num=1]\n"
    )
    assert load_series(bars).steps == [18, 22]
    keras = tmp_path / "keras.log"
    keras.write_text(
        "Epoch 1/2\n512/512 [==============================] - 127s 247ms/step - loss: 0.9 - acc: 0.5\n"
        "Epoch 2/2\n512/512 [==============================] - 127s 247ms/step - loss: nan - acc: 0.1\n"
    )
    s = load_series(keras)
    assert s.steps == [512, 1024] and s.loss[0] == 0.9 and math.isnan(s.loss[1])


def test_megatron_skipped_iterations(tmp_path: Path) -> None:
    p = tmp_path / "megatron.log"
    tpl = " iteration {:8d}/   8000 | lm loss: {} | loss scale: 1.0 | grad norm: {} | number of skipped iterations: {:3d} | number of nan iterations: {:3d} |\n"
    p.write_text(
        tpl.format(10, "2.0", "1.0", 0, 0)
        + tpl.format(20, "1.9", "nan", 2, 1)
        + tpl.format(30, "1.8", "0.9", 0, 0)
    )
    s = load_series(p)
    assert s.steps == [10, 20, 30] and s.skipped == [20] and math.isnan(s.grad_norm[1])
    assert any("counted 2 skipped iterations" in n for n in s.notes)


def test_tags_name_the_keys_of_a_text_log(tmp_path: Path) -> None:
    p = tmp_path / "custom.log"
    p.write_text("step 1 loss_net 2.5 norm_total 4.0\nstep 2 loss_net 2.4 norm_total nan\n")
    s = load_series(p, tags={"loss": "loss_net", "grad_norm": "norm_total"})
    assert s.loss == [2.5, 2.4] and s.grad_norm[0] == 4.0 and math.isnan(s.grad_norm[1])
    assert s.fields == {"loss": "loss_net", "grad_norm": "norm_total"}
    with pytest.raises(LogFormatError, match=r"no line has the key\(s\) asked for: grad_norm=gnorm_x"):
        load_series(p, format="steps", tags={"loss": "loss_net", "grad_norm": "gnorm_x"})


def test_a_long_preamble_before_the_first_training_line(tmp_path: Path) -> None:
    p = tmp_path / "train.log"
    preamble = "".join(
        f"  (layer{i}): Linear(in_features=4096, out_features=4096, bias=True)\n" for i in range(2000)
    )
    p.write_text(preamble + "iter 10: loss 2.5, time 100.0ms\n")
    assert len(preamble) > 1 << 16
    s = load_series(p)
    assert s.source == "steps" and s.steps == [10]


def _fmt(x: float) -> str:
    return repr(x) if math.isfinite(x) else {True: "nan"}.get(math.isnan(x), "inf" if x > 0 else "-inf")


@settings(max_examples=150, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.floats(allow_nan=True, allow_infinity=True, width=64),
            st.floats(min_value=0) | st.just(math.nan) | st.just(math.inf),
            st.floats(min_value=1e-12, max_value=10.0),
        ),
        min_size=1,
        max_size=20,
    ),
    sep=st.sampled_from(["=", ": ", ":", " "]),
    join=st.sampled_from(["  ", " | ", ", ", " - "]),
    step_key=st.sampled_from(["step", "iter", "global_step", "iteration", "num_updates"]),
    order=st.permutations(["loss", "grad_norm", "lr", "tokens"]),
)
def test_key_value_lines_round_trip(rows, sep, join, step_key, order, tmp_path_factory) -> None:
    p = tmp_path_factory.mktemp("kv") / "run.log"
    lines = []
    for i, (loss, gnorm, lr) in enumerate(rows):
        vals = {"loss": _fmt(loss), "grad_norm": _fmt(gnorm), "lr": _fmt(lr), "tokens": str(1000 * i)}
        fields = [f"{step_key}{sep}{5 * (i + 1)}", *(f"{k}{sep}{vals[k]}" for k in order)]
        lines.append("2024-01-01 00:00:00 INFO " + join.join(fields))
    p.write_text("\n".join(lines) + "\n")
    s = load_series(p, format="steps")
    assert s.steps == [5 * (i + 1) for i in range(len(rows))]
    assert same(s.loss, [r[0] for r in rows]) and same(s.grad_norm, [r[1] for r in rows])
    assert same(s.lr, [r[2] for r in rows])


def test_formats_come_from_the_table() -> None:
    from gradsentry.cli.analyze import FORMAT_HELP

    assert ("auto", *(r.name for r in READERS)) == FORMATS
    assert FORMAT_HELP.split(" | ") == list(FORMATS)
    assert len(set(FORMATS)) == len(FORMATS)
    for r in READERS:
        assert r.example and callable(r.sniff) and callable(r.read)


_KEYS = [
    "step",
    "iter",
    "epoch",
    "loss",
    "lm loss",
    "train/loss",
    "val loss",
    "grad_norm",
    "gnorm",
    "grad norm",
    "actor/grad_norm",
    "critic/grad_norm",
    "norm",
    "lr",
    "learning rate",
    "time",
    "tps",
    "mfu",
    "number of skipped iterations",
]
_NUMS = st.one_of(
    st.integers(0, 10**9).map(str),
    st.floats(allow_nan=False, allow_infinity=False, width=32).map(repr),
    st.sampled_from(["nan", "inf", "-inf", "NaN", "1e-5", "3.0E+02", "007"]),
)


@settings(max_examples=300, deadline=None)
@given(
    fields=st.lists(
        st.tuples(st.sampled_from(_KEYS), st.sampled_from([": ", "=", " ", ":"]), _NUMS, _NUMS),
        min_size=1,
        max_size=7,
    ),
    join=st.sampled_from(["  ", " | ", ", ", " - "]),
    avg=st.booleans(),
)
def test_the_template_fast_path_reads_like_the_full_scan(fields, join, avg) -> None:
    """A line of a shape seen before (other numbers) reads exactly as a fresh full scan reads it."""
    from gradsentry.logs.text.keys import Scanner

    def line(which: int) -> str:
        parts = [
            f"{k}{sep}{(a, b)[which]}" + (f" ({b})" if avg and k == "loss" else "") for k, sep, a, b in fields
        ]
        return "[2024-01-01 00:00:00] INFO " + join.join(parts) + "\n"

    warm = Scanner()
    warm.scan(line(0))
    fast, full = warm.scan(line(1)), Scanner().scan(line(1))
    assert repr(fast) == repr(full)  # repr: NaN compares equal as text


@settings(max_examples=200, deadline=None)
@given(
    keys=st.lists(
        st.sampled_from(
            ["loss", "grad_norm", "learning_rate", "epoch", "step", "eval_loss", "train_loss", "note"]
        ),
        min_size=1,
        max_size=5,
        unique=True,
    ),
    values=st.lists(st.tuples(_NUMS, _NUMS, st.booleans()), min_size=5, max_size=5),
)
def test_hf_console_fast_path_reads_like_a_fresh_reader(keys, values) -> None:
    from gradsentry.logs.text.hf_console import HfConsole

    def line(which: int) -> str:
        items = [
            f"'{k}': " + (f"'{v[which]}'" if quoted else v[which])
            for k, v in zip(keys, [(a, b, q) for a, b, q in values], strict=False)
            for quoted in [v[2]]
        ]
        return "{" + ", ".join(items) + "}\n"

    warm = HfConsole()
    warm.parse(line(0))
    warm.last = 0
    assert repr(warm.parse(line(1))) == repr(HfConsole().parse(line(1)))


def test_a_line_without_end_is_read_in_bounded_pieces(tmp_path: Path) -> None:
    from gradsentry.logs.text.engine import MAX_LINE

    p = tmp_path / "one_line.log"
    p.write_text("x" * (3 * MAX_LINE) + " step 5 loss 1.0\nstep 6 loss 0.9\n")
    s = load_series(p)
    assert s.steps == [5, 6]
    p.write_text("step 1 loss 2.0\n" + "y" * (2 * MAX_LINE) + "\nstep " + "9" * 5000 + " loss 1.0\n")
    with pytest.raises(LogFormatError, match=r"one_line.log:3: cannot read this line"):
        load_series(p)  # line numbers count physical lines, not pieces
