"""gradkit's own gradient averaging across processes (`Average`).

`Average` packs gradients into buckets and starts each bucket's all-reduce as
soon as the boundary backward has produced its last gradient, so that
communication overlaps with the rest of backward (as DDP does). Earlier
micro-steps of a window never touch the network. The pipeline then divides by
the global item count (or micro-batches x processes), fused into the copy out
of the bucket.

`Average` itself is configuration and setup; when buckets launch is the
`BucketSchedule`'s (`buckets`), what they send is the reducer's: dense
(`reducers.DenseReducer`) or compressed (`compressed.CompressedReducer`).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import torch.distributed as dist
from torch import Tensor, nn

from gradkit import _checks, distributed
from gradkit.accumulation import Items
from gradkit.averaging.buckets import MIB, Bucket, BucketSchedule
from gradkit.averaging.collectives import as_timeout, global_count, replicate
from gradkit.averaging.compressed import CompressedReducer, effective_compressor, load_compressor_state
from gradkit.averaging.hierarchical import HierarchicalReducer, check_node_size, node_size_for
from gradkit.averaging.reducers import DenseReducer, Reducer
from gradkit.averaging.sync import SyncControl
from gradkit.compression.base import Compressor
from gradkit.context import same_params

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
        node_size: processes per node, for hierarchical averaging (`averaging.hierarchical`):
            full precision inside each node, the compressor only between nodes. None takes
            torchrun's ``LOCAL_WORLD_SIZE`` when it is less than the world size; 1 is flat
            averaging. The world size must be a multiple of it.
        even_windows: a promise that every rank completes its windows together, as DDP
            requires (the same ``accumulation_steps`` and the same number of micro-batches
            until the last window). A complete window's count in mean mode (no `num_items`)
            is then ``accumulation_steps`` x world size, with no count all-reduce: one round
            trip and 32 bytes fewer per step. Item counts, and a last window ended by
            ``flush``, are still summed across ranks. Breaking the promise (one rank flushes a
            shorter window while another completes one) mismatches the ranks' collectives:
            keep the default False for data that runs out unevenly.

    After the reduction each dense ``p.grad`` is a view into its bucket (as DDP's
    ``gradient_as_bucket_view=True``): no copy per tensor. The pipeline drops the
    gradients after the step; a reference to an old ``p.grad`` kept past it sees
    the next window's sums (clone it to keep it).

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
        node_size: int | None = None,
        even_windows: bool = False,
    ) -> None:
        self.compressor = effective_compressor(compressor, error_feedback)
        why = "pass True when every rank completes its windows together (as under DDP), False otherwise"
        self.even_windows = _checks.flag("even_windows", even_windows, why)
        self.node_size = check_node_size(node_size)
        why = "pass True to copy rank 0's buffers at setup, False to keep each rank's"
        self.broadcast_buffers = _checks.flag("broadcast_buffers", broadcast_buffers, why)
        self.lossy = self.compressor is not None
        self.bucket_mb = _checks.positive_number("bucket_mb", bucket_mb, "pass a bucket size in MiB, e.g. 25")
        self.first_bucket_mb = _checks.positive_number("first_bucket_mb", first_bucket_mb, "pass a size in MiB, e.g. 1")
        self.timeout = as_timeout(timeout)
        self._group = distributed.WeakGroup(distributed.resolve_group(group, "gk.Average"))
        self._group_arg = distributed.WeakGroup(group)
        self.world_size = distributed.world_size(self.group)
        # A bad node size fails here when the world is known (else at attach).
        node_size = node_size_for(self.node_size, self.group)
        # What differs between dense, compressed and hierarchical averaging is the reducer's.
        self.reducer: Reducer = (
            HierarchicalReducer(node_size, self.compressor, self.timeout)
            if node_size is not None
            else DenseReducer(self.timeout)
            if self.compressor is None
            else CompressedReducer(self.compressor, self.timeout)
        )
        self._schedule = BucketSchedule([], [], 0, 0, presence=False, launch=self._launch)  # until attached
        self._names: list[str] = []
        self._numels: dict[str, int] = {}  # entries per parameter name, to check loaded state against
        self._params: list[Tensor] = []
        self._finished: list[dist.Work] = []  # the last window's work handles (see reduce_)

    @property
    def group(self) -> dist.ProcessGroup | None:
        """The process group (None: one process, or the group was destroyed); held weakly."""
        return self._group()

    @property
    def buckets(self) -> list[Bucket]:
        """The gradient buckets, in launch order (none on one process)."""
        return self._schedule.buckets

    @property
    def launches(self) -> list[tuple[int, int]]:
        """(bucket index, gradients ready at its launch) for each bucket of the last window, in order."""
        return self._schedule.launches

    @property
    def attached(self) -> bool:
        """Whether a pipeline's `attach` bound this Average to its parameters (no `detach` since)."""
        return bool(self._names)

    def attach(
        self,
        names: Sequence[str],
        params: Sequence[Tensor],
        *,
        sparse: Collection[str] = (),
        module: nn.Module | None = None,
    ) -> None:
        if self._names and not self._rebinds(names, params):
            raise ValueError("this gk.Average is already attached to a pipeline; build one Average per pipeline")
        self._group = distributed.WeakGroup(distributed.resolve_group(self._group_arg(), "gk.Average"))
        self.world_size = distributed.world_size(self.group)
        self._numels = {name: p.numel() for name, p in zip(names, params)}
        if self.group is None:
            # One process: a compressor still makes the gradient selective, and p.grad holds
            # the dense one until the boundary.
            self.local_grads_at_boundary = self.compressor is not None
            self.reducer.bind(names, params)
            self._names = list(names)
            return
        # Buckets are copies: p.grad keeps the local gradient until the boundary.
        self.local_grads_at_boundary = True
        node_size = node_size_for(self.node_size, self.group)
        if node_size is not None:  # two-level averaging; its groups are built once, here
            if not isinstance(self.reducer, HierarchicalReducer):  # the world was not known at construction
                self.reducer = HierarchicalReducer(node_size, self.compressor, self.timeout)
            self.reducer.connect()
        replicate(names, params, module, self.group, self.timeout, "gk.Average", buffers=self.broadcast_buffers)
        # Sparse gradients (nn.Embedding(sparse=True)) travel as (indices, rows), never densified.
        sparse_positions = [i for i, name in enumerate(names) if name in sparse]
        dense = [i for i in range(len(params)) if i not in sparse_positions]
        self.reducer.bind(names, params, sparse_positions)
        self._schedule = BucketSchedule(
            list(params),
            dense,
            int(self.bucket_mb * MIB),
            int(self.first_bucket_mb * MIB),
            presence=self.reducer.presence,
            launch=self._launch,
        )
        # Bound last: an attach that raises before this leaves the Average free to attach again.
        self._names, self._params = list(names), list(params)

    def _launch(self, bucket: Bucket) -> None:
        self.reducer.launch(bucket, self.group)

    def set_sync(self, enabled: bool) -> None:
        self._schedule.arm(enabled)

    def begin_reduction(self, local_count: Items, scale: Tensor | float, loss_scale: Tensor | None = None) -> None:
        self.reducer.begin(local_count, scale, loss_scale)
        # The pipeline begins the reduction just before the boundary backward: the moment to
        # see whether every gradient is still None (then one hook per bucket will do).
        self._schedule.prime()

    def _rebinds(self, names: Sequence[str], params: Sequence[Tensor]) -> bool:
        """Whether a second attach may take over from the first: on one process, where nothing is shared with
        other ranks, when no compressor state would carry over (no compressor, or the same parameters by
        `context.same_params`, as when a notebook cell builds the pipeline again). A second pipeline's parameters
        would share the compressor's state, and across processes the buckets and hooks are the first pipeline's."""
        if self.world_size > 1:
            return False
        return self.compressor is None or same_params(self.reducer.names, self.reducer.params, names, params)

    def global_items(self, items: Items) -> Items:
        if self.group is None:
            return items
        device = self.buckets[0].buffer.device if self.buckets else self._params[0].device
        return global_count(items, device, [self.group], "gk.Average: all-reduce of the item count", self.timeout)

    def global_micro_steps(self, micro_steps: int, *, complete: bool) -> Items:
        if complete and self.even_windows:  # promised: every rank's window is complete too
            return micro_steps * self.world_size
        # Reduced: a peer may flush a shorter last window while this rank's completes,
        # and both must divide by the same count (the collective is in the same place then).
        return self.global_items(micro_steps)

    def reduce_(self, params: Sequence[Tensor], scale: Tensor | float, *, complete: bool) -> None:
        if self.group is None:
            self.reducer.reduce_locally(params, scale)
            return
        self._schedule.launch_rest(complete=complete)
        self.reducer.finish(self.buckets, self.group, scale)
        # Parameters no rank had a gradient for get one from the buffer here; the pipeline
        # sets them back to None (it reads the presence counts with its one host read).
        # This window's work handles stay until the next reduction (or exit) and the previous
        # window's go now, long after gloo's worker thread let go of them: see
        # distributed.keep for why that matters.
        self._finished = self._schedule.end_window()

    def missing_grads(self) -> tuple[list[int], Tensor] | None:
        return self.reducer.missing

    def after_step(self, params: Sequence[Tensor], *, skipped: bool = False, contributed: bool = True) -> None:
        self.reducer.after_step(skipped=skipped, contributed=contributed)

    def state_dict(self) -> dict[str, Any]:
        return {"compressor": self.reducer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Names compressed at every step, in every bucket: their state must be in a checkpoint.
        compressed = [self._names[i] for bucket in self.buckets for i in bucket.positions]
        numels: dict[str, int] | None = self._numels
        if isinstance(self.reducer, HierarchicalReducer):  # its state is this rank's shards', pieces of parameters
            compressed, numels = self.reducer.shard_names(self.buckets), None
        load_compressor_state("Average", self.compressor, state, self._names, compressed, numels)

    def bytes_sent(self) -> int:
        return self.reducer.bytes

    def dense_bytes(self) -> int:
        sparse = sum(self._params[i].numel() * self._params[i].element_size() for i in self.reducer.sparse)
        return sum(bucket.grad_bytes for bucket in self.buckets) + sparse  # a sparse table, sent densely

    def detach(self) -> None:
        """Remove the gradient hooks and forget the parameters: the pipeline no longer uses this Average, and
        another may attach it (compressor state stays, kept by parameter name). No collective.

        A `GradientPipeline` whose constructor raises after attaching calls it (unless the Average was
        attached before, by a pipeline still in use), so that a corrected retry in the same process can use
        the same Average. That retry works when every rank failed alike, or on one process; when only some
        ranks failed, the others went on, and their next collective fails with `gk.CollectiveError` within
        the timeout (restart every rank)."""
        self._schedule.detach()
        self._schedule = BucketSchedule([], [], 0, 0, presence=False, launch=self._launch)
        self._names, self._params = [], []
