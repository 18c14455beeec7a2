"""The named host read behind a logged step's record, and the noise probe's moments."""

from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from gradkit.tracking import host_read
from gradkit.tracking.host_read import HostRead
from gradkit.tracking.noise_scale import NoiseProbe
from host_reads import count_host_reads, no_cuda_syncs


def test_host_read_gives_each_value_back_by_name_in_one_transfer(monkeypatch):
    monkeypatch.setattr(host_read, "DIRECT_DEVICES", ())  # as on an accelerator: the values gathered and copied
    table = torch.arange(15, dtype=torch.float32).reshape(3, 5)
    ranks = torch.arange(30, dtype=torch.float64).reshape(2, 3, 5)
    read = HostRead(torch.device("cpu"), torch.float64)
    read.add("table", table)
    read.add("norm", torch.tensor(2.5))
    read.add("empty", torch.zeros(0, 5))
    read.add("ranks", ranks)
    counter = count_host_reads(monkeypatch)
    got = read.read()
    assert counter["n"] == 1
    assert got["table"] == table.double().tolist()
    assert got["norm"] == 2.5 and got["empty"] == [] and got["ranks"] == ranks.tolist()


def test_host_read_gathers_mixed_dtypes_exactly_in_one_stack_and_one_cat():
    # Counts above 2**24 next to float32 values: a float32 stack would round them; they go into float64 directly.
    big = 2**40 + 1
    read = HostRead(torch.device("cpu"), torch.float64)
    read.add("norm", torch.tensor(0.1, dtype=torch.float32))
    read.add("count", torch.tensor(big))
    read.add("flag", torch.tensor(True))
    read.add("one", torch.tensor([7.5]), scalar=True)  # one element read as a number
    read.add_rows("rows", [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])])
    read.add_stack("sample", [torch.tensor(big), torch.tensor([0.5]), torch.tensor(False)])
    got = read.read()
    assert got["norm"] == float(torch.tensor(0.1, dtype=torch.float32)) and got["count"] == big
    assert got["flag"] == 1.0 and type(got["flag"]) is float and got["one"] == 7.5
    assert got["rows"] == [[1.0, 2.0], [3.0, 4.0]] and got["sample"] == [big, 0.5, 0.0]
    only_ints = HostRead(torch.device("cpu"), torch.float64)
    only_ints.add("bool", torch.tensor(True))
    only_ints.add("ints", torch.tensor([big, 3]))
    assert only_ints.read() == {"bool": 1.0, "ints": [big, 3.0]}


@pytest.mark.parametrize("direct", [True, False])
def test_host_values_read_where_they_are_equal_the_gathered_read(monkeypatch, direct):
    # A CPU read takes each value where it is (no stack or cat); it gives what the gathered read gives, as numbers
    # of the same types, and arrays as float64 numpy arrays of their shape when asked for.
    big = 2**40 + 1
    monkeypatch.setattr(host_read, "DIRECT_DEVICES", ("cpu",) if direct else ())
    read = HostRead(torch.device("cpu"), torch.float64)
    read.add("table", torch.arange(6, dtype=torch.float32).reshape(2, 3) / 3)
    read.add("norm", torch.tensor(0.1, dtype=torch.float32))
    read.add("half", torch.tensor(0.1, dtype=torch.float16))
    read.add("count", torch.tensor(big))
    read.add("flag", torch.tensor(True))
    read.add("one", torch.tensor([7.5], requires_grad=True), scalar=True)
    read.add_rows("rows", [torch.tensor([1.0, 2.0]), torch.tensor([3, 4])])
    read.add_stack("sample", [torch.tensor(big), torch.tensor([0.5]), torch.tensor(False)])
    flight = read.start()
    assert isinstance(flight, host_read._Landed) is direct
    got = flight.values()
    assert got == {
        "table": (torch.arange(6, dtype=torch.float32).reshape(2, 3) / 3).double().tolist(),
        "norm": float(torch.tensor(0.1, dtype=torch.float32)), "half": float(torch.tensor(0.1, dtype=torch.float16)),
        "count": big, "flag": 1.0, "one": 7.5, "rows": [[1.0, 2.0], [3.0, 4.0]], "sample": [big, 0.5, 0.0],
    }  # fmt: skip
    assert all(type(v) is float for k in ("norm", "half", "count", "flag", "one") for v in [got[k]])
    arrays = flight.values(arrays=("table", "rows"))
    assert arrays["table"].dtype == np.float64 and arrays["table"].shape == (2, 3)
    assert arrays["table"].tolist() == got["table"] and arrays["rows"].tolist() == got["rows"]
    # bfloat16 (which numpy does not read) takes the gathered path on the CPU too
    odd = HostRead(torch.device("cpu"), torch.float64)
    odd.add("x", torch.tensor([1.5, 2.5], dtype=torch.bfloat16))
    assert not isinstance(odd.start(), host_read._Landed) and odd.read() == {"x": [1.5, 2.5]}


@pytest.mark.parametrize("direct", [True, False])
def test_host_read_holds_copies_of_what_it_read(monkeypatch, direct):
    monkeypatch.setattr(host_read, "DIRECT_DEVICES", ("cpu",) if direct else ())
    value, rows, flag = torch.arange(4.0), [torch.ones(2), torch.zeros(2)], torch.tensor(2.0)
    read = HostRead(torch.device("cpu"), torch.float64)
    read.add("value", value)
    read.add_rows("rows", rows)
    read.add("flag", flag)
    flight = read.start()
    value.mul_(-1), rows[0].mul_(5), flag.mul_(3)  # changed after the read started
    assert flight.values() == {"value": [0.0, 1.0, 2.0, 3.0], "rows": [[1.0, 1.0], [0.0, 0.0]], "flag": 2.0}


def test_host_read_refuses_a_name_twice():
    read = HostRead(torch.device("cpu"), torch.float64)
    read.add("x", torch.zeros(()))
    with pytest.raises(ValueError, match="'x' was added twice"):
        read.add("x", torch.ones(()))


def test_probe_measures_only_the_windows_asked_for():
    w = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    probe = NoiseProbe(["w"], [w], wants=lambda step: step == 2, accumulation_steps=2)
    window = SimpleNamespace(items=5, item_mode=True, micro_steps=1)  # what before_reduction reads of a Window
    w.grad = torch.tensor([3.0, 0.0, 4.0], dtype=torch.float64)  # a summed loss over 5 items
    probe.after_first_backward(5, step=1)
    probe.before_reduction(window)
    assert probe.sample(torch.tensor(1.0), torch.tensor(10)) is None
    probe.reset()
    probe.after_first_backward(5, step=2)
    sample = probe.sample(torch.tensor(1.0), torch.tensor(10))
    assert float(sample.small_sq) == pytest.approx(25.0 / 25) and float(sample.small_batch) == 5
    assert float(sample.big_sq) == 1.0 and float(sample.big_batch) == 10
    assert probe.unavailable is None


def test_host_values_are_read_where_they_are_when_the_read_targets_a_device():
    # A value already on the host (e.g. the noise estimate before its first update) is not moved
    # to the device: that copy would wait on the stream. Built for "cuda" without needing a GPU:
    # nothing here touches the device, since every value is on the host.
    from gradkit.tracking.host_read import HostRead

    read = HostRead(torch.device("cuda"), torch.float64)
    read.add("g2", torch.tensor(float("nan"), dtype=torch.float64))
    read.add("table", torch.arange(6.0).reshape(2, 3))
    skipped = torch.tensor(True)
    read.add("skipped", skipped)
    flight = read.start()
    skipped.fill_(False)  # read where it is, but copied: a later change is not seen
    got = flight.values()
    assert math.isnan(got["g2"]) and got["table"] == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]] and got["skipped"] == 1.0


WEIGHT_SIZES = [[12, 5, 2, 4], [70000, 3, 1, 257, 0, 8, 256, 65536, 255]]


def check_weight_copy(sizes, device="cpu", no_syncs=contextlib.nullcontext):
    """WeightCopy's ||Δw|| per parameter equals the plain per-tensor norms of the differences, in mixed
    (device, dtype) groups whose order is restored; a copy, not a view, and consumed once."""
    from gradkit.tracking.record import WeightCopy

    torch.manual_seed(0)
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float32]
    params = [nn.Parameter(torch.randn(n).to(dtypes[i % 4]).to(device)) for i, n in enumerate(sizes)]
    params[0].data[0] = -0.0
    with no_syncs():
        unchanged = WeightCopy(params).norms(params)
        before = WeightCopy(params)
    assert torch.equal(unchanged.cpu(), torch.zeros(len(params), dtype=torch.float64))  # exact
    plain = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p))
    with no_syncs():
        got = before.norms(params)  # a copy, not a view: the updates are seen
    assert got.dtype == torch.float64 and got.shape == (len(params),) and got.device == params[0].device
    want = torch.stack([torch.linalg.vector_norm((c - p.detach()).double()) for c, p in zip(plain, params)])
    got, want = got.cpu(), want.cpu()
    assert torch.allclose(got, want, rtol=1e-6)
    for i, p in enumerate(params):
        if p.dtype == torch.float64:  # the difference is exact there: the segment sum is as a float64 norm
            assert got[i].item() == pytest.approx(want[i].item(), rel=1e-12)
    with pytest.raises(RuntimeError, match="already called"):
        before.norms(params)


@pytest.mark.parametrize("sizes", WEIGHT_SIZES)
def test_weight_copies_and_update_norms_match_the_plain_per_tensor_ones(sizes):
    # Small weights (<= stats.small_limit elements) are copied flat and measured by segment, the others by
    # foreach, in mixed (device, dtype) groups whose order is restored.
    check_weight_copy(sizes)


@pytest.mark.parametrize("sizes", WEIGHT_SIZES)
def test_weight_copies_with_the_gpus_small_limit_match_the_plain_ones(sizes, monkeypatch):
    # The GPU's limit (65,536 elements) on a CPU: the weights up to 65,536 elements copied flat, in CI.
    from gradkit.tracking import stats

    monkeypatch.setattr(stats, "SMALL_CPU", stats.SMALL)
    monkeypatch.setattr(stats.FusedStats, "_cache", {})
    check_weight_copy(sizes)
    layout = stats.FusedStats._cache[next(iter(stats.FusedStats._cache))]
    assert sum(count for _, pick, _, count, _ in layout.parts if pick is not None) == sum(
        n <= stats.SMALL for n in sizes
    )


@pytest.mark.cuda
@pytest.mark.parametrize("sizes", WEIGHT_SIZES)
def test_on_cuda_weight_copies_match_the_plain_ones_without_a_sync(sizes):
    # On a GPU: the flat copy, the float64 segment sums (index_add_) and the foreach differences of the
    # large weights, with no host sync in the copy or the norms.
    check_weight_copy(sizes, "cuda", no_cuda_syncs)


def test_weight_norms_of_the_detail_table_match_the_plain_ones():
    from gradkit.tracking.stats import FusedStats

    torch.manual_seed(1)
    params = [nn.Parameter(torch.randn(n)) for n in (70000, 7, 0, 3, 65537, 256, 257)]
    grads = [torch.randn_like(p) for p in params]
    table = FusedStats.of(grads).table(grads, params, torch.device("cpu"), torch.float64)
    want = torch.stack([torch.linalg.vector_norm(p.detach().double()) for p in params])
    assert torch.allclose(table[:, 2], want, rtol=1e-6)


def test_counters_since_the_last_log_count_each_step_once_across_resets_and_state():
    from gradkit.step_report import StepReport
    from gradkit.tracking.counters import SinceLastLog

    def report(coef, skipped):
        one = torch.tensor(1.0)
        return StepReport(step=1, micro_steps=1, items=one, total_norm=one, norm_after=one * coef,
                          clip_coef=torch.tensor(coef), skipped=torch.tensor(skipped), bytes_sent=3)  # fmt: skip

    counters = SinceLastLog()
    assert counters.state_dict()["clipped"].item() == 0
    flags = [(0.5, False), (1.0, True), (0.2, True), (1.0, False), (0.9999, False)]
    for coef, skipped in flags:
        counters.count(report(coef, skipped))
    state = counters.state_dict()
    assert (int(counters.clipped), int(counters.skipped), counters.since, counters.bytes) == (3, 2, 5, 15)
    assert state["clipped"].dtype == state["skipped"].dtype == torch.int64 and int(state["clipped"]) == 3
    counters.reset(5)
    assert int(counters.state_dict()["clipped"]) == 0 and int(counters.state_dict()["skipped"]) == 0
    counters.count(report(1.0, True))  # one step after a log: its flags are the counts
    assert (int(counters.clipped), int(counters.skipped)) == (0, 1)
    counters.count(report(0.5, True))  # bool flags summed as counts, not or-ed
    assert (int(counters.clipped), int(counters.skipped)) == (1, 2)
    restored = SinceLastLog()
    restored.load_state_dict(state)
    restored.count(report(0.5, False))
    assert (int(restored.clipped), int(restored.skipped), restored.since) == (4, 2, 6)
