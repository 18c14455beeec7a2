"""FSDP2: a gradkit pipeline step against the hand-written FSDP2 loop.

Two processes, gloo on loopback, one thread each (on a machine with two GPUs or
more, the ``[cuda]`` twin does the same with NCCL). Both candidates are
``fully_shard`` models with the same weights in the same two processes, fed the
same data, stepped alternately so that a slow stretch of a shared machine hits
both. One optimizer step = 2 micro-batches (FSDP reduce-scatters each) + clip at
norm 1 + AdamW. The reference divides the summed loss by the global item count
it is told, and clips with ``torch.nn.utils.clip_grad_norm_``; gradkit's
pipeline counts the items itself (an all-reduce on the device) and clips with
``gk.ClipByGlobalNorm``. Rank 0's step times, after a barrier, are compared.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gradkit.bench.common import Row, Settings
from gradkit.bench.timing import summarize

__all__ = ["run"]

FULL_SIZES = (512, 2048, 2048, 512)  # 6.3M parameters
TINY_SIZES = (16, 32, 16)
BATCH, ACCUM, MAX_REPEATS = 32, 2, 25
GOAL = 1 / 1.05  # gradkit at most 5% slower


def run(settings: Settings) -> list[Row]:
    rows = [_row(settings, "cpu")]
    if torch.cuda.is_available() and torch.cuda.device_count() >= 2:
        rows.append(_row(settings, "cuda"))
    else:
        rows.append(
            Row(
                "[cuda] FSDP2 pipeline step, 2 processes",
                "cuda",
                "hand-written FSDP2 loop",
                GOAL,
                note="[cuda] FSDP2 step: skipped, needs 2 GPUs",
            )
        )
    return rows


def _row(settings: Settings, device: str) -> Row:
    sizes = TINY_SIZES if settings.tiny else FULL_SIZES
    repeats = min(settings.repeats, MAX_REPEATS)
    with tempfile.TemporaryDirectory() as folder:
        results = mp.get_context("spawn").Manager().dict()
        mp.start_processes(
            _worker,
            args=(2, folder, device, sizes, min(settings.warmup, 3), repeats, results),
            nprocs=2,
            start_method="spawn",
        )
        mine, theirs = summarize(results["gradkit"]), summarize(results["reference"])
    params = sum(a * b + b for a, b in zip(sizes, sizes[1:]))
    tag = "[cuda] " if device == "cuda" else ""
    ratio = mine.median / theirs.median
    return Row(
        f"{tag}FSDP2 pipeline step (accumulation {ACCUM}, clip), MLP {params / 1e6:.1f}M params, 2 processes",
        device, "hand-written FSDP2 loop", GOAL, mine, theirs,
        note=f"{tag}FSDP2: gradkit / hand-written step time {ratio:.3f} "
             f"(goal <= 1.05: {'met' if ratio <= 1.05 else 'MISSED'}); {repeats} interleaved steps each",
    )  # fmt: skip


def _worker(rank, world, folder, device, sizes, warmup, repeats, results):
    from torch.distributed.fsdp import fully_shard

    import gradkit as gk

    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend, init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    dev = torch.device(device, rank) if device == "cuda" else torch.device("cpu")

    def build():
        torch.manual_seed(0)
        layers = []
        for a, b in zip(sizes, sizes[1:]):
            layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
        model = torch.nn.Sequential(*layers[:-1]).to(dev)
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-4)

    model_a, opt_a = build()
    pipe = gk.GradientPipeline(model_a, accumulation_steps=ACCUM, clip=gk.ClipByGlobalNorm(1.0))
    model_b, opt_b = build()
    generator = torch.Generator().manual_seed(rank)
    batches = [torch.randn(BATCH, sizes[0], generator=generator).to(dev) for _ in range(ACCUM)]
    targets = [torch.randn(BATCH, sizes[-1], generator=generator).to(dev) for _ in range(ACCUM)]
    global_items = BATCH * ACCUM * world  # the hand-written loop is told it

    def gradkit_step():
        for x, y in zip(batches, targets):
            pipe.backward(((model_a(x) - y) ** 2).sum(), num_items=x.shape[0])
            pipe.step(opt_a)

    def reference_step():
        for x, y in zip(batches, targets):
            # FSDP averages over the world in its reduce-scatter: undo it in the loss's divisor.
            (((model_b(x) - y) ** 2).sum() * (world / global_items)).backward()
        torch.nn.utils.clip_grad_norm_(model_b.parameters(), 1.0)
        opt_b.step()
        opt_b.zero_grad(set_to_none=True)

    samples = {"gradkit": [], "reference": []}
    for i in range(warmup + repeats):
        for name, step in (
            (("gradkit", gradkit_step), ("reference", reference_step))
            if i % 2
            else (("reference", reference_step), ("gradkit", gradkit_step))
        ):
            dist.barrier()
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                samples[name].append(time.perf_counter() - start)
    if rank == 0:
        results.update(samples)
    dist.barrier()
    dist.destroy_process_group()
    # The samples are sent: skip interpreter teardown. FSDP2 still holds the group, and a gloo thread that
    # frees its last finished work while the interpreter finalizes aborts a finished process (SIGABRT).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
