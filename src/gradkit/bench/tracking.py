"""Tracking overhead: a training step through GradientPipeline with gk.Tracker against the same step without.

A ~6M-parameter MLP on CPU (1024 -> 2048 -> 2048 -> 16, batch 64, SGD with
momentum, global-norm clipping), timed interleaved with and without a tracker
writing JSONL. With ``every=1`` every step is a logging step: three passes
over gradients and weights (max |g|, nonzero count, weight norm), a copy of the
weights and a subtract+norm for ||Δw||/||w||, two host reads and a JSON line.
With ``every=10`` a sample is ten steps, one of them logged.
"""

from __future__ import annotations

import copy
import tempfile

import torch
from torch import nn

import gradkit
from gradkit.bench.common import Row, Settings
from gradkit.bench.timing import measure

__all__ = ["run"]

FULL_SIZES = (1024, 2048, 2048, 16)
TINY_SIZES = (32, 64, 64, 4)
BATCH = 64
REFERENCE = "no tracker"
GOAL = 0.95  # at most ~5% slower
MAX_REPEATS = 21  # a step takes ~0.1 s on a laptop CPU; more repeats add minutes, not information


def _mlp(sizes: tuple[int, ...]) -> nn.Module:
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def run(settings: Settings) -> list[Row]:
    sizes = TINY_SIZES if settings.tiny else FULL_SIZES
    torch.manual_seed(0)
    base = _mlp(sizes)
    numel = sum(p.numel() for p in base.parameters())
    x, y = torch.randn(BATCH, sizes[0]), torch.randn(BATCH, sizes[-1])
    rows = []
    with tempfile.TemporaryDirectory() as log_dir:
        for every in (1, 10):
            steps = {}
            for name, tracker in (("gradkit", gradkit.Tracker(f"{log_dir}/every{every}", every=every)), ("reference", None)):
                model = copy.deepcopy(base)
                opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
                pipe = gradkit.GradientPipeline(model, clip=gradkit.ClipByGlobalNorm(1.0), tracker=tracker)
                steps[name] = _step(pipe, model, opt, x, y)
            timings = measure(
                steps,
                warmup=min(settings.warmup, 2),
                repeats=min(settings.repeats, MAX_REPEATS),
                number=every,  # a sample spans one logging period
            )
            rows.append(
                Row(
                    f"training step + Tracker(every={every}), MLP {numel / 1e6:.1f}M params, batch {BATCH}",
                    "cpu",
                    REFERENCE,
                    GOAL,
                    gradkit_time=timings["gradkit"],
                    reference_time=timings["reference"],
                    note=f"every={every}: with tracker {timings['gradkit'].median * 1e3:.1f} ms/step, "
                    f"without {timings['reference'].median * 1e3:.1f} ms/step "
                    f"({timings['gradkit'].median / timings['reference'].median - 1:+.1%})",
                )
            )
    return rows


def _step(pipe, model, opt, x, y):
    def step() -> None:
        pipe.backward(((model(x) - y) ** 2).mean())
        pipe.step(opt)

    return step
