"""Rollback: bit-for-bit restore after an injected divergence, retries, bad snapshot files."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from gradsentry.remedies import Rollback, RollbackError, SnapshotError, load_snapshot


def _setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    return model, opt


def _batch(step):
    g = torch.Generator().manual_seed(step)
    return torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g)


def _train_step(model, opt, rb, step, poison=False):
    opt.zero_grad()
    x, y = _batch(step)
    loss = (model(x) - y).pow(2).mean()
    if poison:
        loss = loss * float("inf")
    loss.backward()
    res = rb(model.parameters(), loss=loss)
    opt.step()
    return res


def _equal(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.parametrize("where", ["memory", "directory"])
def test_rollback_restores_last_snapshot_bit_for_bit(where, tmp_path):
    model, opt = _setup()
    replayed = []
    rb = Rollback(
        model,
        opt,
        every=3,
        directory=tmp_path if where == "directory" else None,
        replay=lambda: replayed.append([p.detach().clone() for p in model.parameters()]),
    )
    saved = {}
    for step in range(7):
        if step % 3 == 0:  # what the snapshot at this step must hold
            saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
        res = _train_step(model, opt, rb, step)
        assert not res.skip
    assert rb.snapshot_steps == [6]
    diverged_weights = [p.detach().clone() for p in model.parameters()]
    res = _train_step(model, opt, rb, 7, poison=True)  # loss is inf: gradients are NaN
    assert res.skip and res.to_dict()["reason"] == "nonfinite_grad"
    assert res.to_dict()["restored_step"] == 6
    # model and optimizer equal the step-6 snapshot bit for bit (opt.step() above was a no-op)
    sd, osd = saved
    assert _equal(sd, model.state_dict())
    osd["param_groups"][0]["lr"] = 5e-3  # lowered by lr_factor=0.5
    assert _equal(osd, opt.state_dict())
    # replay ran on the diverged weights, before the restore
    assert len(replayed) == 1 and all(
        torch.equal(a, b) for a, b in zip(replayed[0], diverged_weights, strict=True)
    )
    # training goes on and stays finite
    for step in range(8, 12):
        assert not _train_step(model, opt, rb, step).skip
    assert all(torch.isfinite(p).all() for p in model.parameters()) and rb.restores == 1
    if where == "directory":
        files = sorted(tmp_path.glob("snapshot-*.pt"))
        assert [f.name for f in files] == ["snapshot-00000009.pt"]  # keep=1: older files deleted


def test_rollback_loss_spike_and_retry_limit_and_keep():
    model, opt = _setup()
    rb = Rollback(model, opt, every=2, keep=2, loss_factor=5.0, min_history=3, max_retries=2)
    for step in range(6):
        _train_step(model, opt, rb, step)
    assert rb.snapshot_steps == [2, 4]
    med = sorted(rb.losses)[len(rb.losses) // 2]
    res = rb(model.parameters(), loss=torch.tensor(med * 100))
    d = res.to_dict()
    assert d["reason"] == "loss_spike" and d["restored_step"] == 4 and d["lr"] == [5e-3]
    res = rb(model.parameters(), loss=float("nan"))
    d = res.to_dict()
    assert (
        d["reason"] == "nonfinite_loss" and d["restored_step"] == 2 and d["retries"] == 2
    )  # goes further back
    with pytest.raises(RollbackError, match=r"diverged .* 3 times in a row"):
        rb(model.parameters(), loss=float("nan"))


def test_rollback_before_first_snapshot_is_a_clear_error():
    model, opt = _setup()
    rb = Rollback(model, opt)
    with pytest.raises(RollbackError, match="before the first snapshot"):
        rb(model.parameters(), loss=float("inf"))
    with pytest.raises(ValueError, match="lr_factor must be in"):
        Rollback(model, opt, lr_factor=2.0)


def test_snapshot_files_cut_short_or_foreign_give_clear_errors(tmp_path):
    model, opt = _setup()
    rb = Rollback(model, opt, every=1, directory=tmp_path)
    _train_step(model, opt, rb, 0)
    (good,) = list(tmp_path.glob("snapshot-*.pt"))
    snap = load_snapshot(good)
    assert snap["step"] == 0 and set(snap["model"]) == set(model.state_dict())
    data = good.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(SnapshotError, match="cut short or corrupt"):
        load_snapshot(cut)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.ones(2)}, other)
    with pytest.raises(SnapshotError, match=r"is not a gradsentry snapshot .*expected a dict with key"):
        load_snapshot(other)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(SnapshotError, match=r"not a torch\.save file"):
        load_snapshot(text)
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(Rollback, protocol=2))  # unpickling would import code: refused
    with pytest.raises(SnapshotError, match="not a gradsentry snapshot"):
        load_snapshot(evil)
    with pytest.raises(SnapshotError, match="does not exist"):
        load_snapshot(tmp_path / "missing.pt")
    # A snapshot file truncated on disk makes the restore fail clearly, not with a deep traceback.
    good.write_bytes(data[:100])
    with pytest.raises(SnapshotError, match="cut short"):
        rb.restore()


def test_a_corrupt_newest_snapshot_falls_back_to_the_one_before(tmp_path, caplog):
    model, opt = _setup()
    rb = Rollback(model, opt, every=1, directory=tmp_path, keep=3)
    for step in range(3):
        _train_step(model, opt, rb, step)
    newest = sorted(tmp_path.glob("snapshot-*.pt"))[-1]
    newest.write_bytes(b"garbage, not a snapshot")
    with caplog.at_level("WARNING", logger="gradsentry"):
        assert rb.restore() == 1  # step 2's file is garbage: step 1's snapshot is restored
    assert "restoring the snapshot before it instead" in caplog.text
    assert "weights_only set to False" not in caplog.text  # torch's unsafe advice is not passed on


def test_a_folder_named_like_a_snapshot_is_not_taken_over(tmp_path):
    """A folder `snapshot-00000009.pt` in the directory was taken for the newest snapshot; deleting it
    beyond `keep` raised IsADirectoryError from inside the training step."""
    (tmp_path / "snapshot-00000009.pt").mkdir()
    model, opt = _setup()
    rb = Rollback(model, opt, every=1, directory=tmp_path, keep=1)
    assert rb.snapshot_steps == []
    for step in range(3):
        _train_step(model, opt, rb, step)
    assert rb.restore() == 2
    assert (tmp_path / "snapshot-00000009.pt").is_dir()  # left alone
