"""AutoMonitor in process: which model and optimizer it picks, the loss it takes, what it measures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from gradsentry.autoattach import AutoMonitor, scalar_loss
from gradsentry.logs.run_jsonl import read_jsonl


class Backwards(nn.Module):
    """Defined last-layer-first, called first-layer-first, and returns ``(logits, loss)`` like nanoGPT."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(16, 1)
        self.body = nn.Linear(16, 16)
        self.stem = nn.Linear(4, 16)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.head(torch.tanh(self.body(torch.tanh(self.stem(x)))))
        return out, (out - y).pow(2).mean()


def test_forward_order_loss_and_post_clip_norm(tmp_path: Path) -> None:
    model = Backwards()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    own_loss, own_norm = [], []
    with AutoMonitor(tmp_path / "r.jsonl") as auto:
        for _ in range(4):
            _, loss = model(x, y)
            loss.backward()
            own_loss.append(loss.item())
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)  # the script clips before its step
            own_norm.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))))
            opt.step()
            opt.zero_grad()
    assert auto.model is model
    run = read_jsonl(tmp_path / "r.jsonl")
    assert [(i.name, i.depth) for i in run.header.layers] == [("stem", 0), ("body", 1), ("head", 2)]
    assert [r.loss for r in run.records] == pytest.approx(own_loss, rel=1e-6)
    # measured just before optimizer.step(): after the script's clipping, so at most 0.1
    assert [r.global_norm for r in run.records] == pytest.approx(own_norm, rel=1e-6)
    assert max(own_norm) <= 0.1 * (1 + 1e-6)
    assert run.header.meta["model"] == "Backwards"


def test_second_optimizer_and_two_modules(tmp_path: Path) -> None:
    enc, dec, critic = nn.Linear(4, 8), nn.Linear(8, 2), nn.Linear(2, 1)
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=1e-3)
    opt_critic = torch.optim.SGD(critic.parameters(), lr=1e-2)
    x = torch.randn(16, 4)
    with AutoMonitor(tmp_path / "r.jsonl", every=2) as auto:
        for _ in range(5):
            out = dec(enc(x))
            critic(out.detach()).mean().backward()
            opt_critic.step()
            opt_critic.zero_grad()
            out.pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    # the first optimizer to step is the critic's: it and the module it steps are the ones monitored
    assert auto.optimizer is opt_critic and auto.model is critic
    assert any("second optimizer (Adam)" in n for n in auto.notes)
    assert [r.step for r in read_jsonl(tmp_path / "r.jsonl").records] == [0, 2, 4]

    with AutoMonitor(tmp_path / "s.jsonl") as auto:
        for _ in range(2):
            dec(enc(x)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    assert isinstance(auto.model, nn.ModuleDict) and list(auto.model) == ["Linear", "Linear_2"]
    run = read_jsonl(tmp_path / "s.jsonl")
    assert [i.name for i in run.header.layers] == ["Linear", "Linear_2"]
    assert run.header.meta["model"] == "Linear+Linear_2"


def test_hooks_are_removed_and_nothing_found_is_harmless(tmp_path: Path) -> None:
    import torch.nn.modules.module as module_mod
    import torch.optim.optimizer as optim_mod

    before = (len(module_mod._global_forward_pre_hooks), len(module_mod._global_forward_hooks))
    before_opt = len(optim_mod._global_optimizer_pre_hooks)
    w = torch.zeros(3, requires_grad=True)  # a parameter no module owns
    opt = torch.optim.SGD([w], lr=0.1)
    with AutoMonitor(tmp_path / "r.jsonl") as auto:
        (w - 1).pow(2).sum().backward()
        opt.step()
    assert auto.monitor is None and "no module called in a forward pass owns" in auto.notes[-1]
    assert not (tmp_path / "r.jsonl").exists()
    assert w.tolist() == pytest.approx([0.2, 0.2, 0.2])  # the step itself ran untouched
    assert (len(module_mod._global_forward_pre_hooks), len(module_mod._global_forward_hooks)) == before
    assert len(optim_mod._global_optimizer_pre_hooks) == before_opt


def test_scalar_loss_rules() -> None:
    t = torch.tensor(2.0, requires_grad=True) * 1
    assert scalar_loss(t) is not None and not scalar_loss(t).requires_grad  # type: ignore[union-attr]
    assert scalar_loss((torch.randn(3, 2), t)) is not None
    assert scalar_loss({"loss": t, "logits": torch.randn(2)}) is not None
    assert scalar_loss(torch.randn(1, 1, requires_grad=True)) is None  # a batch of one prediction
    assert scalar_loss((t, t)) is None  # two candidates: ambiguous
    assert scalar_loss(torch.tensor(1.0)) is None  # no graph: not a training loss
