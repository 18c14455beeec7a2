"""One rank of a small gk.Average training run, for the bad-link test:
`python tests/netns_worker.py RANK INIT_METHOD OUT` (GLOO_SOCKET_IFNAME picks the interface).
It writes its final parameters to OUT."""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from reliability_helpers import build, params_of, save_atomically, train  # noqa: E402

MICRO_STEPS = 6


def main() -> None:
    rank, init_method, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2, timeout=timedelta(seconds=60))
    objects = build("dense")  # gk.Average with num_items, 2 micro-steps per window, global-norm clip
    train(objects, rank, 0, MICRO_STEPS)
    save_atomically(params_of(objects[0]), out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
