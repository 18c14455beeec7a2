"""The two hops of hierarchical averaging inside a node: sum a padded bucket, then gather its shards back.

Each rank of a node owns one of `node_size` equal shards of a padded bucket. The first hop leaves
on each rank the node's sum of (at least) its own shard; the second, after the cross-node hop has
summed that shard over the nodes, gives every rank of the node every shard. Two ways, picked once
per node group by `hops_for`:

- `NativeHops` (NCCL and the other backends): ``reduce_scatter_tensor`` into a shard buffer of
  its own, then ``all_gather_into_tensor`` back into the bucket, the fast collectives there.
- `GlooHops`: an ``all_reduce`` of the whole padded bucket, or of it piece by piece (the shard
  is then a view of it), then one in-place ``broadcast`` of each shard from its owner. Measured
  on 2 nodes x 2 gloo processes (node size 2; benchmarks/RESULTS.md), on a 47 MB bucket the
  all-reduce took 51 ms against the reduce-scatter's 107, and the broadcasts 42 ms against the
  all-gather's 94 (and 88 for zeroing the other shards and all-reducing). The broadcasts copy
  bits, so -0.0 and NaN payloads arrive as they were sent.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

__all__ = ["NodeHops", "NativeHops", "GlooHops", "hops_for", "gloo_carries"]


class NodeHops:
    """How a padded bucket is summed inside a node and gathered back; one per node group.

    Args:
        group: the node's process group; local_rank: this rank's place in it (its shard's index);
        owners: the global rank of each local rank of the node (the broadcasts' sources).
    """

    def __init__(self, group: dist.ProcessGroup, local_rank: int, owners: list[int]) -> None:
        self.group = group
        self.local_rank = local_rank
        self.owners = owners

    def shard_buffer(self, padded: Tensor) -> Tensor:
        """Where this rank's shard of `padded` (whose size is a multiple of the node size) is summed."""
        raise NotImplementedError

    def start_sum(
        self, padded: Tensor, shard: Tensor, piece: int | None = None
    ) -> tuple[list[tuple[Tensor, dist.Work]], list[dist.Work]]:
        """Start summing `padded` over the node, so that `shard` holds the node's sum of this rank's shard.

        Args:
            piece: sum in pieces of this many entries of each shard (where the hops can), or None.

        Returns:
            The pieces of `shard`, in order, each with the work after which it holds its sum; and the
            other works started (those of the other shards' pieces): wait for them before the gather,
            which overwrites what they write. Wait for each work once: a second ``wait`` of gloo's
            reduce-scatter copies its staged sum into `shard` again.
        """
        raise NotImplementedError

    def start_gather(self, padded: Tensor, shard: Tensor) -> list[dist.Work]:
        """Start giving every rank of the node every rank's `shard`, in its place in `padded`."""
        raise NotImplementedError


class NativeHops(NodeHops):
    """``reduce_scatter_tensor`` into a shard buffer of its own, then ``all_gather_into_tensor``."""

    def shard_buffer(self, padded: Tensor) -> Tensor:
        return padded.new_empty(padded.numel() // len(self.owners))

    def start_sum(
        self, padded: Tensor, shard: Tensor, piece: int | None = None
    ) -> tuple[list[tuple[Tensor, dist.Work]], list[dist.Work]]:
        return [(shard, dist.reduce_scatter_tensor(shard, padded, group=self.group, async_op=True))], []

    def start_gather(self, padded: Tensor, shard: Tensor) -> list[dist.Work]:
        return [dist.all_gather_into_tensor(padded, shard, group=self.group, async_op=True)]


class GlooHops(NodeHops):
    """An ``all_reduce`` of the padded bucket (whole, or piece by piece), then an in-place ``broadcast`` of each
    shard from its owner."""

    def shard_buffer(self, padded: Tensor) -> Tensor:
        return _shards(padded, len(self.owners))[self.local_rank]

    def start_sum(
        self, padded: Tensor, shard: Tensor, piece: int | None = None
    ) -> tuple[list[tuple[Tensor, dist.Work]], list[dist.Work]]:
        # Every rank ends up with the node's sum of every shard; only its own shard goes on. In
        # pieces, piece i of every shard is summed before piece i + 1 of any: each rank's first
        # piece is ready after 1/pieces of the work.
        size = shard.numel()
        if piece is None or piece >= size:
            return [(shard, dist.all_reduce(padded, op=dist.ReduceOp.SUM, group=self.group, async_op=True))], []
        shards = _shards(padded, len(self.owners))
        step = max(piece, 1)
        own, others = [], []
        for start in range(0, size, step):
            for index, part in enumerate(shards):
                work = dist.all_reduce(
                    part[start : start + step], op=dist.ReduceOp.SUM, group=self.group, async_op=True
                )
                if index == self.local_rank:
                    own.append((part[start : start + step], work))
                else:
                    others.append(work)
        return own, others

    def start_gather(self, padded: Tensor, shard: Tensor) -> list[dist.Work]:
        # In the same order on every rank of the node; each overwrites a shard in place.
        return [
            dist.broadcast(part, owner, group=self.group, async_op=True)
            for part, owner in zip(_shards(padded, len(self.owners)), self.owners)
        ]


def _shards(padded: Tensor, count: int) -> list[Tensor]:
    per_shard = padded.numel() // count
    return [padded[index * per_shard : (index + 1) * per_shard] for index in range(count)]


def hops_for(group: dist.ProcessGroup, local_rank: int, owners: list[int], device_type: str) -> NodeHops:
    """`GlooHops` when gloo carries `device_type`'s tensors in `group`, `NativeHops` otherwise.

    The choice reads the group's backend per device (``dist.get_backend_config``: ``cpu:gloo`` for a
    world started without naming a backend, ``cpu:gloo,cuda:gloo`` for ``"gloo"``), not the backend's
    name, so ranks that started the same backends under different spellings choose alike (the hops
    must match on every rank of a node, or their collectives would never meet).
    """
    gloo = gloo_carries(str(dist.get_backend_config(group)), device_type)
    return (GlooHops if gloo else NativeHops)(group, local_rank, owners)


def gloo_carries(backend: str, device_type: str) -> bool:
    """Whether a group whose backend config is `backend` runs `device_type`'s collectives on gloo.

    `backend` is ``dist.get_backend_config``'s text (``"cpu:gloo,cuda:nccl"``), or a plain name
    (``"gloo"``), which then carries every device type.

    Example:
        >>> gloo_carries("cpu:gloo,cuda:nccl", "cpu"), gloo_carries("cuda:nccl", "cuda"), gloo_carries("gloo", "cuda")
        (True, False, True)
    """
    if ":" not in backend:
        return backend == "gloo"
    devices = dict(pair.split(":", 1) for pair in backend.split(",") if ":" in pair)
    return devices.get(device_type) == "gloo"
