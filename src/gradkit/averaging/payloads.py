"""How compressed payloads of many ranks meet: all-reduce for linear ones, all-gather otherwise.

`start_reduce` compresses a flat tensor (a bucket), launches the collectives
asynchronously and returns a `PendingReduce`; its `wait()` returns the sum over
ranks, decompressed. `gk.Average` calls it from the gradient hooks, so the
communication overlaps with backward as on the dense path.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from gradkit import distributed
from gradkit.compression.base import Compressor, Payload
from gradkit.compression.keyed_state import Layout
from gradkit.distributed import PendingReduce

__all__ = ["start_reduce", "start_payload", "compress_keyed", "decompress_sum", "scatter_sum_into"]


def compress_keyed(compressor: Compressor, flat: Tensor, layout: Layout) -> Payload:
    """Compress with per-parameter state where the compressor keeps some, deferring its commit.

    Sparsifiers select over the whole bucket. Selecting per parameter (as DGC does
    layer by layer) was measured on the demo task with AdamW and trained worse
    (validation loss 1.34x dense instead of 1.24x after 500 steps; benchmarks/RESULTS.md,
    "Where to select").
    """
    if compressor.keyed:
        return compressor.compress(flat, key=layout, commit=False)  # type: ignore[call-arg]
    return compressor.compress(flat)


def start_reduce(
    compressor: Compressor,
    flat: Tensor,
    layout: Layout,
    group: dist.ProcessGroup,
    weight: Tensor | float,
    what: str,
    timeout: datetime.timedelta | None,
    out: Tensor | None = None,
) -> PendingReduce:
    """Compress `flat`, weight its payload, and start summing it over `group`.

    With `out` (a flat tensor of flat's size, free once `flat` is compressed), sparse
    sums are written there instead of into a new dense tensor."""
    if compressor.start_reduce is not None:
        return compressor.start_reduce(flat, layout, group, weight, what, timeout)
    return start_payload(compressor, compress_keyed(compressor, flat, layout), group, weight, what, timeout, out)


def start_payload(
    compressor: Compressor,
    payload: Payload,
    group: dist.ProcessGroup,
    weight: Tensor | float,
    what: str,
    timeout: datetime.timedelta | None,
    out: Tensor | None = None,
    *,
    into: tuple[Sequence[Tensor], Sequence[int]] | None = None,
) -> PendingReduce:
    """Weight `payload` (made by `compressor`) and start summing it over `group` (`start_reduce`'s second half).

    Args:
        out: see `start_reduce`.
        into: ``(pieces, offsets)`` for a sparse compressor: the sum is scattered into these tensors
            instead (each zeroed first; piece i holds the flat positions from ``offsets[i]``, in order),
            and `wait()` returns the first piece.

    Raises:
        ValueError: `into` is given for a compressor that is not sparse.
    """
    if into is not None and not compressor.sparse:
        raise ValueError(
            f"into= needs a sparse compressor (its sum is a scatter), got {compressor!r}; pass out= instead"
        )
    for tensor in payload.tensors:
        if tensor.is_floating_point():
            tensor.mul_(weight.to(tensor) if isinstance(weight, Tensor) else weight)
    if compressor.linear:
        works = [dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group, async_op=True) for t in payload.tensors]
        return PendingReduce(works, lambda: compressor.decompress(payload).reshape(-1), payload.nbytes, what, timeout)
    world = dist.get_world_size(group)
    if compressor.variable_size:
        # Sizes differ by rank (Threshold): gather them first; this waits, once per bucket.
        per_rank = [distributed.all_gather_varying(t, group, what, timeout) for t in payload.tensors]
        works: list[dist.Work] = []
        gathered = per_rank
    else:
        gathered = [[torch.empty_like(t) for _ in range(world)] for t in payload.tensors]
        works = [dist.all_gather(out, t, group=group, async_op=True) for out, t in zip(gathered, payload.tensors)]

    def finish() -> Tensor:
        payloads = [compressor.payload_for([g[r] for g in gathered], payload) for r in range(world)]
        if into is not None:
            parts = [(p.tensors[0], p.tensors[1]) for p in payloads]
            return scatter_sum_into(*into, parts, ascending=bool(payload.meta.get("ascending", False)))
        return decompress_sum(compressor, payloads, out).reshape(-1)

    return PendingReduce(works, finish, payload.nbytes, what, timeout)


def decompress_sum(compressor: Compressor, payloads: list[Payload], out: Tensor | None = None) -> Tensor:
    """The sum of the payloads, decompressed; sparse ones in one scatter (into `out` if given)."""
    first = payloads[0]
    if compressor.sparse:
        indices = torch.cat([p.tensors[0] for p in payloads])
        values = torch.cat([p.tensors[1] for p in payloads])
        if out is not None:  # reusing a buffer: allocating a large zeroed tensor costs a pass of its own
            return out.zero_().index_add_(0, indices.long(), values.to(out.dtype))
        return compressor.decompress(compressor.payload_for([indices, values], first))
    total = compressor.decompress(first).clone()
    for payload in payloads[1:]:
        total += compressor.decompress(payload)
    return total


def scatter_sum_into(
    pieces: Sequence[Tensor], offsets: Sequence[int], parts: Sequence[tuple[Tensor, Tensor]], *, ascending: bool = False
) -> Tensor:
    """Zero `pieces` and add each part's values at its flat positions of their concatenation; returns pieces[0].

    Bit for bit ``decompress_sum``'s scatter of the concatenated parts into one flat tensor: the
    parts (one per rank) are added in their order, so a position several ranks send adds up in
    the same order. The split of a part by piece is read on the host (a CPU waits for nothing).

    Args:
        pieces: contiguous tensors of one dtype; offsets: the flat position where each begins.
        parts: (indices, values) per rank: positions below the pieces' total size, one value each.
        ascending: each part's positions rise, except entries at position 0 whose value is 0
            (padding, as ``TopK``'s payloads mark with ``meta["ascending"]``); such a part is
            split by a binary search instead of a sort.
    """
    torch._foreach_zero_(list(pieces))
    dtype = pieces[0].dtype
    if len(pieces) == 1:
        for indices, values in parts:
            pieces[0].view(-1).index_add_(0, indices.long(), values.to(dtype))
        return pieces[0]
    for indices, values in parts:
        if ascending:
            # Padding's position 0 becomes the running maximum: it still adds +0.0, which changes
            # no sum (a sum that starts from +0.0 is never -0.0), and the positions are sorted.
            indices = torch.cummax(indices, 0).values
            bounds = torch.tensor(list(offsets[1:]), dtype=indices.dtype)
            ends = torch.searchsorted(indices, bounds).tolist() + [indices.numel()]
        else:
            indices, values, ends = _by_piece(indices, values, offsets)
        indices, values, start = indices.long(), values.to(dtype), 0
        for piece, offset, end in zip(pieces, offsets, ends):
            if end > start:  # a position appears once per part: the order within it changes nothing
                piece.view(-1).index_add_(0, indices[start:end] - offset, values[start:end])
            start = end
    return pieces[0]


def _by_piece(indices: Tensor, values: Tensor, offsets: Sequence[int]) -> tuple[Tensor, Tensor, list[int]]:
    """`indices` and `values` grouped by the piece their position falls in (stable), and each group's end."""
    bounds = torch.tensor(list(offsets[1:]), dtype=indices.dtype, device=indices.device)
    which = torch.bucketize(indices, bounds, right=True)
    order = torch.sort(which.to(torch.uint8) if len(offsets) < 256 else which, stable=True).indices
    ends = torch.bincount(which, minlength=len(offsets)).cumsum(0).tolist()
    return indices.index_select(0, order), values.index_select(0, order), ends
