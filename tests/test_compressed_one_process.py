"""One process, compressed: under a GradScaler the written-back gradient carries the loss scale.

The one-process step writes what TopK sends back into the gradient inside its selecting pass
(times the loss scale, which GradScaler then removes), so training with a scaler must match
training without one: same parameters, same residuals (power-of-two scales are exact).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradkit as gk


def train(compressor: gk.Compressor, scaler: torch.amp.GradScaler | None, steps: int = 4):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(200, 150), nn.Tanh(), nn.Linear(150, 10))  # 30k weights: the sampled path
    average = gk.Average(compressor)
    pipe = gk.GradientPipeline(model, average=average, scaler=scaler)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 200, generator=generator), torch.randn(16, 10, generator=generator)
        pipe.backward(nn.functional.mse_loss(model(x), y))
        assert pipe.step(optimizer)
    return [p.detach().clone() for p in model.parameters()], average.state_dict()["compressor"]["residuals"]


@pytest.mark.parametrize(
    "make",
    [
        lambda: gk.TopK(0.05),
        lambda: gk.TopK(0.05, exactly_k=True),
        lambda: gk.ErrorFeedback(gk.TopK(0.05), residual_dtype=torch.bfloat16),
    ],
)
def test_a_grad_scaler_changes_nothing_in_the_one_process_compressed_step(make):
    plain_params, plain_residuals = train(make(), None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    scaled_params, scaled_residuals = train(make(), scaler)
    for plain, scaled in zip(plain_params, scaled_params):
        torch.testing.assert_close(scaled, plain, rtol=1e-6, atol=1e-7)
    assert plain_residuals.keys() == scaled_residuals.keys() and plain_residuals
    for name, residual in plain_residuals.items():
        torch.testing.assert_close(scaled_residuals[name], residual, rtol=1e-6, atol=1e-7)
    start, _ = train(make(), None, steps=0)
    assert all(not torch.equal(a, b) for a, b in zip(plain_params, start))  # every tensor was updated
