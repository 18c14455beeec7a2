"""Choosing large-magnitude entries without waiting for the host.

A threshold is estimated from a random sample (as Deep Gradient Compression
does), the positions above it are collected into a buffer of fixed size with
`torch.nonzero_static`, and, for a payload of exactly k entries, the k largest
of those candidates are kept with a `torch.topk` over the small buffer. Every
size is known on the host before the call, so nothing here reads a device
value: the same code runs on CPU and CUDA. On CUDA, floating tensors take three
Triton kernels instead (`triton_select`), when Triton is installed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from gradkit.compression import triton_select
from gradkit.compression.base import index_dtype, narrow

__all__ = [
    "entries_at_least",
    "exactly_k_of",
    "masked_values",
    "positions_at_least",
    "positions_at_least_device",
    "sample_positions",
    "sampled_entries",
    "sampled_exactly_k",
    "sampled_threshold",
    "sampling_aims_well",
    "select_exactly_k",
    "select_in_chunks",
    "threshold_of_sample",
]

# The sample holds about this many entries above the threshold: the count above it then
# spreads by ~1/sqrt(256) = 6% (relative), at any density.
SAMPLE_HITS = 256
MIN_SAMPLE = 16384
# The Triton threshold kernel cuts a sample a little over 16,384 entries down to that when at least 192
# of them still lie above the threshold (densities of ~1-1.3% aimed at 1.2·k): half the lanes, 0.029 ms
# against 0.049 on an H200, for a count that spreads ~7% instead of ~6% (the fast path then overflows
# its 1.5·k slots in ~5e-4 of calls instead of ~3e-5; the entries cut stay in the residual).
TRITON_LANES = 16384
TRITON_MIN_HITS = 192
# Exactly-k selection aims the threshold at 1.35·k candidates and keeps up to 2·k: the count
# lands below k only 3.6 standard deviations (of 7%, the cut Triton sample's) under its aim, above 2·k
# never in practice.
EXACT_K_TARGET = 1.35
EXACT_K_CAPACITY = 2.0
# Devices whose sparsifiers select with `select_in_chunks` (a chunk loop driven from Python);
# the others take one `positions_at_least_device` pass (a GPU runs it without waiting for the host).
CHUNKED_DEVICES = ("cpu",)
_CHUNK = 1 << 20  # entries per step of the CPU mask: a 4 MiB scratch for float32
# Entries per step of `select_in_chunks`: a chunk and its addend stay in cache (here a 1 MiB L2 and a
# shared 32 MiB L3 per core) from the add to the gather of its selected values. Measured, the one-process
# TopK(0.01) step on 5 x 4M entries: 2**16 44 ms, 2**17 37 ms, 2**18 32 ms before the write-back joined
# the pass; after it, interleaved, 2**17 64-76 ms, 2**18 66-71, 2**19 58-63, 2**20 62-64, 2**21 70-74 under
# load. Each step is ~20 small calls, so fewer steps cost less Python, until the chunk leaves the cache.
_SELECT_CHUNK = 1 << 19


def sampled_threshold(flat: Tensor, k: int, target: float) -> Tensor:
    """A magnitude above which about ``target·k`` entries of `flat` lie, from a random sample.

    Args:
        flat: a 1-d tensor with more than `MIN_SAMPLE` entries.
        k: the count the caller wants; target: the aim, relative to k.

    Returns:
        A 0-d tensor in flat's dtype on flat's device, strictly positive.
    """
    sample = _triton_sample(flat, k, target)
    if sample is not None:
        return triton_select.threshold(flat, *sample).view(())
    n = flat.numel()
    drawn = sample_positions(n, k, target, flat.device)
    # index_select, not flat[drawn]: advanced indexing took twice as long for these scattered reads.
    return threshold_of_sample(flat.index_select(0, drawn), n, k, target)


def sample_positions(n: int, k: int, target: float, device: torch.device) -> Tensor:
    """The random positions `sampled_threshold` reads, for a tensor of `n` entries."""
    return torch.randint(n, (_sample_size(n, k, target),), device=device)


def _sample_size(n: int, k: int, target: float) -> int:
    return min(n, max(MIN_SAMPLE, math.ceil(SAMPLE_HITS * n / (target * k))))


def sampling_aims_well(n: int, k: int, target: float) -> bool:
    """Whether a sample aimed at ``target·k`` of `n` entries holds its `SAMPLE_HITS` (the ~6% spread), reading
    fewer entries than the tensor: not for a tensor of at most `MIN_SAMPLE` entries, nor for k = n, nor where
    ``target·k`` is at most `SAMPLE_HITS` (a small k: the sample, cut at n, would hold too few hits to aim;
    `torch.topk` then selects, exactly, from no more entries than the sample would read)."""
    return MIN_SAMPLE < n and k < n and _sample_size(n, k, target) < n


def _triton_sample_size(n: int, k: int, target: float) -> int:
    """`_sample_size`, cut to `TRITON_LANES` where that still holds `TRITON_MIN_HITS` (see there)."""
    size = _sample_size(n, k, target)
    if size > TRITON_LANES and TRITON_LANES * target * k >= TRITON_MIN_HITS * n:
        return TRITON_LANES
    return size


def _triton_sample(flat: Tensor, k: int, target: float) -> tuple[int, int] | None:
    """(sample size, top count) of the Triton threshold kernel for `flat`, or None where it does not run."""
    n = flat.numel()
    size = _triton_sample_size(n, k, target)
    if size > triton_select.MAX_SAMPLE or not triton_select.usable(flat):
        return None
    return size, _top_count(size, n, k, target)


def _top_count(size: int, n: int, k: int, target: float) -> int:
    """How many of `size` sampled entries lie at or above the threshold aimed at target·k of n."""
    return max(1, min(size, int(round(target * k / n * size))))


def threshold_of_sample(sample: Tensor, n: int, k: int, target: float) -> Tensor:
    """`sampled_threshold` from the values at `sample_positions` (of a tensor of `n` entries)."""
    size = sample.numel()
    rank = size - _top_count(size, n, k, target) + 1  # kthvalue is 1-based, ascending
    threshold = torch.kthvalue(sample.abs().float(), rank).values.to(sample.dtype)
    # A threshold of 0 (many exact zeros) would select zeros: keep it strictly positive
    # in flat's own dtype (float32's tiny rounds to 0 in float16), at its smallest subnormal.
    finfo = torch.finfo(sample.dtype)
    return threshold.clamp(min=finfo.tiny * finfo.eps)


def positions_at_least(flat: Tensor, threshold: Tensor, capacity: int) -> Tensor:
    """Positions of the entries with |x| >= threshold, the first `capacity`, padded with -1.

    On CPU a NaN is never selected; on other devices `positions_at_least_device` runs,
    which selects NaN too (callers that gather the values drop NaN there, cheaply).
    """
    if flat.device.type != "cpu":
        return positions_at_least_device(flat, threshold, capacity)
    n = flat.numel()
    mask = torch.empty(-(-n // 8) * 8, dtype=torch.bool)  # whole 8-byte words, for the search below
    mask[n:] = False
    # A temporary as large as a bucket is fresh memory on every call (above malloc's mmap
    # threshold): the kernel maps and zeroes each page, which took longer than the comparison
    # itself. A chunk at a time reuses one small buffer, still in cache.
    scratch = torch.empty(min(_CHUNK, n), dtype=flat.dtype)
    for start in range(0, n, _CHUNK):
        part = flat[start : start + _CHUNK]
        torch.ge(torch.abs(part, out=scratch[: part.numel()]), threshold, out=mask[start : start + part.numel()])
    found = _positions_of_marks(mask, capacity)
    return torch.nn.functional.pad(found, (0, capacity - found.numel()), value=-1)


def _positions_of_marks(mask: Tensor, capacity: int) -> Tensor:
    """The first `capacity` positions (int64, ascending, no padding) where `mask`, a bool tensor
    padded to whole 8-byte words, is True."""
    # nonzero() over the 8-byte words first, then over the bytes of the words holding a True:
    # at top-k densities about half the time of mask.nonzero() (a CPU has no host sync to avoid).
    words = mask.view(torch.int64)
    hit = words.nonzero().view(-1)
    within = words.index_select(0, hit).view(torch.bool).nonzero().view(-1)
    return torch.add(within & 7, hit.index_select(0, within >> 3), alpha=8)[:capacity]


def select_in_chunks(
    flat: Tensor,
    threshold: Tensor,
    capacity: int,
    *,
    prepare: Callable[[int, int], None] | None = None,
    take: Callable[[Tensor, Tensor, Tensor], None] | None = None,
    finish: Callable[[int, int], None] | None = None,
) -> tuple[Tensor, Tensor]:
    """The first `capacity` entries of a CPU tensor with |x| >= threshold (or NaN): positions and values.

    One pass, a chunk at a time, so that each chunk is read from memory once: `prepare`
    writes it (e.g. adds the gradient into the residual), it is compared with the threshold,
    its selected positions are found and their values gathered while it is in cache, and
    `take` may change them there (e.g. remove what is sent from the residual). The same
    gathers and writes after a whole pass miss the cache at every selected entry (measured:
    each as long as a dense pass over the tensor). The comparison is ``trunc(x / threshold)
    != 0`` (exactly ``|x| >= threshold``, see `positions_at_least_device`), several times
    faster on a CPU than ``ge``'s bool output; so NaN is selected, as on the device path:
    callers drop it from what they send.

    Args:
        flat: a contiguous 1-d CPU tensor (written in place by `prepare` and `take` only).
        threshold: a 0-d tensor; capacity: at most this many entries are returned.
        prepare: ``prepare(start, end)`` fills or updates ``flat[start:end]`` before it is read.
        take: ``take(chunk, local, values)``: the chunk (a view of flat), the chunk's selected
            positions and their values, called for every chunk that selects any.
        finish: ``finish(start, end)``, called for every chunk after it was searched (and taken
            from), e.g. to move it elsewhere while it is still in cache.

    Returns:
        (positions, values): int64 positions in ascending order and flat's values there,
        at most `capacity` of each (host-side sizes: a CPU has no device to wait for).
    """
    n = flat.numel()
    step = min(_SELECT_CHUNK, n)
    marks = torch.empty(-(-step // 8) * 8, dtype=torch.bool)  # whole 8-byte words, for _positions_of_marks
    scratch = torch.empty(step, dtype=flat.dtype)
    positions, values, room = [], [], capacity
    for start in range(0, n, step):
        end = min(n, start + step)
        if prepare is not None:
            prepare(start, end)
        part, size = flat[start:end], end - start
        if room > 0:  # once full, the rest is only prepared and finished
            if size < marks.numel():
                marks[size:] = False  # the last chunk's tail, and the padding to a whole word
            marks[:size].copy_(torch.div(part, threshold, rounding_mode="trunc", out=scratch[:size]))
            local = _positions_of_marks(marks, room)
            if local.numel() > 0:
                room -= local.numel()
                found = part.index_select(0, local)
                if take is not None:
                    take(part, local, found)
                positions.append(local + start)
                values.append(found)
        if finish is not None:
            finish(start, end)
    if not positions:
        return torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=flat.dtype)
    return torch.cat(positions), torch.cat(values)


def positions_at_least_device(flat: Tensor, threshold: Tensor, capacity: int) -> Tensor:
    """Positions of the entries with |x| >= threshold or NaN, the first `capacity`, padded with -1.

    One elementwise pass: trunc(x / threshold) is nonzero exactly where |x| >= threshold
    (IEEE division rounds monotonically, and x < t gives a quotient below 1), written as
    2-byte bfloat16 (a GPU kernel casts on store), then `nonzero_static` reads that twice.
    That streams 10 bytes per float32 entry where abs() then >= stream 15, in 5 kernels
    and no host sync (`nonzero_static` on CUDA fills the padding from a device count).
    It runs on any device; the CPU path of `positions_at_least` is faster on a CPU. Where
    `triton_select.usable` says so, one Triton kernel reads the tensor once instead (its
    positions are not sorted, and it never selects NaN).
    """
    if threshold.dtype == flat.dtype and triton_select.usable(flat):
        return triton_select.select_at_least(
            flat, threshold, capacity, index_dtype=torch.int64, value_dtype=flat.dtype, pad=-1
        )[0]
    marks = torch.empty(flat.shape, dtype=torch.bfloat16, device=flat.device)
    torch.div(flat, threshold, rounding_mode="trunc", out=marks)
    return torch.nonzero_static(marks.view(-1), size=capacity, fill_value=-1).view(-1)


def entries_at_least(
    flat: Tensor, threshold: Tensor, capacity: int, value_dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """A payload's (indices, values, valid) of the entries of `flat` with |x| >= threshold, in `capacity` slots.

    NaN is never sent; unused slots send index 0 with value 0 (``valid`` False). Indices are in
    `base.index_dtype`, values in `value_dtype` (default: flat's). One Triton kernel where
    `triton_select.usable` says so, else `positions_at_least` and a gather.
    """
    if threshold.dtype == flat.dtype and triton_select.usable(flat):
        indices, values, valid = triton_select.select_at_least(
            flat, threshold, capacity, index_dtype=index_dtype(flat.numel()), value_dtype=flat.dtype
        )
        return indices, narrow(values, value_dtype), valid  # saturated, not cast in the kernel (see narrow)
    indices = positions_at_least(flat, threshold, capacity)
    # One gather serves the check and the values (each gather of scattered entries is a cache
    # miss per entry: as long as a dense pass over a 4M-entry tensor); -1 reads the last entry.
    values = flat[indices]
    valid = (indices >= 0) & ~values.isnan()
    values = torch.where(valid, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return (indices * valid).to(index_dtype(flat.numel())), narrow(values, value_dtype), valid


def sampled_entries(
    flat: Tensor, k: int, target: float, capacity: int, value_dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """``entries_at_least(flat, sampled_threshold(flat, k, target), capacity, value_dtype)``, in one go.

    Where the Triton kernels run that is three launches and no torch call between them (the
    threshold's kernel also zeroes the selection's slot counter): at 10M entries the call is
    bound by the host's launches, not by the GPU.
    """
    sample = _triton_sample(flat, k, target)
    if sample is not None:
        indices, values, valid = triton_select.select_sampled(
            flat, *sample, capacity, index_dtype=index_dtype(flat.numel()), value_dtype=flat.dtype
        )
        return indices, narrow(values, value_dtype), valid  # saturated, not cast in the kernel (see narrow)
    return entries_at_least(flat, sampled_threshold(flat, k, target), capacity, value_dtype)


def sampled_exactly_k(flat: Tensor, k: int, value_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """A payload's (indices, values, valid) of the k entries `select_exactly_k` picks, in k slots.

    Where the Triton kernels run, the candidates come with their values (`triton_select.select_sampled`),
    so the k largest are picked from those: no gather from `flat` and no NaN scrub (the kernel never
    selects NaN), about half the torch calls of `select_exactly_k` plus a gather. Padding sends index 0
    with value 0 (``valid`` False). Indices are in `base.index_dtype`, values in `value_dtype` (default: flat's).
    """
    n = flat.numel()
    sample = _triton_sample(flat, k, EXACT_K_TARGET)
    if sample is None:
        indices, valid = select_exactly_k(flat, k)
        return indices.to(index_dtype(n)), masked_values(flat, indices, valid, value_dtype), valid
    positions, values, found = triton_select.select_sampled(
        flat, *sample, exactly_k_capacity(n, k), index_dtype=index_dtype(n), value_dtype=flat.dtype
    )
    # Padding (index 0, value 0) loses to every candidate: its magnitude is -1.
    kept, top = torch.topk(torch.where(found, values.abs(), -1.0), k, sorted=False)
    chosen = values[top]
    return positions[top], narrow(chosen, value_dtype), kept >= 0


def masked_values(flat: Tensor, indices: Tensor, valid: Tensor, value_dtype: torch.dtype | None) -> Tensor:
    """``flat[indices]`` where `valid`, else 0, in `value_dtype` (default: flat's): a padded payload's values."""
    values = flat[indices]
    values = torch.where(valid, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return narrow(values, value_dtype)


def select_exactly_k(flat: Tensor, k: int, floor: float | None = None) -> tuple[Tensor, Tensor]:
    """Positions of k entries of the largest magnitude, from a sampled threshold.

    Candidates are the entries at or above a threshold aimed at 1.35·k (and at or above
    `floor`), at most 2·k of them; the k largest candidates are kept. When the candidates
    number between k and 2·k (all but ~1e-4 of calls), these are exactly the k largest
    entries of `flat`, or all those >= floor. Fewer candidates leave padding slots
    (``valid`` False: the k largest are then all candidates, at least ~0.8·k of them);
    more keep the largest k of the first 2·k (by position). NaN is never selected.

    Args:
        flat: a 1-d tensor with more than `MIN_SAMPLE` entries; k: 1 <= k < flat.numel().
        floor: a magnitude below which nothing is selected (`gk.Threshold`'s tau), or None.

    Returns:
        (indices, valid), both of k entries: int64 positions (padding: 0) and a bool mask.
    """
    threshold = sampled_threshold(flat, k, EXACT_K_TARGET)
    if floor is not None:
        threshold = threshold.clamp(min=floor)
    return exactly_k_of(flat, positions_at_least(flat, threshold, exactly_k_capacity(flat.numel(), k)), k)


def exactly_k_capacity(n: int, k: int) -> int:
    """How many candidates `select_exactly_k` collects."""
    return min(n, max(k, math.ceil(EXACT_K_CAPACITY * k)))


def exactly_k_of(flat: Tensor, candidates: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest-magnitude `candidates` (positions in `flat`, -1 padding) as `select_exactly_k`
    returns them: (indices, valid); padding and NaN are never kept."""
    # Padding (-1 reads the last entry) and NaN lose every comparison: -1 is below any magnitude.
    magnitudes = flat[candidates].abs().nan_to_num_(nan=-1.0, posinf=math.inf)
    magnitudes = torch.where(candidates >= 0, magnitudes, -1.0)
    kept, top = torch.topk(magnitudes, k, sorted=False)
    valid = kept >= 0
    return candidates[top] * valid, valid  # padding and NaN send index 0 (with value 0)
