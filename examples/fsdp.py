"""Train an FSDP2-sharded model through gradkit; run with torchrun (CPU + gloo works):
    torchrun --nproc_per_node 2 examples/fsdp.py --steps 30
    torchrun --nproc_per_node 2 examples/fsdp.py --reduce boundary   # one reduce-scatter per window"""

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard

import gradkit as gk

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--reduce", choices=["every", "boundary"], default="every")
args = parser.parse_args()
dist.init_process_group("gloo")  # torchrun provides rank, world size and the rendezvous
rank = dist.get_rank()
torch.manual_seed(0)  # the same initial model everywhere; fully_shard keeps each rank's shard
model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
for module in (model[0], model[2], model):  # each Linear, then the root
    fully_shard(module)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
sync = gk.FSDPSync(model, reduce=args.reduce)  # without average=, the pipeline picks reduce="every" itself
pipe = gk.GradientPipeline(model, accumulation_steps=2, average=sync, clip=gk.ClipByGlobalNorm(1.0),
                           tracker=gk.Tracker(None, every=10))
generator = torch.Generator().manual_seed(1 + rank)  # each rank reads its own data
teacher = torch.randn(32, 4, generator=torch.Generator().manual_seed(7))
for _ in range(args.steps * 2):
    x = torch.randn(16 + 8 * rank, 32, generator=generator)  # uneven batches: weighted by items
    loss = F.mse_loss(model(x), x @ teacher, reduction="sum")
    pipe.backward(loss, num_items=x.shape[0])
    if pipe.step(optimizer) and rank == 0 and pipe.steps % 10 == 0:
        print(f"step {pipe.steps}: loss/item {loss.item() / len(x):.4f}, grad norm {pipe.last.total_norm.item():.4f}")
checksum = sum(p.full_tensor().sum().item() for p in model.parameters())  # full parameters, and the full norm:
print(f"rank {rank}: done, grad norm {pipe.last.total_norm.item():.6f}, parameter checksum {checksum:.6f}", flush=True)
dist.barrier()  # every rank done with its collectives before any tears gloo down
dist.destroy_process_group()
