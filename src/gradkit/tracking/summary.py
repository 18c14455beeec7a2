"""A logged step's per-parameter and per-module entries, built on the host from the read table, column by column.

At every=1 on a model with thousands of tensors, these entries are most of the tracker's host
work per logged step. They stay columns (one list per statistic, `entries.Entries`) from the read
table to the JSONL line: the arithmetic is a few numpy operations over whole float64 columns, module
sums are a few passes with the parameter-to-module layout found once per parameter list (`Layout`),
and the line is written from a kept template (`entries`). No dict per entry is built on the step's
path, so the step allocates little for Python's cyclic garbage collector to walk; dicts are made
only when someone asks for them (`Entries.to_dict`: `Tracker.history`, TensorBoard).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from operator import add, itemgetter
from typing import Any, NamedTuple

import numpy as np

from gradkit.tracking.entries import BLANK, FINITE, KEYS, NUMELS, ZEROS, Entries
from gradkit.tracking.stats import module_of

__all__ = ["KEYS", "Entries", "Layout", "summarize", "summarize_columns"]

# Padding may add up to this many slots per parameter before module sums take the per-module path.
_PAD_LIMIT = 2


class _Sizes(NamedTuple):
    """Element counts of a table's entries: as ints (the record's), as floats and their roots (the rates'
    denominators), and where they are zero (None when nowhere)."""

    numels: list[int]
    count: np.ndarray
    root: np.ndarray
    empty: np.ndarray | None

    @classmethod
    def of(cls, numels: list[int]) -> _Sizes:
        count = np.array(numels, dtype=np.float64)  # exact below 2**53, as int / float is
        empty = count == 0
        return cls(numels, count, np.sqrt(count), empty if empty.any() else None)


class _LayoutSizes(NamedTuple):
    params: _Sizes
    modules: _Sizes


class Layout:
    """Which module each parameter belongs to, and the names JSON-escaped: found once per parameter list.

    Module sums run as ``k`` passes over whole columns, where ``k`` is the most parameters a module
    has: pass ``j`` adds each module's ``j``-th parameter (a zero pad where it has fewer). With
    modules of very different sizes, the padding would cost more than it saves, and sums run per module.

    Args:
        names: the parameter names, in table order.

    Example:
        >>> layout = Layout.of(["0.weight", "0.bias", "1.weight"])
        >>> layout.modules, layout.module_sums([1.0, 2.0, 3.0])
        (['0', '1'], [3.0, 3.0])
    """

    _cache: dict[tuple[str, ...], Layout] = {}
    _CACHE_SIZE = 8

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.quoted = [json.dumps(name) for name in self.names]
        members: dict[str, list[int]] = {}
        for i, name in enumerate(self.names):
            members.setdefault(module_of(name), []).append(i)
        self.modules = list(members)
        self.modules_quoted = [json.dumps(name) for name in self.modules]
        self.members = list(members.values())
        widest = max(map(len, self.members), default=0)
        pad = len(self.names)  # the index of the pad appended to a column
        if widest * len(self.members) <= _PAD_LIMIT * len(self.names) + len(self.members):
            self.passes: list[itemgetter] | None = [
                _getter([m[j] if j < len(m) else pad for m in self.members]) for j in range(widest)
            ]
        else:
            self.passes = None
        # The same passes as index arrays into a padded numpy column (`sums`).
        self._takes = None
        if self.passes is not None:
            self._takes = [np.array([m[j] if j < len(m) else pad for m in self.members], dtype=np.intp)
                           for j in range(widest)]  # fmt: skip
        self._per_module = [_getter(m) for m in self.members]
        self._sizes: _LayoutSizes | None = None

    @classmethod
    def of(cls, names: Sequence[str]) -> Layout:
        """The layout of `names`, from a small cache (a model's names are the same every step)."""
        key = tuple(names)
        found = cls._cache.get(key)
        if found is None:
            if len(cls._cache) >= cls._CACHE_SIZE:
                cls._cache.pop(next(iter(cls._cache), None), None)  # another thread may have evicted it
            found = cls._cache[key] = cls(names)
        return found

    def sizes(self, numels: Sequence[int]) -> _LayoutSizes:
        """The element counts of the parameters and of the modules (kept while they stay the same)."""
        found = self._sizes
        if found is None or found.params.numels != list(numels):
            ints = list(map(int, numels))
            found = self._sizes = _LayoutSizes(_Sizes.of(ints), _Sizes.of(self.module_sums(ints)))
        return found

    def sums(self, column: np.ndarray) -> np.ndarray:
        """Per module, `column` (a 1-D float64 or int64 array) summed over its parameters in parameter order:
        the values `module_sums` gives, as an array of the same dtype."""
        if not self.members:
            return column[:0]
        if self._takes is None:
            return np.array(self.module_sums(column.tolist()), dtype=column.dtype)
        padded = np.concatenate([column, np.zeros(1, dtype=column.dtype)])
        total = padded[self._takes[0]]
        for take in self._takes[1:]:
            total += padded[take]
        return total

    def module_sums(self, column: list, pad: Any = 0) -> list:
        """Per module, `column` summed over its parameters in parameter order (`pad` fills the gaps)."""
        if not self.members:
            return []
        if self.passes is None:
            return [_sum(get(column)) for get in self._per_module]
        padded = column + [pad]
        total = self.passes[0](padded)
        for get in self.passes[1:]:
            total = list(map(add, total, get(padded)))
        return list(total)

    def module_max(self, column: list) -> list:
        """Per module, the max of `column` over its parameters; NaN if any of them is NaN."""
        if not self.members:
            return []
        if self.passes is not None and math.isfinite(sum(column)):  # no NaN: values are >= 0
            padded = column + [0.0]
            result = self.passes[0](padded)
            for get in self.passes[1:]:
                result = list(map(max, result, get(padded)))
            return list(result)
        out = []
        for get in self._per_module:
            values = get(column)
            out.append(math.nan if any(v != v for v in values) else max(values))
        return out

    def module_counts(self, column: list) -> list:
        """Per module, NaN or Inf counts summed over its parameters (None if any of them is unknown)."""
        if None not in column:
            return self.module_sums(column)
        per_module = [get(column) for get in self._per_module]
        return [None if None in values else _sum(values) for values in per_module]


def _sum(values: Sequence) -> Any:
    # In parameter order from the first value (ints stay ints, and float sums round as they always did).
    total = values[0]
    for value in values[1:]:
        total += value
    return total


def _getter(indices: list[int]) -> itemgetter:
    # itemgetter of one index returns the item, not a tuple: give it two and drop the extra.
    if len(indices) == 1:
        one = itemgetter(indices[0])
        return lambda values: (one(values),)
    return itemgetter(*indices)


def summarize_columns(
    layout: Layout, numels: Sequence[int], columns: Sequence[Sequence[float]] | np.ndarray,
    counts: dict[int, tuple[int, int]], *, deltas: Sequence[float] | None = None, strict: bool = True,
    detail: bool = True, short: bool = False,
) -> tuple[Entries, Entries]:  # fmt: skip
    """Per-parameter and per-module entries of a logged step, as columns.

    Module values combine their parameters: L2 norms as the root of the summed
    squares, max |g| as the max, counts as sums, RMS and the zero fraction over
    all of the module's elements. NaN/Inf counts come from the table (detail steps),
    else from `counts`, else they are 0 for a parameter with finite norms and None
    (unknown) for one without.

    The arithmetic runs over whole float64 columns (numpy), one IEEE operation per value as
    the plain per-entry formulas do it, and module sums add their parameters in parameter
    order: every value is bit for bit the one those formulas give.

    Args:
        layout: the parameters (`Layout.of(names)`).
        numels: their element counts.
        columns: the read table by column (`stats.COLUMNS`: norm_pre_clip, norm, max_abs,
            nonzero, weight_norm, nan, inf), one value per parameter each, as lists or one
            (C, P) array; or its first two columns only (an ordinary step's table: the others
            are not measured).
        counts: host-counted (NaN, Inf) by row, for rows without device counts.
        deltas: ||Δw|| per parameter: fills ``update_to_weight`` (None leaves it None).
        strict: non-finite floats become None (the record as written: strict JSON).
        detail: whether the table holds the detail columns (`stats.DETAIL`); without them,
            max |g|, the zero fraction, ||w|| and ||g||/||w|| are not measured (NaN, or None if `strict`).
        short: the table was measured in float32: strict entries are written with 9 significant digits
            (`Entries` ``short``).

    Returns:
        (params, modules) as `Entries`.

    Example:
        >>> params, modules = summarize_columns(Layout.of(names), numels, flight.values()["columns"], {})
        >>> modules.column("norm")
    """
    if not layout.names:
        return Entries([], [], [[] for _ in KEYS]), Entries([], [], [[] for _ in KEYS])
    table = np.asarray(columns, dtype=np.float64)
    if detail and len(table) == 2:  # told to read the detail columns of an ordinary step's table: not measured
        table = np.concatenate([table, np.full((5, table.shape[1]), math.nan)])
    sizes = layout.sizes(numels)
    short = short and strict  # the short text is strict JSON
    with np.errstate(all="ignore"):  # non-finite values are written as null (strict) or kept as NaN
        param_counts, module_counts = _counts(layout, table, counts)
        squares = [table[0] * table[0], table[1] * table[1]]
        if detail:
            squares.append(table[4] * table[4])
        mod_squares = [layout.sums(c) for c in squares]
        d = mod_d = None
        if deltas is not None:
            d = np.asarray(deltas, dtype=np.float64)
            mod_d = np.sqrt(layout.sums(d * d))
        if not detail:  # not measured: one shared column of blanks (nothing to compute, to clean, or to encode)
            params = _entries(
                layout.names, layout.quoted, squares, None, sizes.params, None, param_counts, d, strict, short
            )
            modules = _entries(
                layout.modules, layout.modules_quoted, mod_squares, None, sizes.modules, None, module_counts, mod_d,
                strict, short,
            )  # fmt: skip
            return params, modules
        zeros = sizes.params.count - table[3]
        max_abs = table[2]
        params = _entries(
            layout.names, layout.quoted, squares, max_abs, sizes.params, zeros, param_counts, d, strict, short
        )
        module_max = np.array(layout.module_max(max_abs.tolist()), dtype=np.float64)
        modules = _entries(
            layout.modules, layout.modules_quoted, mod_squares, module_max, sizes.modules, layout.sums(zeros),
            module_counts, mod_d, strict, short,
        )  # fmt: skip
    return params, modules


def summarize(
    names: Sequence[str], numels: Sequence[int], rows: Sequence[Sequence[float]], counts: dict[int, tuple[int, int]],
    *, deltas: Sequence[float] | None = None, strict: bool = False,
) -> tuple[dict[str, dict], dict[str, dict]]:  # fmt: skip
    """Per-parameter and per-module statistics as plain dicts, from the table's rows (`summarize_columns`).

    Returns:
        (params, modules): name -> {norm_pre_clip, norm, max_abs, rms, zero_frac,
        nan, inf, numel, weight_norm, grad_to_weight, update_to_weight}.

    Example:
        >>> params, modules = summarize(["0.weight"], [4], [[1.0, 1.0, 0.5, 4, 2.0, 0, 0]], {})
        >>> modules["0"]["norm"]
        1.0
    """
    if not names:
        return {}, {}
    columns = [list(c) for c in zip(*rows)]
    params, modules = summarize_columns(Layout(names), numels, columns, counts, deltas=deltas, strict=strict)
    return params.to_dict(), modules.to_dict()


class _Counts(NamedTuple):
    """The NaN and Inf counts of a table's entries, and what is known of them (`entries.ZEROS` or None)."""

    nan: list
    inf: list
    known: str | None


def _counts(layout: Layout, table: np.ndarray, counts: dict[int, tuple[int, int]]) -> tuple[_Counts, _Counts]:
    """NaN and Inf counts per parameter and per module: measured (ints), host-counted, 0 with finite norms,
    else None (a module's is None when one of its parameters' is)."""
    pre, norm = table[0], table[1]
    if len(table) > 5 and not np.isnan(table[5]).any():  # measured on the device (a detail step): all there
        nan, inf = _ints(table[5]), _ints(table[6])
        known = None if nan.any() or inf.any() else ZEROS
        return _Counts(nan.tolist(), inf.tolist(), known), _Counts(
            layout.sums(nan).tolist(), layout.sums(inf).tolist(), known
        )
    if not counts and np.isfinite(pre).all() and np.isfinite(norm).all():  # every norm finite: nothing to count
        zeros, module_zeros = [0] * len(pre), [0] * len(layout.modules)
        return _Counts(zeros, list(zeros), ZEROS), _Counts(module_zeros, list(module_zeros), ZEROS)
    isnan, isfinite = math.isnan, math.isfinite
    blank = [math.nan] * len(pre)
    measured = (table[5].tolist(), table[6].tolist()) if len(table) > 5 else (blank, blank)
    got = [
        (int(a), int(b)) if not isnan(a) else counts.get(i, (0, 0) if isfinite(p) and isfinite(n) else (None, None))
        for i, (p, n, a, b) in enumerate(zip(pre.tolist(), norm.tolist(), *measured))
    ]
    nan, inf = [a for a, _ in got], [b for _, b in got]
    return _Counts(nan, inf, None), _Counts(layout.module_counts(nan), layout.module_counts(inf), None)


def _ints(column: np.ndarray) -> np.ndarray:
    """Counts read as floats, as ints (``int`` of each value: a non-finite one raises, as ``int`` does)."""
    if np.isfinite(column).all():
        return column.astype(np.int64)
    return np.array(list(map(int, column.tolist())), dtype=np.int64)


def _entries(names, quoted, squares, max_abs, sizes, zeros, counts, deltas, strict, short) -> Entries:  # fmt: skip
    """Entries from the summed columns: squares of the norms before and after clipping (and, with `zeros`, of the
    weights), max |g|, the element counts (`_Sizes`), zero counts, NaN and Inf counts (`_Counts`) and ||Δw||,
    one statistic at a time, as the plain per-entry formulas give them (a rate over no elements is 0.0)."""
    pre, norm = np.sqrt(squares[0]), np.sqrt(squares[1])
    nones = (None,) * len(names)
    blank = (list(nones), BLANK) if strict else ([math.nan] * len(names), None)
    max_abs_c = zero_frac = weight_c = blank
    g2w = u2w = (list(nones), BLANK)
    if zeros is not None:  # a detail step: ||w||, max |g| and zero counts were measured
        weight = np.sqrt(squares[2])
        zero_frac = _floats(_rate(zeros, sizes.count, sizes), strict)
        max_abs_c, weight_c = _floats(max_abs, strict), _floats(weight, strict)
        g2w = _floats(norm / weight, strict, (weight > 0) & np.isfinite(norm) & np.isfinite(weight))
        if deltas is not None:
            u2w = _floats(deltas / weight, strict, weight > 0)
    pairs = [_floats(pre, strict), _floats(norm, strict), max_abs_c, _floats(_rate(norm, sizes.root, sizes), strict),
             zero_frac, (counts.nan, counts.known), (counts.inf, counts.known), (sizes.numels, NUMELS), weight_c, g2w,
             u2w]  # fmt: skip
    # What is known of a column holds for strict entries, the ones written as JSON.
    known = tuple(k if strict else None for _, k in pairs)
    return Entries(names, quoted, [c for c, _ in pairs], known, short=short)


def _floats(values: np.ndarray, strict: bool, valid: np.ndarray | None = None) -> tuple[list, str | None]:
    """`values` as a list, None where not `valid` and, if `strict`, where not finite; and whether the list is
    known to hold finite floats only (`FINITE`)."""
    out = values.tolist()
    keep = np.isfinite(values) if strict else None
    if valid is not None:
        keep = valid if keep is None else keep & valid
    if keep is None or keep.all():
        return out, FINITE
    for i in np.flatnonzero(~keep).tolist():
        out[i] = None
    return out, None


def _rate(values: np.ndarray, by: np.ndarray, sizes: _Sizes) -> np.ndarray:
    """`values` / `by`, and 0.0 for entries with no elements."""
    out = values / by
    if sizes.empty is not None:
        out[sizes.empty] = 0.0
    return out
