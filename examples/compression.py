"""Sparse gradients on one process: only the top 1% of entries reach the optimizer each step;
error feedback keeps the rest for later steps (selective updates), so training still converges.

    python examples/compression.py --steps 200
"""

import argparse

import torch
import torch.nn.functional as F

import gradkit as gk

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=200)
parser.add_argument("--density", type=float, default=0.01)
args = parser.parse_args()

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 8))
teacher = torch.nn.Linear(64, 8)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
pipe = gk.GradientPipeline(model, average=gk.Average(gk.TopK(args.density)))  # + ErrorFeedback by default

for step in range(args.steps):
    x = torch.randn(64, 64)
    with torch.no_grad():
        y = teacher(x)
    loss = F.mse_loss(model(x), y)
    pipe.backward(loss)
    pipe.step(optimizer)
    if step % 50 == 0 or step == args.steps - 1:
        print(f"step {step}: loss {loss.item():.4f}")
