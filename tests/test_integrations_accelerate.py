"""gradkit's Accelerate helper on a real Accelerator loop with accelerator.accumulate(model)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("accelerate")
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

import gradkit as gk
from gradkit.integrations.accelerate import GradkitStep

ROOT = Path(__file__).resolve().parent.parent


def loop(tracker=None, clip=None, accelerate_clip=None, steps=6):
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    torch.manual_seed(0)
    x = torch.randn(96, 8)
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True).sin())
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    accelerator = Accelerator(gradient_accumulation_steps=2, cpu=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    model, opt, loader = accelerator.prepare(model, opt, torch.utils.data.DataLoader(data, batch_size=8))
    step = GradkitStep(accelerator, model, tracker=tracker, clip=clip) if tracker or clip else None
    for _, (xb, yb) in zip(range(2 * steps), loader):
        with accelerator.accumulate(model):
            accelerator.backward(nn.functional.mse_loss(model(xb), yb))
            if step is not None:
                step.before_step()
            if accelerate_clip and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), accelerate_clip)
            opt.step()
            if step is not None:
                step.after_step()
            opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()], step


def test_tracking_changes_nothing_and_counts_optimizer_steps(tmp_path):
    plain, _ = loop()
    tracker = gk.Tracker(tmp_path / "run", every=1)
    tracked, step = loop(tracker=tracker)
    assert all(torch.equal(a, b) for a, b in zip(plain, tracked))
    assert step.steps == 6 and [r["step"] for r in tracker.history] == list(range(1, 7))


def test_gradkit_clipping_equals_accelerate_clipping():
    reference, _ = loop(accelerate_clip=0.05)
    ours, _ = loop(clip=gk.ClipByGlobalNorm(0.05))
    unclipped, _ = loop()
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(reference, unclipped))
    for a, b in zip(reference, ours):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


def test_bad_accelerator_is_a_clear_error():
    with pytest.raises(TypeError, match="accelerator must be an accelerate.Accelerator"):
        GradkitStep(object(), nn.Linear(2, 2))


def test_accelerate_example_runs(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    cmd = [
        sys.executable,
        str(ROOT / "examples" / "accelerate_loop.py"),
        "--steps",
        "10",
        "--log-dir",
        str(tmp_path / "run"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"rank 0: done, 10 steps, loss [\d.]+", done.stdout)
    assert (tmp_path / "run" / "tracking.jsonl").exists()
