"""A logged step's per-parameter and per-module entries, built on the host from the read table, column by column.

At every=1 on a model with thousands of tensors, these entries are most of the tracker's host
work per logged step. They stay columns (one list per statistic, `Entries`) from the read table
to the JSONL line: module sums are a few passes over whole columns with the parameter-to-module
layout found once per parameter list (`Layout`), and the line is encoded with one %-template per
entry kind, the names already JSON-escaped. No dict per entry is built on the step's path, so the
step allocates little for Python's cyclic garbage collector to walk; dicts are made only when
someone asks for them (`Entries.to_dict`: `Tracker.history`, TensorBoard).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from itertools import chain
from operator import add, itemgetter
from typing import Any

from gradkit.tracking.stats import module_of

__all__ = ["KEYS", "Entries", "Layout", "summarize", "summarize_columns"]

#: the keys of each entry, in order (`writers.STAT_FIELDS`)
KEYS = ("norm_pre_clip", "norm", "max_abs", "rms", "zero_frac", "nan", "inf", "numel", "weight_norm",
        "grad_to_weight", "update_to_weight")  # fmt: skip
# An entry's JSON text: its quoted name, then one "%r" per key (a value's repr is its JSON text).
_KEY_TEXT = [json.dumps(key) + ": " for key in KEYS]
# Padding may add up to this many slots per parameter before module sums take the per-module path.
_PAD_LIMIT = 2


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
        self._per_module = [_getter(m) for m in self.members]

    @classmethod
    def of(cls, names: Sequence[str]) -> Layout:
        """The layout of `names`, from a small cache (a model's names are the same every step)."""
        key = tuple(names)
        found = cls._cache.get(key)
        if found is None:
            if len(cls._cache) >= cls._CACHE_SIZE:
                del cls._cache[next(iter(cls._cache))]
            found = cls._cache[key] = cls(names)
        return found

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


class Entries:
    """Statistics entries by name, held as one list per key (`KEYS`): strict JSON values (None for non-finite).

    Example:
        >>> params, modules = summarize_columns(layout, numels, columns, {})
        >>> params.column("norm")[0], params.to_dict()["0.weight"]["norm"]
    """

    __slots__ = ("names", "quoted", "columns")

    def __init__(self, names: list[str], quoted: list[str], columns: list[list]) -> None:
        self.names, self.quoted, self.columns = names, quoted, columns

    def column(self, key: str) -> list:
        """The values of statistic `key`, in name order."""
        return self.columns[KEYS.index(key)]

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """name -> {key: value}, as the record holds them."""
        return dict(zip(self.names, map(dict, map(zip, [KEYS] * len(self.names), zip(*self.columns)))))

    def encode(self) -> str:
        """The JSON text of `to_dict()` (as ``json.dumps`` writes it), from the columns.

        One %-template for the whole table (`_Template`), made once per kind of table and kept: it holds
        the names, the keys and whatever text does not change from step to step (blank columns, zero
        NaN/Inf counts, the element counts), so a step formats only its floats, in one call. A float
        column equal to one formatted before (the norms after clipping of an unclipped step) reuses its text.
        """
        if not self.names:
            return "{}"
        kinds, values = [], []
        pre: tuple[list, list[str]] | None = None  # the norms before clipping and their text
        for key, column in zip(KEYS, self.columns):
            nones = column.count(None)
            if nones == len(column):  # e.g. the detail statistics of an ordinary step: no value to format
                kinds.append(_NULL)
            elif key in _COUNTS and column.count(0) == len(column):  # ints: no NaN or Inf anywhere
                kinds.append(_ZERO)
            elif key == "numel":  # element counts: the same every step, so their text is in the template
                kinds.append(tuple(column))
            elif nones:  # a few unknown values: their text one by one
                kinds.append(_TEXT)
                values.append(["null" if v is None else repr(v) for v in column])
            else:  # floats and ints: repr is their JSON text (strict: no NaN or Infinity here)
                # Both norms are square roots (floats): equal columns have equal text.
                text = pre[1] if key == "norm" and pre is not None and pre[0] == column else list(map(repr, column))
                if key == "norm_pre_clip":
                    pre = (column, text)
                kinds.append(_TEXT)
                values.append(text)
        # One call formats the whole table; the template's %% (a name with %) become % here too.
        return _Template.of(self.quoted, tuple(kinds)) % tuple(chain.from_iterable(zip(*values)))


# How a column is written in a table's template: as null, as 0, as the text of its values (one %s each),
# or (a tuple) as the given values, constant per table.
_NULL, _ZERO, _TEXT = "null", "0", "%s"
_COUNTS = frozenset(("nan", "inf"))


class _Template:
    """The %-template of a whole table of entries, by names and column kinds; a small cache (a model's
    tables have the same names and kinds step after step)."""

    _cache: dict[tuple, tuple[list[str], str]] = {}
    _CACHE_SIZE = 16

    @classmethod
    def of(cls, quoted: list[str], kinds: tuple) -> str:
        key = (id(quoted), kinds)
        found = cls._cache.get(key)
        if found is not None and found[0] is quoted:  # the names list is held, so its id is not reused
            return found[1]
        if len(cls._cache) >= cls._CACHE_SIZE:
            del cls._cache[next(iter(cls._cache))]
        template = cls._make(quoted, kinds)
        cls._cache[key] = (quoted, template)
        return template

    @staticmethod
    def _make(quoted: list[str], kinds: tuple) -> str:
        entries = []
        for i, name in enumerate(quoted):
            fields = []
            for key, kind in zip(_KEY_TEXT, kinds):
                fields.append(key + (repr(kind[i]) if type(kind) is tuple else kind))
            entries.append(name.replace("%", "%%") + ": {" + ", ".join(fields) + "}")
        return "{" + ", ".join(entries) + "}"


def summarize_columns(
    layout: Layout, numels: Sequence[int], columns: Sequence[list], counts: dict[int, tuple[int, int]],
    *, deltas: Sequence[float] | None = None, strict: bool = True, detail: bool = True,
) -> tuple[Entries, Entries]:  # fmt: skip
    """Per-parameter and per-module entries of a logged step, as columns.

    Module values combine their parameters: L2 norms as the root of the summed
    squares, max |g| as the max, counts as sums, RMS and the zero fraction over
    all of the module's elements. NaN/Inf counts come from the table (detail steps),
    else from `counts`, else they are 0 for a parameter with finite norms and None
    (unknown) for one without.

    Args:
        layout: the parameters (`Layout.of(names)`).
        numels: their element counts.
        columns: the read table by column (`stats.COLUMNS`: norm_pre_clip, norm, max_abs,
            nonzero, weight_norm, nan, inf), one value per parameter each; or its first two
            columns only (an ordinary step's table: the others are not measured).
        counts: host-counted (NaN, Inf) by row, for rows without device counts.
        deltas: ||Δw|| per parameter: fills ``update_to_weight`` (None leaves it None).
        strict: non-finite floats become None (the record as written: strict JSON).
        detail: whether the table holds the detail columns (`stats.DETAIL`); without them,
            max |g|, the zero fraction, ||w|| and ||g||/||w|| are not measured (NaN, or None if `strict`).

    Returns:
        (params, modules) as `Entries`.
    """
    if not layout.names:
        return Entries([], [], [[] for _ in KEYS]), Entries([], [], [[] for _ in KEYS])
    if len(columns) == 2:  # an ordinary step's table: the norms only, the rest not measured
        blank = [math.nan] * len(layout.names)
        columns = [*columns, blank, blank, blank, blank, blank]
    pre, norm, max_abs, nonzero, weight, nan, inf = (list(c) for c in columns)
    numels = list(map(int, numels))
    nan, inf = _counts(pre, norm, nan, inf, counts)
    squares = [_squares(pre), _squares(norm)]
    mod_squares = [layout.module_sums(c, 0.0) for c in squares]
    mod_numels = layout.module_sums(numels)
    mod_deltas = None
    if deltas is not None:
        mod_deltas = list(map(math.sqrt, layout.module_sums(_squares(list(deltas)), 0.0)))
    nan_m, inf_m = layout.module_counts(nan), layout.module_counts(inf)
    if not detail:  # not measured: one shared column of blanks (nothing to compute, to clean, or to encode)
        params = _entries(layout.names, layout.quoted, squares, None, numels, None, nan, inf, deltas, strict)
        modules = _entries(
            layout.modules, layout.modules_quoted, mod_squares, None, mod_numels, None, nan_m, inf_m, mod_deltas, strict
        )  # fmt: skip
        return params, modules
    zeros = [k - z for k, z in zip(numels, nonzero)]
    squares.append(_squares(weight))
    mod_squares.append(layout.module_sums(squares[2], 0.0))
    params = _entries(layout.names, layout.quoted, squares, max_abs, numels, zeros, nan, inf, deltas, strict)
    modules = _entries(
        layout.modules, layout.modules_quoted, mod_squares, layout.module_max(max_abs), mod_numels,
        layout.module_sums(zeros, 0.0), nan_m, inf_m, mod_deltas, strict,
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


def _squares(column: list) -> list:
    return [x * x for x in column]


def _counts(pre, norm, nan, inf, counts) -> tuple[list, list]:
    """NaN and Inf counts per row: measured (ints), host-counted, 0 with finite norms, else None."""
    isnan, isfinite = math.isnan, math.isfinite
    if not isnan(sum(nan)):  # measured on the device (a detail step): every count is there
        return list(map(int, nan)), list(map(int, inf))
    if not counts and isfinite(sum(pre)) and isfinite(sum(norm)):  # every norm finite: nothing to count
        zeros = [0] * len(pre)
        return zeros, list(zeros)
    got = [
        (int(a), int(b)) if not isnan(a) else counts.get(i, (0, 0) if isfinite(p) and isfinite(n) else (None, None))
        for i, (p, n, a, b) in enumerate(zip(pre, norm, nan, inf))
    ]
    return [a for a, _ in got], [b for _, b in got]


def _entries(
    names, quoted, squares, max_abs, numels, zeros, nan, inf, deltas, strict
) -> Entries:  # fmt: skip
    """Entries from the summed columns (squares of the norms before and after clipping and of the weights,
    max |g|, element and zero counts, NaN, Inf), one statistic at a time."""
    sqrt, isfinite = math.sqrt, math.isfinite
    pre, norm = list(map(sqrt, squares[0])), list(map(sqrt, squares[1]))
    rms = [n / sqrt(k) if k else 0.0 for n, k in zip(norm, numels)]
    blank = [None if strict else math.nan] * len(names)
    if zeros is None:  # an ordinary step: the detail statistics were not measured
        max_abs, zero_frac, weight, g2w = blank, blank, blank, [None] * len(names)
    else:
        weight = list(map(sqrt, squares[2]))
        zero_frac = [z / k if k else 0.0 for z, k in zip(zeros, numels)]
        g2w = [n / w if w > 0 and isfinite(n) and isfinite(w) else None for n, w in zip(norm, weight)]
    if deltas is None or zeros is None:  # ||w|| is measured on detail steps only
        u2w = [None] * len(names)
    else:
        u2w = [d / w if w > 0 else None for d, w in zip(deltas, weight)]
    columns = [pre, norm, list(max_abs), rms, zero_frac, nan, inf, numels, weight, g2w, u2w]
    if strict:
        columns = [_strict(c) for c in columns]
    return Entries(names, quoted, columns)


def _strict(column: list) -> list:
    """`column` with non-finite floats as None (strict JSON); a column summing to a finite value is left as is."""
    if column.count(None) == len(column):  # a blank column: nothing to clean
        return column
    try:
        if math.isfinite(sum(column)):  # every statistic is >= 0: a finite sum means every value is finite
            return column
    except TypeError:  # None or ints among the values
        pass
    isfinite = math.isfinite
    return [v if type(v) is not float or isfinite(v) else None for v in column]
