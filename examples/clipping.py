"""Norm scaling: adaptive spike clipping (ZClip) then a global-norm cap, with mixed precision.

    python examples/clipping.py --steps 100
"""

import argparse

import torch
import torch.nn.functional as F

import gradkit as gk

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=100)
args = parser.parse_args()

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)  # a CUDA run passes "cuda"
pipe = gk.GradientPipeline(model, clip=[gk.ZClip(z_thresh=2.5, warmup=10), gk.ClipByGlobalNorm(1.0)], scaler=scaler)

for step in range(args.steps):
    x = torch.randn(32, 16)
    y = x.sum(dim=1, keepdim=True)
    if step % 37 == 36:
        y = y * 100  # a corrupted batch: a gradient spike ZClip should tame
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.mse_loss(model(x), y)
    pipe.backward(loss)
    pipe.step(optimizer)
    if step % 37 == 36 or step == args.steps - 1:
        last = pipe.last
        print(f"step {last.step}: norm {last.total_norm.item():.2f} -> {last.norm_after.item():.2f}, "
              f"skipped steps {pipe.skipped_steps}")
