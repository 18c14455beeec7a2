"""`gk.Average(even_windows=True)`: windows that complete together (as under DDP) need no count all-reduce."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

import gradkit as gk
from dist_helpers import run_workers

LR = 0.1


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 2)).double()


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * rank + step)
    return torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, 2, generator=g, dtype=torch.float64)


def train(rank: int, world: int, even: bool, compressor: str | None) -> dict:
    """Three windows of 2 micro-batches and a flushed one of 1, counting the integer all-reduces."""
    counted = {"integer": 0}
    original = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        counted["integer"] += not tensor.is_floating_point()
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        net = model()
        squeeze = gk.TopK(0.5, exact=True) if compressor == "topk" else None
        pipe = gk.GradientPipeline(net, accumulation_steps=2, average=gk.Average(squeeze, even_windows=even))
        opt = torch.optim.SGD(net.parameters(), lr=LR)
        for step in range(7):
            x, y = batch(rank, step)
            pipe.backward(nn.functional.mse_loss(net(x), y))
            pipe.step(opt)
        pipe.flush(opt)
    finally:
        dist.all_reduce = original
    return {"params": [p.detach().clone() for p in net.parameters()], "integer": counted["integer"]}


def both(rank: int, world: int, compressor: str | None) -> dict:
    return {even: train(rank, world, even, compressor) for even in (False, True)}


@pytest.mark.parametrize("compressor", [None, "topk"])
def test_even_windows_give_the_same_steps_without_the_count_all_reduce(compressor):
    for rank in run_workers(both, 2, compressor):
        default, even = rank[False], rank[True]
        assert default["integer"] == 4  # 3 complete windows and the flush, each one count all-reduce
        assert even["integer"] == 1  # the flush only
        for a, b in zip(default["params"], even["params"]):
            assert torch.equal(a, b)


def reference() -> list[torch.Tensor]:
    """One process: a step per window on the mean over every rank's micro-batches in it."""
    net = model()
    windows = [[0, 1], [2, 3], [4, 5], [6]]
    for window in windows:
        net.zero_grad()
        losses = [nn.functional.mse_loss(net(x), y) for rank in range(2) for x, y in [batch(rank, s) for s in window]]
        (torch.stack(losses).mean()).backward()
        with torch.no_grad():
            for p in net.parameters():
                p -= LR * p.grad
    return [p.detach() for p in net.parameters()]


def test_even_windows_are_the_mean_over_every_micro_batch():
    expected = reference()
    for rank in run_workers(train, 2, True, None):
        for got, want in zip(rank["params"], expected):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_even_windows_must_be_a_bool():
    with pytest.raises(TypeError, match="even_windows must be True or False, got str 'yes'"):
        gk.Average(even_windows="yes")
