"""The detail statistics of large tensors in a fixed number of foreach passes, however many tensors there are.

A detail step measures, per gradient, max |g| and the nonzero, NaN and Inf counts. Small tensors are
flattened into one buffer (`stats.FusedStats`); large ones are measured here without a copy, with
foreach kernels over all of them at once, so the kernels a detail step launches do not grow with the
number of tensors (on a GPU, where each launch costs host time) and no pass sums a boolean tensor
(slow on a CPU). The counts come from indicator values whose squared L2 norms are the counts:

- ``a = sign(|g|)``: 1 where g is nonzero and not NaN (Inf included), else 0;
- ``r = sign(1 / g)``: +-1 where g is finite (zero included: 1/0 is Inf), 0 where g is Inf or NaN;
- ``r * a``: +-1 where g is finite and nonzero.

From their counts (A, F, B) and the element count n: Inf = A - B, zeros = F - B, NaN = n - F - Inf.
A norm of 0/1 values is exact while the count stays well inside float32's integers, so tensors are
measured in pieces of at most `PIECE` elements (views, no copy) and the pieces' counts are added in
float64. Two temporaries of at most `CHUNK` elements are held at a time (smaller on a CPU). The kernels
launched grow with the elements measured (one batch per `CHUNK`), not with the number of tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from gradkit._scalars import from_host

__all__ = ["PIECE", "CHUNK", "CPU_PIECE", "CPU_CHUNK", "LargeStats", "batched", "cut", "split_sizes"]

# Counts up to 2**22 survive the float32 square root and its square exactly (error < 0.5, then rounded).
PIECE = 1 << 22
# Elements measured per batch of pieces: two temporaries of this many elements live at once.
CHUNK = 1 << 26
# On a CPU, smaller: temporaries of a few MB are reused by the allocator, where larger ones are mapped
# afresh every step and their page faults cost more than the passes (5x the time, measured).
CPU_PIECE, CPU_CHUNK = 1 << 18, 1 << 20


class LargeStats:
    """Max |g|, nonzero, NaN and Inf counts of same-device, same-dtype tensors, with foreach kernels.

    Args:
        sizes: the element count of each tensor, each at least 1 (the layout is fixed by them and kept).
        device: where the tensors are.

    Example:
        >>> stats = LargeStats([t.numel() for t in grads], grads[0].device)
        >>> stats.table(grads, torch.float64)          # (len(grads), 4)
    """

    def __init__(self, sizes: Sequence[int], device: torch.device) -> None:
        self.sizes = list(sizes)
        self.count = len(self.sizes)
        self.piece, chunk = (CPU_PIECE, CPU_CHUNK) if device.type == "cpu" else (PIECE, CHUNK)
        pieces = split_sizes(self.sizes, self.piece)
        self.batches = batched([size for _, size in pieces], chunk)  # [start, stop) of pieces, `chunk` elements
        self.split = len(pieces) != self.count
        # Only the tensors over a piece are cut into views: the others go in whole, with no call per tensor.
        self.cut = [size > self.piece for size in self.sizes]
        owners = [index for index, _ in pieces]  # the tensor each piece belongs to
        self.owners = from_host(owners, device, torch.int64) if self.split else None
        self.numels = from_host(self.sizes, device, torch.float64)

    def pieces(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """The tensors, those over `piece` elements as flat views of at most `piece` (a copy if non-contiguous)."""
        return cut(tensors, self.cut, self.piece)

    def table(self, tensors: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
        """(len(tensors), 4) in `dtype`: max |g|, nonzero (NaN counted), NaN and Inf counts; no host sync."""
        pieces = self.pieces(tensors)
        maxes, counts = [], []
        for start, stop in self.batches:
            m, c = _measure(pieces[start:stop])
            maxes.append(m)
            counts.append(c)
        max_abs = torch.cat(maxes).to(dtype)
        # (pieces, 3): nonzero and not NaN, finite, finite and nonzero
        a_f_b = torch.cat(counts, 1).T.double().square().round()
        if self.split:
            max_abs = torch.zeros(self.count, dtype=dtype, device=max_abs.device).scatter_reduce_(
                0, self.owners, max_abs, "amax", include_self=False
            )
            a_f_b = torch.zeros(self.count, 3, dtype=torch.float64, device=a_f_b.device).index_add_(
                0, self.owners, a_f_b
            )
        a, f, b = a_f_b.unbind(1)
        inf = a - b
        nan = self.numels - f - inf
        nonzero = self.numels - (f - b)
        return torch.stack([max_abs, nonzero.to(dtype), nan.to(dtype), inf.to(dtype)], 1)


def split_sizes(sizes: Sequence[int], piece: int) -> list[tuple[int, int]]:
    """(tensor index, element count) of each piece, every tensor over `piece` elements cut into pieces of `piece`."""
    return [(index, min(piece, size - start)) for index, size in enumerate(sizes) for start in range(0, size, piece)]


def batched(spans: Sequence[int], limit: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of consecutive `spans` adding up to at most `limit` (a larger span alone)."""
    ranges, start, held = [], 0, 0
    for at, span in enumerate(spans):
        if held and held + span > limit:
            ranges.append((start, at))
            start, held = at, 0
        held += span
    ranges.append((start, len(spans)))
    return ranges


def cut(tensors: Sequence[Tensor], cuts: Sequence[bool], piece: int) -> list[Tensor]:
    """The tensors, those marked in `cuts` as flat views of `piece` elements (a copy if non-contiguous)."""
    if not any(cuts):
        return list(tensors)
    return [p for t, c in zip(tensors, cuts) for p in (t.reshape(-1).split(piece) if c else (t,))]


def _measure(pieces: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Max |g| of each piece, and (3, pieces) L2 norms of the three indicators (see the module's docstring)."""
    norm_dtype = torch.promote_types(pieces[0].dtype, torch.float32)  # bf16 norms would round the counts
    a = torch._foreach_abs(pieces)
    max_abs = torch.stack(torch._foreach_max(a))  # NaN where a piece holds a NaN
    torch._foreach_sign_(a)
    r = torch._foreach_reciprocal(pieces)
    torch._foreach_sign_(r)
    f = torch._foreach_norm(r, 2, dtype=norm_dtype)
    torch._foreach_mul_(r, a)
    b = torch._foreach_norm(r, 2, dtype=norm_dtype)
    a_norms = torch._foreach_norm(a, 2, dtype=norm_dtype)
    return max_abs, torch.stack([torch.stack(a_norms), torch.stack(f), torch.stack(b)])
