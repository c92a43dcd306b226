"""Run by tests/test_training_distributed.py under torchrun: one stage-2 optimiser step with each
process holding half of a fixed batch, the way train_stage2 shares it; rank r writes its parameters."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from training import distributed
from training.models import StudyNet


def fixed_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 7, 6, generator=g)
    lengths = torch.tensor([7, 5, 6, 3])
    y = torch.tensor([1.0, 0.0, 1.0, 0.0])
    return x, lengths, y


def model() -> StudyNet:
    torch.manual_seed(11)
    return StudyNet(6, hidden=8, inputs="all", dropout=0.0)


def step(net: torch.nn.Module, params, x, lengths, y) -> None:
    opt = torch.optim.SGD(params, lr=0.5)
    logit, _ = net(x, lengths)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, y)
    opt.zero_grad()
    loss.backward()
    opt.step()


if __name__ == "__main__":
    out = Path(sys.argv[1])
    r = distributed.init("cpu")
    m = model()
    net = distributed.wrap(m, torch.device("cpu"), some_unused=True)  # the slice head takes no gradient here
    x, lengths, y = fixed_batch()
    share = slice(r.rank, None, r.world)
    step(net, m.parameters(), x[share], lengths[share], y[share])
    torch.save(m.state_dict(), out / f"rank{r.rank}.pt")
    distributed.finish()
