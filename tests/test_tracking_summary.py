"""The host-side entries of a logged step (tracking/summary.py): module sums, counts, update ratios, strict JSON."""

import json
import math

import numpy as np
import pytest

from gradkit.tracking.entries import short_text
from gradkit.tracking.summary import KEYS, Layout, summarize, summarize_columns
from gradkit.tracking.writers import STAT_FIELDS, clean

NAMES = ["a.weight", "a.bias", "b.weight", "top"]
NUMELS = [6, 2, 4, 3]
NAN, INF = math.nan, math.inf


def rows(detail=True):
    # columns: norm_pre_clip, norm, max_abs, nonzero, weight_norm, nan, inf
    table = [[3.0, 1.5, 2.0, 5, 4.0, 0, 0], [4.0, 2.0, 3.0, 2, 0.0, 0, 0], [0.0, 0.0, 0.0, 0, 2.0, 0, 0],
             [1.0, 0.5, 0.7, 3, 1.0, 0, 0]]  # fmt: skip
    if not detail:
        table = [r[:2] + [NAN] * 5 for r in table]
    return table


def test_modules_combine_their_parameters():
    params, modules = summarize(NAMES, NUMELS, rows(), {}, deltas=[0.3, 0.4, 0.0, 0.1])
    assert list(params) == NAMES and list(modules) == ["a", "b", "(root)"]
    assert set(params["a.weight"]) == set(KEYS) == set(STAT_FIELDS)
    a = modules["a"]
    assert a["norm_pre_clip"] == pytest.approx(5.0) and a["norm"] == pytest.approx(2.5)
    assert a["max_abs"] == 3.0 and a["numel"] == 8 and a["zero_frac"] == pytest.approx(1 / 8)
    assert a["rms"] == pytest.approx(2.5 / math.sqrt(8)) and a["weight_norm"] == pytest.approx(4.0)
    assert a["update_to_weight"] == pytest.approx(0.5 / 4.0) and a["grad_to_weight"] == pytest.approx(2.5 / 4.0)
    assert params["a.bias"]["update_to_weight"] is None and params["a.bias"]["grad_to_weight"] is None  # ||w|| = 0
    assert modules["b"]["zero_frac"] == 1.0 and modules["b"]["nan"] == 0 and isinstance(modules["b"]["nan"], int)


def test_counts_unknown_without_device_counts_and_non_finite_norms():
    table = rows(detail=False)
    table[1][0] = NAN
    params, modules = summarize(NAMES, NUMELS, table, {})
    assert params["a.weight"]["nan"] == 0 and params["a.bias"]["nan"] is None and modules["a"]["nan"] is None
    params, modules = summarize(NAMES, NUMELS, table, {1: (2, 1)})  # counted on the host
    assert params["a.bias"]["nan"] == 2 and modules["a"]["inf"] == 1


@pytest.mark.parametrize("detail", [True, False])
@pytest.mark.parametrize("bad", [None, (0, 0, NAN), (1, 2, INF), (3, 4, 1e308)])
def test_strict_entries_equal_the_cleaned_ones_and_are_strict_json(detail, bad):
    table = rows(detail)
    if bad is not None:
        row, column, value = bad
        table[row][column] = value
    deltas = [0.3, INF, 0.0, 0.1]
    loose = summarize(NAMES, NUMELS, table, {}, deltas=deltas)
    strict = summarize(NAMES, NUMELS, table, {}, deltas=deltas, strict=True)
    assert list(strict) == clean(loose)
    json.dumps(strict, allow_nan=False)  # raises on NaN/Infinity


def test_no_parameters():
    assert summarize([], [], [], {}) == ({}, {})


def columns_of(table):
    return [list(c) for c in zip(*table)]


@pytest.mark.parametrize("detail", [True, False])
@pytest.mark.parametrize("bad", [None, (0, 0, NAN), (1, 2, INF), (2, 1, INF)])
def test_encoded_entries_are_what_json_writes_for_their_dicts(detail, bad):
    names = NAMES + ['é"q.w', "a.extra"]  # an escaped name; a module whose parameters are not contiguous
    table = rows(detail) + [[1.0, 1.0, 0.5, 1, 1.0, 0, 0], [2.0, 2.0, 1.0, 2, 3.0, 0, 0]]
    if not detail:
        table = [r[:2] + [NAN] * 5 for r in table]
    if bad is not None:
        row, column, value = bad
        table[row][column] = value
    layout = Layout(names)
    params, modules = summarize_columns(layout, NUMELS + [1, 2], columns_of(table), {}, deltas=[0.1] * 6)
    for entries in (params, modules):
        assert entries.encode() == json.dumps(entries.to_dict(), allow_nan=False)
        assert json.loads(entries.encode()) == entries.to_dict()
    assert list(modules.to_dict()) == ["a", "b", "(root)", 'é"q']
    assert modules.to_dict()["a"]["numel"] == 6 + 2 + 2


def test_module_sums_padded_and_per_module_agree():
    # Many one-parameter modules and one wide module: padding would cost more than it saves, so sums run per module.
    names = [f"m{i}.w" for i in range(8)] + [f"wide.p{i}" for i in range(30)]
    wide, padded = Layout(names), Layout(names[:8] + names[8:10])
    assert wide.passes is None and padded.passes is not None
    values = [float(i) for i in range(len(names))]
    assert wide.module_sums(values) == values[:8] + [sum(values[8:])]
    assert padded.module_sums(values[:10]) == values[:8] + [values[8] + values[9]]
    assert wide.module_max(values[:8] + [NAN] + values[9:])[:8] == values[:8]
    assert math.isnan(wide.module_max(values[:8] + [NAN] + values[9:])[8])
    assert padded.module_counts([0] * 9 + [None]) == [0] * 8 + [None]


@pytest.mark.parametrize("strict", [True, False])
def test_an_ordinary_step_gives_the_entries_of_its_unmeasured_table(strict):
    # Told that the detail columns were not measured, the entries are those the NaN columns give.
    table = rows(detail=False)
    layout = Layout(NAMES)
    for deltas in (None, [0.0] * 4):
        told = summarize_columns(layout, NUMELS, columns_of(table), {}, deltas=deltas, strict=strict, detail=False)
        read = summarize_columns(layout, NUMELS, columns_of(table), {}, deltas=deltas, strict=strict)
        assert json.dumps([e.to_dict() for e in told]) == json.dumps([e.to_dict() for e in read])
        assert told[1].encode() == json.dumps(read[1].to_dict()) or not strict


@pytest.mark.parametrize("clipped", [False, True])
def test_encoding_of_a_table_kept_from_step_to_step(clipped):
    # The template of a table is kept between steps: names with %, equal norm columns (an unclipped step),
    # other element counts and counts that stop being zero must all still encode as json.dumps does.
    names = ["a%s.w", "a%s.b", "b%%d.w", "c.w"]
    layout = Layout(names)
    coef = 0.5 if clipped else 1.0
    for step, (numels, nan) in enumerate([([4, 2, 3, 1], 0), ([4, 2, 3, 1], 0), ([4, 2, 3, 1], 2), ([5, 2, 3, 1], 0)]):
        pre = [1.0 + step, 0.1 * (step + 1), 3.3, 0.0]
        table = [[p, p * coef, NAN, NAN, NAN, float(nan) if i == 1 else NAN, NAN] for i, p in enumerate(pre)]
        for detail in (False, True):
            if detail:
                table = [r[:2] + [r[0], 1.0, 2.0, float(nan) if i == 1 else 0.0, 0.0] for i, r in enumerate(table)]
            params, modules = summarize_columns(layout, numels, columns_of(table), {}, detail=detail)
            for entries in (params, modules):
                assert entries.encode() == json.dumps(entries.to_dict(), allow_nan=False)
    assert list(json.loads(params.encode())) == names


def _plain_entries(names, numels, columns, counts, deltas, detail):
    """The entries as plainly written, one parameter and one module at a time, in Python floats (strict)."""
    from gradkit.tracking.stats import module_of

    p = len(names)
    pre, norm = columns[0], columns[1]
    max_abs, nonzero, weight, nan, inf = columns[2:] if len(columns) == 7 else [[NAN] * p] * 5
    clean = lambda v: v if type(v) is not float or math.isfinite(v) else None  # noqa: E731
    rows = []
    for i in range(p):
        if not math.isnan(nan[i]):
            n, f = int(nan[i]), int(inf[i])
        else:
            n, f = counts.get(i, (0, 0) if math.isfinite(pre[i]) and math.isfinite(norm[i]) else (None, None))
        rows.append((pre[i] * pre[i], norm[i] * norm[i], max_abs[i], numels[i] - nonzero[i], weight[i] * weight[i],
                     n, f, numels[i], None if deltas is None else deltas[i]))  # fmt: skip
    groups = {}
    for name, row in zip(names, rows):
        groups.setdefault(module_of(name), []).append(row)

    def combine(members):
        total = list(members[0])
        for row in members[1:]:
            for k in (0, 1, 3, 4, 7):
                total[k] += row[k]
            total[2] = math.nan if math.isnan(total[2]) or math.isnan(row[2]) else max(total[2], row[2])
            total[5] = None if None in (total[5], row[5]) else total[5] + row[5]
            total[6] = None if None in (total[6], row[6]) else total[6] + row[6]
            total[8] = None if deltas is None else total[8] + row[8]
        return total

    def entry(row, delta):
        s_pre, s_norm, m, zeros, s_w, n, f, k, _ = row
        g, w = math.sqrt(s_norm), math.sqrt(s_w)
        out = {"norm_pre_clip": math.sqrt(s_pre), "norm": g, "max_abs": m if detail else None,
               "rms": g / math.sqrt(k) if k else 0.0, "zero_frac": (zeros / k if k else 0.0) if detail else None,
               "nan": n, "inf": f, "numel": k, "weight_norm": w if detail else None,
               "grad_to_weight": g / w if detail and w > 0 and math.isfinite(g) and math.isfinite(w) else None,
               "update_to_weight": delta / w if detail and delta is not None and w > 0 else None}  # fmt: skip
        return {key: clean(v) for key, v in out.items()}

    squared = [None if deltas is None else d * d for d in (deltas or [None] * p)]
    params = {name: entry(row, None if deltas is None else deltas[i]) for i, (name, row) in enumerate(zip(names, rows))}
    modules = {}
    for module in groups:
        members = [i for i, name in enumerate(names) if module_of(name) == module]
        total = combine([rows[i][:8] + (squared[i],) for i in members])
        modules[module] = entry(total, None if deltas is None else math.sqrt(total[8]))
    return params, modules


@pytest.mark.parametrize("seed", range(6))
def test_columnar_entries_equal_the_plain_per_entry_ones_bit_for_bit(seed):
    # The columns are computed with numpy over whole columns: every value must be the float the plain formulas
    # give (the same IEEE operations in the same order), NaN, Inf, overflow, subnormals and empty tensors included.
    import random

    rng = random.Random(seed)
    special = [NAN, INF, 0.0, 5e-324, 1e-200, 1e200, 1.7976931348623157e308]
    names = [f"m{i // 3}.p{i % 3}" if i % 5 else f"top{i}" for i in range(40)] + ["m0.late"]
    numels = [rng.choice([0, 1, 8, 64, 4096]) for _ in names]
    for step in range(30):
        value = lambda: rng.choice(special) if rng.random() < 0.15 else rng.uniform(0, 10) ** rng.randint(-3, 3)  # noqa: E731
        pre = [value() for _ in names]
        columns = [pre, [v * rng.choice([1.0, 0.25]) for v in pre]]
        detail = step % 2 == 0
        if detail:
            columns += [[value() for _ in names], [float(rng.randint(0, k)) for k in numels], [value() for _ in names],
                        [float(rng.randint(0, 2)) for _ in names], [0.0 for _ in names]]  # fmt: skip
        counts = {i: (rng.randint(0, 3), 1) for i in range(len(names)) if rng.random() < 0.1} if step % 3 else {}
        deltas = None if step % 4 == 1 else [value() for _ in names]
        params, modules = summarize_columns(Layout(names), numels, columns, counts, deltas=deltas, detail=detail)
        want = _plain_entries(names, numels, columns, counts, deltas, detail)
        assert repr((params.to_dict(), modules.to_dict())) == repr(want)
        for entries in (params, modules):
            assert entries.encode() == json.dumps(entries.to_dict(), allow_nan=False)


def test_short_text_round_trips_float32_and_always_reads_back_as_a_float():
    rng = np.random.default_rng(0)
    values = (rng.standard_normal(20000) * 10.0 ** rng.integers(-40, 39, 20000)).astype(np.float32)
    values = np.concatenate([values, np.float32([0.0, -0.0, 1.0, 123456789.0, 3.4e38, 1e-45, 0.5])])
    column = values.astype(np.float64).tolist()
    text = short_text(column)
    assert len(text) == len(column) and short_text([]) == []
    back = [json.loads(t) for t in text]
    assert all(type(v) is float for v in back)  # never an int: a point or an exponent always ("2.0", "1e-05")
    assert np.array_equal(np.float32(back), values)  # float32's round trip: exactly the measured values
    assert text[-7:] == ["0.0", "0.0", "1.0", "1.23456792e+08", "3.39999995e+38", "1.40129846e-45", "0.5"]
    assert max(map(len, text)) <= len("-1.00000000e-100")
    # Integers below 10**9 keep a point ("123456789.", what "%#.9g" writes, is not JSON): every integer
    # float32 holds exactly up to 2**24, and some above.
    integers = [float(v) for v in (*range(1, 2**24, 9973), 2**24, 99999992, 123456792)]
    assert all(type(json.loads(t)) is float for t in short_text(integers))
    assert [float(t) for t in short_text(integers)] == integers


@pytest.mark.parametrize("detail", [True, False])
@pytest.mark.parametrize("bad", [None, (0, 0, NAN), (1, 5, 3), (2, 1, INF)])
def test_short_entries_are_their_text_read_back(detail, bad):
    # A float32-measured table: 9 significant digits; counts stay ints, non-finite values null.
    table = [[float(np.float32(v)) for v in row] for row in rows(detail)]
    table[0][0] = float(np.float32(1 / 3))
    if bad is not None:
        row, column, value = bad
        table[row][column] = value
    args = (Layout(NAMES), NUMELS, columns_of(table), {})
    exact = summarize_columns(*args, deltas=[0.1] * 4, detail=detail)
    short = summarize_columns(*args, deltas=[0.1] * 4, detail=detail, short=True)
    for full, cut in zip(exact, short):
        assert cut.short and not full.short
        assert cut.to_dict() == json.loads(cut.encode())
        for name, entry in full.to_dict().items():
            for key, value in entry.items():
                got = cut.to_dict()[name][key]
                if isinstance(value, float):
                    assert type(got) is float and got == pytest.approx(value, rel=5e-9, abs=0)
                else:
                    assert got == value and type(got) is type(value)  # None, counts, element counts
    if bad is None:
        assert short[0].to_dict()["a.weight"]["norm_pre_clip"] == json.loads("3.33333343e-01")
        assert np.float32(short[0].to_dict()["a.weight"]["norm_pre_clip"]) == np.float32(1 / 3)


def test_short_zeros_are_written_as_zero_also_beside_nulls():
    table = [[float(np.float32(v)) for v in row] for row in rows()]
    table[1][4] = 0.0  # a.bias: zero weight norm, so its ratios are null; the other rows' are not
    params, _ = summarize_columns(Layout(NAMES), NUMELS, columns_of(table), {}, deltas=[0.0] * 4, short=True)
    assert None in params.column("update_to_weight") and 0.0 in params.column("update_to_weight")
    text = params.encode()
    assert '"update_to_weight": 0.0, ' in text or '"update_to_weight": 0.0}' in text
    assert '"update_to_weight": 0.00000000e+00' not in text
    assert params.to_dict() == json.loads(text)


def test_non_strict_entries_are_never_short():
    params, _ = summarize_columns(Layout(NAMES), NUMELS, columns_of(rows()), {}, strict=False, short=True)
    assert not params.short and params.to_dict()["a.weight"]["norm"] == 1.5
