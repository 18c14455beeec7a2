"""Gradient averaging across processes (`Average`) and parameter averaging (`ModelAverager`).

`Average` packs gradients into buckets and starts each bucket's all-reduce as
soon as the boundary backward has produced its last gradient, so that
communication overlaps with the rest of backward (as DDP does). Earlier
micro-steps of a window never touch the network. The pipeline then divides by
the global item count (or micro-batches x processes), fused into the copy out
of the bucket.
"""

from __future__ import annotations

import datetime
from collections.abc import Collection, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gradkit import _checks, distributed
from gradkit.accumulation import Items, SyncControl
from gradkit.compression.base import Compressor
from gradkit.compression.collective import PendingReduce, compress_keyed, start_reduce
from gradkit.compression.error_feedback import ErrorFeedback

__all__ = ["Average", "ModelAverager"]

_MIB = 1 << 20


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


class Average(SyncControl):
    """Average gradients across processes: bucketed all-reduce overlapped with backward.

    Plug it into ``GradientPipeline(average=gk.Average())``. With `num_items`,
    the result is the exact mean over every item of every rank's window (uneven
    per-rank batches included); without, the mean over all ranks' micro-batches
    (their count is all-reduced each window, so a last window of another length
    on some rank gives every rank the same divisor).
    Without an initialized process group it is a group of one and does nothing.

    At setup (when the pipeline is built) the ranks check that they hold the
    same parameter and buffer names, shapes and dtypes, and rank 0's values of
    every parameter (frozen ones included) and every buffer are broadcast so
    that the replicas start equal, as DDP does at construction (unlike DDP's
    default, buffers are not broadcast again at each forward).

    A parameter that no rank produced a gradient for in a window keeps
    ``grad=None``, as under DDP(find_unused_parameters=True), so an optimizer
    with weight decay leaves it alone; one that some rank used gets the average
    with zeros from the others. Which ranks had a gradient rides in a slot per
    parameter in the dense buckets (with the non-finite flag when compressing),
    and is read with the pipeline's one host read of the step.

    A NaN/inf on any rank reaches every rank (through the sum, or a flag
    reduced with the payloads when compressing), so every rank skips the same
    step, and error-feedback residuals stay as they were.

    On one process a compressor still applies: only the selected coordinates
    reach the optimizer (selective updates), and error feedback keeps the rest
    for later steps.

    Args:
        compressor: how each bucket is compressed (``gk.TopK(0.01)``, ``gk.PowerSGD(2)``,
            ...); None sends dense gradients. Non-linear payloads are all-gathered.
        error_feedback: wrap the compressor in ``gk.ErrorFeedback``; by default
            biased compressors (top-k, threshold, sign) are wrapped, the others
            not (DGC and PowerSGD keep their own residual).
        bucket_mb: bucket size in MiB (> 0); DDP's default is 25.
        first_bucket_mb: size of the first bucket (the last layers), small so that
            communication starts early in backward; DDP uses 1.
        group: the process group (default: the whole world).
        timeout: seconds to wait for a collective before raising; None uses the
            process group's timeout.
        broadcast_buffers: copy rank 0's buffers (BatchNorm statistics, ...) to every
            rank at setup; False keeps each rank's own.

    Memory: one flat buffer per bucket, as large as the gradients together. The
    collectives of a step (and so a linear compressor's payloads, e.g. FP16's
    half-size copy) are kept until the next step's reduction.

    Example:
        >>> dist.init_process_group("gloo")          # under torchrun
        >>> pipe = gk.GradientPipeline(model, accumulation_steps=4, average=gk.Average())
    """

    def __init__(
        self,
        compressor: Compressor | None = None,
        *,
        error_feedback: bool | None = None,
        bucket_mb: float = 25,
        first_bucket_mb: float = 1,
        group: dist.ProcessGroup | None = None,
        timeout: float | None = None,
        broadcast_buffers: bool = True,
    ) -> None:
        self.compressor = _effective_compressor(compressor, error_feedback)
        self.broadcast_buffers = _checks.flag("broadcast_buffers", broadcast_buffers, "pass True to copy rank 0's buffers at setup, False to keep each rank's")
        self.lossy = self.compressor is not None
        self.bucket_mb = _checks.positive_number("bucket_mb", bucket_mb, "pass a bucket size in MiB, e.g. 25")
        self.first_bucket_mb = _checks.positive_number("first_bucket_mb", first_bucket_mb, "pass a size in MiB, e.g. 1")
        self.timeout = _timeout(timeout)
        self._group = distributed.WeakGroup(distributed.resolve_group(group, "gk.Average"))
        self._group_arg = distributed.WeakGroup(group)
        self.world_size = distributed.world_size(self.group)
        self.buckets: list[Bucket] = []
        self.launches: list[tuple[int, int]] = []  # (bucket, gradients ready at launch) of the last window
        self._launches: list[tuple[int, int]] = []
        self._params: list[Tensor] = []
        self._bucket_of: dict[int, Bucket] = {}
        self._sparse: list[int] = []
        self._armed = False
        self._next = 0
        self._fired: set[int] = set()
        self._handles: list[Any] = []
        self._bytes = 0
        self._names: list[str] = []
        self._local_scale: Tensor | float = 1.0
        self._loss_scale: Tensor | None = None
        self._weight: Tensor | float = 1.0
        self._bad: Tensor | None = None
        self._finished: list[dist.Work] = []
        self._dense_index: dict[int, int] = {}
        self._missing: tuple[list[int], Tensor] | None = None

    @property
    def group(self) -> dist.ProcessGroup | None:
        """The process group (None: one process, or the group was destroyed); held weakly."""
        return self._group()

    def attach(self, names: Sequence[str], params: Sequence[Tensor], *, sparse: Collection[str] = (), module: nn.Module | None = None) -> None:
        self._group = distributed.WeakGroup(distributed.resolve_group(self._group_arg(), "gk.Average"))
        self.world_size = distributed.world_size(self.group)
        self._names = list(names)
        if self.group is None:
            # One process: a compressor still makes the gradient selective, and p.grad holds
            # the dense one until the boundary.
            self.local_grads_at_boundary = self.compressor is not None
            return
        # Buckets are copies: p.grad keeps the local gradient until the boundary.
        self.local_grads_at_boundary = True
        if self._params:
            raise ValueError("this gk.Average is already attached to a pipeline; build one Average per pipeline")
        replicate(names, params, module, self.group, self.timeout, "gk.Average", buffers=self.broadcast_buffers)
        self._params = list(params)
        # Sparse gradients (nn.Embedding(sparse=True)) travel as (indices, rows), never densified.
        self._sparse = [i for i, name in enumerate(names) if name in sparse]
        dense = [i for i in range(len(self._params)) if i not in self._sparse]
        plan = plan_buckets(self._params, dense, int(self.bucket_mb * _MIB), int(self.first_bucket_mb * _MIB))
        # Dense buckets carry presence slots; compressed payloads cannot, so presence rides
        # with the non-finite flag there.
        self.buckets = [Bucket(i, positions, self._params, presence=self.compressor is None) for i, positions in enumerate(plan)]
        self._bucket_of = {position: bucket for bucket in self.buckets for position in bucket.positions}
        self._dense_index = {position: k for k, position in enumerate(dense)}
        self._handles = [self._params[i].register_post_accumulate_grad_hook(self._hook_for(i)) for i in dense]

    def _hook_for(self, position: int):
        def on_gradient_ready(_: Tensor) -> None:
            # Only the boundary backward communicates; a gradient counts once per window.
            if not self._armed or position in self._fired:
                return
            self._fired.add(position)
            bucket = self._bucket_of[position]
            bucket.ready += 1
            if bucket.ready == len(bucket.positions):
                self._launch_ready_buckets()

        return on_gradient_ready

    def _launch_ready_buckets(self) -> None:
        # Strictly in bucket order, so that every rank issues the same collectives in the
        # same sequence even if its gradients become ready in another order.
        while self._next < len(self.buckets) and self.buckets[self._next].ready == len(self.buckets[self._next].positions):
            self._launch(self.buckets[self._next])

    def _launch(self, bucket: Bucket) -> None:
        what = f"gk.Average: reduction of gradient bucket {bucket.index} ({bucket.nbytes / _MIB:.1f} MiB dense)"
        try:
            if self.compressor is None:
                bucket.pack(self._params)
                bucket.work = dist.all_reduce(bucket.buffer, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
            else:
                # Compress this rank's mean gradient (stable units for residuals), weighted
                # by its share of the global items, so the sum is the global mean.
                bucket.pack(self._params, self._local_scale)
                # NaN/inf reach the min or the max: one fast reduction, where isfinite(...).all()
                # writes a boolean per entry first.
                low, high = torch.aminmax(bucket.buffer)
                bad = ~(torch.isfinite(low) & torch.isfinite(high))
                self._bad = bad if self._bad is None else self._bad | bad
                layout = tuple((self._names[i], tuple(self._params[i].shape)) for i in bucket.positions)
                bucket.pending = start_reduce(self.compressor, bucket.buffer, layout, self.group, self._weight, what, self.timeout, out=bucket.buffer)  # type: ignore[arg-type]
        except distributed.CollectiveError:
            raise
        except Exception as error:
            raise distributed.CollectiveError(f"{what} could not start: {error}") from error
        self._launches.append((bucket.index, len(self._fired)))
        self._next += 1

    def set_sync(self, enabled: bool) -> None:
        if enabled and not self._armed:
            self._start_window()
        self._armed = enabled

    def _start_window(self) -> None:
        self._next = 0
        self._fired.clear()
        self._launches = []
        for bucket in self.buckets:
            bucket.ready = 0
            bucket.work = None
            bucket.pending = None

    def begin_reduction(self, local_count: Items, scale: Tensor | float, loss_scale: Tensor | None = None) -> None:
        # A rank may have no items in a window (the global total is checked): its gradients
        # are zero and its weight is 0, and 1/0 would turn those zeros into NaN.
        if isinstance(local_count, Tensor):
            self._local_scale = 1.0 / local_count.to(torch.float64).clamp(min=1)
        else:
            self._local_scale = 1.0 / max(local_count, 1)
        self._weight = local_count * scale
        # Under AMP the gradients carry the loss scale, which GradScaler changes from step to
        # step: compressor state (residuals, momentum) must not, so compression sees unscaled
        # gradients and the weight puts the scale back for the sum (GradScaler unscales it).
        self._loss_scale = loss_scale
        if loss_scale is not None:
            self._local_scale = self._local_scale / loss_scale.to(torch.float64)
            self._weight = self._weight * loss_scale.to(torch.float64)

    def global_items(self, items: Items) -> Items:
        if self.group is None:
            return items
        device = self.buckets[0].buffer.device
        total = torch.as_tensor(items, dtype=torch.int64, device=device).clone()
        distributed.run(dist.all_reduce, "gk.Average: all-reduce of the item count", self.timeout, total, group=self.group)
        return total

    def global_micro_steps(self, micro_steps: int, *, complete: bool) -> Items:
        # Always reduced: a peer may flush a shorter last window while this rank's completes,
        # and both must divide by the same count (the collective is in the same place then).
        return self.global_items(micro_steps)

    def missing_grads(self) -> tuple[list[int], Tensor] | None:
        return self._missing

    def reduce_(self, params: Sequence[Tensor], scale: Tensor | float, *, complete: bool) -> None:
        self._missing = None
        if self.group is None:
            if self.compressor is None:
                super().reduce_(params, scale, complete=complete)
            else:
                self._compress_locally(params, scale)
            return
        if not complete:  # a flushed window: its last backward ran unarmed and launched nothing
            self._start_window()
        while self._next < len(self.buckets):  # buckets with gradients unused in this backward
            self._launch(self.buckets[self._next])
        if self.compressor is None:
            for bucket in self.buckets:
                assert bucket.work is not None
                distributed.wait(bucket.work, f"gk.Average: all-reduce of gradient bucket {bucket.index} ({bucket.nbytes / _MIB:.1f} MiB)", self.timeout)
                bucket.unpack(self._params, scale)
            self._bytes = sum(bucket.nbytes for bucket in self.buckets)
            missing = [bucket for bucket in self.buckets if bucket.missing]
            if missing:
                positions = [position for bucket in missing for position, _ in bucket.missing]
                self._missing = (positions, torch.cat([bucket.presence_counts().to(torch.float32) for bucket in missing]))
        else:
            # Any rank's NaN/inf must stop every rank: a top-k may not even select it. Which
            # gradients each rank has travels with the flag: [flag, one count per dense parameter].
            device = self.buckets[0].buffer.device if self.buckets else torch.device("cpu")
            flags = torch.ones(1 + len(self._dense_index), dtype=torch.float32, device=device)
            flags[:1].copy_(self._bad.to(flags).reshape(1) if self._bad is not None else torch.zeros(1))
            slots = [1 + self._dense_index[position] for bucket in self.buckets for position, _ in bucket.missing]
            for slot in slots:
                flags[slot] = 0
            distributed.run(dist.all_reduce, "gk.Average: all-reduce of the non-finite flag", self.timeout, flags, group=self.group)
            bad = flags[:1]
            if slots:
                self._missing = ([position for bucket in self.buckets for position, _ in bucket.missing], flags[slots])
            # Stays on the device (the pipeline's check skips); float64, so that scaling the
            # sparse rows by it keeps their precision.
            poison = torch.where(bad > 0, float("nan"), 1.0).to(torch.float64)
            for bucket in self.buckets:
                assert bucket.pending is not None
                summed = bucket.pending.wait()
                if summed.data_ptr() != bucket.buffer.data_ptr():
                    bucket.buffer.copy_(summed)
                # One NaN entry per bucket is enough for the pipeline's global norm to skip the
                # step on every rank; multiplying every entry would cost a pass over the bucket.
                bucket.buffer[:1].mul_(poison.to(bucket.buffer.device))
                bucket.expose(self._params)
            self._bytes = sum(bucket.pending.nbytes for bucket in self.buckets if bucket.pending is not None)
            scale = poison * scale
        self._bytes += self._reduce_sparse(scale)
        # Parameters no rank had a gradient for get one from the buffer here; the pipeline
        # sets them back to None (it reads the presence counts with its one host read).
        # This window's work handles stay until the next reduction (or exit) and the previous
        # window's go now, long after gloo's worker thread let go of them: see
        # distributed.keep for why that matters.
        self._finished = [work for bucket in self.buckets for work in bucket.works()]
        for bucket in self.buckets:
            bucket.work, bucket.pending = None, None
        self.launches = self._launches
        self._fired.clear()
        self._armed = False
        self._bad = None

    def _reduce_sparse(self, scale: Tensor | float) -> int:
        """Sum sparse gradients over ranks as (row indices, rows): returns the bytes sent."""
        sent = 0
        for position in self._sparse:
            param, name = self._params[position], self._names[position]
            grad = param.grad.coalesce() if param.grad is not None else None
            indices = grad.indices()[0] if grad is not None else torch.zeros(0, dtype=torch.int64, device=param.device)
            rows = grad.values().reshape(-1) if grad is not None else torch.zeros(0, dtype=param.dtype, device=param.device)
            what = f"gk.Average: all-gather of the sparse gradient of {name!r}"
            all_indices = distributed.all_gather_varying(indices, self.group, what, self.timeout)  # type: ignore[arg-type]
            all_rows = distributed.all_gather_varying(rows, self.group, what, self.timeout)  # type: ignore[arg-type]
            sent += indices.numel() * indices.element_size() + rows.numel() * rows.element_size()
            # The indices come from coalesced local gradients of this very parameter, so they
            # are in range; checking again would cost a pass (and torch warns when left implicit).
            summed = torch.sparse_coo_tensor(
                torch.cat(all_indices).unsqueeze(0), torch.cat(all_rows).view(-1, *param.shape[1:]), param.shape, check_invariants=False
            ).coalesce()  # rows that several ranks touched add up
            # No rank had a row (the sizes are on the host already): the gradient stays None.
            param.grad = summed * (scale.to(summed.dtype) if isinstance(scale, Tensor) else scale) if summed._nnz() else None
        return sent

    def _compress_locally(self, params: Sequence[Tensor], scale: Tensor | float) -> None:
        """One process: the compressed gradient is what reaches the optimizer (selective updates)."""
        assert self.compressor is not None
        with_grad = [(name, p) for name, p in zip(self._names, params) if p.grad is not None]
        unscaled = scale if self._loss_scale is None else scale / self._loss_scale.to(torch.float64)  # see begin_reduction
        for name, p in with_grad:
            if p.grad.is_sparse:  # sparse embedding rows are already selective: send them as they are
                p.grad.mul_(scale)
                continue
            flat = p.grad.reshape(-1) * (unscaled.to(p.grad) if isinstance(unscaled, Tensor) else unscaled)
            p.grad.copy_(self.compressor.decompress(compress_keyed(self.compressor, flat, ((name, tuple(p.shape)),))).view_as(p.grad))
            if self._loss_scale is not None:
                p.grad.mul_(self._loss_scale.to(p.grad))
        self._bytes = 0

    def after_step(self, params: Sequence[Tensor], *, skipped: bool = False, contributed: bool = True) -> None:
        if self.compressor is None:
            return
        # Residuals (and DGC/PowerSGD state) move on only with a step that was taken, and
        # to which this rank contributed: at weight 0 what it "sent" reached nobody.
        if skipped or not contributed:
            self.compressor.discard()
        else:
            self.compressor.commit()

    def state_dict(self) -> dict[str, Any]:
        return {"compressor": self.compressor.state_dict() if self.compressor is not None else {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        compressed = [self._names[i] for bucket in self.buckets for i in bucket.positions]  # every step, in every bucket
        _load_compressor_state("Average", self.compressor, state, self._names, compressed)

    def bytes_sent(self) -> int:
        return self._bytes

    def dense_bytes(self) -> int:
        sparse = sum(self._params[i].numel() * self._params[i].element_size() for i in self._sparse)
        return sum(bucket.grad_bytes for bucket in self.buckets) + sparse  # a sparse table, sent densely

    def detach(self) -> None:
        """Remove the gradient hooks (the pipeline no longer uses this Average)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


class ModelAverager(SyncControl):
    """Local SGD: each process steps on its own gradient; parameters are averaged
    every `period` optimizer steps (Lin et al. 2020, "Don't Use Large Mini-Batches,
    Use Local SGD"; torch's PeriodicModelAverager).

    Pass it as ``GradientPipeline(average=gk.ModelAverager(8))``, or use it on its
    own: call ``averager.after_step(model.parameters())`` after each optimizer step.
    After the warm-up, parameters are averaged after steps warmup+1,
    warmup+1+period, ... (counted from 1), the steps at which torch's
    PeriodicModelAverager averages. During the first `warmup_steps` steps they
    are averaged after every step, so the replicas move together while training
    is most unstable; torch's averager does nothing then (its users run DDP's
    gradient all-reduce during warm-up).
    Steps are counted per window, skipped or not, so every rank averages at the
    same steps.

    Args:
        period: average every `period` steps (>= 1).
        warmup_steps: steps at the start that average every step (>= 0).
        group: the process group (default: the whole world).
        timeout: seconds to wait for a collective; None uses the group's.

    Memory: one flat copy of the parameters of one (device, dtype) while averaging.

    Example:
        >>> pipe = gk.GradientPipeline(model, average=gk.ModelAverager(period=8, warmup_steps=100))
    """

    def __init__(self, period: int, *, warmup_steps: int = 0, group: dist.ProcessGroup | None = None, timeout: float | None = None) -> None:
        self.period = _checks.positive_int("period", period, "pass how many steps to take between averages, e.g. 8")
        self.warmup_steps = _checks.non_negative_int("warmup_steps", warmup_steps, "pass 0 for no warm-up")
        self.timeout = _timeout(timeout)
        self._group = distributed.WeakGroup(distributed.resolve_group(group, "gk.ModelAverager"))
        self._group_arg = distributed.WeakGroup(group)
        self.step = 0
        self._attached = False

    @property
    def group(self) -> dist.ProcessGroup | None:
        """The process group (None: one process, or the group was destroyed); held weakly."""
        return self._group()

    def attach(
        self, names: Sequence[str], params: Sequence[Tensor], *, sparse: Collection[str] = (), module: nn.Module | None = None, broadcast: bool = True
    ) -> None:
        """Check that the ranks hold the same parameters and (by default) copy rank 0's
        values to all (with `module`: frozen parameters and buffers too), so the replicas
        start equal; the pipeline calls it at setup."""
        self._group = distributed.WeakGroup(distributed.resolve_group(self._group_arg(), "gk.ModelAverager"))
        self._attached = True
        if self.group is not None:
            if broadcast:
                replicate(names, params, module, self.group, self.timeout, "gk.ModelAverager", buffers=True)
            else:
                distributed.check_same_parameters(names, params, self.group, "gk.ModelAverager")

    def after_step(self, params: Sequence[Tensor], *, skipped: bool = False, contributed: bool = True) -> None:
        """Count one optimizer step and average the parameters if the schedule says so."""
        params = list(params)
        if not self._attached:  # used on its own: the first step already ran, so only check
            self.attach([str(i) for i in range(len(params))], params, broadcast=False)
        self.step += 1
        if self.group is None:
            return
        if self.averages_after(self.step):
            self.average_now(params)

    def averages_after(self, step: int) -> bool:
        """Whether the parameters are averaged after optimizer step `step` (counted from 1).

        Every step of the warm-up, then the first step after it and every `period`-th
        step from there: steps warmup+1, warmup+1+period, ... (torch's
        PeriodicModelAverager averages at those same steps; during its warm-up it
        averages nothing, leaving that to DDP's gradient all-reduce)."""
        return step <= self.warmup_steps or (step - 1 - self.warmup_steps) % self.period == 0

    def average_now(self, params: Sequence[Tensor]) -> None:
        """Replace every parameter by its mean over the group."""
        if self.group is None:
            return
        size = dist.get_world_size(self.group)
        with torch.no_grad():
            # dict keeps first-appearance order: every rank must issue the same collectives in turn
            for kind in dict.fromkeys((p.device, p.dtype) for p in params):
                members = [p for p in params if (p.device, p.dtype) == kind]
                flat = torch.cat([p.reshape(-1) for p in members])
                distributed.run(dist.all_reduce, f"gk.ModelAverager: all-reduce of parameters at step {self.step}", self.timeout, flat, group=self.group)
                flat.div_(size)
                for p, chunk in zip(members, flat.split([p.numel() for p in members])):
                    p.copy_(chunk.view_as(p))

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _checks.state_keys("ModelAverager", state, {"step"})
        self.step = _checks.non_negative_int("step", state["step"], "pass the state from ModelAverager.state_dict()")


def replicate(
    names: Sequence[str],
    params: Sequence[Tensor],
    module: nn.Module | None,
    group: dist.ProcessGroup,
    timeout: datetime.timedelta | None,
    owner: str,
    *,
    buffers: bool,
) -> None:
    """Make the replicas equal, as DDP does at construction: check that every rank holds the
    same tensors, then copy rank 0's values of every parameter (frozen ones included) and,
    with `buffers`, every buffer of `module` to all ranks.

    Raises:
        ValueError: naming the first tensor whose name, shape or dtype differs across ranks.
    """
    entries = list(zip(names, params))
    if module is not None:
        managed = {id(p) for p in params}
        entries += [(name, p) for name, p in module.named_parameters() if id(p) not in managed]
        if buffers:
            entries += [(f"buffer {name}", b) for name, b in module.named_buffers()]
    tensors = [tensor for _, tensor in entries]
    distributed.check_same_parameters([name for name, _ in entries], tensors, group, owner)
    distributed.broadcast_parameters(tensors, group, timeout)


def _load_compressor_state(
    owner: str, compressor: Compressor | None, state: dict[str, Any], known: Sequence[str] = (), required: Sequence[str] = ()
) -> None:
    """Load ``{"compressor": ...}`` (from ``owner.state_dict()``) into `compressor`; state kept under
    names other than `known` (or lacking one of `required`) is refused, unless no names are known yet."""
    _checks.state_keys(owner, state, {"compressor"})
    if compressor is not None:
        if known:
            compressor.check_state_names(owner, state["compressor"], known, required)
        compressor.load_state_dict(state["compressor"])
    elif state["compressor"]:
        raise ValueError(f"{owner}.load_state_dict: the state holds compressor state but this {owner} has no compressor; build it with the same compressor")


def _effective_compressor(compressor: object, error_feedback: bool | None) -> Compressor | None:
    """The compressor Average uses: biased ones get error feedback unless told otherwise."""
    error_feedback = _checks.flag("error_feedback", error_feedback, "pass True, False, or None for the compressor's default", allow_none=True)
    if compressor is None:
        if error_feedback:
            raise ValueError("error_feedback=True needs a compressor; pass e.g. gk.Average(gk.TopK(0.01))")
        return None
    if not isinstance(compressor, Compressor):
        raise TypeError(f"compressor must be a gradkit compressor such as gk.TopK(0.01), got {compressor!r}")
    if error_feedback is None:
        error_feedback = compressor.biased and not compressor.keeps_residual
    if error_feedback and not isinstance(compressor, ErrorFeedback):
        return ErrorFeedback(compressor)
    return compressor


def _timeout(seconds: float | None) -> datetime.timedelta | None:
    if seconds is None:
        return None
    return datetime.timedelta(seconds=_checks.positive_number("timeout", seconds, "pass seconds, e.g. 60, or None for the process group's timeout"))
