"""gradkit in an Accelerate loop with accumulation: a tracker and ZClip between backward and step.

    python examples/accelerate_loop.py --steps 30 --log-dir runs/acc
    accelerate launch --cpu --num_processes 2 examples/accelerate_loop.py --steps 30 --log-dir runs/acc
"""

import argparse

import torch
from accelerate import Accelerator
from torch import nn

import gradkit as gk
from gradkit.integrations.accelerate import GradkitStep

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--log-dir", default="runs/acc")
args = parser.parse_args()
torch.manual_seed(0)
x = torch.randn(1024, 16)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True).sin()), batch_size=16)
model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))
accelerator = Accelerator(gradient_accumulation_steps=2, cpu=True)
model, optimizer, loader = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), loader)
step = GradkitStep(accelerator, model, tracker=gk.Tracker(args.log_dir, every=5), clip=gk.ZClip(warmup=5))
for _, (xb, yb) in zip(range(2 * args.steps), loader):
    with accelerator.accumulate(model):
        loss = nn.functional.mse_loss(model(xb), yb)
        accelerator.backward(loss)
        step.before_step()  # on the window's last micro-batch: unscale, norm, ZClip, track
        optimizer.step()
        step.after_step()
        optimizer.zero_grad()
step.close()
print(f"rank {accelerator.process_index}: done, {step.steps} steps, loss {loss.item():.4f}")
