"""How a window's gradients become their sum over ranks: the `Reducer` interface and the dense reducer.

`Average` owns the buckets and when they are launched (`buckets.BucketSchedule`);
a reducer owns what differs between dense and compressed averaging: what a
bucket sends (`launch`), how the sums come back into ``p.grad`` (`finish`),
which ranks had which gradient (`missing`), and what one process does alone
(`reduce_locally`). `DenseReducer` is here, `CompressedReducer` in `compressed`.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from gradkit import _foreach, distributed
from gradkit.accumulation import Items
from gradkit.averaging.buckets import MIB, Bucket
from gradkit.averaging.sync import grads_of

__all__ = ["Reducer", "DenseReducer", "sum_sparse_rows"]


class Reducer:
    """What `Average` asks of dense or compressed averaging, once per window.

    After `bind`, each window: `begin` (this rank's count and the scale), `launch` of
    every bucket in order, then `finish`, which writes the scaled sums into ``p.grad``
    and sets `bytes` and `missing`; `after_step` once the step was taken or skipped.
    On one process, `reduce_locally` replaces launch and finish.
    """

    #: whether dense buckets carry one presence slot per parameter (which ranks had a gradient)
    presence: bool = False

    def __init__(self, timeout: datetime.timedelta | None) -> None:
        self.timeout = timeout
        self.names: list[str] = []
        self.params: list[Tensor] = []
        self.sparse: list[int] = []
        #: payload bytes this rank sent in the last window
        self.bytes = 0
        #: see `SyncControl.missing_grads`
        self.missing: tuple[list[int], Tensor] | None = None

    def bind(self, names: Sequence[str], params: Sequence[Tensor], sparse: Sequence[int] = ()) -> None:
        """The parameters to reduce, their names, and the positions of those with sparse gradients."""
        self.names, self.params, self.sparse = list(names), list(params), list(sparse)

    def begin(self, local_count: Items, scale: Tensor | float, loss_scale: Tensor | None) -> None:
        """This rank's item (or micro-step) count, the window's scale and the AMP loss scale."""

    def launch(self, bucket: Bucket, group: dist.ProcessGroup | None) -> None:
        """Pack `bucket` and start its collectives (asynchronously)."""
        what = f"gk.Average: reduction of gradient bucket {bucket.index} ({bucket.nbytes / MIB:.1f} MiB dense)"
        try:
            self._start(bucket, group, what)
        except distributed.CollectiveError:
            raise
        except Exception as error:
            raise distributed.CollectiveError(f"{what} could not start: {error}") from error

    def finish(self, buckets: Sequence[Bucket], group: dist.ProcessGroup | None, scale: Tensor | float) -> None:
        """Wait for every bucket and the sparse rows: each gradient becomes the sum over ranks times `scale`."""
        self.missing = None
        scale = self._finish_buckets(buckets, group, scale)
        self.bytes += sum_sparse_rows(self.params, self.names, self.sparse, scale, group, self.timeout)

    def reduce_locally(self, params: Sequence[Tensor], scale: Tensor | float) -> None:
        """One process: nothing to sum, the gradients are scaled."""
        self.missing = None
        _foreach.scale_(grads_of(params), scale)

    def after_step(self, *, skipped: bool, contributed: bool) -> None:
        """The window's step was taken, or skipped (`skipped`), or this rank had no items (`contributed`)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def _start(self, bucket: Bucket, group: dist.ProcessGroup | None, what: str) -> None:
        raise NotImplementedError

    def _finish_buckets(
        self, buckets: Sequence[Bucket], group: dist.ProcessGroup | None, scale: Tensor | float
    ) -> Tensor | float:
        """Write the buckets' sums into ``p.grad``, set `bytes` and `missing`; returns the scale for the sparse rows."""
        raise NotImplementedError


class DenseReducer(Reducer):
    """Dense averaging: each bucket is all-reduced as it is, presence slots included."""

    presence = True

    def _start(self, bucket: Bucket, group: dist.ProcessGroup | None, what: str) -> None:
        bucket.pack(self.params)
        bucket.work = dist.all_reduce(bucket.buffer, op=dist.ReduceOp.SUM, group=group, async_op=True)

    def _finish_buckets(
        self, buckets: Sequence[Bucket], group: dist.ProcessGroup | None, scale: Tensor | float
    ) -> Tensor | float:
        for bucket in buckets:
            assert bucket.work is not None
            what = f"gk.Average: all-reduce of gradient bucket {bucket.index} ({bucket.nbytes / MIB:.1f} MiB)"
            distributed.wait(bucket.work, what, self.timeout)
            bucket.unpack(self.params, scale)
        self.bytes = sum(bucket.nbytes for bucket in buckets)
        missing = [bucket for bucket in buckets if bucket.missing]
        if missing:
            positions = [position for bucket in missing for position, _ in bucket.missing]
            self.missing = (positions, torch.cat([bucket.presence_counts().to(torch.float32) for bucket in missing]))
        return scale


def sum_sparse_rows(
    params: Sequence[Tensor],
    names: Sequence[str],
    positions: Sequence[int],
    scale: Tensor | float,
    group: dist.ProcessGroup | None,
    timeout: datetime.timedelta | None,
) -> int:
    """Sum sparse gradients (``nn.Embedding(sparse=True)``) over ranks as (row indices, rows), never
    densified, and scale them; returns the bytes sent."""
    sent = 0
    for position in positions:
        param, name = params[position], names[position]
        grad = param.grad.coalesce() if param.grad is not None else None
        indices = grad.indices()[0] if grad is not None else torch.zeros(0, dtype=torch.int64, device=param.device)
        rows = grad.values().reshape(-1) if grad is not None else torch.zeros(0, dtype=param.dtype, device=param.device)
        what = f"gk.Average: all-gather of the sparse gradient of {name!r}"
        all_indices = distributed.all_gather_varying(indices, group, what, timeout)  # type: ignore[arg-type]
        all_rows = distributed.all_gather_varying(rows, group, what, timeout)  # type: ignore[arg-type]
        sent += indices.numel() * indices.element_size() + rows.numel() * rows.element_size()
        # The indices come from coalesced local gradients of this very parameter, so they
        # are in range; checking again would cost a pass (and torch warns when left implicit).
        summed = torch.sparse_coo_tensor(
            torch.cat(all_indices).unsqueeze(0),
            torch.cat(all_rows).view(-1, *param.shape[1:]),
            param.shape,
            check_invariants=False,
        ).coalesce()  # rows that several ranks touched add up
        # No rank had a row (the sizes are on the host already): the gradient stays None.
        factor = scale.to(summed.dtype) if isinstance(scale, Tensor) else scale
        param.grad = summed * factor if summed._nnz() else None
    return sent
