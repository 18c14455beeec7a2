"""A logged step's device work does not grow with the number of tensors, and its grouped statistics are exact."""

from __future__ import annotations

import collections
import contextlib
import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gradkit as gk
from gradkit.tracking import host_read, large_stats, row_stats, stats
from gradkit.tracking.large_stats import LargeStats
from gradkit.tracking.row_stats import RowStats
from gradkit.tracking.stats import COLUMNS, SMALL, _one_stats, param_stats
from host_reads import no_cuda_syncs

NAN, INF = math.nan, math.inf


class CountOps(TorchDispatchMode):
    """Counts the operators dispatched (views left out: they launch nothing)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def tracker_ops(tensors, *, detail, device="cpu"):
    """The ops the tracker dispatches in one logged step of a model with `tensors` tensors, a tenth of them large."""
    torch.manual_seed(0)
    large = 2 * max(1, tensors // 20)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range((tensors - large) // 2)])
    side = math.isqrt(SMALL) + 2  # above SMALL: the large tensors' path
    for i in range(large):
        model.register_parameter(f"big{i}", nn.Parameter(torch.randn(side + i % 2, side)))
    model.to(device)
    tracker = gk.Tracker(every=1, detail_every=1 if detail else 10**9)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    pipe = gk.GradientPipeline(model, clip=gk.ClipByGlobalNorm(1.0), tracker=tracker)
    x = torch.randn(3, 4, device=device)

    def step():
        big = [p for name, p in model.named_parameters() if name.startswith("big")]
        pipe.backward(model(x).square().mean() + sum(p.square().mean() for p in big))
        pipe.step(opt)

    for _ in range(2):  # layouts found and kept
        step()
    counter = CountOps()
    for name in ("observe", "after_step"):
        method = getattr(tracker, name)

        def counted(*args, method=method):
            with counter:
                return method(*args)

        setattr(tracker, name, counted)
    step()
    tracker.close()
    assert len(model.state_dict()) == tensors and tracker.history[-1]["detail"] == detail
    return counter.ops


@pytest.mark.parametrize("rows", [False, True], ids=["foreach", "rows"])
@pytest.mark.parametrize("detail", [False, True])
def test_a_logged_step_dispatches_as_many_ops_for_200_tensors_as_for_10(detail, rows, monkeypatch):
    # The large tensors' batches follow their total size (CPU_CHUNK elements each): one batch for both models.
    monkeypatch.setattr(large_stats, "CPU_CHUNK", 1 << 24)
    if rows:  # the accelerators' measure of the large tensors (RowStats), on this CPU
        monkeypatch.setattr(stats, "FOREACH_DEVICES", ())
    few, many = tracker_ops(10, detail=detail), tracker_ops(200, detail=detail)
    assert sum(few.values()) > 0
    assert many == few  # op by op: nothing per tensor
    if detail and rows:  # the padded copies are views of the tensors: their count grows, nothing else does
        assert few["aten._foreach_max.default"] == 0 and few["aten.aminmax.default"] == 1


def test_the_grouped_path_is_taken_for_large_tensors():
    ops = tracker_ops(10, detail=True)
    assert ops["aten._foreach_max.default"] == 1 and ops["aten.aminmax.default"] == 0


def reference(tensors):
    return torch.stack([_one_stats(t).double() for t in tensors])


def special(n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, generator=g).to(dtype)
    t[torch.rand(n, generator=g) < 0.2] = 0.0
    return t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_large_stats_equal_the_per_tensor_ones_with_zeros_nan_inf_and_subnormals(dtype):
    tensors = [special(1000 + 37 * i, dtype, i) for i in range(5)]
    tensors[1][[3, 7, 11]] = NAN
    tensors[2][[5]] = INF
    tensors[2][[6, 8]] = -INF
    tensors[3][[0, 1]] = NAN
    tensors[3][[2]] = INF
    tensors[4][[9, 10]] = torch.finfo(dtype).tiny / 4  # subnormal: nonzero and finite
    tensors[4][[12]] = -0.0
    tensors[4][[13]] = torch.finfo(dtype).max
    got = LargeStats([t.numel() for t in tensors], torch.device("cpu")).table(tensors, torch.float64)
    want = reference(tensors)
    assert torch.equal(got[:, 1:], want[:, 1:])  # counts exact: nonzero (NaN counted), NaN, Inf
    assert torch.equal(got[:, 0].isnan(), want[:, 0].isnan())
    assert torch.equal(got[~got[:, 0].isnan(), 0], want[~want[:, 0].isnan(), 0])
    assert got[:, 2].tolist() == [0, 3, 0, 2, 0] and got[:, 3].tolist() == [0, 0, 3, 1, 0]


def test_large_stats_in_pieces_and_batches_equal_the_whole(monkeypatch):
    # Small PIECE and CHUNK: tensors split into views, pieces measured in several batches, counts added in float64.
    monkeypatch.setattr(large_stats, "CPU_PIECE", 64)
    monkeypatch.setattr(large_stats, "CPU_CHUNK", 300)
    tensors = [special(n, torch.float32, n) for n in (1000, 64, 65, 500, 1)]
    tensors[0][[999]] = NAN
    tensors[3][[0, 100]] = INF
    stats = LargeStats([t.numel() for t in tensors], torch.device("cpu"))
    assert stats.split and len(stats.batches) > 2
    assert stats.cut == [True, False, True, True, False]  # only the tensors over a piece are cut into views
    got = stats.table(tensors, torch.float64)
    want = reference(tensors)
    assert torch.equal(got[:, 1:], want[:, 1:])
    assert torch.equal(got[1:, 0], want[1:, 0]) and math.isnan(got[0, 0])


def nan_inf_tensors(dtype, sizes=(1000, 64, 65, 17, 1, 200, 4096)):
    """Tensors of `sizes` with zeros, NaN, +-Inf, -0.0, subnormals and one all-NaN tensor."""
    tensors = [special(n, dtype, 300 + n) for n in sizes]
    tensors[0][[3, 999]] = NAN
    tensors[3][[0, 5]] = INF
    tensors[3][[6]] = -INF
    tensors[2][[4]] = -0.0
    tensors[2][[7, 8]] = torch.finfo(dtype).tiny / 4
    tensors[5].fill_(NAN)
    return tensors


def assert_equal_stats(got, want):
    got, want = got.cpu(), want.cpu()
    assert torch.equal(got[:, 1:], want[:, 1:])  # counts exact: nonzero (NaN counted), NaN, Inf
    assert torch.equal(got[:, 0].isnan(), want[:, 0].isnan())
    assert torch.equal(got[~got[:, 0].isnan(), 0], want[~want[:, 0].isnan(), 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_row_stats_equal_the_per_tensor_ones_and_the_foreach_ones(dtype):
    tensors = nan_inf_tensors(dtype)
    measure = RowStats([t.numel() for t in tensors], torch.device("cpu"))
    assert len(measure.batches) == 1
    got = measure.table(tensors, torch.float64)
    assert got.shape == (len(tensors), 4) and got.dtype == torch.float64
    assert_equal_stats(got, reference(tensors))
    assert_equal_stats(got, LargeStats([t.numel() for t in tensors], torch.device("cpu")).table(tensors, torch.float64))
    assert got[:, 2].tolist() == [2, 0, 0, 0, 0, 200, 0] and got[:, 3].tolist() == [0, 0, 0, 3, 0, 0, 0]


def test_row_stats_in_rows_batches_and_cut_tensors_equal_the_whole(monkeypatch):
    # Rows of 16 elements, batches of 64: tensors padded to whole rows, several batches, the two largest cut into
    # views of a batch each; a 2-D and a non-contiguous tensor among them.
    monkeypatch.setattr(row_stats, "ROW", 16)
    monkeypatch.setattr(row_stats, "CHUNK", 64)
    tensors = nan_inf_tensors(torch.float32, sizes=(1000, 64, 65, 17, 1, 200, 16))
    tensors.append(special(30 * 7, torch.float32, 9).reshape(30, 7))
    tensors.append(special(12 * 9, torch.float32, 10).reshape(12, 9).T)
    tensors[-1][2, 3] = INF
    measure = RowStats([t.numel() for t in tensors], torch.device("cpu"))
    assert len(measure.batches) > 10 and measure.cut == [n > 64 for n in map(torch.Tensor.numel, tensors)]
    for _ in range(2):  # the padding views are kept: a second step measures the same
        assert_equal_stats(measure.table(tensors, torch.float64), reference(tensors))
    # float32 out, as FusedStats asks for float32 gradients: the same values, counts exact below 2**24
    assert_equal_stats(measure.table(tensors, torch.float32).double(), reference(tensors))


def test_with_the_accelerators_measure_the_detail_table_equals_the_per_tensor_one(monkeypatch):
    # A GPU's layout on this CPU: tensors over 65,536 elements measured by RowStats, the others flattened.
    monkeypatch.setattr(stats, "SMALL_CPU", stats.SMALL)
    monkeypatch.setattr(stats, "FOREACH_DEVICES", ())
    monkeypatch.setattr(stats.FusedStats, "_cache", {})
    grads, params = mixed_tensors("cpu")
    layout = check_detail_table(grads, params)
    large = [measure for _, pick, measure, _, _ in layout.parts if pick is None]
    assert large and all(isinstance(m, RowStats) for m in large)


def tracked_records(steps=3):
    """The tracker's records (times left out) of a few detail steps of a small model with a NaN in one gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 30), nn.Tanh(), nn.Linear(30, 50), nn.Tanh(), nn.Linear(50, 3))
    tracker = gk.Tracker(every=1, detail_every=1)
    pipe = gk.GradientPipeline(model, tracker=tracker)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        pipe.backward(model(torch.randn(8, 40)).square().mean())
        if step == 1:
            model[2].weight.grad[0, :7] = NAN  # a non-finite step (skipped): its counts are recorded
        pipe.step(opt)
    tracker.close()
    return [{k: v for k, v in record.items() if k != "time"} for record in tracker.history]


def test_the_records_are_the_same_whichever_measure_takes_the_large_tensors(monkeypatch):
    monkeypatch.setattr(stats.FusedStats, "_cache", {})
    foreach = tracked_records()
    monkeypatch.setattr(stats, "FOREACH_DEVICES", ())
    monkeypatch.setattr(stats.FusedStats, "_cache", {})
    rows = tracked_records()
    assert rows == foreach and all(record["detail"] for record in rows)
    assert rows[1]["params"]["2.weight"]["nan"] == 7


@pytest.mark.parametrize("rows", [False, True], ids=["foreach", "rows"])
def test_a_count_above_2_24_is_exact_in_the_detail_table(rows, monkeypatch):
    # float32 holds integers exactly only up to 2**24: the large tensors' counts must reach the float64 table
    # without passing through it (a tensor of 2**24 + 3 nonzero entries read 2**24 + 4, zero_frac below 0).
    if rows:
        monkeypatch.setattr(stats, "FOREACH_DEVICES", ())
    monkeypatch.setattr(stats.FusedStats, "_cache", {})
    grad = torch.ones(2**24 + 3)
    grad[5] = NAN
    table = stats.FusedStats.of([grad]).table([grad], [], torch.device("cpu"), torch.float64)
    counts = {name: table[0, stats.DETAIL.index(name)].item() for name in ("nonzero", "nan", "inf")}
    assert counts == {"nonzero": 2**24 + 3, "nan": 1, "inf": 0}  # NaN counts as nonzero


def test_a_sparse_gradient_is_tracked_with_the_dense_ones():
    # nn.Embedding(sparse=True): its statistics come from the stored rows (the others are zeros), beside the
    # dense table (a detail step failed on a model holding one).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 3, sparse=True), nn.Linear(3, 2))
    tracker = gk.Tracker(every=1, detail_every=1)
    pipe = gk.GradientPipeline(model, tracker=tracker)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    grads = []
    for _ in range(2):
        pipe.backward(model(torch.tensor([[1, 2, 2]])).square().mean())
        grads.append(model[0].weight.grad.to_dense())  # no averaging: p.grad is the window's gradient
        pipe.step(opt)
    tracker.close()
    record, grad = tracker.history[-1]["params"]["0.weight"], grads[-1]
    assert record["zero_frac"] == pytest.approx(1 - int(torch.count_nonzero(grad)) / grad.numel())
    assert record["max_abs"] == pytest.approx(float(grad.abs().max()), rel=1e-6) and record["numel"] == 30


@pytest.mark.cuda
@pytest.mark.parametrize("detail", [False, True])
def test_on_cuda_a_logged_step_dispatches_as_many_ops_for_200_tensors_as_for_10(detail):
    few, many = tracker_ops(10, detail=detail, device="cuda"), tracker_ops(200, detail=detail, device="cuda")
    assert many == few
    if detail:  # the large tensors are measured by rows of one padded copy (RowStats), not by foreach kernels
        assert few["aten._foreach_max.default"] == 0 and few["aten.aminmax.default"] == 1


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_on_cuda_large_stats_equal_the_per_tensor_ones_without_a_sync(dtype, monkeypatch):
    monkeypatch.setattr(large_stats, "PIECE", 512)  # pieces: the scatter and index_add of the split path too
    tensors = [special(1000 + 37 * i, dtype, i) for i in range(4)]
    tensors[1][[3, 7, 11]] = NAN
    tensors[2][[5, 6]] = INF
    tensors[3][[0]] = NAN
    tensors[3][[1, 2]] = -INF
    tensors[0][[9]] = torch.finfo(dtype).tiny / 4
    tensors = [t.cuda() for t in tensors]
    want = reference(tensors).cpu()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = LargeStats([t.numel() for t in tensors], tensors[0].device).table(tensors, torch.float64)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    got = got.cpu()
    assert torch.equal(got[:, 1:], want[:, 1:])
    assert torch.equal(got[:, 0].isnan(), want[:, 0].isnan())
    assert torch.equal(got[~got[:, 0].isnan(), 0], want[~want[:, 0].isnan(), 0])


def test_an_ordinary_step_reads_the_two_norm_columns_only():
    # Not measured, the detail columns are neither made on the device nor read: they are blank on the host.
    grads = [torch.randn(3, 3), torch.randn(4)]
    norms = torch.stack([g.norm() for g in grads])
    ordinary = param_stats(grads, [torch.ones(3, 3), torch.ones(4)], norms, norms * 2, detail=False)
    detail = param_stats(grads, [torch.ones(3, 3), torch.ones(4)], norms, norms * 2, detail=True)
    assert ordinary.shape == (2, 2) and detail.shape == (2, len(COLUMNS))
    assert torch.equal(ordinary, detail[:, :2])


# -- the GPU's small limit (65,536 elements): the flattened segment path for the mid-size tensors --------------
# On a GPU every tensor up to `stats.SMALL` elements is measured flattened (segment amax and index_add, float64
# weight norms); on a CPU only those up to `stats.SMALL_CPU`. The same code with the GPU's limit runs here, so the
# values and the order back to input order of the GPU's layout are checked in CI, and on the GPU itself below.

MIXED_SIZES = (65536, 300, 0, 1, 65537, 257, 4096, 70000, 2, 256, 1000)
MIXED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def mixed_tensors(device):
    """Gradients and weights of many sizes around both limits, four dtypes interleaved (groups out of input
    order), with zeros, NaN, +-Inf and subnormals in the gradients."""
    grads, params = [], []
    for i, n in enumerate(MIXED_SIZES):
        dtype = MIXED_DTYPES[i % len(MIXED_DTYPES)]
        g = special(n, dtype, 100 + i)
        if n > 20:
            g[[3 + i]] = NAN if i % 2 else INF
            g[[5]] = -INF
            g[[7, 8]] = torch.finfo(dtype).tiny / 4
            g[[9]] = -0.0
        if i == 6:
            g.fill_(NAN)  # every element NaN: max |g| is NaN, nonzero counts them
        grads.append(g.to(device))
        gen = torch.Generator().manual_seed(200 + i)
        params.append(torch.randn(n, generator=gen).to(dtype).to(device))
    return grads, params


def check_detail_table(grads, params, *, no_syncs=contextlib.nullcontext):
    """param_stats' detail table equals the per-tensor measures: counts exactly, max |g| exactly (NaN where
    there is one), the weights' norms as float64 norms (float32 ones for large float32 weights)."""
    norms = torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])
    layout = stats.FusedStats.of(grads)
    with no_syncs():
        got = param_stats(grads, params, norms, norms * 2)
    got, want = got.cpu(), reference(grads).cpu()
    assert got.shape == (len(grads), len(COLUMNS)) and got.dtype == torch.float64
    exact = dict(rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(got[:, 0], (norms * 2).double().cpu(), **exact)
    torch.testing.assert_close(got[:, 1], norms.double().cpu(), **exact)
    detail = got[:, [2, 3, 5, 6]]  # max_abs, nonzero, nan, inf
    assert torch.equal(detail[:, 1:], want[:, 1:])
    assert torch.equal(detail[:, 0].isnan(), want[:, 0].isnan())
    assert torch.equal(detail[~detail[:, 0].isnan(), 0], want[~want[:, 0].isnan(), 0])
    weights = torch.stack([torch.linalg.vector_norm(p.double()) for p in params]).cpu()
    torch.testing.assert_close(got[:, 4], weights, rtol=1e-6, atol=0)
    return layout


def test_with_the_gpus_small_limit_the_detail_table_equals_the_per_tensor_one(monkeypatch):
    monkeypatch.setattr(stats, "SMALL_CPU", stats.SMALL)
    monkeypatch.setattr(stats.FusedStats, "_cache", {})
    grads, params = mixed_tensors("cpu")
    layout = check_detail_table(grads, params)
    flattened = [count for _, pick, _, count, _ in layout.parts if pick is not None]
    assert sum(flattened) == sum(n <= stats.SMALL for n in MIXED_SIZES)  # 4096 and 65536 among them
    assert layout._inverse is not None  # results come back group by group: the order is restored
    # The kept layout holds the small tensors' lengths, not an id per element (8 bytes each, kept for the run).
    held = [t for _, pick, segments, _, _ in layout.parts if pick is not None for t in (segments.lengths,)]
    flattened_elements = sum(n for n in MIXED_SIZES if n <= stats.SMALL)
    assert sum(t.numel() for t in held) == sum(flattened) < flattened_elements // 100


@pytest.mark.cuda
def test_on_cuda_the_detail_table_of_mixed_sizes_equals_the_per_tensor_one_without_a_sync():
    grads, params = mixed_tensors("cuda")
    layout = check_detail_table(grads, params, no_syncs=no_cuda_syncs)
    assert all(device.type == "cuda" for device, *_ in layout.parts)
    assert sum(count for _, pick, _, count, _ in layout.parts if pick is not None) == sum(
        n <= stats.small_limit(grads[0].device) for n in MIXED_SIZES
    )


class CountCalls(torch.overrides.TorchFunctionMode):
    """Counts the torch functions and tensor methods called (attribute reads and ``numel`` left out: they make
    no tensor), each of which costs host time on a GPU."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__qualname__", None) or getattr(func, "__name__", str(func))
        if not name.endswith("__get__") and name not in ("TensorBase.numel", "_set_grad_enabled"):
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


def test_an_ordinary_logged_step_makes_a_few_torch_calls_whatever_the_number_of_tensors(monkeypatch):
    # With the accelerators' layout: an ordinary step reads its cached norms and scalars in one gather and
    # one transfer. It made 50 dispatched ops and about 50 calls (a to, reshape and detach per value) before, and
    # its counters of clipped and skipped steps five more (two adds, a compare, two zero_).
    monkeypatch.setattr(stats, "SMALL_CPU", SMALL)
    monkeypatch.setattr(stats, "FOREACH_DEVICES", ())
    monkeypatch.setattr(host_read, "DIRECT_DEVICES", ())  # an accelerator's read: gathered, then one copy
    for tensors in (10, 148):
        model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(tensors // 2)])
        tracker = gk.Tracker(every=1, detail_every=10**9)
        pipe = gk.GradientPipeline(model, clip=gk.ClipByGlobalNorm(0.01), tracker=tracker)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        for _ in range(3):
            pipe.backward(model(torch.randn(3, 4)).square().mean())
            pipe.step(opt)
        calls, ops = CountCalls(), CountOps()
        for name in ("observe", "after_step"):
            method = getattr(tracker, name)

            def counted(*args, method=method, calls=calls, ops=ops):
                with calls, ops:
                    return method(*args)

            setattr(tracker, name, counted)
        pipe.backward(model(torch.randn(3, 4)).square().mean())
        pipe.step(opt)
        tracker.close()
        record = tracker.history[-1]
        assert not record["detail"] and record["global"]["clipped_steps"] == 1 and len(record["params"]) == tensors
        # The clip test, one stack, one cat (and the host read's numpy view); the counters make no op of their own.
        assert sum(ops.ops.values()) <= 3, ops.ops
        assert sum(calls.calls.values()) <= 4, calls.calls
        assert calls.calls["TensorBase.reshape"] == calls.calls["TensorBase.to"] == 0, calls.calls


class CountAllOps(CountOps):
    """Counts every operator dispatched, views included (each costs host time on a GPU)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


class CountNumel(torch.overrides.TorchFunctionMode):
    """Counts the ``numel`` calls made in Python."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.numel += getattr(func, "__name__", "") == "numel"
        return func(*args, **(kwargs or {}))


def test_at_gpt2s_148_tensors_a_step_reads_no_size_and_makes_no_view_per_tensor(monkeypatch):
    # GPT-2 small's tensors and names (scaled down), with the accelerators' layout: the element counts and the
    # detail layout are kept from the first step, and the small tensors are concatenated by one operator. A detail
    # step dispatched 644 operators (592 of them views, four per tensor) and read 445 sizes before; an ordinary
    # step read 149 sizes.
    from gradkit.bench.tracking import _GPT

    monkeypatch.setattr(stats, "SMALL_CPU", SMALL)
    monkeypatch.setattr(stats, "FOREACH_DEVICES", ())
    monkeypatch.setattr(host_read, "DIRECT_DEVICES", ())  # an accelerator's read: gathered, then one copy
    monkeypatch.setattr(stats.FusedStats, "_cache", {})
    torch.manual_seed(0)
    model = _GPT(vocab=64, context=16, width=16, layers=12, heads=2)
    tracker = gk.Tracker(every=1, detail_every=3)
    pipe = gk.GradientPipeline(model, clip=gk.ClipByGlobalNorm(1.0), tracker=tracker)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 64, (2, 8))
    counted = {}
    for name in ("observe", "after_step"):
        method = getattr(tracker, name)

        def wrapped(*args, method=method):
            if not counted:
                return method(*args)
            with counted["numel"], counted["ops"]:
                return method(*args)

        setattr(tracker, name, wrapped)
    per_step = []
    for step in range(1, 7):
        if step > 3:  # step 6: a detail step; steps 4 and 5: ordinary ones
            counted.update(numel=CountNumel(), ops=CountAllOps())
        pipe.backward(model(x).square().mean())
        pipe.step(opt)
        if counted:
            per_step.append((tracker.history[-1]["detail"], sum(counted["ops"].ops.values()), counted["numel"].numel))
    tracker.close()
    assert len(tracker.history[-1]["params"]) == 148
    (o1, ops1, n1), (o2, ops2, n2), (detail, ops3, n3) = per_step
    assert (o1, o2, detail) == (False, False, True)
    assert ops1 == ops2 <= 5 and n1 == n2 <= 2
    assert ops3 <= 70 and n3 <= 4, (ops3, n3)


def test_the_kept_layout_follows_a_parameter_list_that_changes():
    # A layer frozen for a step (its gradient None: the step comes with a shorter list), then trained again:
    # every detail step's statistics are those of the gradients it saw, whatever list came before.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    tracker = gk.Tracker(every=1, detail_every=1)
    pipe = gk.GradientPipeline(model, tracker=tracker)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    for step in range(4):
        model[0].requires_grad_(step != 1)
        pipe.backward(model(torch.randn(5, 4)).square().mean())
        seen.append(
            {n: (p.grad.numel(), float(p.grad.abs().max())) for n, p in model.named_parameters() if p.grad is not None}
        )
        pipe.step(opt)
        opt.zero_grad(set_to_none=True)
    tracker.close()
    assert [len(s) for s in seen] == [4, 2, 4, 4]
    for record, want in zip(tracker.history, seen):
        got = {n: (e["numel"], e["max_abs"]) for n, e in record["params"].items()}
        assert got.keys() == want.keys()
        for name, (numel, max_abs) in want.items():
            assert got[name][0] == numel and got[name][1] == pytest.approx(max_abs, rel=1e-6)


def test_a_0d_gradient_after_a_1_element_one_gets_its_own_layout(monkeypatch):
    # One element either way, but a 0-d tensor has no dimension to concatenate along: a layout cached for the
    # 1-d one (keyed by sizes only) would send the 0-d gradient to the one-operator concatenation.
    monkeypatch.setattr(stats.FusedStats, "_cache", {})
    tracker = gk.Tracker(every=1, detail_every=1)
    for value, shape in ((2.0, (1,)), (-3.0, ())):
        param = torch.zeros(shape, requires_grad=True)
        param.grad = torch.full(shape, value)
        tracker.track([("w", param)])
    tracker.close()
    assert [r["params"]["w"]["max_abs"] for r in tracker.history] == [2.0, 3.0]
