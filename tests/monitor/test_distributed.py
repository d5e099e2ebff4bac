"""Monitor statistics under torch.distributed (DDP and FSDP2) on 2 CPU gloo processes.

The ranks run the scenarios of ``dist_worker.py`` (one spawn for all of them) and write JSON; the
references are single-process runs on the full batch, recomputed here in float64.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import dist_worker as W

pytestmark = pytest.mark.slow

RTOL = 1e-5


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Results of every scenario on rank 0 and rank 1."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    out = tmp_path_factory.mktemp("dist")
    return W.spawn_ranks(
        W.main, out, list(W.SCENARIOS), 240
    )  # generous for a loaded 2-core machine; typical: 10-30 s


def _reference(steps: int = 1) -> list[dict[str, Any]]:
    """Single-process full-batch SGD run: per-layer float64 norms of each step's gradient."""
    model = W.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=W.LR)
    x, y = W.make_data()
    out = []
    before: dict[str, torch.Tensor] | None = None
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        layers = {}
        for name, m in model.named_modules():
            ps = list(m.parameters(recurse=False))
            if not ps:
                continue
            g = torch.cat([p.grad.double().flatten() for p in ps])
            w = torch.cat([p.detach().double().flatten() for p in ps])
            ratio = None
            if before is not None:
                ratio = ((w - before[name]).norm() / before[name].norm()).item()
            layers[name] = {
                "numel": g.numel(),
                "grad_norm": g.norm().item(),
                "max": g.abs().max().item(),
                "w": w.norm().item(),
                "ratio": ratio,
            }
        per_tensor = [p.grad.double().norm().item() for p in model.parameters()]
        per_tensor_max = [p.grad.double().abs().max().item() for p in model.parameters()]
        per_tensor_l1 = [p.grad.double().abs().sum().item() for p in model.parameters()]
        acts = {}
        with torch.no_grad():
            pre = model[0](x).double()
        acts["1"] = {
            "pre_mean": pre.mean().item(),
            "sat": (torch.tanh(pre).abs() > 0.99).double().mean().item(),
        }
        out.append(
            {
                "loss": loss.item(),
                "layers": layers,
                "per_tensor": per_tensor,
                "per_tensor_max": per_tensor_max,
                "per_tensor_l1": per_tensor_l1,
                "acts": acts,
            }
        )
        before = {
            name: torch.cat([p.detach().double().flatten() for p in m.parameters(recurse=False)])
            for name, m in model.named_modules()
            if list(m.parameters(recurse=False))
        }
        opt.step()
        opt.zero_grad()
    return out


def _check_layers(rec: dict[str, Any], ref: dict[str, Any], prefix: str = "") -> None:
    names = [layer["name"] for layer in rec["layers"]]
    assert names == [prefix + n for n in ref["layers"]]
    total = 0.0
    for layer in rec["layers"]:
        want = ref["layers"][layer["name"][len(prefix) :]]
        assert layer["numel"] == want["numel"]
        assert layer["grad_norm"] == pytest.approx(want["grad_norm"], rel=RTOL)
        assert layer["grad_max_abs"] == pytest.approx(want["max"], rel=RTOL)
        assert layer["weight_norm"] == pytest.approx(want["w"], rel=RTOL)
        total += want["grad_norm"] ** 2
    assert rec["global_norm"] == pytest.approx(math.sqrt(total), rel=RTOL)


def test_ddp_norms_equal_single_process_full_batch_without_collectives(ranks: list[dict[str, Any]]) -> None:
    ref = _reference()[0]
    got = W.scenario(ranks, "ddp")
    for r in range(W.WORLD):
        no_sync = got[r]["no_sync"]
        _check_layers(no_sync["record"], ref, prefix="module.")
        assert no_sync["calls"] == []  # replicated gradients: no collective at all
        assert no_sync["record"]["loss"] == no_sync["local_loss"]  # rank-local loss, as asked
        sync = got[r]["sync"]
        _check_layers(sync["record"], ref, prefix="module.")
        # once per run, a SUM agreeing on the layer order; then one SUM for the loss and activations
        assert sync["calls"] == ["sum", "sum"]
        assert sync["record"]["loss"] == pytest.approx(ref["loss"], rel=RTOL)
    assert got[0]["sync"]["record"] == got[1]["sync"]["record"] | {
        "overhead": got[0]["sync"]["record"]["overhead"]
    }


def test_ddp_sinks_written_on_rank_zero_only(ranks: list[dict[str, Any]]) -> None:
    from gradsentry.logs.run_jsonl import read_jsonl

    W.scenario(ranks, "ddp")
    out = Path(ranks[0]["_out"])
    run = read_jsonl(out / "ddp_sink0.jsonl")
    assert [rec.step for rec in run.records] == [0]
    assert not (out / "ddp_sink1.jsonl").exists()


def test_fsdp2_norms_equal_unsharded_computation(ranks: list[dict[str, Any]]) -> None:
    refs = _reference(steps=3)
    got = W.scenario(ranks, "fsdp")
    assert got[0]["local_numel"] != got[1]["local_numel"]  # uneven shards really happened
    for r in range(W.WORLD):
        g = got[r]
        assert g["sharded"] is True
        for step, (rec, ref) in enumerate(zip(g["records"], refs[:2], strict=True)):
            _check_layers(rec, ref)
            assert rec["loss"] == pytest.approx(ref["loss"], rel=RTOL)
            act = rec["activations"][0]
            assert act["pre_mean"] == pytest.approx(ref["acts"]["1"]["pre_mean"], rel=RTOL, abs=1e-7)
            assert act["saturated_frac"] == pytest.approx(ref["acts"]["1"]["sat"], rel=RTOL)  # float32
            if step == 1:  # the SGD step between the two logged steps, measured on the shards
                for layer in rec["layers"]:
                    want = ref["layers"][layer["name"]]["ratio"]
                    assert layer["update_ratio"] == pytest.approx(want, rel=RTOL)
        # one all_reduce(SUM) and one all_reduce(MAX) per logged step, nothing else
        assert g["calls"] == [["sum", "sum", "max"], ["sum", "max"]]  # (the first: + order agreement)
        torch.testing.assert_close(
            torch.tensor(g["last_norms"], dtype=torch.float64),
            torch.tensor(refs[1]["per_tensor"], dtype=torch.float64),
            rtol=RTOL,
            atol=0,
        )
    for r in range(W.WORLD):  # lean Monitor (max_abs=False, weight_norms=False) on the third gradient
        lean = got[r]["lean"]
        assert lean["calls"] == ["sum", "sum"]  # a new Monitor: order agreement, then the one SUM
        for layer in lean["record"]["layers"]:
            want = refs[2]["layers"][layer["name"]]
            assert layer["grad_norm"] == pytest.approx(want["grad_norm"], rel=RTOL)
            assert layer["numel"] == want["numel"]
            assert layer["grad_max_abs"] is None and layer["weight_norm"] is None
    # the helpers the remedies use, on the third step's gradient: the same on each rank, and right
    for r in range(W.WORLD):
        for key, ref_key in (
            ("global_per_tensor", "per_tensor"),
            ("global_max_abs", "per_tensor_max"),
            ("global_l1", "per_tensor_l1"),
        ):
            torch.testing.assert_close(
                torch.tensor(got[r][key], dtype=torch.float64),
                torch.tensor(refs[2][ref_key], dtype=torch.float64),
                rtol=RTOL,
                atol=0,
            )
        assert got[r]["global_sq"] == pytest.approx(sum(n * n for n in refs[2]["per_tensor"]), rel=RTOL)
    assert got[0]["global_per_tensor"] == got[1]["global_per_tensor"]
    assert got[0]["records"] == [
        rec | {"overhead": a["overhead"]} for rec, a in zip(got[1]["records"], got[0]["records"], strict=True)
    ]


def test_hsdp_replicated_mesh_dimension_is_counted_once(ranks: list[dict[str, Any]]) -> None:
    ref = _reference()[0]
    got = W.scenario(ranks, "hsdp")
    for r in range(W.WORLD):
        assert got[r]["placements"] == ["R", "S(0)"]  # (Replicate(), Shard(0))
        _check_layers(got[r]["record"], ref)  # a double count would give sqrt(2) times the norms
        assert got[r]["record"]["loss"] == pytest.approx(ref["loss"], rel=RTOL)
        assert got[r]["calls"] == ["sum", "sum", "max"]


def test_plain_tensors_declared_sharded_are_summed_over_ranks(ranks: list[dict[str, Any]]) -> None:
    ref = _reference()[0]
    got = W.scenario(ranks, "plain_sharded")
    for r in range(W.WORLD):
        _check_layers(got[r]["record"], ref)  # norms, max |g|, weight norms and numel of the whole model
        assert got[r]["record"]["layers"][0]["grad_rms"] == pytest.approx(
            ref["layers"]["0"]["grad_norm"] / math.sqrt(ref["layers"]["0"]["numel"]), rel=RTOL
        )


def test_fsdp1_is_refused_clearly_unless_declared_sharded(ranks: list[dict[str, Any]]) -> None:
    ref = _reference()[0]
    want = math.sqrt(sum(layer["grad_norm"] ** 2 for layer in ref["layers"].values()))
    for g in W.scenario(ranks, "fsdp1"):
        assert g["refused"].startswith("gradsentry: FSDP1 (FullyShardedDataParallel) is not supported")
        assert g["global_norm"] == pytest.approx(want, rel=RTOL)
        assert g["loss"] == pytest.approx(ref["loss"], rel=RTOL)


def test_ranks_on_different_forward_paths_reduce_matching_entries(ranks: list[dict[str, Any]]) -> None:
    got = W.scenario(ranks, "ddp_branches")
    model = W.Branchy()
    want = {}
    for r, site in ((0, "module.a"), (1, "module.b")):  # each site ran on one rank only
        pre = model.inp(W.local_batch(r)[0]).detach().double()
        want[site] = (pre.mean().item(), pre.std().item())
    for r in range(W.WORLD):
        acts = {a["name"]: a for a in got[r]["step0"]["activations"]}
        assert set(acts) == {"module.a", "module.b"}
        for site, (mean, std) in want.items():
            assert acts[site]["pre_mean"] == pytest.approx(mean, rel=RTOL, abs=1e-7)
            assert acts[site]["pre_std"] == pytest.approx(std, rel=RTOL)
        assert got[r]["step0"]["nonfinite_origin"] is None
        assert got[r]["step1"]["nonfinite_origin"] == "module.inp"  # rank 1's first non-finite output


def test_overhead_budget_every_is_agreed_over_ranks(ranks: list[dict[str, Any]]) -> None:
    got = W.scenario(ranks, "ddp_every")
    assert got[0]["calls"] == got[1]["calls"] == ["sum", "max"]  # DDP, sync_local=False: order, every
    assert got[0]["every"] == got[1]["every"] >= 5


def test_nan_on_one_rank_shard_is_seen_by_every_rank(ranks: list[dict[str, Any]]) -> None:
    got = W.scenario(ranks, "fsdp_nan")
    for r in range(W.WORLD):
        rec = got[r]["record"]
        assert got[r]["any_rank"] is True
        assert math.isnan(rec["global_norm"])
        by_name = {layer["name"]: layer for layer in rec["layers"]}
        assert by_name["2"]["nonfinite"] == 1
        assert math.isnan(by_name["2"]["grad_norm"]) and math.isnan(by_name["2"]["grad_max_abs"])
        assert by_name["0"]["nonfinite"] == 0 and math.isfinite(by_name["0"]["grad_norm"])


def _reference_remedy(make: Any) -> dict[str, Any]:
    """The remedy applied in one process on the full batch's gradient, STEPS SGD steps."""
    model = W.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=W.LR)
    remedy = make()
    x, y = W.make_data()
    for _ in range(W.STEPS):
        nn.functional.cross_entropy(model(x), y).backward()
        remedy(list(model.parameters()))
        opt.step()
        opt.zero_grad()
    state = remedy.state_dict() if hasattr(remedy, "state_dict") else None
    return {"params": [p.detach().tolist() for p in model.parameters()], "state": state}


def _assert_close_tree(got: Any, want: Any) -> None:
    if isinstance(want, dict):
        assert set(got) == set(want)
        for k in want:
            _assert_close_tree(got[k], want[k])
    elif isinstance(want, list) and want and isinstance(want[0], list) and len(want[0]) != len(want[-1]):
        assert len(got) == len(want)  # ragged (one entry per parameter)
        for g, w in zip(got, want, strict=True):
            _assert_close_tree(g, w)
    elif isinstance(want, list):
        torch.testing.assert_close(
            torch.tensor(got, dtype=torch.float64),
            torch.tensor(want, dtype=torch.float64),
            rtol=RTOL,
            atol=1e-7,
        )
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=RTOL)
    else:
        assert got == want


@pytest.mark.parametrize("name", W.REMEDIES)
def test_fsdp2_clipping_leaves_the_parameters_of_single_process_clipping(
    ranks: list[dict[str, Any]], name: str
) -> None:
    pytest.importorskip("gradsentry.remedies")
    want = _reference_remedy(W.remedy_cases()[name])
    got = W.scenario(ranks, "fsdp_remedies")
    for r in range(W.WORLD):
        assert "error" not in got[r][name], f"rank {r}, {name}:\n{got[r][name].get('error')}"
        _assert_close_tree(got[r][name]["params"], want["params"])
        _assert_close_tree(got[r][name]["state"], want["state"])  # ZClip/AutoClip statistics
    assert got[0][name]["state"] == got[1][name]["state"]  # identical across ranks, not only close
    clipped = [a["clipped"] for acts in got[0][name]["actions"] for a in acts]
    assert any(clipped)  # the scenario really clips


def test_nan_on_one_rank_makes_every_rank_skip_under_nonfinite_guard(ranks: list[dict[str, Any]]) -> None:
    pytest.importorskip("gradsentry.remedies")
    got = W.scenario(ranks, "nan_guard")
    for r in range(W.WORLD):
        fsdp = got[r]["fsdp"]
        assert [a["skipped"] for a in fsdp["actions"]] == [True]
        assert fsdp["grads_none"] and fsdp["unchanged"]
        assert got[r]["ddp"] == {"grads_none": [True, True], "skips": 2}


def test_rollback_and_ladder_decide_the_same_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    pytest.importorskip("gradsentry.remedies")
    got = W.scenario(ranks, "ddp_rollback_ladder")
    for r in range(W.WORLD):
        rb = got[r]["rollback"]
        assert rb["skips"] == [False, False, True]  # rank 1's inf loss rolls back rank 0 too
        assert rb["restores"] == 1 and rb["lr"] == pytest.approx(W.LR * 0.5)
        assert got[r]["ladder"]["skips"] == [False, True]  # rank 1's NaN gradient skips rank 0 too
        assert got[r]["ladder"]["counts"]["skip"] == 1
    assert got[0]["rollback"]["w"] == got[1]["rollback"]["w"]


def test_dead_or_hung_peer_raises_a_clear_error_instead_of_hanging(ranks: list[dict[str, Any]]) -> None:
    got = ranks[0]["dead_peer"]
    assert "error" not in got, got.get("error")
    for case, limit in (("hung", 1.0), ("died", 5.0)):
        err = got[case]
        assert err["type"] == "DistributedError"
        assert "A rank has probably died, hung, or skipped a logged Monitor.step()" in err["msg"]
        assert err["seconds"] < limit + 2.0
    assert "timeout 1 s" in got["hung"]["msg"]
