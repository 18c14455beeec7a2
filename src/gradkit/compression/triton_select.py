"""Top-k style selection on a CUDA device in two or three small Triton kernels.

The torch path of `selection` needs about fifteen kernels per tensor (sample, `kthvalue`,
compare, `nonzero_static`'s scans, gather, masks); on a GPU that is launch-bound for
tensors of ~10M entries and, at 100M, `nonzero_static` reads its mask several times.
Here the same selection takes two launches and one read of the tensor:

1. `threshold_kernel`: reads a quasi-random sample of the magnitudes (its start drawn from
   torch's CPU generator, so no launch for the draw) and finds its ``top``-th largest by
   bisection over the float's bits (non-negative floats order as their bit patterns do),
   counting rounds over values held in registers. A sample big enough to split (``top`` >=
   `SPLIT_TOP`) is read as `PARTS` slices by as many programs, each finding its own share of
   ``top`` (plus a half, which keeps the mean of the estimates aimed at the same count); the
   threshold is the mean of their values. One program over the whole sample took 30 us on an
   H200 (18 rounds of a 16,384-lane reduction across 32 warps), eight over eighths of it 9 us,
   at the same spread of the count. In `select_sampled` the same launch zeroes the select
   kernel's slot counter and marks every slot as padding (programs past the threshold's).
2. `select_kernel`, one program per block: compares each magnitude with the threshold,
   reserves room for its block's hits with one atomic add, and writes their positions, values
   and valid flags there.
3. `pad_kernel` (`select_at_least` only, whose threshold comes from elsewhere): marks the slots
   past the count as padding (index `pad`, value 0, not valid).

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

__all__ = ["MAX_SAMPLE", "PARTS", "SPLIT_TOP", "select_at_least", "select_sampled", "threshold", "usable"]

MAX_SAMPLE = 32768  # the threshold kernel holds its sample in its programs' registers
# A sample whose threshold rank is at least SPLIT_TOP is read as PARTS slices, each slice's program finding
# its share of the rank (>= 16, so each estimate rests on enough order statistics). Simulated on 10M entries
# (Gaussian, Student-t(3), 95% and 98.5% zeros, rows of zeros; 300 draws each, sample 16,384, rank 197): the
# count's mean and spread match one program's (1.19-1.21·k aimed at 1.2, spread 7-10%) when each slice's
# rank gets half a rank more; without that, the mean of the values lands ~6% low.
PARTS, SPLIT_TOP = 8, 128
# The select kernel's programs: 32 rows of 32 entries on 4 warps. Measured on an H200 (float32, density 1%):
# 0.29 ms at 100M entries and 0.032 ms at 10M, where one 512-entry scan on 2 warps took 0.36 / 0.038,
# 4096 x 4 warps 0.49-0.54 / 0.057, and 64, 128 or 256 rows of 32 on 4-16 warps as much or more (the
# compare and count alone stream at 0.09 / 0.008 ms: the scans and the scattered writes cost the rest).
# The threshold kernel: one program on 32 warps (0.030 ms; 8 warps 0.036), eight on 8 warps (0.009).
_ROWS, _WARPS = 32, 4
_THRESHOLD_WARPS = {1: 32, PARTS: 8}
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
    def threshold_kernel(bits_ptr, offset_ptr, offset, parts_ptr, index_ptr, value_ptr, valid_ptr, n, m, step, top,
                         capacity, MAGNITUDE: tl.constexpr, INF: tl.constexpr, ROUNDS: tl.constexpr,
                         BLOCK: tl.constexpr, PARTS: tl.constexpr, OFFSET_ON_DEVICE: tl.constexpr,
                         ZERO_COUNT: tl.constexpr, PAD_BLOCK: tl.constexpr):  # fmt: skip
        part = tl.program_id(0)
        if part < PARTS:
            # (A name of its own for the start: Triton wants a name bound before an `if` to keep its type in it.)
            if OFFSET_ON_DEVICE:  # drawn on the device while a CUDA graph is captured (a host draw would be frozen)
                start = tl.load(offset_ptr).to(tl.int64)
            else:
                start = offset.to(tl.int64)
            lanes = tl.cdiv(m, PARTS)
            i = part * lanes + tl.arange(0, BLOCK)
            inside = (tl.arange(0, BLOCK) < lanes) & (i < m)
            pos = (start + i.to(tl.int64) * step) % n
            bits = tl.load(bits_ptr + pos, mask=inside, other=0).to(tl.int32) & MAGNITUDE  # the magnitude's bits
            bits = tl.where(bits > INF, 0, bits)  # NaN (above +inf's bits) counts as 0
            bits = tl.where(inside, bits, -1)  # lanes past this slice count below everything
            # This slice's share of the rank: `top` is the sum of the shares (see `_shares`).
            rank = tl.minimum((top + part) // PARTS, tl.sum(inside.to(tl.int32), axis=0))
            # Invariant: at least `rank` sampled bits are >= lo, fewer than `rank` are >= hi. (Four pivots per
            # round in 9 rounds measured slower on an H200: 0.082 ms against 0.049 for these 18.)
            lo = tl.zeros((), tl.int32)
            hi = tl.full((), INF + 1, tl.int32)
            for _ in range(ROUNDS):
                mid = lo + (hi - lo) // 2
                enough = tl.sum((bits >= mid).to(tl.int32), axis=0) >= rank
                lo = tl.where(enough, mid, lo)
                hi = tl.where(enough, hi, mid)
            # At least the smallest subnormal: a threshold of 0 would select zeros.
            tl.store(parts_ptr + part, tl.maximum(lo, 1))
            if ZERO_COUNT and part == 0:  # the select kernel's slot counter, after the parts: one launch fewer
                tl.store(parts_ptr + PARTS, 0)
        else:  # the payload's slots, all padding until the select kernel fills some: no pad kernel after it
            # (Names of their own: Triton wants a name bound in both branches to have one type.)
            slot = (part - PARTS) * PAD_BLOCK + tl.arange(0, PAD_BLOCK)
            in_payload = slot < capacity
            tl.store(valid_ptr + slot, tl.zeros_like(slot) != 0, mask=in_payload)
            tl.store(index_ptr + slot, tl.zeros_like(slot).to(index_ptr.dtype.element_ty), mask=in_payload)
            tl.store(value_ptr + slot, tl.zeros_like(slot).to(value_ptr.dtype.element_ty), mask=in_payload)

    @triton.jit
    def select_kernel(bits_ptr, values_ptr, parts_ptr, index_ptr, value_ptr, valid_ptr, count_ptr, n, capacity,
                      MAGNITUDE: tl.constexpr, INF: tl.constexpr, ROWS: tl.constexpr, PARTS: tl.constexpr,
                      FLOAT: tl.constexpr, INT: tl.constexpr, COUNT_AT: tl.constexpr):  # fmt: skip
        # The block as ROWS x 32: slots come from a 32-wide scan per row plus a short scan over the
        # rows' counts, which measured 20% faster than one scan over the whole block.
        offs = tl.program_id(0) * (ROWS * 32) + tl.arange(0, ROWS)[:, None] * 32 + tl.arange(0, 32)[None, :]
        inside = offs < n  # n < 2**31
        magnitude = tl.load(bits_ptr + offs, mask=inside, other=0).to(tl.int32) & MAGNITUDE
        if PARTS == 1:
            t = tl.load(parts_ptr).to(tl.int32)
        else:  # the mean of the parts' values, as bits: scalar loads and adds, no reduction across threads
            total = tl.zeros((), tl.float32)
            for j in tl.static_range(PARTS):
                total += tl.load(parts_ptr + j).to(INT).to(FLOAT, bitcast=True).to(tl.float32)
            t = (total / PARTS).to(FLOAT).to(INT, bitcast=True).to(tl.int32)
        hit = inside & (magnitude >= t) & (magnitude <= INF)  # not NaN
        hits = hit.to(tl.int32)
        row_hits = tl.sum(hits, axis=1)
        base = tl.atomic_add(count_ptr + COUNT_AT, tl.sum(row_hits, axis=0), sem="relaxed")  # orders nothing else
        row_start = base + tl.cumsum(row_hits, axis=0) - row_hits
        slot = row_start[:, None] + tl.cumsum(hits, axis=1) - 1
        room = hit & (slot < capacity)
        tl.store(index_ptr + slot, offs, mask=room)
        tl.store(value_ptr + slot, tl.load(values_ptr + offs, mask=room), mask=room)
        tl.store(valid_ptr + slot, room, mask=room)

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


@functools.cache
def _triton_types(dtype: torch.dtype) -> tuple:
    """(float, int) Triton types of the same width as `dtype`, for the mean of the parts."""
    import triton.language as tl

    return {torch.float32: (tl.float32, tl.int32), torch.bfloat16: (tl.bfloat16, tl.int16)}.get(
        dtype, (tl.float16, tl.int16)
    )


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


def parts_of(top: int) -> int:
    """How many slices the threshold kernel reads a sample in, for a threshold rank of `top`."""
    return PARTS if top >= SPLIT_TOP else 1


def threshold(flat: Tensor, sample: int, top: int) -> Tensor:
    """The ``top``-th largest magnitude of a quasi-random sample of `sample` entries of `flat`, or, where ``top``
    >= `SPLIT_TOP`, the mean of `PARTS` such estimates from slices of it (float32: each rounded down by at most
    ~2**-10 of it).

    Args:
        flat: a tensor `usable` accepts; sample: 1 <= sample <= `MAX_SAMPLE`; top: 1 <= top <= sample.

    Returns:
        A 1-element tensor in flat's dtype on flat's device, at least the smallest subnormal (never 0).
    """
    parts = torch.empty(parts_of(top) + 1, dtype=torch.int32, device=flat.device)
    _threshold_into(flat, sample, top, parts, zero_count=False)
    if parts.numel() == 2:
        return parts[:1].to(_BITS[flat.dtype][0]).view(flat.dtype)
    return parts[:-1].to(_BITS[flat.dtype][0]).view(flat.dtype).float().mean(0, keepdim=True).to(flat.dtype)


def _shares(top: int, parts: int) -> int:
    """The sum of the slices' ranks: `top`, and half a rank more per slice where the sample is split."""
    return top if parts == 1 else top + parts // 2


def _threshold_into(
    flat: Tensor, sample: int, top: int, parts: Tensor, *, zero_count: bool, payload: tuple | None = None
) -> None:
    """The threshold kernel: each slice's bits into ``parts[:-1]`` (int32), ``parts[-1]`` zeroed if `zero_count`,
    and, given ``payload=(positions, values, valid)``, every slot marked as padding (position 0)."""
    triton, threshold_kernel, _, _ = _kernels()
    n = flat.numel()
    _, magnitude, inf, rounds = _BITS[flat.dtype]
    split = parts.numel() - 1
    # The sample's start comes from torch's generator (seeded by torch.manual_seed): the CPU's, read on the
    # host (no launch, ~10 us of host time less than a device draw), or the device's while a CUDA graph is
    # captured, where a number from the host would be replayed unchanged.
    on_device = flat.is_cuda and torch.cuda.is_current_stream_capturing()
    drawn = torch.randint(n, (1,), device=flat.device) if on_device else None
    offset = 0 if on_device else int(torch.randint(n, (1,), device="cpu"))
    step = max(1, round(_GOLDEN * n)) | 1
    block = max(16, triton.next_power_of_2(triton.cdiv(sample, split)))
    positions, values, valid = payload if payload is not None else (parts, parts, parts)
    capacity = positions.numel() if payload is not None else 0
    threshold_kernel[(split + triton.cdiv(capacity, _PAD_BLOCK),)](
        flat.view(_BITS[flat.dtype][0]), parts if drawn is None else drawn, offset, parts, positions, values, valid,
        n, sample, step, _shares(top, split), capacity, MAGNITUDE=magnitude, INF=inf, ROUNDS=rounds, BLOCK=block,
        PARTS=split, OFFSET_ON_DEVICE=drawn is not None, ZERO_COUNT=zero_count, PAD_BLOCK=_PAD_BLOCK,
        num_warps=_THRESHOLD_WARPS[split],
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
    triton, _, _, pad_kernel = _kernels()
    count = torch.zeros(1, dtype=torch.int32, device=flat.device)
    bits = limit.reshape(1).view(_BITS[flat.dtype][0])
    payload = _payload(flat, capacity, index_dtype, value_dtype)
    _select(flat, bits, 1, count, 0, payload)
    pad_kernel[(triton.cdiv(capacity, _PAD_BLOCK),)](*payload, count, capacity, pad, BLOCK=_PAD_BLOCK)
    return payload


def select_sampled(
    flat: Tensor, sample: int, top: int, capacity: int, *, index_dtype: torch.dtype, value_dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """``select_at_least(flat, threshold(flat, sample, top), capacity, ...)`` in two launches instead of five
    (the threshold's kernel zeroes the slot counter and pads every slot first; the select kernel takes the mean
    of the parts itself), padding with position 0; arguments as those two take."""
    split = parts_of(top)
    parts = torch.empty(split + 1, dtype=torch.int32, device=flat.device)  # the parts, then the slot counter
    payload = _payload(flat, capacity, index_dtype, value_dtype)
    _threshold_into(flat, sample, top, parts, zero_count=True, payload=payload)
    _select(flat, parts, split, parts, split, payload)  # the counter after the parts
    return payload


def _payload(flat: Tensor, capacity: int, index_dtype: torch.dtype, value_dtype: torch.dtype) -> tuple:
    """Uninitialized (positions, values, valid) of `capacity` slots on flat's device."""
    device = flat.device
    return (
        torch.empty(capacity, dtype=index_dtype, device=device),
        torch.empty(capacity, dtype=value_dtype, device=device),
        torch.empty(capacity, dtype=torch.bool, device=device),
    )


def _select(flat: Tensor, parts: Tensor, split: int, count: Tensor, count_at: int, payload: tuple) -> None:
    """The select kernel: fills the payload's first slots from a zeroed ``count[count_at]``, with the threshold's
    bits in `parts` (one, or `split` to be averaged)."""
    triton, _, select_kernel, _ = _kernels()
    n = flat.numel()
    _, magnitude, inf, _ = _BITS[flat.dtype]
    floats, ints = _triton_types(flat.dtype)
    select_kernel[(triton.cdiv(n, _ROWS * 32),)](
        flat.view(_BITS[flat.dtype][0]), flat, parts, *payload, count, n, payload[0].numel(),
        MAGNITUDE=magnitude, INF=inf, ROWS=_ROWS, PARTS=split, FLOAT=floats, INT=ints, COUNT_AT=count_at,
        num_warps=_WARPS,
    )  # fmt: skip
