"""Hierarchical averaging: full precision inside a node, the compressor (if any) only between nodes.

With ``gk.Average(node_size=L)`` the world is seen as nodes of `L` consecutive
ranks (torchrun numbers the ranks of one node consecutively). Each bucket is
summed in three hops:

1. reduce-scatter inside the node, in full precision: local rank ``l`` ends up
   with shard ``l`` of the node's sum (the bucket is padded to ``L`` equal shards);
2. all-reduce of that shard with the ranks holding the same shard on the other
   nodes (local rank ``l`` of every node): the only hop over the slow link, and
   the only one a compressor touches, with its error feedback kept per shard;
3. all-gather inside the node: every rank has the whole bucket's sum.

On gloo, hops 1 and 3 are an all-reduce of the bucket and a broadcast of each shard
from its owner, which gloo runs in place (`node_hops`).

Each rank sends ``1/L`` of a bucket across nodes instead of all of it, which is
what makes it fast where the link between nodes is the bottleneck.

`HierarchicalReducer` is the `Reducer` that does it; `node_size_for` picks and
checks the node size, `NodeGroups` builds the process groups once.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from gradkit import _checks, distributed
from gradkit.accumulation import Items
from gradkit.averaging.buckets import MIB, Bucket
from gradkit.averaging.node_hops import NodeHops, hops_for
from gradkit.averaging.payloads import start_reduce
from gradkit.averaging.reducers import Reducer
from gradkit.compression.base import Compressor
from gradkit.compression.keyed_state import Layout
from gradkit.distributed import PendingReduce

__all__ = ["HierarchicalReducer", "NodeGroups", "check_node_size", "node_size_for"]

# Dense, each shard crosses nodes in pieces of this size where the node's sum comes in pieces (gloo;
# see `HierarchicalReducer._start`). Measured on 2 nodes x 2 gloo processes over a 1 Gbit/s link, 17M
# parameters, steps interleaved (benchmarks/RESULTS.md), two runs: whole shards 1135 and 916 ms a step,
# pieces of 4 MiB 971 and 819 ms (8 MiB 993 and 849, 2 MiB 867, 16 MiB 1009).
PIECE_BYTES = 4 * MIB


def check_node_size(node_size: object) -> int | None:
    """`node_size` as given to `gk.Average`: None or an integer >= 1.

    Raises:
        TypeError, ValueError: naming the value and the fix.
    """
    if node_size is None:
        return None
    return _checks.positive_int("node_size", node_size, "pass the number of processes per node, e.g. 8, or None")


def node_size_for(node_size: int | None, group: dist.ProcessGroup | None) -> int | None:
    """The node size `gk.Average` uses with `group`, or None for flat averaging.

    None takes ``LOCAL_WORLD_SIZE`` (set by torchrun) when it is less than the world
    size; a node of one process is flat averaging.

    Raises:
        ValueError: the group's size is not a multiple of the node size, or a node size
            was given for a group other than the whole world (its groups could not be built).
    """
    if group is None:
        return None
    world = dist.get_world_size(group)
    explicit = node_size is not None
    if node_size is None:
        local = os.environ.get("LOCAL_WORLD_SIZE", "")
        if not local.isdigit() or int(local) >= world or dist.get_world_size() != world:
            return None
        node_size = int(local)
    if world % node_size:
        where = "" if explicit else " (from LOCAL_WORLD_SIZE)"
        raise ValueError(
            f"gk.Average: the world size {world} is not a multiple of node_size={node_size}{where}; pass the number "
            "of processes on each node (every node must run as many), or node_size=1 for flat averaging"
        )
    if node_size == 1:
        return None
    if world != dist.get_world_size():
        raise ValueError(
            f"gk.Average: node_size={node_size} needs the whole world as its group (its node groups are built by "
            f"every process), got a group of {world} of {dist.get_world_size()} processes; pass group=None"
        )
    return node_size


@dataclass
class NodeGroups:
    """This rank's two groups: `node` (the ranks of its node) and `cross` (the same local rank on every node)."""

    node: dist.ProcessGroup
    cross: dist.ProcessGroup
    node_size: int
    nodes: int
    local_rank: int
    _hops: dict[str, NodeHops] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, node_size: int, timeout: datetime.timedelta | None) -> NodeGroups:
        """Build every node and cross group of the world, on every rank in the same order
        (``new_group`` is a collective of the whole world), and keep this rank's two."""
        world, rank = dist.get_world_size(), dist.get_rank()
        nodes = world // node_size
        options = {} if timeout is None else {"timeout": timeout}
        try:
            node_groups = [
                dist.new_group(list(range(n * node_size, (n + 1) * node_size)), **options) for n in range(nodes)
            ]
            cross_groups = [
                dist.new_group(list(range(local, world, node_size)), **options) for local in range(node_size)
            ]
        except Exception as error:  # a peer that never joins: the store's wait times out (RuntimeError)
            raise distributed.CollectiveError(
                f"gk.Average(node_size={node_size}): creating the node and cross-node process groups at setup "
                f"failed: {error}. A peer process died, hung, or did not build its pipeline; check the other ranks' "
                "logs (every rank must build the same gk.Average)"
            ) from error
        return cls(node_groups[rank // node_size], cross_groups[rank % node_size], node_size, nodes, rank % node_size)

    def hops(self, device_type: str) -> NodeHops:
        """How buckets on `device_type` are summed and gathered in the node (see `node_hops`)."""
        hops = self._hops.get(device_type)
        if hops is None:
            first = dist.get_rank() - self.local_rank
            owners = list(range(first, first + self.node_size))
            hops = self._hops[device_type] = hops_for(self.node, self.local_rank, owners, device_type)
        return hops


@dataclass
class _Shard:
    """One bucket's padded buffer, this rank's shard of it and the shard's collectives in flight."""

    padded: Tensor
    shard: Tensor  # a buffer of its own, or a view of `padded` (see `node_hops`)
    valid: int  # entries of the shard inside the bucket (the rest is padding)
    layout: Layout  # the shard's pieces of parameters, keyed by parameter name (error feedback per shard)
    hops: NodeHops
    sums: list[tuple[Tensor, dist.Work]] = field(default_factory=list)  # pieces of the shard, summed in the node
    summing: list[dist.Work] = field(default_factory=list)  # the node's sums of the other shards' pieces
    crossed: int = 0  # pieces whose cross-node hop has started
    cross: PendingReduce | None = None  # compressed: the shard's cross-node reduction
    crosses: list[dist.Work] = field(default_factory=list)  # dense: one all-reduce per piece
    gather: list[dist.Work] = field(default_factory=list)

    def works(self) -> list[dist.Work]:
        """Every collective of the shard's step (kept past it: see `distributed.keep`)."""
        crossed = self.cross.works if self.cross is not None else self.crosses
        return [work for _, work in self.sums] + self.summing + list(crossed) + self.gather


class HierarchicalReducer(Reducer):
    """Two-level averaging of each bucket: reduce-scatter in the node, all-reduce across nodes, all-gather.

    Dense (no compressor), the buckets carry presence slots through all three hops and a
    NaN/inf reaches every rank through the sums, as in the flat dense case. With a
    compressor, only the cross-node all-reduce of each shard is compressed: the shard of
    the node's sum, already scaled to the global mean, plus its residual (error feedback
    is kept per shard, under the names of the parameters the shard covers). A non-finite
    flag and one presence count per parameter are then all-reduced over the world, as in
    `CompressedReducer`. On one node nothing crosses nodes and nothing is compressed.

    `bytes` counts what this rank sends across nodes (its shards, or their payloads);
    the full-precision traffic inside the node is not counted.

    Args:
        node_size: processes per node (> 1).
        compressor: the compressor of the cross-node hop (error feedback already added),
            or None. Compressors with their own collectives (PowerSGD) are refused: they
            compress whole matrices, and a shard holds pieces of them.
        timeout: for the collectives; None uses the group's.

    Example:
        >>> reducer = HierarchicalReducer(2, None, None)   # what gk.Average(node_size=2) builds
    """

    def __init__(self, node_size: int, compressor: Compressor | None, timeout: datetime.timedelta | None) -> None:
        super().__init__(timeout)
        if compressor is not None and compressor.start_reduce is not None:
            raise ValueError(
                f"gk.Average(node_size=...) compresses shards of buckets, and {type(compressor).__name__} compresses "
                "whole matrices with its own collectives; use an element-wise compressor (gk.TopK, gk.FP16, ...) "
                "between nodes, or node_size=1 for flat averaging"
            )
        self.node_size = node_size
        self.compressor = compressor
        self.presence = compressor is None
        self.groups: NodeGroups | None = None
        self._shards: dict[int, _Shard] = {}
        self._launched: list[Bucket] = []
        self._crossed = 0  # buckets of this window whose cross-node hop has started
        self._pack_scale: Tensor | float = 1.0
        self._loss_scale: Tensor | None = None
        self._bad: Tensor | None = None

    @property
    def compressing(self) -> bool:
        """Whether the cross-node hop is compressed (a compressor and more than one node)."""
        return self.compressor is not None and self.groups is not None and self.groups.nodes > 1

    def connect(self) -> None:
        """Build the node and cross groups (once; every rank of the world must call it)."""
        if self.groups is None:
            self.groups = NodeGroups.build(self.node_size, self.timeout)

    def begin(self, local_count: Items, scale: Tensor | float, loss_scale: Tensor | None) -> None:
        self._loss_scale = loss_scale
        if self.compressor is None:
            return
        # Compressed, the shard is scaled before it is compressed, so that the residuals are in
        # units of the global mean gradient, without the AMP loss scale (which changes from step
        # to step); the scale goes back on after the cross-node hop, on the shard alone.
        self._pack_scale = scale if loss_scale is None else scale / loss_scale.to(torch.float64)

    # -- the three hops ---------------------------------------------------------------------

    def _start(self, bucket: Bucket, group: dist.ProcessGroup | None, what: str) -> None:
        assert self.groups is not None, "HierarchicalReducer.connect() comes before the first launch"
        shard = self._shard_of(bucket)
        bucket.pack(self.params, self._pack_scale if self.compressor is not None else 1.0)
        # Dense, the shard crosses nodes in pieces, each as soon as the node has summed it, so that
        # the link is busy while the node still sums the rest of a large bucket; compressed, whole
        # (the compressor selects over the shard).
        piece = PIECE_BYTES // shard.padded.element_size() if self.compressor is None else None
        shard.sums, shard.summing = shard.hops.start_sum(shard.padded, shard.shard, piece)
        shard.crossed = 0
        self._launched.append(bucket)
        self._cross_ready(wait=False)

    def _cross_ready(self, *, wait: bool) -> None:
        """Start the cross-node hop of each piece of each launched bucket whose sum in the node is done, in
        bucket and piece order (the same order on every rank, whenever each gets there); with `wait`, of all."""
        while self._crossed < len(self._launched):
            bucket = self._launched[self._crossed]
            shard = self._shards[bucket.index]
            while shard.crossed < len(shard.sums):
                piece, summed = shard.sums[shard.crossed]
                if not wait and not summed.is_completed():
                    return
                what = f"gk.Average: sum in the node of bucket {bucket.index}"
                distributed.wait(summed, what, self.timeout)
                self._start_cross(bucket, shard, piece)
                shard.crossed += 1
            self._crossed += 1

    def _start_cross(self, bucket: Bucket, shard: _Shard, piece: Tensor) -> None:
        assert self.groups is not None
        what = f"gk.Average: cross-node reduction of shard {self.groups.local_rank} of bucket {bucket.index}"
        if self.groups.nodes == 1 or shard.valid == 0:
            return  # nothing to add up (one node), or a shard of padding on every node
        if not self.compressing:
            work = dist.all_reduce(piece, op=dist.ReduceOp.SUM, group=self.groups.cross, async_op=True)
            shard.crosses.append(work)
        else:
            assert self.compressor is not None
            values = shard.shard[: shard.valid]
            low, high = torch.aminmax(values)  # NaN/inf reach the min or the max (see CompressedReducer)
            bad = ~(torch.isfinite(low) & torch.isfinite(high))
            self._bad = bad if self._bad is None else self._bad | bad
            shard.cross = start_reduce(
                self.compressor, values, shard.layout, self.groups.cross, 1.0, what, self.timeout, out=values
            )

    def _finish_buckets(
        self, buckets: Sequence[Bucket], group: dist.ProcessGroup | None, scale: Tensor | float
    ) -> Tensor | float:
        assert self.groups is not None
        self._cross_ready(wait=True)
        poison = self._reduce_flags(buckets, group) if self.compressor is not None else None
        sent = 0
        for bucket in buckets:
            shard = self._shards[bucket.index]
            if shard.cross is not None:
                summed = shard.cross.wait()
                values = shard.shard[: shard.valid]
                if summed.data_ptr() != values.data_ptr():
                    values.copy_(summed.view_as(values))
                sent += shard.cross.nbytes
            elif shard.crosses:
                what = f"gk.Average: cross-node all-reduce of bucket {bucket.index} ({bucket.nbytes / MIB:.1f} MiB)"
                for work in shard.crosses:
                    distributed.wait(work, what, self.timeout)
                sent += shard.valid * shard.shard.element_size()
            if self._loss_scale is not None and self.compressor is not None:
                shard.shard.mul_(self._loss_scale.to(shard.shard))  # on 1/node_size of the bucket
            for work in shard.summing:  # the other shards' sums write where the gather will (done by now)
                distributed.wait(work, f"gk.Average: sum in the node of bucket {bucket.index}", self.timeout)
            shard.gather = shard.hops.start_gather(shard.padded, shard.shard)
        for bucket in buckets:
            shard = self._shards[bucket.index]
            what = f"gk.Average: gather in the node of bucket {bucket.index}"
            for work in shard.gather:
                distributed.wait(work, what, self.timeout)
            distributed.keep(shard.works())
            shard.sums, shard.summing, shard.gather, shard.cross, shard.crosses = [], [], [], None, []
            if poison is None:
                bucket.unpack(self.params, scale)
            else:
                # One NaN entry per bucket is enough for the pipeline's global check to skip everywhere.
                bucket.buffer[:1].mul_(poison.to(bucket.buffer.device))
                bucket.expose(self.params)
        self.bytes = sent
        self._launched, self._crossed = [], 0
        if poison is None:
            missing = [bucket for bucket in buckets if bucket.missing]
            if missing:
                positions = [position for bucket in missing for position, _ in bucket.missing]
                counts = torch.cat([bucket.presence_counts().to(torch.float32) for bucket in missing])
                self.missing = (positions, counts)
            return scale
        return poison * scale

    def _reduce_flags(self, buckets: Sequence[Bucket], group: dist.ProcessGroup | None) -> Tensor:
        """All-reduce [non-finite flag, a presence flag per missing parameter of any rank] over the world;
        sets `missing` and returns a float64 device scalar, NaN if any shard was not finite, else 1."""
        dense = [position for bucket in buckets for position in bucket.positions]
        slot_of = {position: 1 + k for k, position in enumerate(dense)}
        device = buckets[0].buffer.device if buckets else torch.device("cpu")
        flags = torch.ones(1 + len(dense), dtype=torch.float32, device=device)
        flags[:1].copy_(self._bad.to(flags).reshape(1) if self._bad is not None else torch.zeros(1))
        absent = [position for bucket in buckets for position, _ in bucket.missing]
        for position in absent:
            flags[slot_of[position]] = 0
        what = "gk.Average: all-reduce of the non-finite flag"
        distributed.run(dist.all_reduce, what, self.timeout, flags, group=group)
        self._bad = None
        if absent:
            self.missing = (absent, flags[[slot_of[position] for position in absent]])
        return torch.where(flags[:1] > 0, float("nan"), 1.0).to(torch.float64)

    # -- shards and their layout ------------------------------------------------------------

    def _shard_of(self, bucket: Bucket) -> _Shard:
        shard = self._shards.get(bucket.index)
        if shard is None:
            shard = self._shards[bucket.index] = self._new_shard(bucket)
        return shard

    def _new_shard(self, bucket: Bucket) -> _Shard:
        assert self.groups is not None
        size = bucket.buffer.numel()
        per_shard = -(-size // self.node_size)
        # The bucket's buffer becomes the front of a padded one (before anything was packed into it),
        # so that the reduce-scatter and the all-gather work on it without a copy.
        padded = bucket.buffer.new_zeros(per_shard * self.node_size)
        bucket.use_buffer(padded[:size])
        start = self.groups.local_rank * per_shard
        valid = max(0, min(per_shard, size - start))
        hops = self.groups.hops(padded.device.type)
        return _Shard(padded, hops.shard_buffer(padded), valid, self._layout(bucket, start, start + valid), hops)

    def _layout(self, bucket: Bucket, start: int, stop: int) -> Layout:
        """The pieces of parameters in entries [start, stop) of the bucket, named by parameter."""
        pieces = []
        for position, offset, size in zip(bucket.positions, bucket.offsets, bucket.sizes):
            low, high = max(start, offset), min(stop, offset + size)
            if low < high:
                pieces.append((self.names[position], (high - low,)))
        return tuple(pieces)

    def shard_names(self, buckets: Sequence[Bucket]) -> list[str]:
        """The names of the parameters whose pieces this rank's shards hold (their state is this rank's)."""
        assert self.groups is not None
        names = []
        for bucket in buckets:
            size = bucket.buffer.numel()
            per_shard = -(-size // self.node_size)
            start = self.groups.local_rank * per_shard
            names += [name for name, _ in self._layout(bucket, start, min(size, start + per_shard))]
        return names

    # -- after the step ---------------------------------------------------------------------

    def after_step(self, *, skipped: bool, contributed: bool) -> None:
        if self.compressor is None:
            return
        # The shard is the node's sum: what was sent reached every rank even when this rank had
        # no items, so the residual moves on with every step that was taken.
        if skipped:
            self.compressor.discard()
        else:
            self.compressor.commit()

    def state_dict(self) -> dict[str, Any]:
        return self.compressor.state_dict() if self.compressor is not None else {}
