"""Per-layer |g| and |w| histograms: counts checked exactly against numpy.histogram of the same tensors."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
import torch
from torch import nn

from gradsentry.histograms import HistogramSpec, LayerCounter, count, record_bytes, resolve, unpack
from gradsentry.logs.run_jsonl import read_jsonl
from gradsentry.monitor import Monitor
from gradsentry.records import Histogram, LayerHistograms, StepRecord
from gradsentry.sinks import JsonlSink, TensorBoardSink
from zoo import mlp


def _numpy_counts(x: np.ndarray, spec: HistogramSpec) -> dict:
    """The independent count: numpy on the same float32 |x| and the same float32 edges."""
    a = np.abs(x.astype(np.float32).reshape(-1))
    e = spec.edges(torch.device("cpu")).numpy()
    finite = np.isfinite(a)
    inside = finite & (a >= e[0]) & (a < e[-1])  # numpy's last bin is closed: keep |x| = e[-1] out
    return {
        "counts": np.histogram(a[inside], bins=e)[0].tolist(),
        "below": int((finite & (a > 0) & (a < e[0])).sum()),
        "above": int((finite & (a >= e[-1])).sum()),
        "zeros": int((a == 0).sum()),
        "nonfinite": int((~finite).sum()),
    }


def _as_dict(h: Histogram) -> dict:
    return {k: getattr(h, k) for k in ("counts", "below", "above", "zeros", "nonfinite")}


def test_counts_equal_numpy_histogram_with_zeros_nonfinite_and_out_of_range():
    spec = HistogramSpec(bins=20, log10_low=-6, log10_high=2)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5000, generator=g) * 10.0 ** torch.empty(5000).uniform_(-9, 4, generator=g)
    x[:50] = 0.0
    x[50:60] = -0.0
    x[60:63] = torch.tensor([math.nan, math.inf, -math.inf])
    x[63:66] = spec.edges(torch.device("cpu"))[[0, 7, -1]]  # exactly on edges: the left edge's bin
    y = (
        torch.randn(3, 7).double() * 1e-7
    )  # a second tensor of the same layer (float64 is compared as float32)
    out = count([x, y], [1, 1], 2, spec, spec.edges(torch.device("cpu")))
    first, second = unpack(out.tolist(), ["a", "b"], spec)
    assert first.total == 0
    want = _numpy_counts(np.concatenate([x.numpy(), y.float().numpy().reshape(-1)]), spec)
    assert _as_dict(second) == want  # exact integer counts
    assert second.total == 5000 + 21
    assert want["zeros"] == 60 and want["nonfinite"] == 3 and want["below"] > 0 and want["above"] > 0
    assert LayerCounter(spec).size(2) == 2 * 2 * spec.width


def test_monitor_records_histograms_of_each_layers_gradients_and_weights(tmp_path):
    model = mlp(3, width=16, act=nn.ReLU)
    spec = HistogramSpec(bins=32, log10_low=-10, log10_high=2)
    mon = Monitor(model, histograms=spec, sinks=[JsonlSink(tmp_path / "run.jsonl")])
    model(torch.randn(8, 16)).pow(2).mean().backward()
    model[2].weight.grad[3] = 0.0  # a dead unit's row
    model[4].bias.grad[1] = math.nan
    rec = mon.step()
    mon.close()
    assert rec.histograms is not None and [h.name for h in rec.histograms] == ["0", "2", "4"]
    for h, layer in zip(rec.histograms, [model[0], model[2], model[4]], strict=True):
        grads = torch.cat([layer.weight.grad.reshape(-1), layer.bias.grad]).numpy()
        weights = torch.cat([layer.weight.detach().reshape(-1), layer.bias.detach()]).numpy()
        assert h.grad is not None and h.weight is not None
        assert _as_dict(h.grad) == _numpy_counts(grads, spec)
        assert _as_dict(h.weight) == _numpy_counts(weights, spec)
        assert h.grad.total == h.weight.total == rec.layer(h.name).numel
    assert rec.histograms[1].grad.zeros >= 16 and rec.histograms[2].grad.nonfinite == 1
    back = read_jsonl(tmp_path / "run.jsonl").records
    assert back[0].histograms == rec.histograms  # JSON round trip


def test_default_off_and_old_records_without_histograms_still_read():
    model = mlp(2, width=4)
    mon = Monitor(model)
    model(torch.randn(2, 16)).sum().backward()
    rec = mon.step()
    assert rec.histograms is None and "histograms" not in rec.to_dict()  # files unchanged when off
    old = {"kind": "step", "step": 3, "global_norm": 1.0, "layers": []}
    assert StepRecord.from_dict(old).histograms is None


def test_frozen_layer_gets_no_gradient_histogram_and_weights_only_spec():
    model = mlp(3, width=4)
    model[0].requires_grad_(False)
    mon = Monitor(model, histograms=HistogramSpec(grads=False, bins=8))
    model(torch.randn(2, 16)).sum().backward()
    rec = mon.step()
    assert rec.histograms is not None
    assert all(h.grad is None and h.weight is not None for h in rec.histograms)
    mon2 = Monitor(model, histograms=True)
    rec2 = mon2.step()
    assert rec2.histograms is not None and rec2.histograms[0].grad is None  # has_grad=False
    assert rec2.histograms[1].grad is not None and len(rec2.histograms[1].grad.counts) == 64


def test_tensorboard_writes_layer_histograms_of_log10_abs(tmp_path):
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    model = mlp(2, width=8)
    spec = HistogramSpec(bins=16, log10_low=-6, log10_high=2)
    mon = Monitor(model, histograms=spec, sinks=[TensorBoardSink(tmp_path)])
    model(torch.randn(4, 16)).pow(2).mean().backward()
    rec = mon.step()
    mon.close()
    acc = ea.EventAccumulator(str(tmp_path), size_guidance={ea.HISTOGRAMS: 0})
    acc.Reload()
    assert rec.histograms is not None
    h = rec.histograms[0].grad
    assert h is not None
    (event,) = acc.Histograms("gradsentry/grad_hist/0")
    assert event.step == 0 and event.histogram_value.num == sum(h.counts)
    assert list(event.histogram_value.bucket) == h.counts
    assert list(event.histogram_value.bucket_limit) == pytest.approx(h.log10_edges()[1:])
    assert "gradsentry/weight_hist/2" in acc.Tags()["histograms"]


def test_record_bytes_covers_the_measured_size():
    spec = HistogramSpec()
    model = mlp(5, width=64)
    mon = Monitor(model, histograms=spec)
    model(torch.randn(8, 16)).pow(2).mean().backward()
    rec = mon.step()
    data = rec.to_dict()["histograms"]

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = [[LayerHistograms.from_dict(h) for h in data] for _ in range(50)]
        size = (tracemalloc.get_traced_memory()[0] - before) / 50
    finally:
        tracemalloc.stop()
    assert len(kept) == 50
    estimate = record_bytes(5, spec)
    assert 0.8 * size <= estimate <= 2.0 * size, (size, estimate)


def test_bad_specs_are_clear_errors():
    with pytest.raises(ValueError, match="bins"):
        HistogramSpec(bins=0)
    with pytest.raises(ValueError, match="range"):
        HistogramSpec(log10_low=2, log10_high=1)
    with pytest.raises(ValueError, match="counts nothing"):
        HistogramSpec(grads=False, weights=False)
    with pytest.raises(TypeError, match="histograms must be"):
        resolve("yes")  # type: ignore[arg-type]
    assert resolve(False) is None and resolve(True) == HistogramSpec()
