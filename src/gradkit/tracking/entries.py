"""A table of statistics entries (per parameter or per module) held as columns, and its JSON text.

A logged step's entries stay one list per statistic from the read table to the JSONL line. The
line is written from a template made once per kind of table and kept: the names, the keys and the
text that does not change from step to step (blank columns, zero NaN/Inf counts, the element counts)
are literal pieces, and a step joins them with the text of its values in one ``str.join``. Dicts are
made only when asked for (`Entries.to_dict`: `Tracker.history`, TensorBoard).

A value's text is its ``repr`` (what ``json.dumps`` writes for a float) or, for a table measured in
float32 (``short``), 9 significant digits for its floats (`short_text`): float32's round-trip precision, so
``numpy.float32`` of the value read back is the measured value, at 0.4-0.5 of ``repr``'s cost for the 17
digits a float32 value takes as a float64. A short table's dict holds its values as the text reads them
back, so `Tracker.history` equals the log.
"""

from __future__ import annotations

import json
from itertools import repeat
from typing import Any

__all__ = ["KEYS", "Entries", "BLANK", "ZEROS", "NUMELS", "FINITE"]

#: the keys of each entry, in order (`writers.STAT_FIELDS`)
KEYS = ("norm_pre_clip", "norm", "max_abs", "rms", "zero_frac", "nan", "inf", "numel", "weight_norm",
        "grad_to_weight", "update_to_weight")  # fmt: skip
# An entry's JSON text: its quoted name, then one value per key (its repr, or `short_text` in a short table).
_KEY_TEXT = [json.dumps(key) + ": " for key in KEYS]

#: What the maker of a table knows of a column, so that encoding need not scan it (`Entries` ``known``):
#: every value None; every value the int 0; the element counts (the same every step); finite floats or ints.
BLANK, ZEROS, NUMELS, FINITE = "blank", "zeros", "numels", "finite"


class Entries:
    """Statistics entries by name, held as one list per key (`KEYS`): strict JSON values (None for non-finite).

    Args:
        names: the entries' names; quoted: the same, JSON-escaped (``json.dumps(name)``).
        columns: one list per key of `KEYS`, one value per name.
        known: per column, what its maker knows of it (`BLANK`, `ZEROS`, `NUMELS`, `FINITE`) or None;
            None (the default) for every column: each is then scanned when encoded.
        short: the table was measured in float32: its floats are written with 9 significant digits
            (`short_text`) and its dict is its text read back.

    Example:
        >>> params, modules = summarize_columns(layout, numels, columns, {})
        >>> params.column("norm")[0], params.to_dict()["0.weight"]["norm"]
    """

    __slots__ = ("names", "quoted", "columns", "known", "short")

    def __init__(
        self, names: list[str], quoted: list[str], columns: list[list], known: tuple[str | None, ...] | None = None,
        *, short: bool = False,
    ) -> None:  # fmt: skip
        self.names, self.quoted, self.columns = names, quoted, columns
        self.known = known if known is not None else (None,) * len(columns)
        self.short = short

    def column(self, key: str) -> list:
        """The values of statistic `key`, in name order."""
        return self.columns[KEYS.index(key)]

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """name -> {key: value}, as the record holds them (a `short` table: as its text reads back)."""
        columns = self.columns
        if self.short:  # the values as their text reads back
            columns = list(map(_read_back, KEYS, columns))
        return dict(zip(self.names, map(dict, map(zip, [KEYS] * len(self.names), zip(*columns)))))

    def encode(self) -> str:
        """The JSON text of `to_dict()` (as ``json.dumps`` writes it; a `short` table's floats with 9 significant
        digits, which `to_dict` reads back), from the columns.

        The table's literal pieces come from its kept template (`_Template`); a step makes the text of its
        values only, column by column, and joins it with the pieces in one call. A float column equal to
        one written before (the norms after clipping of an unclipped step) reuses its text.
        """
        if not self.names:
            return "{}"
        kinds, values = [], []
        pre: tuple[list, list[str]] | None = None  # the norms before clipping and their text
        for key, column, known in zip(KEYS, self.columns, self.known):
            kind = known or _kind_of(key, column)
            if kind == BLANK:  # e.g. the detail statistics of an ordinary step: no value to format
                kinds.append(_NULL)
            elif kind == ZEROS:
                kinds.append(_ZERO)
            elif kind == NUMELS:  # element counts: the same every step, so their text is in the template
                kinds.append(tuple(column))
            elif kind == FINITE:  # floats and ints: repr or short_text (strict: no NaN or Infinity here)
                # Both norms are square roots (floats): equal columns have equal text.
                if key == "norm" and pre is not None and pre[0] == column:
                    text = pre[1]
                else:
                    text = short_text(column) if self.short and key not in _EXACT else list(map(repr, column))
                if key == "norm_pre_clip":
                    pre = (column, text)
                kinds.append(_TEXT)
                values.append(text)
            else:  # a few unknown values: their text one by one
                kinds.append(_TEXT)
                write = _short_one if self.short and key not in _EXACT else repr
                values.append(["null" if v is None else write(v) for v in column])
        pieces = _Template.of(self.quoted, tuple(kinds))
        if not values:
            return pieces[0]
        # The pieces at even places, the values' text between them, entry by entry and column by column.
        width = len(values)
        text = [""] * (2 * len(pieces) - 1)
        text[::2] = pieces
        for j, column_text in enumerate(values):
            text[2 * j + 1 :: 2 * width] = column_text
        return "".join(text)


# 9 significant digits (float32's round trip) in `format`'s general form without a type: like "%.9g", but fixed-point
# text keeps a digit after the point ("2.0", never "2" or "123456789."), so the text always reads back as a float. It
# costs 0.6-0.7 of "%.8e" (measured, best of 5: 30 us against 43 us for 148 values) and drops trailing zeros.
_SHORT = "{:.9}"
_ZERO_TEXT = {0.0: "0.0"}  # -0.0 too (equal keys): the norms and rates written here are never negative


def short_text(column: list[float]) -> list[str]:
    """The JSON text of floats measured in float32, 9 significant digits each (see the module's docstring).
    Python floats only (an int has no general format with a precision); counts keep their own text (`_EXACT`).

    One ``str.format`` over the whole column: 0.4-0.5 of ``repr``'s cost per value, the call's overhead
    paid once. Zeros (common: dead layers, unused parameters, zero fractions) are literal ``0.0`` in the format;
    the format is found with no Python work per value (``map`` of a dict lookup).

    Example:
        >>> short_text([1 / 3, 0.0, 2.0, 1e-05])
        ['0.333333333', '0.0', '2.0', '1e-05']
    """
    if not column:
        return []
    form = ",".join(map(_ZERO_TEXT.get, column, repeat(_SHORT)))
    return form.format(*filter(None, column)).split(",")


def _short_one(value: float) -> str:
    """One value's `short_text` (a column that also holds None is written value by value)."""
    return _ZERO_TEXT.get(value) or _SHORT.format(value)


def _read_back(key: str, column: list) -> list:
    """A short table's column as its text reads back: floats at 9 significant digits; counts and None as they are."""
    if key in _EXACT or not column:
        return column
    if None in column:
        return [None if v is None else float(_short_one(v)) for v in column]
    return list(map(float, short_text(column)))


def _kind_of(key: str, column: list) -> str | None:
    """What a column holds, found by scanning it (`Entries.known`); None when some values are None."""
    nones = column.count(None)
    if nones == len(column):
        return BLANK
    if key in _COUNTS and column.count(0) == len(column):  # ints: no NaN or Inf anywhere
        return ZEROS
    if key == "numel":
        return NUMELS
    return None if nones else FINITE


# How a column is written in a table's template: as null, as 0, as the text of its values (a gap between
# two pieces), or (a tuple) as the given values, constant per table.
_NULL, _ZERO, _TEXT = "null", "0", None
_COUNTS = frozenset(("nan", "inf"))
_EXACT = _COUNTS | {"numel"}  # ints, written as they are in a short table too


class _Template:
    """The literal pieces of a whole table of entries, by names and column kinds; a small cache (a model's
    tables have the same names and kinds step after step)."""

    _cache: dict[tuple, tuple[list[str], list[str]]] = {}
    _CACHE_SIZE = 16

    @classmethod
    def of(cls, quoted: list[str], kinds: tuple) -> list[str]:
        """The pieces between which the values' text goes: one more than values, entry by entry."""
        key = (id(quoted), kinds)
        found = cls._cache.get(key)
        if found is not None and found[0] is quoted:  # the names list is held, so its id is not reused
            return found[1]
        if len(cls._cache) >= cls._CACHE_SIZE:
            cls._cache.pop(next(iter(cls._cache), None), None)  # another thread may have evicted it
        pieces = cls._make(quoted, kinds)
        cls._cache[key] = (quoted, pieces)
        return pieces

    @staticmethod
    def _make(quoted: list[str], kinds: tuple) -> list[str]:
        pieces, text = [], ["{"]
        for i, name in enumerate(quoted):
            text.append((", " if i else "") + name + ": {")
            for k, (key, kind) in enumerate(zip(_KEY_TEXT, kinds)):
                text.append((", " if k else "") + key)
                if kind is _TEXT:  # a gap: the piece so far ends here
                    pieces.append("".join(text))
                    text = []
                else:
                    text.append(repr(kind[i]) if type(kind) is tuple else kind)
            text.append("}")
        text.append("}")
        pieces.append("".join(text))
        return pieces
