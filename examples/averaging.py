"""Average gradients across processes with gradkit; run with torchrun:
    torchrun --nproc_per_node 2 examples/averaging.py --steps 50
    torchrun --nproc_per_node 2 examples/averaging.py --compressor topk   # 1% of the entries + error feedback
"""

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F

import gradkit as gk

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=50)
parser.add_argument("--compressor", choices=["none", "topk", "powersgd"], default="none")
args = parser.parse_args()
dist.init_process_group("gloo")  # torchrun provides rank, world size and the rendezvous
rank = dist.get_rank()
torch.manual_seed(0)  # the same model everywhere (gk.Average also broadcasts rank 0's weights)
model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
compressor = {"none": None, "topk": gk.TopK(0.01), "powersgd": gk.PowerSGD(rank=2)}[args.compressor]
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
pipe = gk.GradientPipeline(model, accumulation_steps=2, average=gk.Average(compressor), clip=gk.ClipByGlobalNorm(1.0))
generator = torch.Generator().manual_seed(1 + rank)  # each rank reads its own data
teacher = torch.randn(32, 4, generator=torch.Generator().manual_seed(7))
held_out = torch.randn(256, 32, generator=torch.Generator().manual_seed(8))  # one fixed batch for every report
for _ in range(args.steps * 2):
    x = torch.randn(16 + 8 * rank, 32, generator=generator)  # uneven batches: weighted by items
    loss = F.mse_loss(model(x), x @ teacher, reduction="sum")
    pipe.backward(loss, num_items=x.shape[0])
    if pipe.step(optimizer) and rank == 0 and pipe.steps % 10 == 0:
        with torch.no_grad():  # the held-out loss moves with the model alone, not with the batch drawn
            held = F.mse_loss(model(held_out), held_out @ teacher).item()
        print(f"step {pipe.steps}: held-out loss {held:.4f}, sent {pipe.last.bytes_sent} of {pipe.last.dense_bytes} B")
checksum = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).sum().item()
print(f"rank {rank}: done, parameter checksum {checksum:.6f}", flush=True)
dist.barrier()  # every rank done with its collectives before any tears gloo down
dist.destroy_process_group()
