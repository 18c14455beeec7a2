"""Sparsifiers: keep a subset of entries and send (indices, values).

`TopK` keeps the largest-magnitude entries. Its fast path estimates the
threshold from a small random sample (as Deep Gradient Compression does) and
selects with a fixed-capacity `nonzero_static`, so it never waits for the
host; `exactly_k=True` then keeps exactly k entries (the exact top-k in all but
rare calls), `exact=True` uses `torch.topk`. `RandomK` keeps random entries
chosen from a seed all ranks share, so its payloads add up like dense ones.
`Threshold` keeps every entry above a fixed magnitude; with `max_density` its
payload has a fixed size too. The selection itself lives in `selection`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from gradkit import _checks
from gradkit.compression import selection
from gradkit.compression.base import (
    Compressor,
    Payload,
    check_density,
    check_value_dtype,
    count_for,
    index_dtype,
    narrow,
)
from gradkit.compression.selection import (
    EXACT_K_TARGET,
    exactly_k_capacity,
    masked_values,
    positions_at_least,
    sample_positions,
    sampled_entries,
    sampled_exactly_k,
    sampled_threshold,
    sampling_aims_well,
    select_exactly_k,
    select_in_chunks,
    threshold_of_sample,
)

__all__ = ["TopK", "RandomK", "Threshold", "positions_at_least", "sparse_payload", "scatter_sum"]

# Capacity of the fast top-k payload, relative to k: the sampled threshold lands the
# count within a few percent of k, and a fixed size lets ranks all-gather in one go.
_CAPACITY = 1.5
# Aim the sampled threshold at 1.2·k: a count a little over k keeps at least top-k's
# energy despite sampling noise, and stays well inside the capacity.
_TARGET = 1.2


def sparse_payload(
    owner: Compressor, flat: Tensor, indices: Tensor, valid: Tensor | None, shape, value_dtype
) -> Payload:
    """(indices, values) of `flat`; entries where `valid` is False are padding (index 0, value 0)."""
    if valid is not None:
        values = masked_values(flat, indices, valid, value_dtype)
    else:
        values = narrow(flat[indices], value_dtype)
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
    capacity. No host sync on a GPU. `exact=True` selects exactly k with `torch.topk`, as does
    every tensor of at most 16,384 entries and every k of at most 213 (189 with `exactly_k`): there
    a sample would hold fewer than 256 entries above its threshold while reading the whole tensor.

    `exactly_k=True` sends exactly k slots: the threshold is aimed at 1.35·k, up to
    2·k candidates above it are collected and the k largest of them kept with a
    `torch.topk` over that small buffer. These are exactly the top-k entries
    whenever the candidates number between k and 2·k (the count spreads ~6-7% around
    its aim: all but ~1e-4 of calls), so the energy kept is top-k's; in the rare
    short call the unused slots are padding (``meta["valid"]`` False), and the
    k largest are still all sent. A size known in advance lets ranks all-gather
    without a size exchange, and k slots instead of 1.5·k send a third less. It
    is an option, not the default, because the default's count (about 1.2·k of
    real entries in 1.5·k slots) is part of its documented behaviour.

    Args:
        density: fraction of entries to keep, in (0, 1].
        exact: use `torch.topk` (slower, exactly k entries).
        value_dtype: dtype of the sent values (e.g. torch.float16 to halve them).
        exactly_k: a payload of exactly k entries from the sampled threshold (see above).

    Example:
        >>> pipe = gk.GradientPipeline(model, average=gk.Average(gk.TopK(0.01, exactly_k=True)))
    """

    def __init__(
        self, density: float, *, exact: bool = False, value_dtype: torch.dtype | None = None, exactly_k: bool = False
    ) -> None:
        self.density = check_density(density)
        self.exact = _checks.flag("exact", exact, "pass exact=True for torch.topk, False for the sampled threshold")
        self.value_dtype = check_value_dtype(value_dtype)
        self.exactly_k = _checks.flag(
            "exactly_k", exactly_k, "pass exactly_k=True for a payload of exactly k entries, False for 1.5·k slots"
        )

    def compress(self, tensor: Tensor) -> Payload:
        tensor = self._check_input(tensor)
        flat = tensor.reshape(-1)
        k = count_for(self.density, flat.numel())
        if not self._sampled(flat.numel()):
            indices = torch.topk(flat.abs(), k, sorted=False).indices
            return sparse_payload(self, flat, indices, None, tensor.shape, self.value_dtype)
        return self._select(flat, None, tensor.shape)

    def compress_residual_(self, tensor: Tensor, *, sum_of: tuple[Tensor, Tensor] | None = None) -> Payload:
        """`Compressor.compress_residual_`, fused on a CPU: the sum is formed, and the sent entries
        leave `tensor`, in the pass that selects them, a chunk at a time while it is in cache."""
        tensor = self._check_input(tensor)
        if not self._sampled(tensor.numel()) or not tensor.is_contiguous():
            return super().compress_residual_(tensor, sum_of=sum_of)
        flat = tensor.view(-1)
        n = flat.numel()
        k = count_for(self.density, n)
        if sum_of is None:
            return self._select(flat, None, tensor.shape, residual=True)
        first, second = (part.reshape(-1) for part in sum_of)
        if flat.device.type not in selection.CHUNKED_DEVICES:  # one pass forms the sum, selected as `compress` does
            torch.add(first, second, out=flat)
            return self._select(flat, None, tensor.shape, residual=True)
        drawn = sample_positions(n, k, self._target, flat.device)
        sample = torch.add(first.index_select(0, drawn), second.index_select(0, drawn), out=flat.new_empty(drawn.shape))
        threshold = threshold_of_sample(sample, n, k, self._target)

        def add(start: int, end: int) -> None:
            torch.add(first[start:end], second[start:end], out=flat[start:end])

        return self._select(flat, threshold, tensor.shape, prepare=add, residual=True)

    def compress_sum_(self, into: Tensor, addend: Tensor, scale: Tensor) -> Payload:
        """`Compressor.compress_sum_`, fused on the sampled paths: the threshold comes from a
        sample of the sum (read at the sampled positions of both tensors), then one pass adds,
        zeroes the addend and selects (`select_in_chunks` on a CPU).
        The entries chosen are those `compress` chooses on the sum, with the same random draw."""
        if not self._sampled(into.numel()):
            return super().compress_sum_(into, addend, scale)
        return self._select_sum(into, addend, scale, None)

    def absorb_sum_(
        self, into: Tensor, addend: Tensor, scale: Tensor, keep: Tensor, *, write_back: Tensor | None = None
    ) -> Payload:
        """`Compressor.absorb_sum_` in one pass on a CPU: add, zero the addend, select, gather the
        values, take them out of `into` and (with `write_back`) write them into the addend, a chunk
        at a time (`select_in_chunks`). There `keep` is read on the host (a CPU has no device to
        wait for): a kept step's addend is finite (the caller checked it), so the pass skips
        `nan_to_num`, which only a refused step needs."""
        if not self._sampled(into.numel()):
            return super().absorb_sum_(into, addend, scale, keep, write_back=write_back)
        return self._select_sum(into, addend, scale, keep, write_back)

    def absorb_into_(
        self, tensor: Tensor, residual: Tensor, scale: Tensor, keep: Tensor, *, write_back: Tensor | None = None
    ) -> Payload:
        """`Compressor.absorb_into_` in one pass on a CPU: per chunk, the sum is formed in the
        tensor, selected from, what is sent taken out, the rest stored into the (narrower)
        residual, and the tensor's chunk zeroed and given what is sent, while it is in cache."""
        n = tensor.numel()
        chunked = tensor.device.type in selection.CHUNKED_DEVICES
        if not (self._sampled(n) and chunked and tensor.is_contiguous() and residual.is_contiguous()):
            return super().absorb_into_(tensor, residual, scale, keep, write_back=write_back)
        k = count_for(self.density, n)
        drawn = sample_positions(n, k, self._target, tensor.device)
        sample = (
            tensor.index_select(0, drawn).nan_to_num(0.0, 0.0, 0.0).mul_(scale).add_(residual.index_select(0, drawn))
        )
        threshold = threshold_of_sample(sample, n, k, self._target)
        finite = bool(keep)  # a CPU: the read waits for nothing; a kept step's tensor is finite
        taker = self._taker(tensor, keep, None)
        pending: list[tuple[Tensor, Tensor]] = []

        def prepare(start: int, end: int) -> None:
            chunk = tensor[start:end]
            (chunk if finite else chunk.nan_to_num_(0.0, 0.0, 0.0)).mul_(scale).add_(residual[start:end])

        def take(chunk: Tensor, local: Tensor, found: Tensor) -> None:
            taker(chunk, local, found)
            if write_back is not None:
                pending.append((local, self._sent(found, keep, not finite)))

        def finish(start: int, end: int) -> None:
            chunk = tensor[start:end]
            residual[start:end].copy_(chunk)
            chunk.zero_()
            if pending:
                local, sent = pending.pop()
                chunk.index_put_((local,), sent.nan_to_num(0.0, math.inf, -math.inf).mul_(write_back))

        positions, values = select_in_chunks(
            tensor, threshold, self._capacity(n, k), prepare=prepare, take=take, finish=finish
        )
        if self.exactly_k:
            payload, top = self._exactly_k_payload(positions, values, k, n, tensor.shape)
            self._put_back_rejected(
                residual, positions, values, top, None if write_back is None else (tensor, write_back)
            )
        else:
            payload = self._padded_payload(positions, values, self._capacity(n, k), n, tensor.shape)
        return self._kept(tensor, payload, keep, False, None)

    def _capacity(self, n: int, k: int) -> int:
        """How many slots (or, with exactly_k, candidates) the sampled selection collects."""
        return exactly_k_capacity(n, k) if self.exactly_k else min(n, math.ceil(_CAPACITY * k))

    def _sent(self, found: Tensor, keep: Tensor | None, scaled: bool) -> Tensor:
        """What is sent of the `found` values: rounded to the value dtype, times `keep` if `scaled`."""
        sent = found if self.value_dtype is None else narrow(found, self.value_dtype).to(found.dtype)
        return sent * keep if scaled else sent

    @property
    def _target(self) -> float:
        return EXACT_K_TARGET if self.exactly_k else _TARGET

    def _sampled(self, n: int) -> bool:
        """Whether the sampled threshold selects (else `torch.topk` does: `exact`, all entries, or where a sample
        would not aim well, see `sampling_aims_well`)."""
        return not self.exact and sampling_aims_well(n, count_for(self.density, n), self._target)

    def _select_sum(
        self, into: Tensor, addend: Tensor, scale: Tensor, keep: Tensor | None, write_back: Tensor | None = None
    ) -> Payload:
        n = into.numel()
        k = count_for(self.density, n)
        chunked = into.device.type in selection.CHUNKED_DEVICES
        # CPU only (a host read there waits for nothing): a kept step's addend is finite.
        finite = chunked and keep is not None and bool(keep)

        def add(start: int, end: int) -> None:
            taken = addend[start:end]
            into[start:end].addcmul_(taken if finite else taken.nan_to_num_(0.0, 0.0, 0.0), scale)
            taken.zero_()

        write = None if write_back is None else (addend, write_back)
        if not chunked:  # one pass forms the sum, then it is selected from as `compress` selects
            add(0, n)
            return self._select(into, None, into.shape, keep=keep, residual=keep is not None, write=write)
        drawn = sample_positions(n, k, self._target, into.device)
        sample = into.index_select(0, drawn) + addend.index_select(0, drawn).nan_to_num(0.0, 0.0, 0.0) * scale
        threshold = threshold_of_sample(sample, n, k, self._target)
        return self._select(into, threshold, into.shape, prepare=add, keep=keep, residual=keep is not None, write=write)

    def _select(
        self,
        flat: Tensor,
        threshold: Tensor | None,
        shape: torch.Size,
        *,
        prepare: Callable[[int, int], None] | None = None,
        keep: Tensor | None = None,
        residual: bool = False,
        write: tuple[Tensor, Tensor] | None = None,
    ) -> Payload:
        """The payload of the entries of `flat` at or above `threshold` (after ``prepare(0, n)``);
        values times `keep` if given; with `residual`, what is sent is taken out of `flat`; with
        ``write=(target, factor)``, what is sent, times factor, is added into `target` (flat's size,
        zeroed by `prepare` chunk by chunk when `residual`: the chunked pass writes, not adds).
        A `threshold` of None samples it from `flat` (on a CPU, where `prepare` runs chunk by chunk, only
        without one); on a device it is always sampled, after `prepare`, in the same calls that select."""
        n = flat.numel()
        k = count_for(self.density, n)
        capacity = self._capacity(n, k)
        if flat.device.type not in selection.CHUNKED_DEVICES:
            if threshold is not None:  # before prepare writes anything
                raise ValueError("on a device the threshold is sampled with the selection: pass threshold=None")
            if prepare is not None:
                prepare(0, n)
            # Threshold and selection in one go (three Triton launches on a GPU).
            if self.exactly_k:
                indices, values, valid = sampled_exactly_k(flat, k, self.value_dtype)
            else:
                indices, values, valid = sampled_entries(flat, k, self._target, capacity, self.value_dtype)
            payload = Payload([indices, values], torch.Size(shape), flat.dtype, self, {"valid": valid})
            return self._kept(flat, payload, keep, residual, write)
        if threshold is None:
            if prepare is not None:
                raise ValueError("a sampled threshold on a CPU needs the tensor whole: pass the threshold with prepare")
            threshold = sampled_threshold(flat, k, self._target)
        # The pass takes every entry it finds out of flat (and writes it into write's target) while
        # its chunk is in cache; with exactly_k, the candidates that lose to the k largest go back after.
        take = self._taker(flat, keep, write) if residual else None
        positions, values = select_in_chunks(flat, threshold, capacity, prepare=prepare, take=take)
        if self.exactly_k:
            payload, top = self._exactly_k_payload(positions, values, k, n, shape)
            if take is not None:
                self._put_back_rejected(flat, positions, values, top, write)
            return self._kept(flat, payload, keep, False, None if take is not None else write)
        payload = self._padded_payload(positions, values, capacity, n, shape)
        return self._kept(flat, payload, keep, False, None if take is not None else write)

    @staticmethod
    def _put_back_rejected(
        flat: Tensor, positions: Tensor, values: Tensor, top: Tensor, write: tuple[Tensor, Tensor] | None
    ) -> None:
        """Undo the pass's take for the candidates `_exactly_k_payload` did not keep (about a quarter
        of them): flat gets their values back exactly, write's target its zeros."""
        count = positions.numel()
        rejected = torch.ones(count, dtype=torch.bool)
        rejected[top[top < count]] = False  # slots past count are padding
        lost = positions[rejected]
        flat.index_put_((lost,), values[rejected].to(flat.dtype))
        if write is not None:
            write[0].index_fill_(0, lost, 0.0)

    def _taker(
        self, flat: Tensor, keep: Tensor | None, write: tuple[Tensor, Tensor] | None
    ) -> Callable[[Tensor, Tensor, Tensor], None]:
        """`select_in_chunks`'s ``take``: what is sent leaves the chunk of `flat` (and, with `write`,
        enters the same chunk of its target) while the chunk is in cache."""

        # A kept step (read on the host: this runs on a CPU only) sends what it finds as it is.
        scaled = keep is not None and not bool(keep)
        unit = write is None or bool(write[1] == 1)

        def take(chunk: Tensor, local: Tensor, found: Tensor) -> None:
            sent = self._sent(found, keep, scaled)
            # found - found is exactly 0: what is sent leaves nothing behind.
            chunk.index_put_((local,), found - sent)
            if write is not None:
                start = chunk.storage_offset() - flat.storage_offset()
                # NaN is never sent (the payload pads it): 0 there. The target's chunk was zeroed by
                # `prepare` (`_select_sum`), so a plain write is the scatter-add.
                sent = sent.nan_to_num(0.0, math.inf, -math.inf)
                write[0][start : start + chunk.numel()].index_put_((local,), sent if unit else sent.mul_(write[1]))

        return take

    def _kept(
        self,
        flat: Tensor,
        payload: Payload,
        keep: Tensor | None,
        residual: bool,
        write: tuple[Tensor, Tensor] | None = None,
    ) -> Payload:
        """`payload` with its values times `keep`; with `residual`, taken out of `flat`; with `write`,
        added (times its factor) into its target."""
        if keep is not None:
            payload.tensors[1].mul_(keep)
        if residual:
            self.residual_(flat, payload)
        if write is not None:
            self.add_sent_(write[0], payload, write[1])
        return payload

    def _padded_payload(self, positions: Tensor, values: Tensor, capacity: int, n: int, shape) -> Payload:
        """`capacity` slots from `select_in_chunks`'s entries; NaN and unused slots are padding.

        ``meta["ascending"]``: the positions rise, except padding, which sends index 0 (a scatter
        of many ranks' payloads may split them by position without sorting)."""
        count = positions.numel()
        valid = torch.zeros(capacity, dtype=torch.bool)
        ok = valid[:count]
        torch.logical_not(values.isnan(), out=ok)
        indices = torch.zeros(capacity, dtype=index_dtype(n))
        indices[:count] = positions * ok
        sent = torch.zeros(capacity, dtype=self.value_dtype or values.dtype)
        sent[:count] = narrow(torch.where(ok, values, torch.zeros((), dtype=values.dtype)), self.value_dtype)
        meta = {"valid": valid, "ascending": True}
        return Payload([indices, sent], torch.Size(shape), values.dtype, self, meta)

    def _exactly_k_payload(self, positions: Tensor, values: Tensor, k: int, n: int, shape) -> tuple[Payload, Tensor]:
        """The k largest of `select_in_chunks`'s candidates (`exactly_k_of` on gathered values), and
        the slots of the candidates it keeps (those past the candidates' count are padding)."""
        short = k - positions.numel()
        if short > 0:  # fewer candidates than slots: padding, whose magnitude -1 loses to any entry
            positions = torch.nn.functional.pad(positions, (0, short))
            values = torch.nn.functional.pad(values, (0, short), value=math.nan)
        magnitudes = values.abs().nan_to_num_(nan=-1.0, posinf=math.inf)
        kept, top = torch.topk(magnitudes, k, sorted=False)
        valid = kept >= 0
        indices = (positions.index_select(0, top) * valid).to(index_dtype(n))
        sent = torch.where(valid, values.index_select(0, top), torch.zeros((), dtype=values.dtype))
        sent = narrow(sent, self.value_dtype)
        return Payload([indices, sent], torch.Size(shape), values.dtype, self, {"valid": valid}), top


class RandomK(Compressor):
    """Keep about `density` of the entries, drawn at random, scaled by 1/density (unbiased).

    k = density·n indices are drawn uniformly with replacement; each kept value
    is scaled by n/k and repeated draws add up, so E[decompress] is exactly the
    input. All ranks draw the same indices from a shared seed and a step
    counter, so only the values travel and they are all-reduced like dense
    gradients. The indices are drawn on the tensor's own device (no host
    work or copy per call, and no sync): ranks on the same kind of device draw
    the same ones, and a payload is decompressed with the draw it was made with.

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
        payload = Payload([values], tensor.shape, tensor.dtype, self, {"step": self._step, "drawn_on": flat.device})
        self._step += 1
        return payload

    def decompress(self, payload: Payload) -> Tensor:
        payload = self._check_payload(payload)
        (values,) = payload.tensors
        dense = torch.zeros(payload.numel, dtype=payload.dtype, device=values.device)
        # Redrawn where compress drew them (a CPU and a CUDA generator give different draws).
        drawn_on = payload.meta.get("drawn_on", values.device)
        indices = self._indices(payload.numel, payload.meta["step"], drawn_on).to(values.device)
        if self.scale:
            dense.index_add_(0, indices, values)  # repeated draws add up: that keeps it unbiased
        else:
            dense[indices] = values  # unscaled: a kept entry is kept once
        return dense.view(payload.shape)

    def decoding(self) -> dict[str, Any]:
        return {"density": self.density, "seed": self.seed, "scale": self.scale}

    def _indices(self, numel: int, step: int, device: torch.device) -> Tensor:
        k = count_for(self.density, numel)
        # A generator on the tensor's device: seeding it is host bookkeeping (no sync), and the
        # draw is one kernel, where a CPU draw of k indices and their copy cost more than a top-k.
        generator = torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + step)
        # (An empty tensor draws none; randint needs a non-empty range even for k = 0.)
        return torch.randint(max(numel, 1), (k,), generator=generator, device=device)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self._step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._step = _checks.non_negative_int("step", state["step"], "pass the state from RandomK.state_dict()")


class Threshold(_Sparsifier):
    """Keep every entry whose magnitude is at least `tau` (the count varies per step).

    With `max_density`, the payload has a fixed size instead: k = max_density·n
    slots holding the entries >= tau, the largest k of them when more qualify
    (chosen as `TopK(exactly_k=True)` chooses, from a sampled threshold); unused
    slots are padding (index 0, value 0, ``meta["valid"]`` False). Ranks then
    all-gather without a size exchange and with no host sync; without it, the
    count is read on the host once per tensor.

    Args:
        tau: the magnitude threshold (> 0).
        value_dtype: dtype of the sent values.
        max_density: the fraction of entries the payload holds, in (0, 1], or None
            (every entry >= tau, a size that varies).

    Example:
        >>> pipe = gk.GradientPipeline(model, average=gk.Average(gk.Threshold(1e-3, max_density=0.01)))
    """

    variable_size = True

    def __init__(self, tau: float, *, value_dtype: torch.dtype | None = None, max_density: float | None = None) -> None:
        self.tau = _checks.positive_number("tau", tau, "pass the smallest magnitude to send, e.g. 1e-3")
        self.value_dtype = check_value_dtype(value_dtype)
        self.max_density = None if max_density is None else check_density(max_density)
        # A fixed number of slots: the all-gather needs no size exchange.
        self.variable_size = self.max_density is None

    def compress(self, tensor: Tensor) -> Payload:
        tensor = self._check_input(tensor)
        flat = tensor.reshape(-1)
        if self.max_density is not None:
            indices, valid = self._fixed_size(flat)
            return sparse_payload(self, flat, indices, valid, tensor.shape, self.value_dtype)
        # A variable count needs its size on the host: nonzero() syncs, once per tensor.
        indices = ((flat >= self.tau) | (flat <= -self.tau)).nonzero().view(-1)
        return sparse_payload(self, flat, indices, None, tensor.shape, self.value_dtype)

    def _fixed_size(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        k = count_for(self.max_density, flat.numel())
        if not sampling_aims_well(flat.numel(), k, EXACT_K_TARGET):
            kept, indices = torch.topk(flat.abs(), k, sorted=False)
            valid = kept >= self.tau  # NaN compares False: never sent
            return indices * valid, valid  # padding sends index 0
        return select_exactly_k(flat, k, floor=self.tau)
