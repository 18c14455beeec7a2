"""One benchmark worker process (started by processes.run_workers), writing JSON to --out.

    python -m gradkit.bench.worker average --rank R --world W --init tcp://HOST:PORT --pair ddp|topk \\
        --sizes 1024,4096,... --batch B --warmup N --repeats N
    python -m gradkit.bench.worker average ... --pair ddp --tensors 10,100,1000 --batch B --warmup N --repeats N
    python -m gradkit.bench.worker memory --sizes ... --batch B --accumulation K --repeats N
    python -m gradkit.bench.worker quality --rank R --world W --init tcp://HOST:PORT --configs FILE

`average` times two kinds of training step on the same model and data, interleaved
step by step in this process (so a slow stretch hits both): ``ddp`` pairs a
gradkit dense-averaging step (GradientPipeline + gk.Average()) with a
DistributedDataParallel step; ``topk`` pairs gk.Average(gk.TopK(0.01)) with
dense gk.Average(); ``hier`` times gk.Average(node_size=N) and
gk.Average(gk.TopK(0.01), node_size=N) against flat dense gk.Average().
Rank 0's samples are reported. With ``--tensors``, the model is
instead a chain of tiny ``Linear(8, 8)`` layers with that many parameter tensors, one
model per count, all in the same process group: the result is then a list, one entry
per count.

`memory` runs training steps on one batch (at once, or in K micro-batches through
GradientPipeline(accumulation_steps=K)) in this fresh process, so its peak RSS
belongs to that configuration alone.

`quality` runs the training engine (`gradkit.train`) once per config in FILE (a
JSON list of TrainConfig fields), one after the other in the same process
group: one process start-up for all of them.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import gradkit

TIMEOUT = timedelta(seconds=120)


def mlp(sizes: list[int]) -> nn.Module:
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def tiny_layers(tensors: int) -> nn.Module:
    """A chain of ``Linear(8, 8)`` layers holding `tensors` parameter tensors (weight and bias each)."""
    return nn.Sequential(*[nn.Linear(8, 8) for _ in range(max(tensors // 2, 1))])


def average(args: argparse.Namespace) -> dict | list[dict]:
    dist.init_process_group("gloo", init_method=args.init, rank=args.rank, world_size=args.world, timeout=TIMEOUT)
    try:
        results = []
        for tensors in args.tensors or [0]:
            torch.manual_seed(0)  # the same initial model on every rank and for both candidates
            model = tiny_layers(tensors) if tensors else mlp(args.sizes)
            fan_in, fan_out = (8, 8) if tensors else (args.sizes[0], args.sizes[-1])
            results.append(_average_pair(args, model, fan_in, fan_out))
        return results if args.tensors else results[0]
    finally:
        dist.destroy_process_group()


def _average_pair(args: argparse.Namespace, base: nn.Module, fan_in: int, fan_out: int) -> dict:
    """Time the two candidates of `args.pair` on copies of `base`, interleaved step by step."""
    torch.manual_seed(1 + args.rank)  # each rank its own data, the same for both candidates
    x, y = torch.randn(args.batch, fan_in), torch.randn(args.batch, fan_out)
    steps = {}
    if args.pair == "ddp":
        steps["gradkit"] = _pipeline_step(copy.deepcopy(base), gradkit.Average(), x, y)
        steps["reference"] = _ddp_step(copy.deepcopy(base), x, y)
    elif args.pair == "hier":
        # Hierarchical dense and hierarchical TopK against flat dense, all across the same nodes.
        steps["gradkit"] = _pipeline_step(copy.deepcopy(base), gradkit.Average(node_size=args.node_size), x, y)
        topk = gradkit.Average(gradkit.TopK(0.01), node_size=args.node_size)
        steps["topk"] = _pipeline_step(copy.deepcopy(base), topk, x, y)
        steps["reference"] = _pipeline_step(copy.deepcopy(base), gradkit.Average(), x, y)
    else:
        steps["gradkit"] = _pipeline_step(copy.deepcopy(base), gradkit.Average(gradkit.TopK(0.01)), x, y)
        steps["reference"] = _pipeline_step(copy.deepcopy(base), gradkit.Average(), x, y)
    samples: dict[str, list[float]] = {name: [] for name in steps}
    sent: dict[str, int] = {}
    names = list(steps)
    for round_index in range(args.warmup + args.repeats):
        shift = round_index % len(names)  # alternate which candidate goes first
        for name in names[shift:] + names[:shift]:
            # Line the ranks up outside the timed region: a rank that finished the previous
            # step early must not count its wait for the peer as this step's time.
            dist.barrier()
            start = time.perf_counter()
            sent[name] = steps[name]()
            elapsed = time.perf_counter() - start
            if round_index >= args.warmup:
                samples[name].append(elapsed)
    params = list(base.parameters())
    return {"samples": samples, "bytes_sent": sent, "params": sum(p.numel() for p in params), "tensors": len(params)}


def _pipeline_step(model: nn.Module, averaging: gradkit.Average, x: torch.Tensor, y: torch.Tensor):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    pipe = gradkit.GradientPipeline(model, average=averaging)

    def step() -> int:
        # A mean loss without num_items: the same normalization as DDP, and no item-count all-reduce.
        pipe.backward(nn.functional.mse_loss(model(x), y))
        pipe.step(optimizer)
        return averaging.bytes_sent()  # what pipe.last.bytes_sent holds, without making the step's report

    return step


def _ddp_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    ddp = nn.parallel.DistributedDataParallel(model)  # 25 MiB buckets, as gk.Average's default
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    dense = sum(p.numel() * p.element_size() for p in model.parameters())

    def step() -> int:
        nn.functional.mse_loss(ddp(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return dense

    return step


def memory(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    model = mlp(args.sizes)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    pipe = gradkit.GradientPipeline(model, accumulation_steps=args.accumulation)
    x, y = torch.randn(args.batch, args.sizes[0]), torch.randn(args.batch, args.sizes[-1])
    micro_x, micro_y = x.chunk(args.accumulation), y.chunk(args.accumulation)
    # Model and data only: what the step adds on top (gradients, activations, temporaries) is peak - before.
    before = proc_status("VmRSS")
    reset_peak()  # so that transient peaks of start-up (imports) do not count
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for xb, yb in zip(micro_x, micro_y):
            # A summed loss with item counts: exactly the full batch's mean gradient for any K.
            pipe.backward(nn.functional.mse_loss(model(xb), yb, reduction="sum"), num_items=yb.numel())
            pipe.step(optimizer)
        times.append(time.perf_counter() - start)
    # VmHWM, not getrusage's ru_maxrss: Linux carries the parent's RSS at fork into the child's
    # ru_maxrss across exec, so a large parent (the harness) would mask the child's own peak.
    return {"times": times, "peak_bytes": proc_status("VmHWM"), "before_bytes": before}


def proc_status(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} line; the memory benchmark needs Linux")


def reset_peak() -> None:
    """Set the peak RSS (VmHWM) back to the current RSS (Linux >= 4.0); keep it where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def quality(args: argparse.Namespace) -> list[dict]:
    from gradkit.train.config import TrainConfig
    from gradkit.train.engine import train_worker

    dist.init_process_group("gloo", init_method=args.init, rank=args.rank, world_size=args.world, timeout=TIMEOUT)
    try:
        return [train_worker(TrainConfig(**values).validate()) for values in json.loads(args.configs.read_text())]
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("task", choices=("average", "memory", "quality"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")])
    parser.add_argument("--batch", type=int)
    parser.add_argument("--tensors", type=lambda s: [int(v) for v in s.split(",")], default=[])
    parser.add_argument("--configs", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world", type=int, default=1)
    parser.add_argument("--init", default="")
    parser.add_argument("--pair", choices=("ddp", "topk", "hier"), default="ddp")
    parser.add_argument("--node-size", type=int, default=2)
    parser.add_argument("--accumulation", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = {"average": average, "memory": memory, "quality": quality}[args.task](args)
    partial = args.out.with_suffix(".partial")
    partial.write_text(json.dumps(result))
    partial.replace(args.out)  # the parent never reads a half-written file


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    # The result is written: skip interpreter teardown, where a gloo thread still holding
    # work from DDP can abort the process (exit -6) after everything succeeded.
    os._exit(0)
