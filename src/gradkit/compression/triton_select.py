"""Top-k style selection on a CUDA device in three small Triton kernels.

The torch path of `selection` needs about fifteen kernels per tensor (sample, `kthvalue`,
compare, `nonzero_static`'s scans, gather, masks); on a GPU that is launch-bound for
tensors of ~10M entries and, at 100M, `nonzero_static` reads its mask several times.
Here the same selection takes three launches and one read of the tensor:

1. `threshold_kernel`, one program: reads a quasi-random sample of the magnitudes (its start
   drawn from torch's CPU generator, so no launch for the draw) and finds the sample's
   ``top``-th largest by bisection over the float's bits (non-negative floats order as their
   bit patterns do), counting rounds over values held in registers. In `select_sampled` it
   also zeroes the select kernel's slot counter.
2. `select_kernel`, one program per block: compares each magnitude with the threshold,
   reserves room for its block's hits with one atomic add, and writes their positions and
   values there.
3. `pad_kernel`: marks the slots past the count as padding (index `pad`, value 0, not valid).

The positions come out grouped by block in the order the blocks reserved room, not sorted,
and when more entries qualify than there are slots, which of them are dropped depends on that
order; for a given threshold the set of entries sent is otherwise the torch path's (the sample,
and so the threshold, differs by sampling noise). NaN is never selected.
It runs where `usable` says so (a float32, bfloat16 or float16 tensor on CUDA, Triton importable); everything else takes
the torch path. Tests run the kernels on a CPU under Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import functools
import math
import os

import torch
from torch import Tensor

__all__ = ["MAX_SAMPLE", "select_at_least", "select_sampled", "threshold", "usable"]

MAX_SAMPLE = 32768  # the threshold kernel holds its sample in one program's registers
# The select kernel's programs: 32 rows of 32 entries on 4 warps. Measured on an H200 (float32, density 1%):
# 0.29 ms at 100M entries and 0.032 ms at 10M, where one 512-entry scan on 2 warps took 0.36 / 0.038 and
# 4096 x 4 warps 0.49-0.54 / 0.057 (the compare and count alone stream at 0.09 / 0.008 ms: the scans and
# the scattered writes cost the rest). The threshold kernel: 32 warps, 0.049 ms where 8 took 0.060.
_ROWS, _WARPS = 32, 4
_THRESHOLD_WARPS = 32
_PAD_BLOCK = 1024
# Quasi-random sample: position i is (offset + i·step) mod n with step ~ 0.618·n, a Weyl
# sequence that spreads evenly over the tensor and over the columns of any row layout.
_GOLDEN = (math.sqrt(5) - 1) / 2


@functools.cache
def _kernels():
    """The compiled kernels, or None without Triton."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit(do_not_specialize=["offset"])
    def threshold_kernel(bits_ptr, offset_ptr, offset, out_ptr, count_ptr, n, m, step, top, MAGNITUDE: tl.constexpr,
                         INF: tl.constexpr, ROUNDS: tl.constexpr, BLOCK: tl.constexpr, OFFSET_ON_DEVICE: tl.constexpr,
                         ZERO_COUNT: tl.constexpr):  # fmt: skip
        i = tl.arange(0, BLOCK)
        if OFFSET_ON_DEVICE:  # drawn on the device while a CUDA graph is captured (a host draw would be frozen)
            offset = tl.load(offset_ptr)
        pos = (offset + i.to(tl.int64) * step) % n
        bits = tl.load(bits_ptr + pos, mask=i < m, other=0).to(tl.int32) & MAGNITUDE  # the magnitude's bits
        bits = tl.where(bits > INF, 0, bits)  # NaN (above +inf's bits) counts as 0
        bits = tl.where(i < m, bits, -1)  # slots past the sample count below everything
        # Invariant: at least `top` sampled bits are >= lo, fewer than `top` are >= hi. (Four pivots per
        # round in 9 rounds measured slower on an H200: 0.082 ms against 0.049 for these 18.)
        lo = tl.zeros((), tl.int32)
        hi = tl.full((), INF + 1, tl.int32)
        for _ in range(ROUNDS):
            mid = lo + (hi - lo) // 2
            enough = tl.sum((bits >= mid).to(tl.int32), axis=0) >= top
            lo = tl.where(enough, mid, lo)
            hi = tl.where(enough, hi, mid)
        # At least the smallest subnormal: a threshold of 0 would select zeros.
        tl.store(out_ptr, tl.maximum(lo, 1))
        if ZERO_COUNT:  # the selection's slot counter, which runs next on the same stream: one launch fewer
            tl.store(count_ptr, 0)

    @triton.jit
    def select_kernel(bits_ptr, values_ptr, threshold_ptr, index_ptr, value_ptr, count_ptr, n, capacity,
                      MAGNITUDE: tl.constexpr, INF: tl.constexpr, ROWS: tl.constexpr):  # fmt: skip
        # The block as ROWS x 32: slots come from a 32-wide scan per row plus a short scan over the
        # rows' counts, which measured 20% faster than one scan over the whole block.
        offs = tl.program_id(0) * (ROWS * 32) + tl.arange(0, ROWS)[:, None] * 32 + tl.arange(0, 32)[None, :]
        inside = offs < n  # n < 2**31
        magnitude = tl.load(bits_ptr + offs, mask=inside, other=0).to(tl.int32) & MAGNITUDE
        t = tl.load(threshold_ptr).to(tl.int32)
        hit = inside & (magnitude >= t) & (magnitude <= INF)  # not NaN
        hits = hit.to(tl.int32)
        row_hits = tl.sum(hits, axis=1)
        base = tl.atomic_add(count_ptr, tl.sum(row_hits, axis=0), sem="relaxed")  # orders nothing else
        row_start = base + tl.cumsum(row_hits, axis=0) - row_hits
        slot = row_start[:, None] + tl.cumsum(hits, axis=1) - 1
        room = hit & (slot < capacity)
        tl.store(index_ptr + slot, offs, mask=room)
        tl.store(value_ptr + slot, tl.load(values_ptr + offs, mask=room), mask=room)

    @triton.jit
    def pad_kernel(index_ptr, value_ptr, valid_ptr, count_ptr, capacity, pad, BLOCK: tl.constexpr):
        slot = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = slot < capacity
        used = slot < tl.minimum(tl.load(count_ptr), capacity)
        tl.store(valid_ptr + slot, used, mask=inside)
        empty = inside & ~used
        tl.store(index_ptr + slot, tl.zeros_like(slot) + pad, mask=empty)
        tl.store(value_ptr + slot, tl.zeros_like(slot).to(value_ptr.dtype.element_ty), mask=empty)

    return triton, threshold_kernel, select_kernel, pad_kernel


# Per float dtype: the integer view, the magnitude's bits (all but the sign), +inf's bits, and the
# threshold kernel's bisection rounds: 16-bit floats to the exact value (their range is < 2**15), float32
# to within 2**13 of its bit pattern (~2**-10 relative, far inside the sample's ~6-7% noise) in 18 of 31.
_BITS = {
    torch.float32: (torch.int32, 0x7FFFFFFF, 0x7F800000, 18),
    torch.bfloat16: (torch.int16, 0x7FFF, 0x7F80, 15),
    torch.float16: (torch.int16, 0x7FFF, 0x7C00, 15),
}


def usable(flat: Tensor) -> bool:
    """Whether `flat` (1-d, contiguous) selects with these kernels: float32, bfloat16 or float16 on CUDA,
    Triton importable (or a CPU tensor under ``TRITON_INTERPRET=1``, which is how the tests run them)."""
    on_device = flat.is_cuda or (flat.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")
    return (
        on_device
        and flat.dtype in _BITS
        and flat.dim() == 1
        and flat.is_contiguous()
        and 0 < flat.numel() < 2**31
        and _kernels() is not None
    )


def threshold(flat: Tensor, sample: int, top: int) -> Tensor:
    """The ``top``-th largest magnitude of a quasi-random sample of `sample` entries of `flat` (float32:
    rounded down by at most ~2**-10 of it, so at least `top` sampled entries lie at or above it).

    Args:
        flat: a tensor `usable` accepts; sample: 1 <= sample <= `MAX_SAMPLE`; top: 1 <= top <= sample.

    Returns:
        A 1-element tensor in flat's dtype on flat's device, at least the smallest subnormal (never 0).
    """
    as_int = _BITS[flat.dtype][0]
    out = torch.empty(1, dtype=as_int, device=flat.device)
    _threshold_into(flat, sample, top, out, None)
    return out.view(flat.dtype)


def _threshold_into(flat: Tensor, sample: int, top: int, out: Tensor, count: Tensor | None) -> None:
    """`threshold` written into `out` (1 entry of flat's integer view); zeroes `count` too if given."""
    triton, threshold_kernel, _, _ = _kernels()
    n = flat.numel()
    as_int, magnitude, inf, rounds = _BITS[flat.dtype]
    # The sample's start comes from torch's generator (seeded by torch.manual_seed): the CPU's, read on the
    # host (no launch, ~10 us of host time less than a device draw), or the device's while a CUDA graph is
    # captured, where a number from the host would be replayed unchanged.
    on_device = flat.is_cuda and torch.cuda.is_current_stream_capturing()
    drawn = torch.randint(n, (1,), device=flat.device) if on_device else None
    offset = 0 if on_device else int(torch.randint(n, (1,), device="cpu"))
    step = max(1, round(_GOLDEN * n)) | 1
    block = max(16, triton.next_power_of_2(sample))
    threshold_kernel[(1,)](
        flat.view(as_int), out if drawn is None else drawn, offset, out, out if count is None else count, n, sample,
        step, top, MAGNITUDE=magnitude, INF=inf, ROUNDS=rounds, BLOCK=block, OFFSET_ON_DEVICE=drawn is not None,
        ZERO_COUNT=count is not None, num_warps=_THRESHOLD_WARPS,
    )  # fmt: skip


def select_at_least(
    flat: Tensor, limit: Tensor, capacity: int, *, index_dtype: torch.dtype, value_dtype: torch.dtype, pad: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """The entries of `flat` with |x| >= `limit` (NaN never), in `capacity` slots.

    Args:
        flat: a tensor `usable` accepts.
        limit: a 1-element or 0-d tensor in flat's dtype on flat's device (e.g. from `threshold`).
        capacity: the number of slots; entries past it are dropped.
        index_dtype, value_dtype: the dtypes of the returned positions and values.
        pad: the position written into unused slots (0 for a payload, -1 to mark them).

    Returns:
        (positions, values, valid), each of `capacity` entries; unused slots hold `pad`, 0, False.
    """
    count = torch.zeros(1, dtype=torch.int32, device=flat.device)
    as_int = _BITS[flat.dtype][0]
    return _select(flat, limit.reshape(1).view(as_int), count, capacity, index_dtype, value_dtype, pad)


def select_sampled(
    flat: Tensor, sample: int, top: int, capacity: int, *, index_dtype: torch.dtype, value_dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """``select_at_least(flat, threshold(flat, sample, top), capacity, ...)`` in three launches instead of four
    (the threshold's kernel zeroes the slot counter), padding with position 0; arguments as those two take."""
    as_int = _BITS[flat.dtype][0]
    limit = torch.empty(1, dtype=as_int, device=flat.device)
    count = torch.empty(1, dtype=torch.int32, device=flat.device)
    _threshold_into(flat, sample, top, limit, count)
    return _select(flat, limit, count, capacity, index_dtype, value_dtype, 0)


def _select(
    flat: Tensor, limit_bits: Tensor, count: Tensor, capacity: int, index_dtype, value_dtype, pad: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The select and pad kernels, with the threshold's bits and a zeroed counter already on the device."""
    triton, _, select_kernel, pad_kernel = _kernels()
    n, device = flat.numel(), flat.device
    positions = torch.empty(capacity, dtype=index_dtype, device=device)
    values = torch.empty(capacity, dtype=value_dtype, device=device)
    valid = torch.empty(capacity, dtype=torch.bool, device=device)
    as_int, magnitude, inf, _ = _BITS[flat.dtype]
    grid = (triton.cdiv(n, _ROWS * 32),)
    select_kernel[grid](
        flat.view(as_int), flat, limit_bits, positions, values, count, n, capacity,
        MAGNITUDE=magnitude, INF=inf, ROWS=_ROWS, num_warps=_WARPS,
    )  # fmt: skip
    pad_kernel[(triton.cdiv(capacity, _PAD_BLOCK),)](positions, values, valid, count, capacity, pad, BLOCK=_PAD_BLOCK)
    return positions, values, valid
