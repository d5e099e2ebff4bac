"""2-rank gloo runs with a NaN on one rank (see fault_dist_worker.py): rank 0, the writer, records it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import fault_dist_worker as F
import pytest
import torch

import dist_worker as W

pytestmark = [pytest.mark.faults, pytest.mark.slow]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    out = tmp_path_factory.mktemp("faultdist")
    return W.spawn_ranks(F.main, out, list(F.SCENARIOS), 180)


def test_nan_in_one_ranks_replicated_gradient_is_recorded_by_rank_zero(ranks: list[dict[str, Any]]) -> None:
    from gradsentry.logs.run_jsonl import read_jsonl

    got = W.scenario(ranks, "ddp_local_nan")
    for r in range(W.WORLD):
        recs = got[r]["records"]
        assert math.isfinite(recs[0]["global_norm"]) and math.isfinite(recs[2]["global_norm"])
        bad = recs[1]
        assert math.isnan(bad["global_norm"]), f"rank {r}"
        layers = {layer["name"]: layer for layer in bad["layers"]}
        assert math.isnan(layers["module.2"]["grad_norm"]) and layers["module.2"]["nonfinite"] == 1
        assert math.isfinite(layers["module.0"]["grad_norm"]) and layers["module.0"]["nonfinite"] == 0
        assert bad["nonfinite_origin"] == "module.2"  # forward finite: the deepest non-finite layer
    assert got[0]["records"][1]["layers"] == got[1]["records"][1]["layers"]
    run = read_jsonl(Path(ranks[0]["_out"]) / "ddp_nan0.jsonl")
    assert [math.isnan(r.global_norm) for r in run.records] == [False, True, False]
    kinds = {f.kind: f for f in run.findings}
    assert kinds["nonfinite"].steps[0] == 1 and kinds["nonfinite"].layers[0] == "module.2"


def test_inf_in_one_ranks_input_names_the_module_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    got = W.scenario(ranks, "ddp_forward_nan")
    for r in range(W.WORLD):
        rec = got[r]["record"]
        assert not math.isfinite(rec["global_norm"])
        assert rec["nonfinite_origin"] == "module.0", f"rank {r}"
