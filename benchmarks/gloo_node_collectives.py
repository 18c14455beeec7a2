"""The intra-node hops of hierarchical averaging on gloo: native collectives against all-reduces.

    OMP_NUM_THREADS=1 python benchmarks/gloo_node_collectives.py [--numel N] [--repeats R]

Four gloo processes over loopback, seen as two nodes of two (groups {0, 1} and {2, 3}), one
thread each; both nodes run the same hop at the same time, as in a training step. Per hop,
the median wall time and this process's CPU time (gloo's threads included) on rank 0:

- the node's sum: ``reduce_scatter_tensor``, ``all_reduce`` of the whole padded bucket, a
  ``reduce`` of each shard to its owner, and point-to-point sends of the shards plus an add;
- the gather: ``all_gather_into_tensor``, zeroing the other shards plus ``all_reduce``, and one
  ``broadcast`` of each shard from its owner; a copy of the bucket for reference.

The numbers back the choice in `gradkit.averaging.node_hops` (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

NODE = 2
WORLD = 4


def node_rank(node: int, local: int) -> int:
    return node * NODE + local


def _worker(rank: int, numel: int, repeats: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    nodes = [dist.new_group(list(range(n * NODE, (n + 1) * NODE))) for n in range(WORLD // NODE)]
    node = nodes[rank // NODE]
    local = rank % NODE
    per_shard = -(-numel // NODE)
    padded = torch.randn(per_shard * NODE)
    shard = torch.empty(per_shard)

    def zero_others_and_all_reduce() -> None:
        padded[: local * per_shard].zero_()
        padded[(local + 1) * per_shard :].zero_()
        dist.all_reduce(padded, group=node)

    owners = [node_rank(rank // NODE, owner) for owner in range(NODE)]
    shards = [padded[owner * per_shard : (owner + 1) * per_shard] for owner in range(NODE)]

    def per_owner(collective) -> None:
        works = [collective(part, owner, group=node, async_op=True) for part, owner in zip(shards, owners)]
        for work in works:
            work.wait()

    received = torch.empty(per_shard)
    peer = owners[1 - local]

    def send_receive_add() -> None:
        # Two ranks: send the peer its shard, receive this rank's from it, add.
        works = [dist.isend(shards[1 - local], peer, group=node), dist.irecv(received, peer, group=node)]
        for work in works:
            work.wait()
        shards[local].add_(received)

    hops = {
        "reduce_scatter_tensor": lambda: dist.reduce_scatter_tensor(shard, padded, group=node),
        "all_reduce (for the reduce-scatter)": lambda: dist.all_reduce(padded, group=node),
        "reduce of each shard to its owner (for the reduce-scatter)": lambda: per_owner(dist.reduce),
        "send / receive + add (for the reduce-scatter)": send_receive_add,
        "all_gather_into_tensor": lambda: dist.all_gather_into_tensor(padded, shard, group=node),
        "zero others + all_reduce (for the all-gather)": zero_others_and_all_reduce,
        "broadcast of each shard from its owner (for the all-gather)": lambda: per_owner(dist.broadcast),
        "copy of the bucket (reference)": lambda: padded.clone(),
    }
    for name, hop in hops.items():
        hop()
        dist.barrier()
        walls, cpus = [], []
        for _ in range(repeats):
            dist.barrier()
            wall, cpu = time.perf_counter(), time.process_time()
            hop()
            cpus.append(time.process_time() - cpu)
            dist.barrier()  # both nodes done: the wall time includes the slower one
            walls.append(time.perf_counter() - wall)
        if rank == 0:
            wall_ms, cpu_ms = statistics.median(walls) * 1e3, statistics.median(cpus) * 1e3
            print(f"| {name} | {wall_ms:.1f} ms | {cpu_ms:.1f} ms |", flush=True)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=6_553_600, help="bucket entries (default: 25 MiB of float32)")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--port", type=int, default=29613)
    args = parser.parse_args()
    print(f"{args.numel} float32 entries, 2 nodes x 2 gloo processes over loopback, medians of {args.repeats}")
    print("| hop | wall (rank 0) | CPU time (rank 0's process) |\n|---|---|---|")
    mp.spawn(_worker, args=(args.numel, args.repeats, args.port), nprocs=WORLD)


if __name__ == "__main__":
    main()
