"""Compressed averaging: the compressed reducer, which compressor averaging uses, and its state.

`CompressedReducer` is `Average`'s reducer when it has a compressor; the DDP
communication hook shares `effective_compressor` and `load_compressor_state`.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from gradkit import _checks, distributed
from gradkit._scalars import on_device
from gradkit.accumulation import Items
from gradkit.averaging.buckets import Bucket
from gradkit.averaging.corrected import corrected_inputs, hand_back_to, pack_corrected_
from gradkit.averaging.payloads import compress_keyed, start_payload, start_reduce
from gradkit.averaging.reducers import Reducer
from gradkit.compression.base import Compressor, Payload
from gradkit.compression.error_feedback import ErrorFeedback

__all__ = ["CompressedReducer", "effective_compressor", "load_compressor_state"]


class CompressedReducer(Reducer):
    """Compressed averaging: each bucket's payload is all-reduced (linear compressors) or all-gathered.

    Each rank compresses its own mean gradient (stable units for the residuals) and weights
    the payload by its share of the global items, so the sum is the global mean. A NaN/inf
    (which a top-k may not even select) reaches every rank through a flag, reduced with one
    presence count per dense parameter, since payloads have no room for presence slots; a
    compressor that `carries_flags` (PowerSGD) sends both inside its own first collective,
    and no flag all-reduce goes on the wire.
    On one process, the compressed gradient is what reaches the optimizer (selective updates).

    Args:
        compressor: the compressor (with error feedback already added, see `effective_compressor`).
        timeout: for the collectives; None uses the group's.
    """

    def __init__(self, compressor: Compressor, timeout: datetime.timedelta | None) -> None:
        super().__init__(timeout)
        self.compressor = compressor
        self._local_scale: Tensor | float = 1.0
        self._weight: Tensor | float = 1.0
        self._loss_scale: Tensor | None = None
        self._bad: Tensor | None = None
        self._dense_index: dict[int, int] = {}  # position -> its presence count's slot, after the flag

    def bind(self, names: Sequence[str], params: Sequence[Tensor], sparse: Sequence[int] = ()) -> None:
        super().bind(names, params, sparse)
        dense = [i for i in range(len(self.params)) if i not in self.sparse]
        self._dense_index = {position: 1 + k for k, position in enumerate(dense)}

    def begin(self, local_count: Items, scale: Tensor | float, loss_scale: Tensor | None) -> None:
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

    def _start(self, bucket: Bucket, group: dist.ProcessGroup | None, what: str) -> None:
        bucket.received = None
        layout = tuple((self.names[i], tuple(self.params[i].shape)) for i in bucket.positions)
        grads = [self.params[position].grad for position in bucket.positions]
        if corrected_inputs(self.compressor, bucket, grads):
            residual = self.compressor.residual_for(layout, bucket.grads)  # type: ignore[attr-defined]
            if residual is not None:  # else a narrower residual: the plain path
                self._start_corrected(bucket, grads, residual, layout, group, what)  # type: ignore[arg-type]
                return
        bucket.pack(self.params, self._local_scale)
        # NaN/inf reach the min or the max: one fast reduction, where isfinite(...).all()
        # writes a boolean per entry first.
        low, high = torch.aminmax(bucket.buffer)
        bad = ~(torch.isfinite(low) & torch.isfinite(high))
        if self.compressor.carries_flags:
            # The flag, and which parameters this rank lacks, ride in the compressor's own
            # collectives; the sum is written back into the bucket (see `_finish_carried`).
            start: Callable[..., distributed.PendingReduce] = self.compressor.start_reduce  # type: ignore[assignment]
            flags = {"bad": bad, "absent": [slot for _, slot in bucket.missing]}
        else:
            self._bad = bad if self._bad is None else self._bad | bad
            start, flags = partial(start_reduce, self.compressor), {}
        bucket.pending = start(
            bucket.buffer, layout, group, self._weight, what, self.timeout, out=bucket.buffer, **flags
        )

    def _start_corrected(
        self,
        bucket: Bucket,
        grads: list[Tensor],
        residual: Tensor,
        layout: tuple[tuple[str, tuple[int, ...]], ...],
        group: dist.ProcessGroup | None,
        what: str,
    ) -> None:
        """Error feedback formed in the bucket (see `averaging.corrected`): the sum comes back into
        the gradients, and at commit the bucket's tensor becomes the residual."""
        ef: ErrorFeedback = self.compressor  # type: ignore[assignment]
        bad = pack_corrected_(bucket, grads, self._local_scale, residual)
        bucket.missing = []
        payload = ef.compress_corrected_(bucket.grads, layout, hand_back=hand_back_to(bucket))
        bucket.received = grads
        self._bad = bad if self._bad is None else self._bad | bad
        bucket.pending = start_payload(
            ef, payload, group, self._weight, what, self.timeout, into=(grads, bucket.offsets)
        )

    def _finish_buckets(
        self, buckets: Sequence[Bucket], group: dist.ProcessGroup | None, scale: Tensor | float
    ) -> Tensor | float:
        if self.compressor.carries_flags:
            return self._finish_carried(buckets, scale)
        poison = self._reduce_flags(buckets, group)
        for bucket in buckets:
            assert bucket.pending is not None
            summed = bucket.pending.wait()
            if bucket.received is not None:
                # The sum is in the gradients themselves (they stay p.grad); the bucket holds the
                # new residual until the step is taken or skipped.
                first = bucket.received[0].view(-1)
                first[:1].mul_(poison.to(first.device))
                bucket.received = None  # no reference kept past the step
                continue
            if summed.data_ptr() != bucket.buffer.data_ptr():
                bucket.buffer.copy_(summed)
            # One NaN entry per bucket is enough for the pipeline's global norm to skip the
            # step on every rank; multiplying every entry would cost a pass over the bucket.
            bucket.buffer[:1].mul_(poison.to(bucket.buffer.device))
            bucket.expose(self.params)
        self.bytes = sum(bucket.pending.nbytes for bucket in buckets if bucket.pending is not None)
        self._bad = None
        return poison * scale

    def _finish_carried(self, buckets: Sequence[Bucket], scale: Tensor | float) -> Tensor | float:
        """Finish buckets whose compressor carried the flags: no collective of our own.

        A NaN/inf on any rank (or a sum that overflowed) already made every rank's sum non-finite,
        so the pipeline's norm skips the step everywhere; which of this rank's missing parameters
        some rank had comes back with each bucket's reduction."""
        positions: list[int] = []
        present: list[Tensor] = []
        for bucket in buckets:
            assert bucket.pending is not None
            bucket.pending.wait()  # the sum lands in the bucket (out=)
            bucket.expose(self.params)
            if bucket.missing:
                assert bucket.pending.present is not None
                positions += [position for position, _ in bucket.missing]
                present.append(bucket.pending.present)
        self.bytes = sum(bucket.pending.nbytes for bucket in buckets if bucket.pending is not None)
        if positions:
            self.missing = (positions, torch.cat(present))
        return scale

    def _reduce_flags(self, buckets: Sequence[Bucket], group: dist.ProcessGroup | None) -> Tensor:
        """All-reduce [non-finite flag, one presence count per dense parameter]; sets `missing` and
        returns a float64 device scalar, NaN if any rank's gradient was not finite, else 1."""
        device = buckets[0].buffer.device if buckets else torch.device("cpu")
        flags = torch.ones(1 + len(self._dense_index), dtype=torch.float32, device=device)
        flags[:1].copy_(self._bad.to(flags).reshape(1) if self._bad is not None else torch.zeros(1))
        slots = [self._dense_index[position] for bucket in buckets for position, _ in bucket.missing]
        for slot in slots:
            flags[slot] = 0
        what = "gk.Average: all-reduce of the non-finite flag"
        distributed.run(dist.all_reduce, what, self.timeout, flags, group=group)
        if slots:
            self.missing = ([position for bucket in buckets for position, _ in bucket.missing], flags[slots])
        # Stays on the device (the pipeline's check skips); float64, so that scaling the
        # sparse rows by it keeps their precision.
        return torch.where(flags[:1] > 0, float("nan"), 1.0).to(torch.float64)

    def reduce_locally(self, params: Sequence[Tensor], scale: Tensor | float) -> None:
        """One process: each gradient becomes its compressed self (selective updates), in place.

        No temporary as large as a gradient: the gradient is scaled (or, under error feedback,
        moved into the residual) where it lies, and the sent values are written back into it.
        A NaN/inf that the compressor does not send still skips the step: each gradient's
        extremes are read first (one read-only pass, no host read), its first entry is set to
        NaN when it was not finite, and error feedback then leaves every residual as it was
        (the other compressors' state is deferred to `after_step`, which discards it).
        """
        self.missing = None
        with_grad = [(name, p) for name, p in zip(self.names, params) if p.grad is not None]
        dense = []
        for name, p in with_grad:
            if p.grad.is_sparse:  # sparse embedding rows are already selective: send them as they are
                p.grad.mul_(scale)
            else:
                dense.append((name, p.grad))
        if dense:
            # Compression sees unscaled gradients (see begin).
            unscaled = scale if self._loss_scale is None else scale / self._loss_scale.to(torch.float64)
            factors = _factors([grad for _, grad in dense], unscaled)
            bad = self._not_finite([grad for _, grad in dense], factors)
            absorb = isinstance(self.compressor, ErrorFeedback)
            keep = ~bad.any()  # on the first gradient's device
            for (name, grad), factor, poisoned in zip(dense, factors, torch.where(bad, float("nan"), 1.0).unbind()):
                if absorb and grad.is_contiguous():
                    # What is sent goes back into the gradient inside the compressor's pass (TopK
                    # writes it while each chunk is in cache), times the loss scale (see begin).
                    write_back = True if self._loss_scale is None else self._loss_scale.to(grad)
                    self.compressor.absorb_(  # type: ignore[attr-defined]
                        grad, name, scale=factor, keep=keep.to(grad.device), write_back=write_back
                    )
                else:
                    # Scaled in place: the gradient is overwritten with what is sent anyway.
                    flat = grad.mul_(factor).reshape(-1)  # a view unless the gradient is not contiguous
                    payload = compress_keyed(self.compressor, flat, ((name, tuple(grad.shape)),))
                    self._write(grad, payload)
                # The step is skipped on every non-finite gradient, also where nothing non-finite was sent.
                grad.view(-1)[:1].mul_(poisoned.to(grad))
        self.bytes = 0

    def _not_finite(self, grads: list[Tensor], factors: list[Tensor]) -> Tensor:
        """A bool per gradient: it holds a NaN/inf, or overflows once scaled (device values, no host read)."""
        # NaN and inf reach the min or the max: one read-only pass (isfinite().all() writes a bool
        # per entry first; an inf-norm was measured 40x slower on a CPU); overflow of the scaled
        # gradient shows in its scaled extremes.
        device = grads[0].device
        flags = []
        for grad, factor in zip(grads, factors):
            if grad.numel() == 0:
                flags.append(torch.zeros((), dtype=torch.bool, device=device))
                continue
            extremes = torch.stack(torch.aminmax(grad))
            flags.append((~torch.isfinite(extremes * factor).all()).to(device))
        return torch.stack(flags)

    def _write(self, grad: Tensor, payload: Payload) -> None:
        """Overwrite `grad` with what `payload` sends, times the loss scale."""
        if self.compressor.sparse:
            grad.zero_()
            self.compressor.add_sent_(grad, payload, None if self._loss_scale is None else self._loss_scale.to(grad))
            return
        grad.copy_(self.compressor.decompress(payload).view_as(grad))
        if self._loss_scale is not None:
            grad.mul_(self._loss_scale.to(grad))

    def after_step(self, *, skipped: bool, contributed: bool) -> None:
        # Residuals (and DGC/PowerSGD state) move on only with a step that was taken, and
        # to which this rank contributed: at weight 0 what it "sent" reached nobody.
        if skipped or not contributed:
            self.compressor.discard()
        else:
            self.compressor.commit()

    def state_dict(self) -> dict[str, Any]:
        return self.compressor.state_dict()


def load_compressor_state(
    owner: str,
    compressor: Compressor | None,
    state: dict[str, Any],
    known: Sequence[str] = (),
    required: Sequence[str] = (),
    numels: Mapping[str, int] | None = None,
) -> None:
    """Load ``{"compressor": ...}`` (from ``owner.state_dict()``) into `compressor`; state kept under
    names other than `known` (or lacking one of `required`, or, with `numels`, of another size than
    its parameter) is refused, unless no names are known yet."""
    _checks.state_keys(owner, state, {"compressor"})
    if compressor is not None:
        if known:
            compressor.check_state_names(owner, state["compressor"], known, required, numels)
        compressor.load_state_dict(state["compressor"])
    elif state["compressor"]:
        raise ValueError(
            f"{owner}.load_state_dict: the state holds compressor state but this {owner} has no compressor; "
            "build it with the same compressor"
        )


def effective_compressor(compressor: object, error_feedback: bool | None) -> Compressor | None:
    """The compressor Average uses: biased ones get error feedback unless told otherwise."""
    error_feedback = _checks.flag(
        "error_feedback", error_feedback, "pass True, False, or None for the compressor's default", allow_none=True
    )
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


def _factors(grads: list[Tensor], scale: Tensor | float) -> list[Tensor]:
    """`scale` as a 0-d tensor in each gradient's dtype on its device: one per (device, dtype), no host sync."""
    made: dict[tuple[torch.device, torch.dtype], Tensor] = {}
    for grad in grads:
        if (grad.device, grad.dtype) not in made:
            made[grad.device, grad.dtype] = on_device(scale, grad.device, grad.dtype)
    return [made[grad.device, grad.dtype] for grad in grads]
