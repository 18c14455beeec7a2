"""Gradient buckets: flat buffers planned as DDP plans them, launched as backward fills them."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from gradkit.distributed import PendingReduce

__all__ = ["Bucket", "BucketSchedule", "plan_buckets", "MIB"]

MIB = 1 << 20


class Bucket:
    """Gradients of some parameters of one (device, dtype), packed into one flat buffer.

    The buffer's views, one per parameter in its shape, are made once here: packing is one
    fused copy into them, and a reduced bucket hands them out as the gradients (`expose`),
    so no Python work per tensor remains but reading and setting ``p.grad``.
    """

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
        self.shapes = [params[i].shape for i in positions]
        self.use_buffer(
            torch.empty(self.numel + (len(positions) if presence else 0), dtype=first.dtype, device=first.device)
        )
        self.missing: list[tuple[int, int]] = []  # (position, slot) of parameters without a gradient here
        self.ready = 0
        self.work: dist.Work | None = None
        self.pending: PendingReduce | None = None
        #: the tensors the reduction's sum lands in when they are not the buffer (see `averaging.corrected`)
        self.received: list[Tensor] | None = None

    def use_buffer(self, buffer: Tensor) -> None:
        """Hold the bucket in `buffer` (its size; e.g. the front of a padded one that splits evenly),
        with the gradients' part and one view per parameter made once, here."""
        self.buffer = buffer
        self.grads = buffer[: self.numel]  # the gradients' part, without the presence slots
        self.views = [
            buffer.narrow(0, offset, size).view(shape)
            for offset, size, shape in zip(self.offsets, self.sizes, self.shapes)
        ]

    def pack(self, params: Sequence[Tensor], scale: Tensor | float = 1.0) -> None:
        """Copy this rank's gradients (times `scale`) into the buffer; a missing one packs as zeros."""
        grads = [params[position].grad for position in self.positions]
        present = [grad for grad in grads if grad is not None]
        if len(present) == len(grads):
            self.missing = []
            torch._foreach_copy_(self.views, grads)
        else:
            self._pack_some(grads)
        if self.presence:
            self.buffer[self.numel :].fill_(1)
            for _, slot in self.missing:
                self.buffer[self.numel + slot].fill_(0)
        # One pass over the bucket, bit for bit what a multiply per gradient would give.
        if isinstance(scale, Tensor):
            self.grads.mul_(scale.to(self.buffer))
        elif scale != 1.0:
            self.grads.mul_(scale)

    def _pack_some(self, grads: list[Tensor | None]) -> None:
        self.missing = []
        for slot, (position, view, grad) in enumerate(zip(self.positions, self.views, grads)):
            if grad is None:  # unused in this window on this rank; others may have a gradient
                view.zero_()
                self.missing.append((position, slot))
            else:
                view.copy_(grad)

    def presence_counts(self) -> Tensor:
        """After the sum: how many ranks had each of this rank's missing gradients."""
        return self.buffer[[self.numel + slot for _, slot in self.missing]]

    def unpack(self, params: Sequence[Tensor], scale: Tensor | float) -> None:
        """Scale the reduced buffer in place and make it the gradients (see `expose`)."""
        if isinstance(scale, Tensor):
            self.grads.mul_(scale.to(self.buffer.device))
        elif scale != 1.0:
            self.grads.mul_(scale)
        self.expose(params)

    def expose(self, params: Sequence[Tensor]) -> None:
        """Make each parameter's gradient a view of the buffer: no copy.

        Only for a finished reduction: the pipeline drops the gradients after the
        step, so the next backward writes fresh ones and the buffer is free again
        (a reference to an old ``p.grad`` kept past the step sees the next window's
        sums, as under DDP's ``gradient_as_bucket_view=True``)."""
        for position, view in zip(self.positions, self.views):
            params[position].grad = view

    @property
    def full(self) -> bool:
        """Whether every gradient of this bucket is ready in this window."""
        return self.ready == len(self.positions)

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


def plan_buckets(
    params: Sequence[Tensor], positions: Sequence[int], bucket_bytes: int, first_bucket_bytes: int
) -> list[list[int]]:
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


class BucketSchedule:
    """When each bucket is launched: as soon as the boundary backward has produced the bucket's last
    gradient, strictly in bucket order, once per window.

    Only an armed window (its boundary micro-step) launches, so the earlier micro-steps never
    touch the network, and communication overlaps with the rest of backward. Two ways to see
    a bucket fill, chosen by `prime` just before the boundary backward:

    - one hook per bucket, on the parameter whose gradient came last in that bucket when last
      observed, which launches the bucket once every gradient of it is there. It needs every
      gradient to be None when backward starts (the pipeline drops them after each step, so
      this holds whenever a window is one micro-step): a gradient that is not None was then
      produced by this backward;
    - otherwise (accumulated windows, whose earlier micro-steps left gradients; the first
      window, or one whose order changed, to learn the last parameters), a hook on every
      parameter (``register_post_accumulate_grad_hook``), registered for that backward only,
      counts the gradients of its bucket.

    A bucket that no hook launched (unused gradients, an order that changed, no `prime`) is
    launched by `launch_rest`, so the result never depends on which way was taken.

    Args:
        params: the parameters, indexed by `positions`.
        positions: the parameters to bucket (those with dense gradients).
        bucket_bytes: bucket size; first_bucket_bytes: the first bucket's (the last layers).
        presence: give each bucket one presence slot per parameter (see `Bucket`).
        launch: starts a bucket's collectives; called in bucket order, on every rank the same.
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        positions: Sequence[int],
        bucket_bytes: int,
        first_bucket_bytes: int,
        *,
        presence: bool,
        launch: Callable[[Bucket], None],
    ) -> None:
        plan = plan_buckets(params, positions, bucket_bytes, first_bucket_bytes)
        self.buckets = [Bucket(i, members, params, presence=presence) for i, members in enumerate(plan)]
        self.launches: list[tuple[int, int]] = []  # (bucket, gradients ready at launch) of the last window
        self._params = list(params)
        self._positions = list(positions)
        self._launch = launch
        self._bucket_of = {position: bucket for bucket in self.buckets for position in bucket.positions}
        self._launched: list[tuple[int, int]] = []
        self._armed = False
        self._next = 0
        self._fired: set[int] = set()
        self._order: list[int] = []  # positions in the order their hooks fired (per-parameter hooks)
        self._per_bucket = False  # this window's backward is watched by the hooks per bucket
        self._relearn = True  # the last parameter of each bucket is not known (yet, or any more)
        self._each: list[RemovableHandle] = []  # hooks per parameter, for one backward
        self._last: list[RemovableHandle] = []  # hooks per bucket

    def arm(self, enabled: bool) -> None:
        """Say whether the next backward ends the window (and so launches the buckets)."""
        if enabled and not self._armed:
            self._start_window()
        self._armed = enabled

    def prime(self) -> None:
        """Called just before the boundary backward: choose the hooks that watch it (see the class)."""
        if not self._armed or self._next or self._fired:
            return
        fresh = all(self._params[i].grad is None for i in self._positions)
        self._per_bucket = fresh and not self._relearn and bool(self._last)
        if not self._per_bucket and not self._each:
            self._order = []
            # A parameter frozen since attach gets no gradient, and cannot take a hook.
            watched = [i for i in self._positions if self._params[i].requires_grad]
            self._each = [self._params[i].register_post_accumulate_grad_hook(self._hook_for(i)) for i in watched]

    def launch_rest(self, *, complete: bool) -> None:
        """Launch the buckets the boundary backward did not fill (gradients unused in it, or a flushed
        window, whose last backward ran unarmed and launched nothing)."""
        if not complete:
            self._start_window()
        elif self._per_bucket and any(self._filled(bucket) for bucket in self.buckets[self._next :]):
            # A bucket was complete before backward ended but no hook saw it: the order changed.
            self._relearn = True
        while self._next < len(self.buckets):
            self._launch_next()

    def end_window(self) -> list[dist.Work]:
        """Forget this window's collectives; returns their work handles (see `gradkit.distributed.keep`)."""
        works = [work for bucket in self.buckets for work in bucket.works()]
        for bucket in self.buckets:
            bucket.work, bucket.pending = None, None
        self.launches = self._launched
        if self._each:
            self._learn()
        self._fired.clear()
        self._armed = False
        self._per_bucket = False
        return works

    def detach(self) -> None:
        """Remove the gradient hooks."""
        for handle in self._each + self._last:
            handle.remove()
        self._each, self._last = [], []

    def _learn(self) -> None:
        """After a backward watched per parameter: hook, per bucket, the parameter whose gradient came last."""
        for handle in self._each:
            handle.remove()
        self._each = []
        if not self._order:
            return
        last: dict[int, int] = {}
        for position in self._order:
            last[self._bucket_of[position].index] = position
        for handle in self._last:
            handle.remove()
        self._last = [self._params[p].register_post_accumulate_grad_hook(self._bucket_hook) for p in last.values()]
        self._relearn = False

    def _filled(self, bucket: Bucket) -> bool:
        params = self._params
        return all(params[i].grad is not None for i in bucket.positions)

    def _bucket_hook(self, _: Tensor) -> None:
        # Every gradient was None when this backward started (see prime): one that is not None
        # now was produced by it, so a bucket whose gradients are all there is complete.
        if not self._per_bucket:
            return
        while self._next < len(self.buckets) and self._filled(self.buckets[self._next]):
            self._launch_next()

    def _hook_for(self, position: int) -> Callable[[Tensor], None]:
        def on_gradient_ready(_: Tensor) -> None:
            # Only the boundary backward communicates; a gradient counts once per window.
            if not self._armed or position in self._fired:
                return
            self._fired.add(position)
            self._order.append(position)
            bucket = self._bucket_of[position]
            bucket.ready += 1
            if bucket.full:
                self._launch_ready()

        return on_gradient_ready

    def _launch_ready(self) -> None:
        # Strictly in bucket order, so that every rank issues the same collectives in the
        # same sequence even if its gradients become ready in another order.
        while self._next < len(self.buckets) and self.buckets[self._next].full:
            self._launch_next()

    def _launch_next(self) -> None:
        bucket = self.buckets[self._next]
        self._launch(bucket)
        if self._per_bucket:  # no count kept: the gradients there now (all were None before backward)
            ready = sum(self._params[i].grad is not None for i in self._positions)
        else:
            ready = len(self._fired)
        self._launched.append((bucket.index, ready))
        self._next += 1

    def _start_window(self) -> None:
        self._next = 0
        self._fired.clear()
        self._launched = []
        self._per_bucket = False
        for bucket in self.buckets:
            bucket.ready = 0
            bucket.work = None
            bucket.pending = None
