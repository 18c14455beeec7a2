"""gradkit's own gradient averaging across processes (`Average`).

`Average` packs gradients into buckets and starts each bucket's all-reduce as
soon as the boundary backward has produced its last gradient, so that
communication overlaps with the rest of backward (as DDP does). Earlier
micro-steps of a window never touch the network. The pipeline then divides by
the global item count (or micro-batches x processes), fused into the copy out
of the bucket.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gradkit import _checks, distributed
from gradkit.accumulation import Items
from gradkit.averaging.buckets import MIB, Bucket, plan_buckets
from gradkit.averaging.collectives import as_timeout, replicate
from gradkit.averaging.compressed import effective_compressor, load_compressor_state
from gradkit.averaging.payloads import compress_keyed, start_reduce
from gradkit.averaging.sync import SyncControl
from gradkit.compression.base import Compressor

__all__ = ["Average"]


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
        self.compressor = effective_compressor(compressor, error_feedback)
        self.broadcast_buffers = _checks.flag("broadcast_buffers", broadcast_buffers, "pass True to copy rank 0's buffers at setup, False to keep each rank's")
        self.lossy = self.compressor is not None
        self.bucket_mb = _checks.positive_number("bucket_mb", bucket_mb, "pass a bucket size in MiB, e.g. 25")
        self.first_bucket_mb = _checks.positive_number("first_bucket_mb", first_bucket_mb, "pass a size in MiB, e.g. 1")
        self.timeout = as_timeout(timeout)
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
        plan = plan_buckets(self._params, dense, int(self.bucket_mb * MIB), int(self.first_bucket_mb * MIB))
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
        what = f"gk.Average: reduction of gradient bucket {bucket.index} ({bucket.nbytes / MIB:.1f} MiB dense)"
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
                distributed.wait(bucket.work, f"gk.Average: all-reduce of gradient bucket {bucket.index} ({bucket.nbytes / MIB:.1f} MiB)", self.timeout)
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
        load_compressor_state("Average", self.compressor, state, self._names, compressed)

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
