"""Per-parameter and per-module gradient statistics, computed on the device.

A logging step needs a handful of numbers per parameter. They are computed as
one (P, C) tensor on the gradients' device and read with a single host
transfer; the module view (a module is a parameter name minus its last
component) is assembled on the host from those P rows, so nothing is read
twice. The per-parameter L2 norms come from the step's `GradContext` cache:
they are never recomputed here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from gradkit import _foreach
from gradkit._scalars import from_host
from gradkit.tracking.large_stats import LargeStats
from gradkit.tracking.row_stats import RowStats, concatenated

__all__ = ["module_of", "COLUMNS", "param_stats", "host_dtype", "nonfinite_counts", "histograms"]

ROOT = "(root)"

#: the columns of `param_stats`, in order; "nan" and "inf" are counts (NaN when not measured)
COLUMNS = ("norm_pre_clip", "norm", "max_abs", "nonzero", "weight_norm", "nan", "inf")
#: the columns a detail step measures (the others come from the step's cached norms)
DETAIL = COLUMNS[2:]
# Tensors up to this many elements are measured together, flattened into one buffer per
# (device, dtype) group: their count, not their size, is what costs there. Larger ones are
# measured one by one, where the launch per tensor is small next to the pass itself.
SMALL = 1 << 16
# On a CPU a segment reduction costs a few ns per element and a foreach kernel under 1 ns per element plus a few us
# per tensor: they cross near 256 elements. Measured (one thread), the detail table of 500 tensors of 4096
# elements 46.6 ms flattened against 9.9 ms with this limit, 100 of 32768 elements 88 against 7.7 ms, 2000 of
# 256 elements 15.0 against 15.3 ms; the weights' norms, 500 of 4096 elements, 37 against 4.3 ms.
SMALL_CPU = 256
# Where the large tensors are measured with foreach kernels (`LargeStats`): on a CPU those passes beat the row
# reductions of `RowStats` (9.4M elements: 12 against 180 ms, measured); elsewhere each call costs host time, and
# `RowStats` makes a few a batch where `LargeStats` makes nine foreach calls, each with an output per tensor.
FOREACH_DEVICES = ("cpu",)


_Large = LargeStats | RowStats


def small_limit(device: torch.device) -> int:
    """The most elements a tensor on `device` may have to be measured flattened (`FusedStats`)."""
    return SMALL_CPU if device.type == "cpu" else SMALL


def module_of(name: str) -> str:
    """The module a parameter belongs to: its name minus the last component ('(root)' at top level)."""
    return name.rpartition(".")[0] or ROOT


def host_dtype(device: torch.device) -> torch.dtype:
    # float64 keeps element counts exact up to 2**53; MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def param_stats(
    grads: Sequence[Tensor], params: Sequence[Tensor], norms: Tensor, pre_clip: Tensor | None, *, detail: bool = True,
    groups: _foreach.Groups | None = None, layout: FusedStats | None = None,
) -> Tensor:  # fmt: skip
    """A (P, len(COLUMNS)) tensor of statistics, one row per parameter, on ``norms.device``; no host sync.

    Args:
        grads: the final gradients (after the clip stages).
        params: the parameters (weights before the update).
        norms: per-parameter L2 norms of `grads` (the step's cached ``ctx.norms()``).
        pre_clip: the norms before clipping (``ctx.pre_clip_norms``), or None for `norms`.
        detail: also max |g|, the nonzero, NaN and Inf counts and the weight norm;
            otherwise the table holds the first two columns only and costs nothing but the cached norms.
        groups: the (device, dtype) grouping of `grads`, if known (``ctx.groups()``): finding
            it reads every tensor's kind.
        layout: the `FusedStats` layout of `grads`, if kept (`kept.KeptShapes`): finding it reads every
            tensor's size.

    Returns:
        The table, in ``host_dtype(norms.device)``: (P, len(COLUMNS)), or (P, 2) without `detail`.

    Cost: with `detail`, fused passes whose number does not grow with the number of
    tensors (`FusedStats`), plus the norms of the weights (`FusedStats.norms`).

    Example:
        >>> table = param_stats(ctx.grads, ctx.params, ctx.norms(), None)
        >>> table[:, COLUMNS.index("max_abs")]
    """
    device = norms.device
    dtype = host_dtype(device)
    base = torch.stack([(pre_clip if pre_clip is not None else norms).to(device, dtype), norms.to(device, dtype)], 1)
    if not detail:  # the two measured columns only: nothing else to compute, copy or read
        return base
    layout = layout if layout is not None else FusedStats.of(grads, groups)
    return torch.cat([base, layout.table(grads, params, device, dtype)], 1)


class FusedStats:
    """The detail columns (max |g|, nonzero, weight norm, NaN, Inf) of many tensors in a few fused passes.

    Per (device, dtype) group (`_foreach.Groups`), the small tensors are flattened into one
    buffer and reduced per segment (one amax and one index_add for all of them); the large tensors are
    measured together, a fixed number of calls per group: with foreach kernels on a CPU
    (`large_stats.LargeStats`, no copy), from rows of one padded copy elsewhere (`row_stats.RowStats`). The
    weight norms are measured the same way (`norms`). "Small" is up to `small_limit(device)` elements: 65,536 on
    a GPU, 256 on a CPU.
    The layout (groups, segments, the order back to input order) is found once per kind of
    tensor list and kept.

    Args:
        grads: the gradients whose layout to learn (device, dtype, layout and size of each).
        groups: their grouping, if known.

    Example:
        >>> detail = FusedStats.of(grads).table(grads, params, device, torch.float64)   # (P, 5)
    """

    _cache: dict[tuple, FusedStats] = {}
    _CACHE_SIZE = 16

    def __init__(self, grads: Sequence[Tensor], groups: _foreach.Groups | None = None) -> None:
        self.groups = groups if groups is not None else _foreach.Groups.of(grads)
        self.parts: list[tuple[torch.device, _foreach._Pick, _Segments | _Large, int, _foreach._Pick]] = []
        order: list[int] = []
        for device, _, positions, _ in self.groups.dense:
            limit = small_limit(device)
            large = [i for i in positions if grads[i].numel() > limit]
            small = [i for i in positions if grads[i].numel() <= limit]
            if small:
                segments = _Segments([grads[i].numel() for i in small], device)
                segments.chunked = all(grads[i].ndim and grads[i].numel() for i in small)
                self.parts.append((device, _foreach._picker(small, self.groups.count), segments, len(small), None))
            if large:
                # One measure per group for all of its large tensors at once (no launch per tensor).
                sizes = [grads[i].numel() for i in large]
                fused = LargeStats(sizes, device) if device.type in FOREACH_DEVICES else RowStats(sizes, device)
                self.parts.append((device, None, fused, 0, _foreach._picker(large, self.groups.count)))
            order += small + large
        self.sparse = self.groups.sparse
        order += list(self.sparse)
        inverse = [0] * len(order)
        for place, index in enumerate(order):
            inverse[index] = place
        self._inverse = None if order == list(range(len(order))) else inverse
        self._moved: dict[torch.device, Tensor] = {}

    @classmethod
    def of(cls, grads: Sequence[Tensor], groups: _foreach.Groups | None = None) -> FusedStats:
        """The layout of `grads`, from the cache when a list of the same kinds and sizes was seen before.

        `groups`: their grouping, if known (else it is found from the tensors)."""
        # The ranks too: a 0-d tensor and a 1-element one have one size but not one way of flattening (`flat`).
        key = (groups if groups is not None else _foreach.Groups.of(grads), tuple(map(Tensor.numel, grads)),
               tuple(map(Tensor.dim, grads)))  # fmt: skip
        found = cls._cache.get(key)
        if found is None:
            found = cls(grads, key[0])
            if len(cls._cache) >= cls._CACHE_SIZE:
                del cls._cache[next(iter(cls._cache))]
            cls._cache[key] = found
        return found

    def table(
        self, grads: Sequence[Tensor], params: Sequence[Tensor], device: torch.device, dtype: torch.dtype
    ) -> Tensor:
        """(P, len(DETAIL)) on `device`, in input order; no host sync."""
        # Under no_grad rather than one detach per tensor: no Python work per tensor on this path.
        with torch.no_grad():
            return self._table(grads, params, device, dtype)

    def _table(
        self, grads: Sequence[Tensor], params: Sequence[Tensor], device: torch.device, dtype: torch.dtype
    ) -> Tensor:
        blocks = []
        for _part_device, pick_small, segments, count, pick_large in self.parts:
            if pick_small is not None:
                block = _segment_stats(segments.flat(pick_small(grads)), segments.ids(), count)
            else:  # the large tensors' LargeStats or RowStats
                large = pick_large(grads)
                # In the table's own dtype (float64 but on MPS): a count above 2**24 is exact there, not in float32.
                block = segments.table(large, dtype)
            blocks.append(block.to(device, dtype))
        blocks += [_one_stats(grads[i]).to(device, dtype).unsqueeze(0) for i in self.sparse]
        table = torch.cat(blocks) if blocks else torch.zeros(0, 4, device=device, dtype=dtype)
        if self._inverse is not None:
            table = table.index_select(0, self._moved_inverse(device))
        if params and not self.sparse:  # dense gradients have their weight's kind: the weights group as they do
            weight = self.norms(params, device, dtype)
        elif params:
            weight = _foreach.Groups.of(params).stacked_norms(params, 2.0, at_least=torch.float32).to(device, dtype)
        else:
            weight = table[:, 0]
        # columns: max_abs, nonzero, weight_norm, nan, inf
        return torch.cat([table[:, :2], weight.unsqueeze(1), table[:, 2:]], 1)

    def norms(
        self, tensors: Sequence[Tensor], device: torch.device, dtype: torch.dtype, *, minus: list[Tensor] | None = None
    ) -> Tensor:  # fmt: skip
        """L2 norms (P,) of `tensors` laid out as the gradients are (the weights), on `device` in `dtype`, in
        input order; no host sync. With `minus` (a `snapshot`), the norms of ``minus - tensors``: `minus` is consumed.

        Small tensors: their squares summed per segment over one flattened buffer per group, in float64 (but on
        MPS): at least as exact as a per-tensor norm, not bit for bit the same; a GPU's ``index_add_`` may add in
        any order (the last bits may differ between runs). On a CPU, where a foreach norm costs a few microseconds
        per tensor, that is many times faster for tiny tensors (see `SMALL_CPU`). Large tensors: one foreach
        norm per group, as `_foreach.Groups` measures them.
        """
        with torch.no_grad():
            blocks = []
            for at, (part_device, pick_small, segments, count, pick_large) in enumerate(self.parts):
                if pick_small is not None:
                    flat = segments.flat(pick_small(tensors))
                    flat = minus[at].sub_(flat) if minus is not None else flat
                    exact = host_dtype(part_device)  # float64 where the part's device has it
                    sums = torch.zeros(count, device=flat.device, dtype=exact)
                    sums.index_add_(0, segments.ids(), flat.to(exact).square())
                    blocks.append(sums.sqrt_().to(device, dtype))
                else:
                    large = pick_large(tensors)
                    if minus is not None:
                        _foreach.apply(part_device, "sub_", minus[at], large)
                        large = minus[at]
                    norms = _foreach.Groups.of(large).stacked_norms(large, 2.0, at_least=torch.float32)
                    blocks.append(norms.to(device, dtype))
            for at, i in enumerate(self.sparse, len(self.parts)):  # (sparse weights are rare) one by one
                sparse = minus[at].sub_(tensors[i]) if minus is not None else tensors[i]
                norm = torch.linalg.vector_norm(
                    sparse.coalesce().values(), dtype=torch.promote_types(dtype, sparse.dtype)
                )
                blocks.append(norm.reshape(1).to(device, dtype))
            out = torch.cat(blocks) if blocks else torch.zeros(0, device=device, dtype=dtype)
            return out.index_select(0, self._moved_inverse(device)) if self._inverse is not None else out

    def snapshot(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """A copy of `tensors` (the weights before a step) for ``norms(..., minus=)``: one flat buffer per group of
        small tensors (one concatenation), the large ones copied with one foreach op per group."""
        with torch.no_grad():
            # x * 1 is x exactly (NaN, Inf and -0.0 included): foreach has no out-of-place copy.
            return [
                _flat_copy(pick_small(tensors), segments)
                if pick_small is not None
                else _foreach.apply(part_device, "mul", pick_large(tensors), 1)
                for part_device, pick_small, segments, _, pick_large in self.parts
            ] + [tensors[i].detach().clone() for i in self.sparse]

    def _moved_inverse(self, device: torch.device) -> Tensor:
        moved = self._moved.get(device)
        if moved is None:
            moved = self._moved[device] = from_host(self._inverse, device, torch.int64)
        return moved


class _Segments:
    """Which small tensor each element of a group's flat buffer belongs to, made when a detail step needs it.

    The ids take 8 bytes per element (int64: ``scatter_reduce_`` wants it), hundreds of MB for a model of many
    small tensors on a GPU, so only the tensors' lengths are kept between steps and the ids are one
    ``repeat_interleave`` per use (its output size is known: no host read).
    """

    __slots__ = ("lengths", "total", "chunked")

    def __init__(self, sizes: list[int], device: torch.device) -> None:
        self.lengths, self.total = from_host(sizes, device, torch.int64), sum(sizes)
        #: every member has a dimension and an element: `flat` may take the one-operator concatenation
        self.chunked = False

    def flat(self, members: list[Tensor]) -> Tensor:
        """The members' elements in one 1-D buffer: a new one from `concatenated` (always a copy); on the fallback
        path (a member with no dimension or no element), a view of the one member when it is alone and flat."""
        return concatenated(members) if self.chunked else torch._C._nn.flatten_dense_tensors(members)

    def ids(self) -> Tensor:
        """(total,) int64: the index of the tensor each element belongs to."""
        return torch.repeat_interleave(self.lengths, output_size=self.total)


def _flat_copy(tensors: list[Tensor], segments: _Segments) -> Tensor:
    """The tensors' elements in one new buffer (the concatenation of one tensor would be a view of it)."""
    flat = segments.flat(tensors)
    return flat.clone() if len(tensors) == 1 and flat.data_ptr() == tensors[0].data_ptr() else flat


def _segment_stats(flat: Tensor, segments: Tensor, count: int) -> Tensor:
    """(count, 4): max |g|, nonzero, NaN and Inf counts of each small tensor, over their flattened buffer `flat`."""
    out_dtype = torch.promote_types(flat.dtype, torch.float32)
    if flat.numel() == 0:
        return torch.zeros(count, 4, device=flat.device, dtype=out_dtype)
    max_abs = torch.zeros(count, device=flat.device, dtype=out_dtype)
    max_abs.scatter_reduce_(0, segments, flat.abs().to(out_dtype), "amax", include_self=False)
    flags = torch.stack([flat != 0, torch.isnan(flat), torch.isinf(flat)], 1).to(out_dtype)
    counts = torch.zeros(count, 3, device=flat.device, dtype=out_dtype).index_add_(0, segments, flags)
    return torch.cat([max_abs.unsqueeze(1), counts], 1)


def _one_stats(grad: Tensor) -> Tensor:
    """(4,): max |g|, nonzero, NaN and Inf counts of one tensor (one pass each)."""
    grad = grad.detach()
    if grad.is_sparse:
        grad = grad.coalesce().values()
    dtype = torch.promote_types(grad.dtype, torch.float32)
    if grad.numel() == 0:
        return torch.zeros(4, device=grad.device, dtype=dtype)
    # aminmax is one fast pass on every backend; the foreach inf-norm is ~10x slower on CPU.
    low, high = torch.aminmax(grad)
    counts = [torch.count_nonzero(grad), torch.isnan(grad).sum(), torch.isinf(grad).sum()]
    return torch.stack([torch.maximum(-low, high).to(dtype)] + [c.to(dtype) for c in counts])


def nonfinite_counts(grads: Sequence[Tensor], indices: Sequence[int]) -> dict[int, tuple[int, int]]:
    """(NaN count, Inf count) of the gradients at `indices`; one host read.

    Only called for parameters whose norm is not finite, so a healthy logging
    step never pays for it.
    """
    if not indices:
        return {}
    device = grads[indices[0]].device
    counts = torch.stack(
        [torch.stack([torch.isnan(grads[i]).sum(), torch.isinf(grads[i]).sum()]).to(device) for i in indices]
    )
    return {i: (int(nan), int(inf)) for i, (nan, inf) in zip(indices, counts.tolist())}


def histograms(names: Sequence[str], grads: Sequence[Tensor], modules: dict[str, dict], bins: int) -> dict[str, dict]:
    """Histograms of gradient values per module, binned on the device (``torch.histc``); one host read.

    Each module's range is ``[-max|g|, max|g|]`` from its statistics; modules
    with an all-zero or non-finite gradient are left out.

    Returns:
        module -> {min, max, num, sum, sum_squares, bucket_limits, bucket_counts},
        the arguments of ``SummaryWriter.add_histogram_raw``.
    """
    parts: dict[str, list[Tensor]] = {}
    for name, grad in zip(names, grads):
        module = module_of(name)
        limit = modules[module]["max_abs"]
        if not (math.isfinite(limit) and limit > 0):
            continue
        flat = grad.detach().reshape(-1).float()
        lo, hi = torch.aminmax(flat)
        parts.setdefault(module, []).append(
            torch.cat([torch.histc(flat, bins=bins, min=-limit, max=limit), torch.stack([lo, hi, flat.sum()])]).double()
        )
    if not parts:
        return {}
    order = list(parts)
    device = parts[order[0]][0].device
    table = torch.stack([_combine(parts[m], device) for m in order]).tolist()
    out = {}
    for module, row in zip(order, table):
        limit = modules[module]["max_abs"]
        counts, (lo, hi, total) = row[:bins], row[bins:]
        step = 2 * limit / bins
        out[module] = {
            "min": lo,
            "max": hi,
            "num": modules[module]["numel"],
            "sum": total,
            "sum_squares": modules[module]["norm"] ** 2,
            "bucket_limits": [-limit + step * (k + 1) for k in range(bins)],
            "bucket_counts": counts,
        }
    return out


def _combine(rows: list[Tensor], device: torch.device) -> Tensor:
    stacked = torch.stack([r.to(device) for r in rows])
    bins = stacked.shape[1] - 3
    return torch.cat(
        [
            stacked[:, :bins].sum(0),
            stacked[:, bins].min().reshape(1),
            stacked[:, bins + 1].max().reshape(1),
            stacked[:, bins + 2].sum().reshape(1),
        ]
    )
