"""A training script for `python -m torch.distributed.run --standalone --nproc_per_node 2
--max-restarts=1 tests/elastic_worker.py OUT [--kill-at MICRO_STEP]`.

Every micro-step it checkpoints atomically: each rank its pipeline state and RNG (error-
feedback residuals and a partial window's gradients differ per rank), rank 0 the model and
optimizer (equal on every rank), and after a barrier rank 0 names the micro-step in
`latest`. A (re)started job resumes from `latest`. With --kill-at, rank 1 SIGKILLs itself
once, at the start of that micro-step (a marker file makes it happen only once); the
launcher then restarts both workers. At the end each rank writes its parameters.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from reliability_helpers import build, restore, save_atomically, train  # noqa: E402

MICRO_STEPS = 10


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--kill-at", type=int, default=-1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    # A key prefix per attempt: on a restart the launcher's store can still hold the previous
    # attempt's gloo addresses, and a rank that reads one before its peer overwrites it fails
    # to connect ("Connection refused"); seen on a loaded machine.
    timeout = timedelta(seconds=30)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(
        "gloo", store=dist.PrefixStore(f"attempt{attempt}", store), rank=rank, world_size=world, timeout=timeout
    )
    folder = os.path.join(args.out, "ckpt")
    os.makedirs(folder, exist_ok=True)
    latest = os.path.join(folder, "latest")

    objects = build("topk")
    start = 0
    if os.path.exists(latest):
        with open(latest) as f:
            start = int(f.read())
        shared = torch.load(os.path.join(folder, f"model-{start}.pt"), weights_only=True)
        own = torch.load(os.path.join(folder, f"rank{rank}-{start}.pt"), weights_only=True)
        restore(objects, {**shared, **own})
    with open(os.path.join(args.out, f"starts-rank{rank}.txt"), "a") as f:
        f.write(f"{start} {os.environ.get('TORCHELASTIC_RESTART_COUNT', '?')}\n")

    model, opt, pipe = objects
    for micro in range(start, MICRO_STEPS):
        marker = os.path.join(args.out, "killed")
        if micro == args.kill_at and rank == 1 and not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        train(objects, rank, micro, micro + 1)
        save_atomically(
            {"pipe": pipe.state_dict(), "rng": torch.get_rng_state()},
            os.path.join(folder, f"rank{rank}-{micro + 1}.pt"),
        )
        if rank == 0:
            save_atomically(
                {"model": model.state_dict(), "opt": opt.state_dict()}, os.path.join(folder, f"model-{micro + 1}.pt")
            )
        dist.barrier()  # every file of this micro-step is on disk
        if rank == 0:
            with open(latest + ".partial", "w") as f:
                f.write(str(micro + 1))
            os.replace(latest + ".partial", latest)
        dist.barrier()  # `latest` names it before anyone moves on

    save_atomically([p.detach().clone() for p in model.parameters()], os.path.join(args.out, f"params-rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
