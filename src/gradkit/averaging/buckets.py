"""Gradient buckets: parameters of one (device, dtype) packed into one flat buffer, planned as DDP plans them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from gradkit.distributed import PendingReduce

__all__ = ["Bucket", "plan_buckets", "MIB"]

MIB = 1 << 20


class Bucket:
    """Gradients of some parameters of one (device, dtype), packed into one flat buffer."""

    def __init__(self, index: int, positions: list[int], params: Sequence[Tensor], *, presence: bool = False) -> None:
        self.index = index
        self.positions = positions
        self.sizes = [params[i].numel() for i in positions]
        self.offsets = [sum(self.sizes[:k]) for k in range(len(self.sizes))]
        first = params[positions[0]]
        self.numel = sum(self.sizes)
        # With `presence`, one slot per parameter after the gradients says whether this rank
        # has its gradient (1) or not (0); summed with them, a slot is > 0 exactly when some
        # rank has one (sums of ones never round to 0, even in bfloat16).
        self.presence = presence
        self.buffer = torch.empty(self.numel + (len(positions) if presence else 0), dtype=first.dtype, device=first.device)
        self.missing: list[tuple[int, int]] = []  # (position, slot) of parameters without a gradient here
        self.ready = 0
        self.work: dist.Work | None = None
        self.pending: PendingReduce | None = None

    def pack(self, params: Sequence[Tensor], scale: Tensor | float = 1.0) -> None:
        factor = scale.to(self.buffer) if isinstance(scale, Tensor) else scale
        self.missing = []
        if self.presence:
            self.buffer[self.numel :].fill_(1)
        for slot, (position, offset, size) in enumerate(zip(self.positions, self.offsets, self.sizes)):
            view = self.buffer.narrow(0, offset, size)
            grad = params[position].grad
            if grad is None:  # unused in this window on this rank; others may have a gradient
                view.zero_()
                self.missing.append((position, slot))
                if self.presence:
                    self.buffer[self.numel + slot].fill_(0)
            elif isinstance(factor, float) and factor == 1.0:
                view.copy_(grad.reshape(-1))
            else:
                torch.mul(grad.reshape(-1), factor, out=view)

    def presence_counts(self) -> Tensor:
        """After the sum: how many ranks had each of this rank's missing gradients."""
        return self.buffer[[self.numel + slot for _, slot in self.missing]]

    def unpack(self, params: Sequence[Tensor], scale: Tensor | float) -> None:
        factor = scale.to(self.buffer.device) if isinstance(scale, Tensor) else scale
        for position, offset, size in zip(self.positions, self.offsets, self.sizes):
            param = params[position]
            view = self.buffer.narrow(0, offset, size).view(param.shape)
            if param.grad is None:
                param.grad = view * factor
            else:
                torch.mul(view, factor, out=param.grad)

    def expose(self, params: Sequence[Tensor]) -> None:
        """Make each parameter's gradient a view of the buffer: no copy.

        Only for a finished reduction: the pipeline drops the gradients after the
        step, so the next backward writes fresh ones and the buffer is free again."""
        for position, offset, size in zip(self.positions, self.offsets, self.sizes):
            param = params[position]
            param.grad = self.buffer.narrow(0, offset, size).view(param.shape)

    def works(self) -> list[dist.Work]:
        """The work handles of this bucket's collectives in the current window."""
        if self.pending is not None:
            return list(self.pending.works)
        return [] if self.work is None else [self.work]

    @property
    def nbytes(self) -> int:
        """Bytes sent: the gradients and the presence slots."""
        return self.buffer.numel() * self.buffer.element_size()

    @property
    def grad_bytes(self) -> int:
        """Bytes of the gradients alone, dense."""
        return self.numel * self.buffer.element_size()


def plan_buckets(params: Sequence[Tensor], positions: Sequence[int], bucket_bytes: int, first_bucket_bytes: int) -> list[list[int]]:
    """Group parameter positions into buckets, in reverse order (gradients arrive roughly
    last-layer first during backward), one (device, dtype) per bucket, the first one small so
    that communication starts early."""
    buckets: list[list[int]] = []
    current: list[int] = []
    current_bytes = 0
    for position in reversed(positions):
        p = params[position]
        limit = first_bucket_bytes if not buckets else bucket_bytes
        same_kind = not current or (params[current[0]].device, params[current[0]].dtype) == (p.device, p.dtype)
        if current and (not same_kind or current_bytes >= limit):
            buckets.append(current)
            current, current_bytes = [], 0
        current.append(position)
        current_bytes += p.numel() * p.element_size()
    if current:
        buckets.append(current)
    return buckets

