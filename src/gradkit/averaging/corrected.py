"""Error feedback formed in the bucket: the distributed compressed step without a buffer of its own.

Under `gk.ErrorFeedback`, a bucket sends ``gradient + residual``'s selected entries and keeps
the rest as the new residual, but only once the step is known to be taken: a skipped step
(a NaN on any rank, a GradScaler's inf, a rank without items) must leave the old residual
as it was. The plain way (``ErrorFeedback.compress(..., commit=False)``) writes the new
residual into a fresh bucket-sized buffer every step, whose pages the kernel maps and zeroes.

Here, on a CPU, the bucket itself holds it: one pass, a chunk at a time while it is in cache,
copies the gradients in, scales them, reads their extremes (the non-finite check) and adds the
residual; the compressor then takes what it sends out of the bucket. The gradients, no longer
needed as input, receive the sum over ranks (they stay ``p.grad``), and at commit the bucket's
tensor becomes the residual while the old residual's tensor becomes the bucket's buffer: no
copy, nothing allocated, one residual per key between steps, and on a skip the old residual is
untouched. The result is bit for bit that of the plain path (same sums, same selection).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from gradkit.averaging.buckets import Bucket
from gradkit.compression.base import Compressor
from gradkit.compression.error_feedback import ErrorFeedback
from gradkit.compression.selection import CHUNKED_DEVICES

__all__ = ["MAX_PIECES", "corrected_inputs", "pack_corrected_", "hand_back_to"]

# Entries per step of the pass: a chunk of the bucket, its gradients and its residual stay in cache.
_CHUNK = 1 << 19
# Buckets of more tensors take the plain path: the pass slices each gradient, and the sum is
# split by tensor, Python work per tensor that many tiny tensors would pay for no saved pass.
MAX_PIECES = 64


def corrected_inputs(compressor: Compressor, bucket: Bucket, grads: Sequence[Tensor | None]) -> bool:
    """Whether `bucket` can form ``gradient + residual`` in place: error feedback around a sparse
    compressor, a CPU bucket without presence slots, and every gradient present, dense, contiguous,
    in the bucket's dtype, and not a view of the bucket (as after a plain step whose gradients
    were kept)."""
    buffer = bucket.buffer
    if not (isinstance(compressor, ErrorFeedback) and compressor.sparse and not compressor.variable_size):
        return False
    if buffer.device.type not in CHUNKED_DEVICES or bucket.presence or len(grads) > MAX_PIECES:
        return False
    if buffer.numel() != bucket.numel or not buffer.is_contiguous():
        return False
    storage = buffer.untyped_storage().data_ptr()
    return all(
        grad is not None
        and not grad.is_sparse
        and grad.dtype == buffer.dtype
        and grad.device == buffer.device
        and grad.is_contiguous()
        and grad.untyped_storage().data_ptr() != storage
        for grad in grads
    )


def pack_corrected_(bucket: Bucket, grads: Sequence[Tensor], scale: Tensor | float, residual: Tensor) -> Tensor:
    """Write ``grads * scale + residual`` into the bucket's buffer, one chunk at a time.

    Each chunk is copied in, scaled exactly as `Bucket.pack` scales, its extremes are read
    (the non-finite check of the scaled gradients, while the chunk is in cache), and the
    residual is added (as ``torch.add(bucket, residual)`` would).

    Args:
        bucket: the bucket; grads: its gradients, in its order (see `corrected_inputs`).
        scale: the factor of `Bucket.pack`; residual: flat, the bucket's size.

    Returns:
        A 0-d bool tensor: True if a scaled gradient holds a NaN or an inf.
    """
    flat = bucket.grads
    factor = scale.to(flat) if isinstance(scale, Tensor) else scale
    sources = [grad.view(-1) for grad in grads]
    ends = [offset + size for offset, size in zip(bucket.offsets, bucket.sizes)]
    extremes = []
    first = 0  # the first gradient that reaches into the current chunk
    for start in range(0, flat.numel(), _CHUNK):
        end = min(flat.numel(), start + _CHUNK)
        targets, parts = [], []
        while ends[first] <= start:
            first += 1
        for index in range(first, len(sources)):
            offset = bucket.offsets[index]
            if offset >= end:
                break
            low, high = max(start, offset), min(end, ends[index])
            targets.append(flat[low:high])
            parts.append(sources[index][low - offset : high - offset])
        torch._foreach_copy_(targets, parts)
        chunk = flat[start:end]
        if isinstance(factor, Tensor) or factor != 1.0:
            chunk.mul_(factor)
        extremes.append(torch.stack(torch.aminmax(chunk)))
        chunk.add_(residual[start:end])
    if not extremes:
        return torch.zeros((), dtype=torch.bool, device=flat.device)
    # NaN propagates through min and max; an inf is itself an extreme.
    return ~torch.isfinite(torch.stack(extremes)).all()


def hand_back_to(bucket: Bucket):
    """The ``hand_back`` of `ErrorFeedback.compress_corrected_` for `bucket`: the old residual's
    tensor becomes the bucket's buffer (a fresh one if it cannot: another size or layout)."""

    def hand_back(old: Tensor) -> None:
        like = bucket.buffer
        fits = (
            old.shape == like.shape
            and old.dtype == like.dtype
            and old.device == like.device
            and old.is_contiguous()
            and old.data_ptr() != like.data_ptr()
        )
        bucket.use_buffer(old if fits else torch.empty_like(like))

    return hand_back
