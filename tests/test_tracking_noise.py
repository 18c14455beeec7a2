"""The gradient noise scale matches the analytic value on a synthetic problem."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradkit as gk
from gradkit.tracking import batch_advice


class Center(nn.Module):
    """loss_i = 0.5 * ||w - x_i||^2: the gradient of the mean loss is w - mean(x)."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x):
        return 0.5 * ((self.w - x) ** 2).sum()


def test_b_simple_within_20_percent_of_d_sigma2_over_g2():
    d, sigma, b_true = 1000, 1.5, 64.0
    mu = torch.zeros(d, dtype=torch.float64)
    # ||w - mu||^2 = d sigma^2 / B_simple
    w = mu + math.sqrt(d * sigma**2 / b_true / d)
    model = Center(w.clone())
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # frozen weights: the true gradient never changes
    tracker = gk.Tracker(every=1, noise_beta=0.9)
    micro, steps = 8, 8
    pipe = gk.GradientPipeline(model, accumulation_steps=steps, tracker=tracker)
    g = torch.Generator().manual_seed(0)
    for _ in range(40 * steps):
        x = mu + sigma * torch.randn(micro, d, generator=g, dtype=torch.float64)
        pipe.backward(model(x), num_items=micro)
        pipe.step(opt)
    noise = tracker.history[-1]["noise"]
    assert noise["small_batch"] == micro and noise["big_batch"] == micro * steps
    assert noise["trace"] == pytest.approx(d * sigma**2, rel=0.2)
    assert noise["g2"] == pytest.approx(d * sigma**2 / b_true, rel=0.2)
    assert noise["b_simple"] == pytest.approx(b_true, rel=0.2)
    assert "current batch 64" in noise["advice"]


def test_no_noise_sample_without_two_batch_sizes():
    model = Center(torch.zeros(4))
    tracker = gk.Tracker(every=1)
    pipe = gk.GradientPipeline(model, tracker=tracker)
    pipe.backward(model(torch.randn(3, 4)), num_items=3)
    pipe.step(torch.optim.SGD(model.parameters(), lr=0.1))
    assert tracker.history[-1]["noise"] is None


def test_advice_direction():
    assert "below the noise scale" in batch_advice(1000.0, 64)
    assert "near the noise scale" in batch_advice(100.0, 64)
    assert "well above" in batch_advice(10.0, 640)
    assert batch_advice(None, 64) is None and batch_advice(float("nan"), 64) is None


def test_estimate_is_kept_until_the_emas_change():
    # The estimate is kept between logged steps; an update or a load makes it anew.
    from gradkit.tracking.noise_scale import NoiseScale

    noise = NoiseScale(0.5)
    first = noise.estimate()
    assert noise.estimate() is first and all(math.isnan(float(v)) for v in first)
    sample = _sample(small_sq=5.0, small_batch=1.0, big_sq=2.0, big_batch=4.0)
    noise.update(sample)
    g2, trace, b_simple = noise.estimate()
    assert float(g2) == pytest.approx((4 * 2.0 - 1 * 5.0) / 3) and float(trace) == pytest.approx(3.0 / 0.75)
    assert float(b_simple) == pytest.approx(float(trace) / float(g2))
    state = noise.state_dict()
    noise.update(_sample(small_sq=9.0, small_batch=1.0, big_sq=1.0, big_batch=4.0))
    assert float(noise.estimate()[0]) != pytest.approx(float(g2))
    noise.load_state_dict(state)
    assert float(noise.estimate()[0]) == pytest.approx(float(g2))


def _sample(**values: float):
    from gradkit.step_report import NoiseSample

    return NoiseSample(**{name: torch.tensor(value) for name, value in values.items()})


def test_a_window_not_measured_makes_no_operation_for_its_sample():
    # With a tracker logging every 3rd step, the probe measures those windows only; the others' sample is None,
    # decided before any operation (it made three: the norm's square and two casts, each a launch on a GPU).
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[str(func)] += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    pipe = gk.GradientPipeline(model, accumulation_steps=2, tracker=gk.Tracker(every=3))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sample, seen = pipe.probe.sample, []

    def counted(*args):
        with CountOps() as counter:
            got = sample(*args)
        seen.append((got is not None, sum(counter.ops.values())))
        return got

    pipe.probe.sample = counted
    for _ in range(12):
        pipe.backward(model(torch.randn(3, 4)).square().mean())
        pipe.step(opt)
    assert [measured for measured, _ in seen] == [True, False, True, False, False, True]
    assert all(ops == 0 for measured, ops in seen if not measured)
    assert all(ops > 0 for measured, ops in seen if measured)
