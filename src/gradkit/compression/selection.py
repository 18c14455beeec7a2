"""Choosing large-magnitude entries without waiting for the host.

A threshold is estimated from a random sample (as Deep Gradient Compression
does), the positions above it are collected into a buffer of fixed size with
`torch.nonzero_static`, and, for a payload of exactly k entries, the k largest
of those candidates are kept with a `torch.topk` over the small buffer. Every
size is known on the host before the call, so nothing here reads a device
value: the same code runs on CPU and CUDA.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "add_then_positions_at_least",
    "exactly_k_of",
    "positions_at_least",
    "positions_at_least_device",
    "sample_positions",
    "sampled_threshold",
    "select_exactly_k",
    "threshold_of_sample",
]

# The sample holds about this many entries above the threshold: the count above it then
# spreads by ~1/sqrt(256) = 6% (relative), at any density.
SAMPLE_HITS = 256
MIN_SAMPLE = 16384
# Exactly-k selection aims the threshold at 1.3·k candidates and keeps up to 2·k: the count
# lands below k only 3.7 standard deviations (of 6%) under its aim, above 2·k never in practice.
EXACT_K_TARGET = 1.3
EXACT_K_CAPACITY = 2.0
_CHUNK = 1 << 20  # entries per step of the CPU mask: a 4 MiB scratch for float32
# Entries per step of the fused add-and-mark loop: its chunks of both tensors stay in cache
# between the add and the comparison (measured: 2**16 to 2**18 alike; fewer steps, less Python).
_FUSED_CHUNK = 1 << 17


def sampled_threshold(flat: Tensor, k: int, target: float) -> Tensor:
    """A magnitude above which about ``target·k`` entries of `flat` lie, from a random sample.

    Args:
        flat: a 1-d tensor with more than `MIN_SAMPLE` entries.
        k: the count the caller wants; target: the aim, relative to k.

    Returns:
        A 0-d tensor in flat's dtype on flat's device, strictly positive.
    """
    n = flat.numel()
    drawn = sample_positions(n, k, target, flat.device)
    return threshold_of_sample(flat[drawn], n, k, target)


def sample_positions(n: int, k: int, target: float, device: torch.device) -> Tensor:
    """The random positions `sampled_threshold` reads, for a tensor of `n` entries."""
    size = min(n, max(MIN_SAMPLE, math.ceil(SAMPLE_HITS * n / (target * k))))
    return torch.randint(n, (size,), device=device)


def threshold_of_sample(sample: Tensor, n: int, k: int, target: float) -> Tensor:
    """`sampled_threshold` from the values at `sample_positions` (of a tensor of `n` entries)."""
    size = sample.numel()
    rank = max(1, min(size, size - int(round(target * k / n * size)) + 1))  # kthvalue is 1-based, ascending
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
    return _positions_of_marks(mask, capacity)


def _positions_of_marks(mask: Tensor, capacity: int) -> Tensor:
    """The first `capacity` positions where `mask` (a bool tensor padded to whole 8-byte words) is
    True, padded with -1."""
    # nonzero() over the 8-byte words first, then over the bytes of the words holding a True:
    # at top-k densities about half the time of mask.nonzero() (a CPU has no host sync to avoid).
    words = mask.view(torch.int64)
    hit = words.nonzero().view(-1)
    within = words[hit].view(torch.bool).nonzero().view(-1)
    found = (hit[within >> 3] * 8 + (within & 7))[:capacity]
    return torch.nn.functional.pad(found, (0, capacity - found.numel()), value=-1)


def add_then_positions_at_least(
    into: Tensor, addend: Tensor, scale: Tensor, threshold: Tensor, capacity: int
) -> Tensor:
    """``into += nan_to_num(addend) * scale`` and ``addend.zero_()``, then `positions_at_least(into, ...)`.

    One pass over both tensors on a CPU: each chunk is added, zeroed and compared while it
    is in cache, where separate calls stream `into` from memory three times. The comparison
    is ``trunc(x / threshold) != 0`` (exactly ``|x| >= threshold``, see
    `positions_at_least_device`) cast to bool, several times faster on a CPU than ``ge``'s
    bool output; so NaN in `into` is selected, as on the device path (callers drop it).
    Other devices take `positions_at_least` after full-size adds.

    Args:
        into, addend: 1-d tensors of one size, dtype and device (`into` is the residual, `addend`
            the gradient it takes in; non-finite entries of `addend` count as 0).
        scale: a 0-d tensor in their dtype; threshold: a 0-d tensor; capacity: positions returned.

    Returns:
        int64 positions, the first `capacity` (by position), padded with -1.
    """
    if into.device.type != "cpu":
        into.addcmul_(addend.nan_to_num_(0.0, 0.0, 0.0), scale)
        addend.zero_()
        return positions_at_least(into, threshold, capacity)
    n = into.numel()
    mask = torch.empty(-(-n // 8) * 8, dtype=torch.bool)
    mask[n:] = False
    scratch = torch.empty(min(_FUSED_CHUNK, n), dtype=into.dtype)
    for start in range(0, n, _FUSED_CHUNK):
        end = min(n, start + _FUSED_CHUNK)
        part, taken = into[start:end], addend[start:end]
        part.addcmul_(taken.nan_to_num_(0.0, 0.0, 0.0), scale)
        taken.zero_()
        mask[start:end].copy_(torch.div(part, threshold, rounding_mode="trunc", out=scratch[: end - start]))
    return _positions_of_marks(mask, capacity)


def positions_at_least_device(flat: Tensor, threshold: Tensor, capacity: int) -> Tensor:
    """Positions of the entries with |x| >= threshold or NaN, the first `capacity`, padded with -1.

    One elementwise pass: trunc(x / threshold) is nonzero exactly where |x| >= threshold
    (IEEE division rounds monotonically, and x < t gives a quotient below 1), written as
    2-byte bfloat16 (a GPU kernel casts on store), then `nonzero_static` reads that twice.
    That streams 10 bytes per float32 entry where abs() then >= stream 15, in 5 kernels
    and no host sync (`nonzero_static` on CUDA fills the padding from a device count).
    It runs on any device; the CPU path of `positions_at_least` is faster on a CPU.
    """
    marks = torch.empty(flat.shape, dtype=torch.bfloat16, device=flat.device)
    torch.div(flat, threshold, rounding_mode="trunc", out=marks)
    return torch.nonzero_static(marks.view(-1), size=capacity, fill_value=-1).view(-1)


def select_exactly_k(flat: Tensor, k: int, floor: float | None = None) -> tuple[Tensor, Tensor]:
    """Positions of k entries of the largest magnitude, from a sampled threshold.

    Candidates are the entries at or above a threshold aimed at 1.3·k (and at or above
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
