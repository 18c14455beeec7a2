"""Gradient tracking: per-layer statistics, alerts naming the first bad layer, noise scale, a report.

    python examples/tracking.py --steps 200 && gradkit report runs/tracking-example
"""

import argparse

import torch
import torch.nn.functional as F

import gradkit as gk

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=200)
parser.add_argument("--log-dir", default="runs/tracking-example")
args = parser.parse_args()

torch.manual_seed(0)
layers = [torch.nn.Linear(32, 32) for _ in range(10)]
model = torch.nn.Sequential(*[m for layer in layers for m in (layer, torch.nn.Sigmoid())], torch.nn.Linear(32, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
tracker = gk.Tracker(args.log_dir, every=10)  # full statistics every 10th step, cheap ones in between
pipe = gk.GradientPipeline(model, accumulation_steps=2, clip=gk.ClipByGlobalNorm(1.0), tracker=tracker)

for _ in range(args.steps * 2):
    x = torch.randn(16, 32)
    loss = F.mse_loss(model(x), x.sum(dim=1, keepdim=True), reduction="sum")
    pipe.backward(loss, num_items=16)
    pipe.step(optimizer)
tracker.close()

for alert in tracker.alerts[:3]:  # a deep sigmoid stack: the first layers' gradients vanish
    print(f"alert at step {alert.step}: {alert.kind} in {alert.name}")
noise = tracker.history[-1]["noise"] or {}
print("noise scale:", noise.get("advice") or "no estimate yet (it needs more measured steps)")
