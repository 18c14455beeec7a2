"""PowerSGD against torch's own: gk.Average(gk.PowerSGD(r)) against DDP with ``powerSGD_hook``, ranks 1, 2 and 4.

Two processes, gloo over loopback, one thread each. Both candidates train the
same MLP from the same weights on the same batches (a fixed random teacher
labels Gaussian inputs, 10 classes), with SGD and momentum, interleaved step
by step in the same two processes so that a slow stretch of the machine hits
both. torch's side is ``PowerSGDState(process_group=None,
matrix_approximation_rank=r, start_powerSGD_iter=2)`` (its other settings at
their defaults: error feedback and warm start on).

Per rank r, the row compares the median step time; the note adds the final
loss (the mean of the last 10 steps' training loss, averaged over ranks; goal
gradkit <= torch x 1.005) and the bytes each rank hands to all_reduce per step
after torch's two uncompressed warm-up steps (counted the same way for both,
by wrapping ``torch.distributed.all_reduce``; goal gradkit <= torch). The note
names gradkit's integer bytes apart: the pipeline's all-reduce of the window's
count (items, micro-steps), which DDP, dividing by the world size, does not send.
gradkit runs with ``even_windows=True``, DDP's own promise (every rank completes
its windows together), under which a complete window needs no count all-reduce
either; the integer bytes are then 0.
Both average all gradients in one bucket: with several, torch's hook launches
its second all-reduce from the first one's completion callback, which on gloo
races with the next bucket's hook and ends in a collective mismatch.

Run alone: ``python -m gradkit.bench.powersgd``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from gradkit.bench.common import Row, Settings
from gradkit.bench.processes import free_port, same_gradkit_env
from gradkit.bench.timing import summarize

__all__ = ["run"]

RANKS = (1, 2, 4)
FULL = {"sizes": (512, 1024, 1024, 10), "batch": 64, "steps": 120}  # 1.6M parameters
TINY = {"sizes": (16, 32, 10), "batch": 8, "steps": 6}
LOSS_GOAL = 1.005
GOAL = 1.0  # step time at most torch's
TIMEOUT = 600.0
BUCKET_MB = 1000  # one bucket for all gradients, for both (see _worker)
LAST = 10  # steps whose mean loss is the final loss


def run(settings: Settings) -> list[Row]:
    shape = TINY if settings.tiny else FULL
    rows = []
    for rank in RANKS:
        result = _launch(rank, shape)
        mine, theirs = summarize(result["times"]["gradkit"]), summarize(result["times"]["torch"])
        loss, sent = result["loss"], result["bytes"]
        time_ratio = mine.median / theirs.median
        loss_ratio = loss["gradkit"] / loss["torch"]
        goals = {
            "loss": loss_ratio <= LOSS_GOAL,
            "bytes": sent["gradkit"] <= sent["torch"],
            "time": time_ratio <= 1 / GOAL,
        }
        note = (
            f"rank {rank}: final loss gradkit {loss['gradkit']:.4f}, torch {loss['torch']:.4f} "
            f"(ratio {loss_ratio:.4f}, goal <= {LOSS_GOAL}: {'met' if goals['loss'] else 'MISSED'}); "
            f"bytes to all_reduce per step gradkit {sent['gradkit']:,} "
            f"({result['integer_bytes']['gradkit']:,} of them the window's count), torch {sent['torch']:,} "
            f"(goal <=: {'met' if goals['bytes'] else 'MISSED'}); step time gradkit / torch {time_ratio:.3f} "
            f"(goal <= 1: {'met' if goals['time'] else 'MISSED'}); "
            f"{shape['steps']} steps each, MLP {result['params'] / 1e6:.1f}M params, batch {shape['batch']} per process"
        )
        rows.append(
            Row(
                f"Average(PowerSGD({rank})) step vs DDP powerSGD_hook, 2 processes, gloo on loopback",
                "cpu",
                f"DDP + powerSGD_hook(rank {rank})",
                GOAL,
                gradkit_time=mine,
                reference_time=theirs,
                note=note,
            )
        )
    return rows


def _launch(rank: int, shape: dict) -> dict:
    """Both processes of one comparison; rank 0's result (times, losses, bytes)."""
    init = f"tcp://127.0.0.1:{free_port()}"
    with tempfile.TemporaryDirectory(prefix="gradkit-powersgd-") as folder:
        processes, outs = [], []
        try:
            for process_rank in (0, 1):
                out = Path(folder, f"{process_rank}.json")
                outs.append(out)
                command = [
                    sys.executable, "-m", "gradkit.bench.powersgd", "--rank", str(process_rank), "--init", init,
                    "--powersgd-rank", str(rank), "--shape", json.dumps(shape), "--out", str(out),
                ]  # fmt: skip
                env = {**same_gradkit_env(os.environ), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
                processes.append(
                    subprocess.Popen(
                        command,
                        env=env,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT,
                        text=True,
                        start_new_session=True,
                    )
                )
            deadline = time.monotonic() + TIMEOUT
            outputs = [p.communicate(timeout=max(0.1, deadline - time.monotonic()))[0] for p in processes]
        finally:
            for process in processes:  # on a timeout or an error, no worker is left behind
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.communicate()
        for process, output in zip(processes, outputs):
            if process.returncode != 0:
                raise RuntimeError(f"PowerSGD benchmark worker failed (exit {process.returncode}):\n{output[-3000:]}")
        return json.loads(outs[0].read_text())


# -- the worker (runs in each process) ------------------------------------------------------


def _worker(args: argparse.Namespace) -> dict:
    import copy

    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as torch_powersgd

    import gradkit

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=args.init, rank=args.rank, world_size=2, timeout=timedelta(seconds=120))
    shape = json.loads(args.shape)
    sizes, batch, steps = shape["sizes"], shape["batch"], shape["steps"]
    counted = {"on": None, "bytes": 0, "integer": 0}
    original_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *a, **k):
        if counted["on"] is not None:
            counted["bytes"] += tensor.numel() * tensor.element_size()
            if not tensor.is_floating_point():  # gradkit's window count (items, micro-steps)
                counted["integer"] += tensor.numel() * tensor.element_size()
        return original_all_reduce(tensor, *a, **k)

    dist.all_reduce = counting_all_reduce  # both libraries call it through torch.distributed
    try:
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        for fan_in, fan_out in itertools.pairwise(sizes):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        base = nn.Sequential(*layers[:-1])
        teacher = nn.Linear(sizes[0], sizes[-1])
        data = torch.Generator().manual_seed(100 + args.rank)  # each rank its own batches

        ours_model, torch_model = copy.deepcopy(base), copy.deepcopy(base)
        ours_opt = torch.optim.SGD(ours_model.parameters(), lr=0.05, momentum=0.9)
        # One bucket each: torch's hook issues its second all-reduce from the first one's completion
        # callback, which on gloo races with the next bucket's first all-reduce (a collective mismatch).
        compressor = gradkit.PowerSGD(args.powersgd_rank)
        # even_windows: DDP's own setting (every window completes on every rank), no count all-reduce.
        averaging = gradkit.Average(compressor, bucket_mb=BUCKET_MB, first_bucket_mb=BUCKET_MB, even_windows=True)
        pipe = gradkit.GradientPipeline(ours_model, average=averaging)
        ddp = nn.parallel.DistributedDataParallel(torch_model, bucket_cap_mb=BUCKET_MB)
        state = torch_powersgd.PowerSGDState(
            process_group=None, matrix_approximation_rank=args.powersgd_rank, start_powerSGD_iter=2
        )
        ddp.register_comm_hook(state, torch_powersgd.powerSGD_hook)
        torch_opt = torch.optim.SGD(torch_model.parameters(), lr=0.05, momentum=0.9)

        def ours(x, y):
            loss = nn.functional.cross_entropy(ours_model(x), y)
            pipe.backward(loss)
            pipe.step(ours_opt)
            return loss.detach()

        def theirs(x, y):
            loss = nn.functional.cross_entropy(ddp(x), y)
            loss.backward()
            torch_opt.step()
            torch_opt.zero_grad(set_to_none=True)
            return loss.detach()

        candidates = {"gradkit": ours, "torch": theirs}
        times = {name: [] for name in candidates}
        losses = {name: [] for name in candidates}
        sent = {name: 0 for name in candidates}
        integer = {name: 0 for name in candidates}
        names = list(candidates)
        for step in range(steps):
            x = torch.randn(batch, sizes[0], generator=data)
            with torch.no_grad():
                y = teacher(x).argmax(1)
            shift = step % 2  # alternate which candidate goes first
            for name in names[shift:] + names[:shift]:
                dist.barrier()
                counted["on"], counted["bytes"], counted["integer"] = name, 0, 0
                start = time.perf_counter()
                loss = candidates[name](x, y)
                elapsed = time.perf_counter() - start
                counted["on"] = None
                sent[name], integer[name] = counted["bytes"], counted["integer"]
                losses[name].append(loss)
                if step >= 3:  # after torch's two uncompressed steps and one compressed warm-up
                    times[name].append(elapsed)
        final = torch.stack([torch.stack(losses[n][-LAST:]).mean() for n in names])
        original_all_reduce(final)
        final /= 2
        return {
            "times": times,
            "loss": dict(zip(names, final.tolist())),
            "bytes": sent,
            "integer_bytes": integer,
            "params": sum(p.numel() for p in base.parameters()),
        }
    finally:
        dist.all_reduce = original_all_reduce
        # No destroy_process_group(): the caller leaves with os._exit, and tearing gloo down while
        # DDP's hook threads may still hold the group hung a finished rank now and then.


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int)
    parser.add_argument("--init")
    parser.add_argument("--powersgd-rank", type=int)
    parser.add_argument("--shape")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--tiny", action="store_true", help="alone: tiny shapes (the numbers mean nothing)")
    args = parser.parse_args()
    if args.out is not None:
        args.out.write_text(json.dumps(_worker(args)))
        sys.stdout.flush()
        os._exit(0)  # skip teardown, where a gloo thread left by DDP can abort a finished process
    from gradkit.bench import run as harness

    rows = run(Settings(warmup=1, repeats=7, tiny=args.tiny))
    print(harness.table(rows))
    print(harness.notes(rows))


if __name__ == "__main__":
    main()
