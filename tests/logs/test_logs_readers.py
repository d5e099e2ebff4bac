"""Readers of other tools' logs: each format read back against the values the test wrote."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from gradsentry.logs import LogFormatError, Series, load_series, sniff_format
from gradsentry.records import RunHeader, StepRecord
from gradsentry.report.sparkline import sparkline
from gradsentry.sinks import JsonlSink


def write_hf(path: Path, entries: list[dict]) -> Path:
    """trainer_state.json as the HF Trainer writes it (json.dump: NaN/Infinity literals)."""
    state = {"best_metric": None, "epoch": 1.0, "global_step": 100, "log_history": entries, "max_steps": 100}
    path.write_text(json.dumps(state, indent=2), encoding="utf-8")
    return path


def hf_entries() -> list[dict]:
    return [
        {"epoch": 0.1, "grad_norm": 3.5, "learning_rate": 5e-5, "loss": 2.5, "step": 10},
        {"epoch": 0.2, "grad_norm": float("nan"), "learning_rate": 4e-5, "loss": 0.0, "step": 20},
        {"epoch": 0.2, "eval_loss": 2.1, "eval_runtime": 1.5, "eval_samples_per_second": 30.0, "step": 20},
        {"epoch": 0.3, "grad_norm": float("inf"), "learning_rate": 3e-5, "loss": 2.25, "step": 30},
        {"epoch": 0.4, "grad_norm": 1.25, "learning_rate": 2e-5, "loss": float("-inf"), "step": 40},
        {"epoch": 0.4, "eval_loss": 2.0, "eval_runtime": 1.5, "step": 40},
        {"epoch": 1.0, "step": 100, "total_flos": 1e12, "train_loss": 2.0, "train_runtime": 12.0},
    ]


def test_hf_eval_entries_and_nan_literals(tmp_path: Path) -> None:
    p = write_hf(tmp_path / "trainer_state.json", hf_entries())
    text = p.read_text()
    assert "NaN" in text and "Infinity" in text  # the literals Python's json writes
    s = load_series(p)
    assert s.source == "hf" and sniff_format(p) == "hf"
    assert s.steps == [10, 20, 30, 40]
    assert s.grad_norm[0] == 3.5 and math.isnan(s.grad_norm[1]) and s.grad_norm[2] == math.inf
    assert s.loss == [2.5, 0.0, 2.25, -math.inf]
    assert s.lr == [5e-5, 4e-5, 3e-5, 2e-5]
    assert s.fields == {"loss": "loss", "grad_norm": "grad_norm", "lr": "learning_rate"}
    assert any("2 evaluation entries skipped" in n for n in s.notes)
    assert any("before clipping" in n for n in s.notes)


def test_hf_checkpoint_folder_and_output_dir(tmp_path: Path) -> None:
    for n, loss in ((500, 1.0), (1000, 0.5)):
        d = tmp_path / f"checkpoint-{n}"
        d.mkdir()
        write_hf(d / "trainer_state.json", [{"loss": loss, "grad_norm": 1.0, "step": n}])
    assert load_series(tmp_path / "checkpoint-500").loss == [1.0]
    s = load_series(tmp_path)  # the output dir: the latest checkpoint is read
    assert s.steps == [1000] and s.loss == [0.5]


def test_hf_never_evaluates(tmp_path: Path) -> None:
    p = tmp_path / "trainer_state.json"
    p.write_text('{"log_history": [{"loss": __import__("os").getpid(), "step": 1}]}')
    with pytest.raises(LogFormatError, match="not valid JSON"):
        load_series(p, format="hf")


def test_hf_only_eval_entries(tmp_path: Path) -> None:
    p = write_hf(tmp_path / "trainer_state.json", [{"eval_loss": 1.0, "step": 5}])
    with pytest.raises(LogFormatError, match="no training entries"):
        load_series(p)


def test_hf_bad_value(tmp_path: Path) -> None:
    p = write_hf(tmp_path / "trainer_state.json", [{"loss": [1, 2], "step": 5}])
    with pytest.raises(LogFormatError, match=r"log_history\[0\]\.loss: expected a number"):
        load_series(p)


def test_tensorboard_run_directory(tmp_path: Path) -> None:
    pytest.importorskip("torch.utils.tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "lightning_logs" / "version_0"
    w = SummaryWriter(str(run))
    gn = [0.5, 1.5, float("nan"), 4.0]
    for step, g in enumerate(gn):
        w.add_scalar("train/grad_norm", g, step * 10)
        w.add_scalar("train/loss", 3.0 - step, step * 10)
        w.add_scalar("train/learning_rate", 1e-3, step * 10)
    w.add_scalar("eval/loss", 9.0, 30)
    w.close()
    for path in (run, tmp_path, tmp_path / "lightning_logs"):  # the run dir, or a parent with one run
        s = load_series(path)
        assert s.source == "tensorboard"
        assert s.steps == [0, 10, 20, 30]
        np.testing.assert_allclose(s.loss, [3.0, 2.0, 1.0, 0.0], rtol=1e-6)
        assert math.isnan(s.grad_norm[2])
        np.testing.assert_allclose([s.grad_norm[i] for i in (0, 1, 3)], [0.5, 1.5, 4.0], rtol=1e-6)
        np.testing.assert_allclose(s.lr, [1e-3] * 4, rtol=1e-6)  # float32 storage
        assert s.fields["grad_norm"] == "train/grad_norm"
    event_file = next(run.glob("*tfevents*"))
    assert load_series(event_file).steps == [0, 10, 20, 30]
    # configurable tags
    s = load_series(run, tags={"loss": "eval/loss"})
    assert s.loss == [None, None, None, 9.0] and s.fields["loss"] == "eval/loss"
    with pytest.raises(
        LogFormatError, match=r"no grad_norm tag named 'grad/total'; available: .*train/grad_norm"
    ):
        load_series(run, tags={"grad_norm": "grad/total"})


def test_tensorboard_errors(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    for name in ("a", "b"):
        w = SummaryWriter(str(tmp_path / "runs" / name))
        w.add_scalar("loss", 1.0, 0)
        w.close()
    with pytest.raises(
        LogFormatError, match=r"2 logs found \(a \(tensorboard\), b \(tensorboard\)\); pass one"
    ):
        load_series(tmp_path / "runs")
    with pytest.raises(LogFormatError, match="event files in 2 runs"):
        load_series(tmp_path / "runs", format="tensorboard")
    other = tmp_path / "other"
    w = SummaryWriter(str(other))
    w.add_scalar("accuracy", 0.5, 0)
    w.close()
    with pytest.raises(LogFormatError, match=r"no loss or gradient-norm scalar tag.*available: accuracy"):
        load_series(other)
    fake = tmp_path / "fake" / "events.out.tfevents.123.host"
    fake.parent.mkdir()
    fake.write_bytes(b"\x00\x01 not a record" * 20)
    with pytest.raises(LogFormatError, match="no scalar summaries"):
        load_series(fake)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello")
    with pytest.raises(LogFormatError, match="directory without a log"):
        load_series(empty)
    with pytest.raises(LogFormatError, match=r"directory without TensorBoard event files"):
        load_series(empty, format="tensorboard")


def test_tensorboard_v2_tensor_scalars(tmp_path: Path) -> None:
    """tf.summary v2 / Keras store scalars as rank-0 tensors of the scalars plugin."""
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter
    from tensorboard.util import tensor_util

    def write(tag: str, values: list, dtype: str = "float32") -> None:
        w = EventFileWriter(str(tmp_path / tag))
        meta = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
        )
        for step, v in enumerate(values):
            val = summary_pb2.Summary.Value(
                tag=tag, tensor=tensor_util.make_tensor_proto(v, dtype=dtype), metadata=meta
            )
            w.add_event(event_pb2.Event(step=step, wall_time=1.0, summary=summary_pb2.Summary(value=[val])))
        w.close()

    write("epoch_loss", [2.0, 1.5, float("nan")])
    s = load_series(tmp_path / "epoch_loss")
    assert s.steps == [0, 1, 2] and s.loss[:2] == [2.0, 1.5] and math.isnan(s.loss[2])
    assert s.fields == {"loss": "epoch_loss"} and not s.has("grad_norm")
    write("loss", [[1.0, 2.0]])
    with pytest.raises(
        LogFormatError, match=r"tag 'loss' holds float32 tensors of shape \(2,\), not scalars"
    ):
        load_series(tmp_path / "loss")


LIGHTNING_CSV = """epoch,grad_2.0_norm_total,lr-AdamW,step,train_loss,val_loss
0,1.5,0.001,0,2.5,
0,,,9,,2.2
0,nan,0.001,10,2.25,
1,2.0,,20,inf,
1,,,29,,2.0
"""


def test_lightning_csv_sparse(tmp_path: Path) -> None:
    d = tmp_path / "version_0"
    d.mkdir()
    (d / "metrics.csv").write_text(LIGHTNING_CSV)
    s = load_series(d)
    assert s.source == "csv"
    assert s.steps == [0, 10, 20]  # validation-only rows (steps 9, 29) skipped
    assert s.loss == [2.5, 2.25, math.inf]
    assert s.grad_norm[0] == 1.5 and math.isnan(s.grad_norm[1]) and s.grad_norm[2] == 2.0
    assert s.lr == [0.001, 0.001, None]
    assert s.fields == {"loss": "train_loss", "grad_norm": "grad_2.0_norm_total", "lr": "lr-AdamW"}


def test_nested_logs_are_found(tmp_path: Path) -> None:
    d = tmp_path / "logs" / "lightning_logs" / "version_0"
    d.mkdir(parents=True)
    (d / "metrics.csv").write_text(LIGHTNING_CSV)
    assert load_series(tmp_path / "logs").steps == [0, 10, 20]
    out = tmp_path / "out"
    for n in (6, 12):
        (out / f"checkpoint-{n}").mkdir(parents=True)
        write_hf(out / f"checkpoint-{n}" / "trainer_state.json", [{"loss": 1.0, "step": n}])
    assert load_series(out).steps == [12]
    assert load_series(out, format="hf").steps == [12]
    with pytest.raises(
        LogFormatError, match=r"2 logs found .*metrics\.csv \(csv\).*trainer_state\.json \(hf\)"
    ):
        load_series(tmp_path)


@pytest.mark.parametrize(("tb_last", "expect"), [(90, "tensorboard"), (30, "hf")])
def test_hf_output_dir_with_tensorboard_reads_the_longer_log(
    tmp_path: Path, tb_last: int, expect: str
) -> None:
    """HF with report_to=tensorboard: checkpoint-N/trainer_state.json and runs/<date>/events side by side."""
    from torch.utils.tensorboard import SummaryWriter

    (tmp_path / "checkpoint-60").mkdir()
    entries = [{"loss": 1.0, "grad_norm": 1.0, "step": s} for s in range(10, 70, 10)]
    write_hf(tmp_path / "checkpoint-60" / "trainer_state.json", entries)
    w = SummaryWriter(str(tmp_path / "runs" / "Nov30_12-00-00_host"))
    for s in range(10, tb_last + 10, 10):
        w.add_scalar("train/loss", 1.0, s)
        w.add_scalar("train/grad_norm", 1.0, s)
    w.close()
    series = load_series(tmp_path)
    assert series.source == expect
    assert series.steps[-1] == max(60, tb_last)
    assert any(n.startswith("also found") for n in series.notes)


def test_plain_csv_and_errors(tmp_path: Path) -> None:
    p = tmp_path / "log.csv"
    p.write_text("global_step,loss,grad_norm\n1,2.0,0.5\n2.0,1.5,0.25\n")
    s = load_series(p)
    assert s.steps == [1, 2] and s.loss == [2.0, 1.5] and s.grad_norm == [0.5, 0.25]
    p.write_text("time,loss\n1,2.0\n")
    with pytest.raises(LogFormatError, match="CSV without a step column"):
        load_series(p)
    with pytest.raises(LogFormatError, match="no step column"):
        load_series(p, format="csv")
    p.write_text("step,loss\n1,abc\n")
    with pytest.raises(LogFormatError, match=r"log.csv:2 column 'loss': expected a number, got 'abc'"):
        load_series(p)
    p.write_text("step,loss\n1.5,2.0\n")
    with pytest.raises(LogFormatError, match="expected an integer step"):
        load_series(p)
    p.write_text("step,loss\n1,2.0\n")
    with pytest.raises(LogFormatError, match="no grad_norm column named 'gn'"):
        load_series(p, tags={"grad_norm": "gn"})


def test_mmengine_lines(tmp_path: Path) -> None:
    d = tmp_path / "20240101_000000" / "vis_data"
    d.mkdir(parents=True)
    lines = [
        {
            "lr": 1e-4,
            "data_time": 0.01,
            "loss": 2.0,
            "loss_cls": 1.5,
            "grad_norm": 5.0,
            "time": 0.3,
            "epoch": 1,
            "iter": 50,
            "memory": 1000,
            "step": 50,
        },
        {
            "lr": 1e-4,
            "data_time": 0.01,
            "loss": float("nan"),
            "grad_norm": float("inf"),
            "time": 0.3,
            "epoch": 1,
            "iter": 100,
            "memory": 1000,
            "step": 100,
        },
        {"accuracy/top1": 70.0, "data_time": 0.01, "time": 0.1, "step": 1},
    ]
    (d / "scalars.json").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    for path in (d / "scalars.json", d.parent):
        s = load_series(path)
        assert s.source == "mmengine"
        assert s.steps == [50, 100]
        assert s.loss[0] == 2.0 and math.isnan(s.loss[1])
        assert s.grad_norm == [5.0, math.inf] and s.lr == [1e-4, 1e-4]
        assert any("window means" in n for n in s.notes)
        assert any("1 lines without a loss" in n for n in s.notes)


def test_mmengine_iter_key_and_truncated_last_line(tmp_path: Path) -> None:
    p = tmp_path / "scalars.json"
    p.write_text('{"loss": 1.0, "iter": 10}\n{"loss": 0.5, "iter": 20}\n{"loss": 0.2, "it')
    s = load_series(p)
    assert s.steps == [10, 20] and s.loss == [1.0, 0.5] and not s.has("grad_norm")


def test_gradsentry_jsonl(tmp_path: Path) -> None:
    p = tmp_path / "run.jsonl"
    sink = JsonlSink(p)
    sink.open(RunHeader())
    for step, (g, loss) in enumerate([(1.0, 2.0), (float("nan"), 1.5), (0.5, None)]):
        sink.write(StepRecord(step=step, global_norm=g, loss=loss, lr=0.1))
    sink.close()
    s = load_series(p)
    assert s.source == "jsonl" and sniff_format(p) == "jsonl"
    assert s.steps == [0, 1, 2]
    assert s.grad_norm[0] == 1.0 and math.isnan(s.grad_norm[1]) and s.grad_norm[2] == 0.5
    assert s.loss == [2.0, 1.5, None] and s.lr == [0.1, 0.1, 0.1]
    assert s.fields == {"loss": "loss", "grad_norm": "global_norm", "lr": "lr"}


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "empty file; expected a Hugging Face trainer_state.json"),
        (b"   \n\n", "empty file"),
        (
            b'{"model": "bert", "layers": 12}',
            r"JSON of another shape \(an object with keys \['layers', 'model'\]\)",
        ),
        (b"[1, 2, 3]", "JSON of another shape"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary file"),
        (b"\xff\xfe\xfa garbage bytes that are not utf-8 \xff" * 3, "not a UTF-8 text file"),
        (b"hello world\n", "unrecognised text file"),
    ],
    ids=["empty", "blank", "json-object", "json-list", "binary", "not-utf8", "plain-text"],
)
def test_unreadable_inputs(tmp_path: Path, content: bytes, match: str) -> None:
    p = tmp_path / "log.json"
    p.write_bytes(content)
    with pytest.raises(LogFormatError, match=match):
        load_series(p)


def test_multiline_json_of_another_shape(tmp_path: Path) -> None:
    p = tmp_path / "config.json"
    p.write_text(json.dumps({"hidden_size": 768, "num_layers": 12}, indent=2))
    with pytest.raises(LogFormatError, match=r"expected a Hugging Face trainer_state\.json"):
        load_series(p)


def test_missing_path_and_bad_format(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_series(tmp_path / "nope.json")
    p = write_hf(tmp_path / "trainer_state.json", [{"loss": 1.0, "step": 1}])
    with pytest.raises(ValueError, match="format must be one of auto, hf"):
        load_series(p, format="wandb")
    with pytest.raises(LogFormatError, match=r"trainer_state.json:1: not valid JSON"):
        load_series(p, format="jsonl")


def test_huge_step_gap_is_noted(tmp_path: Path) -> None:
    steps = [*range(0, 100, 10), 10**12, 10**12 + 10]
    p = write_hf(tmp_path / "trainer_state.json", [{"loss": 1.0, "grad_norm": 1.0, "step": s} for s in steps])
    s = load_series(p)
    assert s.steps == steps
    gap = [n for n in s.notes if "huge step gap" in n]
    assert len(gap) == 1 and f"{10**12 - 90} steps between logged steps 90 and {10**12}" in gap[0]


def test_series_validation_and_values() -> None:
    with pytest.raises(ValueError, match=r"Series\.loss has 1 values for 2 steps"):
        Series(steps=[1, 2], loss=[1.0], grad_norm=[None, None], lr=[None, None])
    with pytest.raises(ValueError, match="strictly increasing"):
        Series(steps=[2, 1], loss=[1.0, 1.0], grad_norm=[None, None], lr=[None, None])
    s = Series(steps=[1, 2, 3], loss=[1.0, None, float("nan")], grad_norm=[None] * 3, lr=[None] * 3)
    st, v = s.values("loss")
    assert st.tolist() == [1, 3] and v[0] == 1.0 and math.isnan(v[1])
    d = s.to_dict()
    assert d["loss"] == [1.0, None, "NaN"]
    json.dumps(d, allow_nan=False)  # strict JSON


def test_sparkline() -> None:
    assert sparkline([1, 2, 3, 4, 5, 6, 7, 8]) == "▁▂▃▄▅▆▇█"
    assert sparkline([1.0, None, float("nan"), 1.0]) == "▁ !▁"
    # bucketing keeps the maximum of each bucket: a one-point spike stays visible
    line = sparkline([1.0] * 99 + [100.0], width=10)
    assert len(line) == 10 and line[-1] == "█" and set(line[:-1]) == {"▁"}
    assert sparkline([1e-6, 1e-3, 1.0], log=True) == "▁▅█"
    assert sparkline([]) == ""
    with pytest.raises(ValueError, match="width must be >= 1"):
        sparkline([1.0], width=0)


def test_gradsentry_callback_key_is_the_gradient_norm(tmp_path: Path) -> None:
    """gradsentry's HF callback adds gradsentry/global_norm; older transformers log no grad_norm."""
    entries = [
        {"loss": 2.5, "gradsentry/global_norm": 3.0, "gradsentry/grad_norm/fc": 2.0, "step": 10},
        {"loss": 2.4, "grad_norm": 2.5, "gradsentry/global_norm": 2.6, "step": 20},
        {"gradsentry/global_norm": float("nan"), "gradsentry/nonfinite_steps": 1.0, "step": 30},
    ]
    s = load_series(write_hf(tmp_path / "trainer_state.json", entries))
    assert s.steps == [10, 20, 30] and s.grad_norm[:2] == [3.0, 2.5] and math.isnan(s.grad_norm[2])
    assert s.fields["grad_norm"] == "grad_norm | gradsentry/global_norm"
    assert any("2 gradient norms read from gradsentry/global_norm" in n for n in s.notes)
    # Lightning's CSVLogger with gradsentry's callback
    p = tmp_path / "metrics.csv"
    p.write_text(
        "epoch,gradsentry/global_norm,gradsentry/grad_norm/fc,step,train_loss\n0,1.5,9.0,0,2.0\n0,nan,9.0,1,1.9\n"
    )
    s = load_series(p)
    assert s.fields == {"loss": "train_loss", "grad_norm": "gradsentry/global_norm"}
    assert s.grad_norm[0] == 1.5 and math.isnan(s.grad_norm[1])


def test_csvsink_file_gives_the_global_norm_not_a_layers(tmp_path: Path) -> None:
    from gradsentry.records import LayerStats
    from gradsentry.sinks import CsvSink

    def layer(name: str, depth: int, g: float) -> LayerStats:
        return LayerStats(name, depth, 4, g, g / 2, None, 0, None, None, True)

    path = tmp_path / "run.csv"
    sink = CsvSink(path)
    sink.open(RunHeader())
    for step, (g0, g1) in enumerate([(3.0, 4.0), (6.0, 8.0), (float("nan"), 1.0)]):
        glob = math.sqrt(g0 * g0 + g1 * g1)
        sink.write(
            StepRecord(step=step, global_norm=glob, layers=[layer("a", 0, g0), layer("b", 1, g1)], loss=1.0)
        )
    sink.close()
    s = load_series(path)
    assert s.source == "csv" and s.steps == [0, 1, 2]
    assert s.grad_norm[:2] == [5.0, 10.0] and math.isnan(s.grad_norm[2])  # not layer b's 4.0, 8.0, 1.0
    assert s.fields["grad_norm"] == "global_norm" and any("CsvSink" in n for n in s.notes)
    assert load_series(path, tags={"grad_norm": "grad_norm"}).grad_norm == [4.0, 8.0, 1.0]  # asked for


def _lightning_tb(folder: Path, steps: range) -> None:
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(folder))
    for s in steps:
        w.add_scalar("train_loss", 2.0 - s / 100, s)
    w.close()


@pytest.mark.parametrize(("tb_points", "expect"), [(3, "csv"), (5, "tensorboard"), (2, "csv")])
def test_lightning_dir_with_csv_and_tensorboard_loggers_reads_one(
    tmp_path: Path, tb_points: int, expect: str
) -> None:
    """Trainer(logger=[TensorBoardLogger("logs"), CSVLogger("logs")]) writes both into one version folder."""
    version = tmp_path / "logs" / "lightning_logs" / "version_0"
    version.mkdir(parents=True)
    (version / "metrics.csv").write_text("epoch,step,train_loss\n0,0,2.0\n0,1,1.99\n0,2,1.98\n")
    _lightning_tb(version, range(tb_points))
    for where in (version, tmp_path / "logs"):
        s = load_series(where)
        assert s.source == expect
        note = [n for n in s.notes if n.startswith("also found")]
        assert len(note) == 1 and "one run logged through several loggers" in note[0]
        assert sniff_format(where) == expect


def test_lightning_loggers_in_sibling_folders_and_two_runs(tmp_path: Path) -> None:
    """CSVLogger("logs", name="csv") + TensorBoardLogger("logs", name="tb"): csv/version_0, tb/version_0."""
    (tmp_path / "csv" / "version_0").mkdir(parents=True)
    (tmp_path / "csv" / "version_0" / "metrics.csv").write_text("step,train_loss\n0,2.0\n5,1.5\n")
    _lightning_tb(tmp_path / "tb" / "version_0", range(0, 10, 5))
    s = load_series(tmp_path)
    assert s.source == "csv" and any("tb/version_0 (tensorboard, 2 points)" in n for n in s.notes)
    # two versions are two runs: still an error naming both
    _lightning_tb(tmp_path / "tb" / "version_1", range(3))
    with pytest.raises(LogFormatError, match=r"3 logs found"):
        load_series(tmp_path)
