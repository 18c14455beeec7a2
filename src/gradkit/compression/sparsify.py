"""Sparsifiers: keep a subset of entries and send (indices, values).

`TopK` keeps the largest-magnitude entries. Its fast path estimates the
threshold from a small random sample (as Deep Gradient Compression does) and
selects with a fixed-capacity `nonzero_static`, so it never waits for the
host; `exact=True` uses `torch.topk`. `RandomK` keeps random entries chosen
from a seed all ranks share, so its payloads add up like dense ones.
`Threshold` keeps every entry above a fixed magnitude.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from gradkit import _checks
from gradkit.compression.base import Compressor, Payload, check_density, check_value_dtype, count_for, index_dtype

__all__ = ["TopK", "RandomK", "Threshold", "sparse_payload", "scatter_sum"]

# Capacity of the fast top-k payload, relative to k: the sampled threshold lands the
# count within a few percent of k, and a fixed size lets ranks all-gather in one go.
_CAPACITY = 1.5
# Aim the sampled threshold at 1.2·k: a count a little over k keeps at least top-k's
# energy despite sampling noise, and stays well inside the capacity.
_TARGET = 1.2
# The sample holds about this many entries above the threshold: the count's relative
# spread is then ~1/sqrt(256) = 6%, far inside the capacity's 25% margin at any density.
_SAMPLE_HITS = 256
_MIN_SAMPLE = 16384
_CHUNK = 1 << 20  # entries per step of the CPU mask: a 4 MiB scratch for float32


def sparse_payload(owner: Compressor, flat: Tensor, indices: Tensor, valid: Tensor | None, shape, value_dtype) -> Payload:
    """(indices, values) of `flat`; entries where `valid` is False are padding (index 0, value 0)."""
    values = flat[indices]
    if valid is not None:
        values = torch.where(valid, values, torch.zeros((), dtype=values.dtype, device=values.device))
    values = values.to(value_dtype) if value_dtype is not None else values
    meta = {"valid": valid} if valid is not None else {}
    return Payload([indices.to(index_dtype(flat.numel())), values], torch.Size(shape), flat.dtype, owner, meta)


def scatter_sum(payload: Payload) -> Tensor:
    """The dense tensor of an (indices, values) payload; repeated indices add up."""
    indices, values = payload.tensors
    dense = torch.zeros(payload.numel, dtype=payload.dtype, device=values.device)
    dense.index_add_(0, indices.long(), values.to(payload.dtype))
    return dense.view(payload.shape)


class _Sparsifier(Compressor):
    biased = True
    sparse = True

    def decompress(self, payload: Payload) -> Tensor:
        return scatter_sum(self._check_payload(payload))

    def residual_(self, corrected: Tensor, payload: Payload) -> Tensor:
        # Subtract only what was sent, at its indices: no dense pass. Padding adds 0.
        indices, values = payload.tensors
        flat = corrected.view(-1)
        flat.index_add_(0, indices.long(), values.to(flat.dtype), alpha=-1)
        return corrected


class TopK(_Sparsifier):
    """Keep the `density` fraction of entries with the largest magnitude.

    The fast path (default) estimates the magnitude threshold from a random
    sample (sized so that ~256 sampled entries lie above it, at least 16,384)
    aimed at 1.2·k entries, keeps entries above it,
    and pads to a fixed capacity of 1.5·k (padding sends index 0 with value 0,
    which adds nothing). If the estimate is far off the count is cut at the
    capacity. No host sync on a GPU. `exact=True` selects exactly k with `torch.topk`.

    Args:
        density: fraction of entries to keep, in (0, 1].
        exact: use `torch.topk` (slower, exactly k entries).
        value_dtype: dtype of the sent values (e.g. torch.float16 to halve them).

    Example:
        >>> pipe = gk.GradientPipeline(model, average=gk.Average(gk.TopK(0.01)))
    """

    def __init__(self, density: float, *, exact: bool = False, value_dtype: torch.dtype | None = None) -> None:
        self.density = check_density(density)
        self.exact = _checks.flag("exact", exact, "pass exact=True for torch.topk, False for the sampled threshold")
        self.value_dtype = check_value_dtype(value_dtype)

    def compress(self, tensor: Tensor) -> Payload:
        tensor = self._check_input(tensor)
        flat = tensor.reshape(-1)
        k = count_for(self.density, flat.numel())
        if self.exact or k == flat.numel() or flat.numel() <= _MIN_SAMPLE:
            indices = torch.topk(flat.abs(), k, sorted=False).indices
            return sparse_payload(self, flat, indices, None, tensor.shape, self.value_dtype)
        threshold = sampled_threshold(flat, k)
        capacity = min(flat.numel(), math.ceil(_CAPACITY * k))
        indices = positions_at_least(flat, threshold, capacity)
        valid = indices >= 0
        return sparse_payload(self, flat, indices.clamp_(min=0), valid, tensor.shape, self.value_dtype)


def positions_at_least(flat: Tensor, threshold: Tensor, capacity: int) -> Tensor:
    """Positions of the entries with |x| >= threshold (NaN: never), the first `capacity`, padded with -1."""
    if flat.device.type != "cpu":
        # Filling with -1 marks the padding without counting the mask (a host sync on a GPU).
        return torch.nonzero_static(flat.abs() >= threshold, size=capacity, fill_value=-1).view(-1)
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
    # nonzero() over the 8-byte words first, then over the bytes of the words holding a True:
    # at top-k densities about half the time of mask.nonzero() (a CPU has no host sync to avoid).
    words = mask.view(torch.int64)
    hit = words.nonzero().view(-1)
    within = words[hit].view(torch.bool).nonzero().view(-1)
    found = (hit[within >> 3] * 8 + (within & 7))[:capacity]
    return torch.nn.functional.pad(found, (0, capacity - found.numel()), value=-1)


def sampled_threshold(flat: Tensor, k: int) -> Tensor:
    """A magnitude above which about k entries of `flat` lie, from a random sample."""
    n = flat.numel()
    size = min(n, max(_MIN_SAMPLE, math.ceil(_SAMPLE_HITS * n / (_TARGET * k))))
    sample = flat[torch.randint(n, (size,), device=flat.device)].abs()
    rank = max(1, min(size, size - int(round(_TARGET * k / n * size)) + 1))  # kthvalue is 1-based, ascending
    threshold = torch.kthvalue(sample.float(), rank).values.to(flat.dtype)
    # A threshold of 0 (many exact zeros) would select zeros: keep it strictly positive
    # in flat's own dtype (float32's tiny rounds to 0 in float16), at its smallest subnormal.
    finfo = torch.finfo(flat.dtype)
    return threshold.clamp(min=finfo.tiny * finfo.eps)


class RandomK(Compressor):
    """Keep about `density` of the entries, drawn at random, scaled by 1/density (unbiased).

    k = density·n indices are drawn uniformly with replacement; each kept value
    is scaled by n/k and repeated draws add up, so E[decompress] is exactly the
    input. All ranks draw the same indices from a shared seed and a step
    counter, so only the values travel and they are all-reduced like dense
    gradients.

    Args:
        density: fraction of entries to keep, in (0, 1].
        seed: the seed shared by all ranks.
        scale: multiply kept values by 1/density so that the expectation is the
            input (True); False sends the values as they are (use with error feedback).

    Example:
        >>> pipe = gk.GradientPipeline(model, average=gk.Average(gk.RandomK(0.01)))
    """

    linear = True

    def __init__(self, density: float, *, seed: int = 0, scale: bool = True) -> None:
        self.density = check_density(density)
        self.seed = _checks.non_negative_int("seed", seed, "pass any integer >= 0 shared by all ranks")
        self.scale = _checks.flag("scale", scale, "pass scale=True for an unbiased estimate, False with error feedback")
        self.biased = not self.scale
        self._step = 0

    def compress(self, tensor: Tensor) -> Payload:
        tensor = self._check_input(tensor)
        flat = tensor.reshape(-1)
        indices = self._indices(flat.numel(), self._step, flat.device)
        values = flat[indices] * (flat.numel() / max(indices.numel(), 1) if self.scale else 1.0)
        payload = Payload([values], tensor.shape, tensor.dtype, self, {"step": self._step})
        self._step += 1
        return payload

    def decompress(self, payload: Payload) -> Tensor:
        payload = self._check_payload(payload)
        (values,) = payload.tensors
        dense = torch.zeros(payload.numel, dtype=payload.dtype, device=values.device)
        indices = self._indices(payload.numel, payload.meta["step"], values.device)
        if self.scale:
            dense.index_add_(0, indices, values)  # repeated draws add up: that keeps it unbiased
        else:
            dense[indices] = values  # unscaled: a kept entry is kept once
        return dense.view(payload.shape)

    def _indices(self, numel: int, step: int, device: torch.device) -> Tensor:
        k = count_for(self.density, numel)
        generator = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + step)
        # Drawing on a CPU generator gives every device and rank the same indices.
        # (An empty tensor draws none; randint needs a non-empty range even for k = 0.)
        return torch.randint(max(numel, 1), (k,), generator=generator).to(device)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self._step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._step = _checks.non_negative_int("step", state["step"], "pass the state from RandomK.state_dict()")


class Threshold(_Sparsifier):
    """Keep every entry whose magnitude is at least `tau` (the count varies per step).

    Args:
        tau: the magnitude threshold (> 0).
        value_dtype: dtype of the sent values.

    Example:
        >>> pipe = gk.GradientPipeline(model, average=gk.Average(gk.Threshold(1e-3)))
    """

    variable_size = True

    def __init__(self, tau: float, *, value_dtype: torch.dtype | None = None) -> None:
        self.tau = _checks.positive_number("tau", tau, "pass the smallest magnitude to send, e.g. 1e-3")
        self.value_dtype = check_value_dtype(value_dtype)

    def compress(self, tensor: Tensor) -> Payload:
        tensor = self._check_input(tensor)
        flat = tensor.reshape(-1)
        # A variable count needs its size on the host: nonzero() syncs, once per tensor.
        indices = ((flat >= self.tau) | (flat <= -self.tau)).nonzero().view(-1)
        return sparse_payload(self, flat, indices, None, tensor.shape, self.value_dtype)
