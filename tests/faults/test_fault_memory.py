"""Records sized honestly: the measured bytes per record match the documented model, and the default
max_records keeps them within the documented budget."""

from __future__ import annotations

import tracemalloc

import pytest
import torch
from torch import nn

import gradsentry as gs
from gradsentry.monitor import RECORDS_BUDGET_BYTES, record_bytes

pytestmark = pytest.mark.faults


def _measure(layers: int, activations: bool, bins: int = 0, steps: int = 60) -> tuple[float, gs.Monitor]:
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(8, 8), nn.Tanh())])
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(4, 8)
    with gs.Monitor(model, optimizer=opt, activations=activations, histogram_bins=bins) as mon:
        model(x).sum().backward()
        mon.step(loss=1.0)
        opt.step()
        opt.zero_grad()
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        for _ in range(steps):
            model(x).sum().backward()
            mon.step(loss=torch.tensor(1.0))
            opt.step()
            opt.zero_grad()
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    return grown / steps, mon


@pytest.mark.parametrize(("layers", "activations", "bins"), [(40, False, 0), (40, True, 0), (20, True, 16)])
def test_bytes_per_record_match_the_documented_model(layers: int, activations: bool, bins: int) -> None:
    per_record, mon = _measure(layers, activations, bins)
    sites = layers if activations else 0
    assert per_record == pytest.approx(record_bytes(layers, sites, bins), rel=0.25)
    # the default keeps the window within the budget (it was 100,000 records: ~2.7 GB at 50 layers)
    assert mon.max_records * per_record <= 1.25 * RECORDS_BUDGET_BYTES
    assert mon.max_records == min(
        100_000, max(100, RECORDS_BUDGET_BYTES // record_bytes(layers, sites, bins))
    )
