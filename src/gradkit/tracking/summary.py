"""A logged step's per-parameter and per-module entries, built on the host from the read table, column by column.

At every=1 on a model with thousands of tensors, these entries are most of the tracker's host
work per logged step. They are built one statistic at a time over all rows (list comprehensions
over columns, no call per value), the module sums in one loop, and, for the record, with
non-finite values already null (strict JSON) and the update ratios filled in, so that the record
is not walked again before it is written.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from gradkit.tracking.stats import ROOT

__all__ = ["KEYS", "summarize"]

#: the keys of each entry, in order (`writers.STAT_FIELDS`)
KEYS = ("norm_pre_clip", "norm", "max_abs", "rms", "zero_frac", "nan", "inf", "numel", "weight_norm",
        "grad_to_weight", "update_to_weight")  # fmt: skip


def summarize(
    names: Sequence[str], numels: Sequence[int], rows: Sequence[Sequence[float]], counts: dict[int, tuple[int, int]],
    *, deltas: Sequence[float] | None = None, strict: bool = False,
) -> tuple[dict[str, dict], dict[str, dict]]:  # fmt: skip
    """Per-parameter and per-module statistics as plain dicts (host side).

    Module values combine their parameters: L2 norms as the root of the summed
    squares, max |g| as the max, counts as sums, RMS and the zero fraction over
    all of the module's elements. NaN/Inf counts come from the rows (detail steps),
    else from `counts`, else they are 0 for a parameter with finite norms and None
    (unknown) for one without.

    Args:
        names, numels: the parameters, in table order.
        rows: the read table (`stats.param_stats`), one row per parameter.
        counts: host-counted (NaN, Inf) by row, for rows without device counts.
        deltas: ||Δw|| per parameter: fills ``update_to_weight`` (None leaves it None).
        strict: non-finite floats become None (the record as written: strict JSON).

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
    pre, norm, max_abs, nonzero, weight, nan, inf = zip(*rows)
    nan, inf = _counts(pre, norm, nan, inf, counts)
    zeros = [k - z for k, z in zip(numels, nonzero)]
    sq = (
        [x * x for x in pre], [x * x for x in norm], list(max_abs), list(numels), zeros, nan, inf,
        [x * x for x in weight],
    )  # fmt: skip
    module_names, module_sq = _module_sums(names, sq)
    params = _entries(names, sq, deltas, strict)
    if deltas is not None:
        delta_sq = _module_sums(names, ([d * d for d in deltas],))[1][0]
        deltas = [math.sqrt(d) for d in delta_sq]
    modules = _entries(module_names, module_sq, deltas, strict)
    return params, modules


def _counts(pre, norm, nan, inf, counts) -> tuple[list, list]:
    """NaN and Inf counts per row: measured (ints), host-counted, 0 with finite norms, else None."""
    isnan, isfinite = math.isnan, math.isfinite
    if not any(map(isnan, nan)):
        return list(map(int, nan)), list(map(int, inf))
    got = [
        (int(a), int(b)) if not isnan(a) else counts.get(i, (0, 0) if isfinite(p) and isfinite(n) else (None, None))
        for i, (p, n, a, b) in enumerate(zip(pre, norm, nan, inf))
    ]
    return [a for a, _ in got], [b for _, b in got]


def _module_sums(names: Sequence[str], columns: Sequence[list]) -> tuple[list[str], list[list]]:
    """Per module (first appearance order): columns summed over its parameters, in parameter order.

    With all eight statistic columns, they are combined as the entries need: squares, element
    and zero counts summed, max |g| as the max, NaN/Inf counts summed (None if any is unknown).
    """
    order: dict[str, list] = {}
    isnan = math.isnan
    full = len(columns) == 8
    for i, name in enumerate(names):
        module = name.rpartition(".")[0] or ROOT
        acc = order.get(module)
        if acc is None:
            order[module] = [c[i] for c in columns]
            continue
        if not full:
            acc[0] += columns[0][i]
            continue
        acc[0] += columns[0][i]
        acc[1] += columns[1][i]
        value = columns[2][i]
        acc[2] = value if isnan(value) or isnan(acc[2]) else max(acc[2], value)
        acc[3] += columns[3][i]
        acc[4] += columns[4][i]
        nan, inf = columns[5][i], columns[6][i]
        acc[5] = None if acc[5] is None or nan is None else acc[5] + nan
        acc[6] = None if acc[6] is None or inf is None else acc[6] + inf
        acc[7] += columns[7][i]
    names_out = list(order)
    return names_out, [list(c) for c in zip(*order.values())] if order else [[] for _ in columns]


def _entries(names: Sequence[str], sq: Sequence[list], deltas: Sequence[float] | None, strict: bool) -> dict:
    """Entries by name from the summed columns (squares of the norms, max |g|, element and zero counts, NaN,
    Inf, squared weight norm), one statistic at a time."""
    pre_sq, norm_sq, max_abs, numels, zeros, nan, inf, w_sq = sq
    sqrt, isfinite = math.sqrt, math.isfinite
    pre = [sqrt(x) for x in pre_sq]
    norm = [sqrt(x) for x in norm_sq]
    weight = [sqrt(x) for x in w_sq]
    rms = [n / sqrt(k) if k else 0.0 for n, k in zip(norm, numels)]
    zero_frac = [z / k if k else 0.0 for z, k in zip(zeros, numels)]
    g2w = [n / w if w > 0 and isfinite(n) and isfinite(w) else None for n, w in zip(norm, weight)]
    if deltas is None:
        u2w = [None] * len(names)
    else:
        u2w = [d / w if w > 0 else None for d, w in zip(deltas, weight)]
    columns = [pre, norm, max_abs, rms, zero_frac, nan, inf, list(map(int, numels)), weight, g2w, u2w]
    if strict:
        columns = [_strict(c) for c in columns]
    return dict(zip(names, map(dict, map(zip, [KEYS] * len(names), zip(*columns)))))


def _strict(column: list) -> list:
    """`column` with non-finite floats as None (strict JSON); a column summing to a finite value is left as is."""
    try:
        if math.isfinite(sum(column)):  # every statistic is >= 0: a finite sum means every value is finite
            return column
    except TypeError:  # None or ints among the values
        pass
    isfinite = math.isfinite
    return [v if type(v) is not float or isfinite(v) else None for v in column]
