"""TensorBoardSink: event files read back with TensorBoard's own EventAccumulator equal the records."""

from __future__ import annotations

import logging
import math
import re

import numpy as np
import pytest

from gradsentry.sinks import SafeSink, TensorBoardSink
from gradsentry.sinks.tensorboard import ACTIVATION_STATS, LAYER_STATS, layer_tag
from sink_records import findings, header, records

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def _load(path: object) -> event_accumulator.EventAccumulator:
    acc = event_accumulator.EventAccumulator(
        str(path), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0}
    )
    acc.Reload()
    return acc


def _expected(prefix: str) -> dict[str, dict[int, float]]:
    """Independent list of (tag, step) -> value from the records, following the documented rules."""
    exp: dict[str, dict[int, float]] = {}
    for rec in records():
        exp.setdefault(f"{prefix}/global_norm", {})[rec.step] = rec.global_norm
        if rec.loss is not None:
            exp.setdefault(f"{prefix}/loss", {})[rec.step] = rec.loss
        if rec.lr is not None:
            exp.setdefault(f"{prefix}/lr", {})[rec.step] = rec.lr
        for x in rec.layers:
            name = x.name or "(root)"
            if x.has_grad:
                for stat in ("grad_norm", "grad_rms", "grad_max_abs", "nonfinite"):
                    exp.setdefault(f"{prefix}/{stat}/{name}", {})[rec.step] = float(getattr(x, stat))
            exp.setdefault(f"{prefix}/weight_norm/{name}", {})[rec.step] = x.weight_norm
            if x.update_ratio is not None:
                exp.setdefault(f"{prefix}/update_ratio/{name}", {})[rec.step] = x.update_ratio
        for a in rec.activations:
            for stat in ("pre_mean", "pre_std", "saturated_frac", "dead_frac"):
                if getattr(a, stat) is not None:
                    exp.setdefault(f"{prefix}/{stat}/{a.name}", {})[rec.step] = getattr(a, stat)
    return exp


def _same_f32(got: float, want: float) -> bool:
    # TensorBoard stores scalars as float32: compare with the float32 rounding of the record.
    w = float(np.float32(want))
    return (math.isnan(got) and math.isnan(w)) or got == w


def test_scalars_read_back_equal_records(tmp_path):
    sink = TensorBoardSink(tmp_path / "tb", prefix="gs")
    sink.open(header())
    for rec in records():
        sink.write(rec)
    sink.write_findings(findings())
    sink.close()

    acc = _load(tmp_path / "tb")
    exp = _expected("gs")
    assert set(acc.Tags()["scalars"]) == set(exp)
    for tag, by_step in exp.items():
        events = acc.Scalars(tag)
        got = {e.step: e.value for e in events}
        assert set(got) == set(by_step), tag
        for step, want in by_step.items():
            assert _same_f32(got[step], want), (tag, step, got[step], want)
    # NaN and inf are kept as evidence, not dropped.
    assert math.isnan({e.step: e.value for e in acc.Scalars("gs/global_norm")}[6])
    assert {e.step: e.value for e in acc.Scalars("gs/grad_norm/blocks.1.fc")}[6] == math.inf
    # A frozen layer (has_grad=False) is not drawn as a zero gradient.
    assert "gs/grad_norm/(root)" not in acc.Tags()["scalars"]


def test_layout_gives_one_chart_per_stat_with_every_layer(tmp_path):
    sink = TensorBoardSink(tmp_path / "tb", prefix="gs")
    sink.open(header())
    for rec in records():
        sink.write(rec)
    sink.close()
    acc = _load(tmp_path / "tb")
    assert "custom_scalars__config__" in acc.Tags()["tensors"]

    from tensorboard.plugins.custom_scalar import layout_pb2

    raw = acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0]
    layout = layout_pb2.Layout.FromString(raw)
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    assert set(LAYER_STATS) | set(ACTIVATION_STATS) <= set(charts)
    scalar_tags = acc.Tags()["scalars"]
    for stat in LAYER_STATS:
        (regex,) = charts[stat]
        matched = {t for t in scalar_tags if re.match(regex, t)}  # the plugin uses re.match
        want = {t for t in scalar_tags if t.startswith(f"gs/{stat}/")}
        assert matched == want and matched, stat
    assert {t for t in scalar_tags if re.match(charts["grad_norm"][0], t)} == {
        "gs/grad_norm/fc0",
        "gs/grad_norm/blocks.1.fc",
    }


def test_histograms_every_k_and_findings_text(tmp_path):
    sink = TensorBoardSink(tmp_path / "tb", histograms_every=2)
    sink.open(header())
    recs = records()
    for rec in recs:
        sink.write(rec)
    sink.write_findings(findings())
    sink.close()
    acc = _load(tmp_path / "tb")
    hists = acc.Tags()["histograms"]
    # logged steps 0, 2, 4 (the 1st, 3rd and 5th records) get histograms; records have steps 0,2,4,6,8.
    h = acc.Histograms("gradsentry/hist/log10_grad_norm")
    assert [e.step for e in h] == [0, 4]  # step 8 has no layers: no histogram
    first = h[0].histogram_value
    want = np.log10([0.5, 2.0])  # finite non-zero per-layer norms of the first record
    assert first.num == 2
    assert first.min == pytest.approx(want.min(), rel=1e-12)
    assert first.max == pytest.approx(want.max(), rel=1e-12)
    assert first.sum == pytest.approx(want.sum(), rel=1e-12)

    pre = acc.Histograms(layer_tag("gradsentry", "preact", "act0"))
    assert [e.step for e in pre] == [0, 4]
    hv = pre[0].histogram_value
    assert list(hv.bucket_limit) == [-1.0, 0.0, 1.0, 2.0]
    assert list(hv.bucket) == [1, 3, 4, 0]
    assert hv.num == 8 and hv.min == -2.0 and hv.max == 1.0
    # centres -1.5, -0.5, 0.5 weighted 1, 3, 4
    assert hv.sum == pytest.approx(-1.5 - 1.5 + 2.0, abs=1e-12)
    assert "gradsentry/preact/act1" not in hists  # no histogram in the record

    (text_event,) = acc.Tensors("gradsentry/findings/text_summary")
    text = text_event.tensor_proto.string_val[0].decode()
    assert "vanishing" in text and "Gradients \\| shrink" in text and "| fc0 |" in text


def test_bad_arguments_and_use_before_open(tmp_path):
    with pytest.raises(ValueError, match="prefix must be a non-empty tag component"):
        TensorBoardSink(tmp_path, prefix="a/b")
    with pytest.raises(ValueError, match="histograms_every must be None or an integer >= 1"):
        TensorBoardSink(tmp_path, histograms_every=0)
    with pytest.raises(RuntimeError, match="is not open"):
        TensorBoardSink(tmp_path).write(records()[0])


def test_failing_writer_is_reported_once_and_disabled(tmp_path, caplog):
    sink = TensorBoardSink(tmp_path / "tb")
    safe = SafeSink(sink)
    safe.open(header())

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("No space left on device")

    assert sink._writer is not None
    sink._writer.add_scalar = boom  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="gradsentry"):
        for rec in records():
            safe.write(rec)
        safe.close()
    sink.close()  # SafeSink skips every call after the first failure, close included
    errors = [r for r in caplog.records if "TensorBoardSink failed in write" in r.getMessage()]
    assert len(errors) == 1 and "No space left on device" in errors[0].getMessage()
    assert isinstance(safe.error, OSError)


def test_tensorboard_custom_scalars_plugin_draws_a_line_per_layer(tmp_path):
    """Ask TensorBoard's own custom-scalars plugin which series each chart of the layout draws."""
    import json

    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.custom_scalar import custom_scalars_plugin
    from tensorboard.plugins.scalar import scalars_plugin

    sink = TensorBoardSink(tmp_path / "run1", prefix="gs")
    sink.open(header())
    for rec in records():
        sink.write(rec)
    sink.close()
    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(tmp_path))
    mux.Reload()
    plugins: dict[str, object] = {}
    tb = base_plugin.TBContext(
        logdir=str(tmp_path),
        multiplexer=mux,
        plugin_name_to_instance=plugins,
        data_provider=data_provider.MultiplexerDataProvider(mux, str(tmp_path)),
    )
    plugins["scalars"] = scalars_plugin.ScalarsPlugin(tb)
    plugin = custom_scalars_plugin.CustomScalarsPlugin(tb)
    ctx = context.RequestContext()
    layout = plugin.layout_impl(ctx, "")
    layout = json.loads(layout) if isinstance(layout, (str, bytes)) else layout
    lines = {}
    for category in layout["category"]:
        for chart in category["chart"]:
            (regex,) = chart["multiline"]["tag"]
            answer = plugin.scalars_impl(ctx, "run1", regex, "")
            assert answer["regex_valid"]
            lines[chart["title"]] = sorted(answer["tag_to_events"])
    assert lines["grad_norm"] == ["gs/grad_norm/blocks.1.fc", "gs/grad_norm/fc0"]
    assert lines["weight_norm"] == [
        "gs/weight_norm/(root)",
        "gs/weight_norm/blocks.1.fc",
        "gs/weight_norm/fc0",
    ]
    assert lines["saturated_frac"] == ["gs/saturated_frac/act0"]
    assert lines["global_norm"] == ["gs/global_norm"]
    assert set(LAYER_STATS) | set(ACTIVATION_STATS) | {"global_norm", "loss", "lr"} == set(lines)
