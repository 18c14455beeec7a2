"""The detail statistics of large tensors on an accelerator, from rows of one padded copy: a few calls a batch.

A detail step measures, per gradient, max |g| and the nonzero, NaN and Inf counts. On a GPU each torch call
costs host time (5-10 us), and a foreach call costs more with every tensor it takes (an output each): the
foreach measure (`large_stats.LargeStats`) spends nine foreach calls a batch. Here a batch of tensors is copied
into one buffer (one concatenation), each tensor starting on a row boundary and padded with zeros to whole rows
of `ROW` elements, and the buffer is measured row by row with a fixed number of whole-buffer reductions
(``aminmax``, ``count_nonzero``, the NaN and Inf sums along the rows). The rows' values are then combined per
tensor: one amax scatter, one float64 index_add. The zero padding changes nothing: it is neither nonzero, NaN
nor Inf, and |0| exceeds no max |g|. Counts are added as integers per row and in float64 across rows: exact
(a device without float64, MPS, adds them in float32: exact up to 2**24 a tensor).

On a CPU the row reductions cost more than the foreach passes (boolean sums: ~4 ns an element, measured), so a
CPU keeps `LargeStats` (see `stats.FOREACH_DEVICES`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from gradkit._scalars import from_host
from gradkit.tracking.large_stats import batched, cut, split_sizes


def concatenated(tensors: Sequence[Tensor]) -> Tensor:
    """The elements of `tensors` (each with at least one dimension and one element, of one device and dtype) in
    one new 1-D tensor, with one dispatched operator: ``flatten_dense_tensors`` makes a view of each tensor first,
    an operator each (host time on a GPU: hundreds of them a detail step at GPT-2's 148 tensors)."""
    return torch._chunk_cat(tensors, 0, 1).view(-1)


__all__ = ["ROW", "CHUNK", "RowStats"]

# Elements per row: the padding is under one row per tensor (tensors measured here have over 65,536 elements).
ROW = 1 << 12
# Elements per batch (a multiple of ROW): the copy, and one boolean temporary of its size, live at once.
# A tensor larger than this is measured in views of this many elements.
CHUNK = 1 << 26


class RowStats:
    """Max |g|, nonzero, NaN and Inf counts of same-device, same-dtype tensors, from one padded copy per batch.

    Args:
        sizes: the element count of each tensor, each at least 1 (the layout is fixed by them and kept).
        device: where the tensors are.

    Memory: during `table`, one copy of at most `CHUNK` elements (plus padding) in the tensors' dtype and one
    boolean temporary of its size at a time (a non-contiguous tensor over `CHUNK` is also copied whole, to be
    cut); kept between steps, one int64 per row and one zero row per dtype.

    Example:
        >>> stats = RowStats([t.numel() for t in grads], grads[0].device)
        >>> stats.table(grads, torch.float64)          # (len(grads), 4)
    """

    def __init__(self, sizes: Sequence[int], device: torch.device) -> None:
        self.count, self.device = len(sizes), device
        # Only a tensor larger than a batch is cut into views, and only it pays for the cut (two calls).
        self.cut = [n > CHUNK for n in sizes]
        pieces = split_sizes(sizes, CHUNK)
        rows = [-(-size // ROW) for _, size in pieces]
        # (pieces, the padding after each of them), a batch holding at most CHUNK elements with its padding
        self.batches = [
            (slice(start, stop), [-size % ROW for _, size in pieces[start:stop]])
            for start, stop in batched([n * ROW for n in rows], CHUNK)
        ]
        owners = [index for (index, _), n in zip(pieces, rows) for _ in range(n)]  # the tensor each row belongs to
        self.owners = from_host(owners, device, torch.int64)
        self._zeros: dict[torch.dtype, list[list[Tensor | None]]] = {}  # per dtype, per batch: the padding views

    def pieces(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """The tensors, those larger than `CHUNK` as flat views of `CHUNK` elements."""
        return cut(tensors, self.cut, CHUNK)

    def table(self, tensors: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
        """(len(tensors), 4) in `dtype`: max |g|, nonzero (NaN counted), NaN and Inf counts; no host sync."""
        pieces = self.pieces(tensors)
        pads = self._padding(pieces[0].dtype)
        maxes, counts = [], []
        for (span, _), zeros in zip(self.batches, pads):
            # One copy: each piece followed by the zeros that fill its last row (none where it fills it whole),
            # in one operator (`concatenated` above: no view of each piece made first).
            members = [t for pair in zip(pieces[span], zeros) for t in pair if t is not None]
            rows = concatenated(members).view(-1, ROW)
            low, high = torch.aminmax(rows, dim=1)  # NaN where the row holds one
            maxes.append(torch.maximum(low.neg(), high))
            counts.append(torch.stack([torch.count_nonzero(rows, dim=1), rows.isnan().sum(1), rows.isinf().sum(1)]))
            del rows, low, high  # the next batch's copy is made after this one's is freed: one copy at a time
        row_max = torch.cat(maxes) if len(maxes) > 1 else maxes[0]
        row_counts = torch.cat(counts, 1) if len(counts) > 1 else counts[0]
        max_abs = torch.zeros(self.count, dtype=row_max.dtype, device=row_max.device)
        max_abs.scatter_reduce_(0, self.owners, row_max, "amax", include_self=False)
        # Counts add up in float64 (exact) where the table is float64; a device without it (MPS) asks for float32.
        total = torch.float64 if dtype == torch.float64 else torch.float32
        sums = torch.zeros(3, self.count, dtype=total, device=row_max.device)
        sums.index_add_(1, self.owners, row_counts.to(total))
        # max |g| widens to float64 without rounding (every float dtype does), then one cast for all.
        return torch.cat([max_abs.to(total).unsqueeze(0), sums]).T.to(dtype)

    def _padding(self, dtype: torch.dtype) -> list[list[Tensor | None]]:
        """Per batch, the zero views that pad each piece to whole rows (made once per dtype, views of one row)."""
        pads = self._zeros.get(dtype)
        if pads is None:
            row = torch.zeros(ROW, dtype=dtype, device=self.device)
            # None where a piece fills its last row: an empty tensor cannot join the one-operator concatenation.
            pads = self._zeros[dtype] = [[row[:n] if n else None for n in fill] for _, fill in self.batches]
        return pads
