"""Checks of the Triton selection kernels (`gradkit.compression.triton_select`) on a CPU, by Triton's interpreter.

On a GPU the kernels serve float32 CUDA tensors; under ``TRITON_INTERPRET=1`` the same kernels
run on CPU tensors, so their results can be checked against plain torch. The variable must be
set before Triton is imported, so test_triton_select.py runs this file in a child pytest
(``TRITON_INTERPRET=1 python -m pytest tests/compression/triton_interpreted.py`` by hand).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import gradkit as gk
from gradkit.compression import selection, triton_select

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run under TRITON_INTERPRET=1 (see test_triton_select.py)", allow_module_level=True)


def weyl_sample(x: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """The entries `triton_select.threshold` reads after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    n = x.numel()
    offset = int(torch.randint(n, (1,)))
    step = max(1, round((math.sqrt(5) - 1) / 2 * n)) | 1
    return x[(offset + torch.arange(size, dtype=torch.int64) * step) % n]


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, size, top", [(300_000, 21_334, 256), (5_000, 5_000, 60), (40, 16, 1), (40, 16, 16)])
def test_threshold_is_the_sample_top_th_largest_magnitude(n, size, top, dtype):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype)
    x[::97] = float("nan")  # NaN counts as 0
    sample = weyl_sample(x, size, seed=3)
    torch.manual_seed(3)
    got = triton_select.threshold(x, size, top)
    expected = torch.topk(sample.abs().nan_to_num(0.0), top).values[-1]
    assert got.shape == (1,) and got.dtype == dtype
    if dtype == torch.float32:  # 18 bisection rounds: at most 2**13 bit patterns below the exact value
        assert expected.view(torch.int32) - 2**13 <= got.view(torch.int32)[0] <= expected.view(torch.int32)
    else:  # 16-bit floats: exact
        assert torch.equal(got[0], expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_threshold_of_zeros_is_the_smallest_subnormal(dtype):
    got = triton_select.threshold(torch.zeros(1000, dtype=dtype), 100, 10)
    assert float(got) == torch.finfo(dtype).tiny * torch.finfo(dtype).eps


@pytest.mark.parametrize("capacity_share", [2.0, 1.0, 0.5])
@pytest.mark.parametrize(
    "dtype, index_dtype, value_dtype",
    [(torch.float32, torch.int32, torch.float32), (torch.float32, torch.int64, torch.float16),
     (torch.bfloat16, torch.int32, torch.bfloat16), (torch.float16, torch.int32, torch.float32)],
)  # fmt: skip
def test_select_at_least_matches_the_plain_mask(capacity_share, dtype, index_dtype, value_dtype):
    n = 20_000  # several blocks of the select kernel
    x = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(dtype)
    x[::501] = float("nan")  # never selected
    x[7], x[9] = float("inf"), float("-inf")  # selected
    cut = torch.tensor(2.0, dtype=dtype)
    x[11] = 2.0  # entries right at the threshold count
    expected = ((x.abs() >= cut) & ~x.isnan()).nonzero().view(-1)
    capacity = max(1, round(capacity_share * expected.numel()))
    positions, values, valid = triton_select.select_at_least(
        x, cut, capacity, index_dtype=index_dtype, value_dtype=value_dtype, pad=-1
    )
    assert positions.dtype == index_dtype and values.dtype == value_dtype and positions.numel() == capacity
    used = min(capacity, expected.numel())
    assert int(valid.sum()) == used and bool(valid[:used].all())  # the used slots come first
    found = positions[valid].long()
    assert found.unique().numel() == used
    if used == expected.numel():
        assert torch.equal(found.sort().values, expected)
    else:  # the capacity binds: some of the qualifying entries, each once
        assert bool(torch.isin(found, expected).all())
    assert torch.equal(values[valid], x[found].to(value_dtype))
    assert bool((positions[~valid] == -1).all()) and bool((values[~valid] == 0).all())


def test_topk_on_the_triton_path_keeps_the_top_k_energy(monkeypatch):
    monkeypatch.setattr(selection, "CHUNKED_DEVICES", ())  # the device path, on CPU tensors
    n = 200_000
    x = torch.randn(n, generator=torch.Generator().manual_seed(2)) ** 3  # heavy tails
    torch.manual_seed(0)
    compressor = gk.TopK(0.01)
    payload = compressor.compress(x)
    indices, values = payload.tensors
    valid = payload.meta["valid"]
    assert indices.numel() == math.ceil(1.5 * 2000) and indices.dtype == torch.int32
    assert torch.equal(values[valid], x[indices[valid].long()])
    assert bool((values[~valid] == 0).all()) and bool((indices[~valid] == 0).all())
    exact = torch.topk(x.abs(), 2000).values.square().sum()
    assert float(values.square().sum()) >= 0.9 * float(exact)
    dense = compressor.decompress(payload)
    assert torch.equal(dense[indices[valid].long()], values[valid])
    assert int(torch.count_nonzero(dense)) == int(valid.sum())


@pytest.mark.parametrize("dtype", DTYPES)
def test_select_sampled_is_the_threshold_then_the_selection(dtype):
    # One call in three launches (the threshold's kernel zeroes the slot counter) gives what the two
    # calls give from the same draw: the same threshold, so the same slots, values and padding.
    x = torch.randn(50_000, generator=torch.Generator().manual_seed(4)).to(dtype)
    x[::313] = float("nan")
    torch.manual_seed(5)
    got = triton_select.select_sampled(x, 16_384, 200, 900, index_dtype=torch.int32, value_dtype=torch.float32)
    torch.manual_seed(5)
    limit = triton_select.threshold(x, 16_384, 200)
    expected = triton_select.select_at_least(x, limit, 900, index_dtype=torch.int32, value_dtype=torch.float32)
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype
        assert torch.equal(a, b)  # the interpreter runs the programs in order: the same slots
    assert 0 < int(got[2].sum()) <= 900


def test_topk_device_path_in_one_go_matches_the_two_step_selection(monkeypatch):
    monkeypatch.setattr(selection, "CHUNKED_DEVICES", ())
    x = torch.randn(300_000, generator=torch.Generator().manual_seed(6))
    k = 3_000
    torch.manual_seed(7)
    payload = gk.TopK(0.01).compress(x)
    torch.manual_seed(7)
    threshold = selection.sampled_threshold(x, k, 1.2)
    indices, values, valid = selection.entries_at_least(x, threshold, payload.tensors[0].numel())
    assert torch.equal(payload.meta["valid"], valid)
    assert torch.equal(payload.tensors[0], indices) and torch.equal(payload.tensors[1], values)


def test_the_threshold_kernel_zeroes_the_slot_counter():
    x = torch.randn(20_000, generator=torch.Generator().manual_seed(8))
    limit = torch.empty(1, dtype=torch.int32)
    count = torch.full((1,), 12_345, dtype=torch.int32)  # whatever memory held before
    triton_select._threshold_into(x, 16_384, 160, limit, count)
    assert int(count) == 0
    torch.manual_seed(9)
    expected = triton_select.threshold(x, 16_384, 160)
    torch.manual_seed(9)
    triton_select._threshold_into(x, 16_384, 160, limit, None)
    assert torch.equal(limit.view(torch.float32), expected)


def test_the_sample_start_read_from_the_device_gives_the_host_draw_s_threshold():
    # While a CUDA graph is captured the start comes from a device tensor (OFFSET_ON_DEVICE); the kernel must
    # read the same sample from it as from the host's number.
    n, size, top = 50_000, 16_384, 200
    x = torch.randn(n, generator=torch.Generator().manual_seed(10))
    _, kernel, _, _ = triton_select._kernels()
    step = max(1, round((math.sqrt(5) - 1) / 2 * n)) | 1
    results = []
    for on_device in (False, True):
        out, start = torch.empty(1, dtype=torch.int32), torch.tensor([31_337])
        kernel[(1,)](x.view(torch.int32), start, 0 if on_device else 31_337, out, out, n, size, step, top,
                     MAGNITUDE=0x7FFFFFFF, INF=0x7F800000, ROUNDS=18, BLOCK=16_384, OFFSET_ON_DEVICE=on_device,
                     ZERO_COUNT=False)  # fmt: skip
        results.append(out.view(torch.float32))
    assert torch.equal(results[0], results[1])
    sample = x[(31_337 + torch.arange(size, dtype=torch.int64) * step) % n]
    expected = torch.topk(sample.abs(), top).values[-1]
    assert expected.view(torch.int32) - 2**13 <= results[0].view(torch.int32)[0] <= expected.view(torch.int32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_exactly_k_from_the_kernel_s_values_matches_the_gathered_candidates(monkeypatch, dtype):
    # TopK(exactly_k=True) on the device path picks the k largest of the candidates' values as the select kernel
    # wrote them; the earlier path gathered them from the tensor again. Same draw, same payload.
    monkeypatch.setattr(selection, "CHUNKED_DEVICES", ())
    x = torch.randn(300_000, generator=torch.Generator().manual_seed(12)).to(dtype)
    x[::777] = float("nan")
    x[5] = float("inf")
    k = 3_000
    torch.manual_seed(13)
    payload = gk.TopK(0.01, exactly_k=True, value_dtype=torch.float32).compress(x)
    torch.manual_seed(13)
    n = x.numel()
    size = selection._triton_sample_size(n, k, selection.EXACT_K_TARGET)
    limit = triton_select.threshold(x, size, selection._top_count(size, n, k, selection.EXACT_K_TARGET))
    candidates = triton_select.select_at_least(
        x, limit, selection.exactly_k_capacity(n, k), index_dtype=torch.int64, value_dtype=x.dtype, pad=-1
    )[0]
    indices, valid = selection.exactly_k_of(x, candidates, k)
    indices_sent, values_sent = payload.tensors
    assert indices_sent.numel() == k and indices_sent.dtype == torch.int32 and values_sent.dtype == torch.float32
    assert torch.equal(payload.meta["valid"], valid)
    assert torch.equal(indices_sent.long(), indices)
    assert torch.equal(values_sent, selection.masked_values(x, indices, valid, torch.float32))
    assert bool(valid.all()) and not bool(values_sent.isnan().any()) and 5 in set(indices_sent.tolist())
