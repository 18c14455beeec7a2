"""The CPU's one-pass selection (`select_in_chunks`) and the fused compressor calls built on it.

Each fused call is checked against the plain composition it replaces: the same random draw
must choose the same entries, send the same values and leave the same residual.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import gradkit as gk
from compression_cases import F64
from gradkit.compression import selection
from gradkit.compression.base import Compressor

N = 1_300_003  # above the sampled path's minimum, over two 2**19-entry chunks and a short last one
TOPKS = {
    "fast": lambda: gk.TopK(0.01),
    "fp16_values": lambda: gk.TopK(0.01, value_dtype=torch.float16),
    "exactly_k": lambda: gk.TopK(0.01, exactly_k=True),
}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 2**20 + 13),  # across 2**19-entry chunks and 8-entry words
    threshold=st.floats(0.01, 4.0),
    capacity_share=st.floats(0.001, 1.0),
    nans=st.integers(0, 5),
    seed=st.integers(0, 2**16),
)
@example(n=7, threshold=0.1, capacity_share=1.0, nans=0, seed=0)
@example(n=2**19 + 1, threshold=3.0, capacity_share=0.5, nans=2, seed=1)
def test_select_in_chunks_matches_the_plain_mask_and_gathers_the_values(n, threshold, capacity_share, nans, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    x[torch.randint(n, (nans,), generator=g)] = float("nan")
    cut = torch.tensor(threshold)
    capacity = max(1, round(capacity_share * n))
    expected = ((x.abs() >= cut) | x.isnan()).nonzero().view(-1)[:capacity]  # NaN is selected, as on a GPU
    positions, values = selection.select_in_chunks(x, cut, capacity)
    assert torch.equal(positions, expected)
    torch.testing.assert_close(values, x[expected], rtol=0, atol=0, equal_nan=True)


def test_select_in_chunks_prepares_every_chunk_and_takes_only_what_it_returns():
    x = torch.randn(N, generator=torch.Generator().manual_seed(3))
    addend = torch.randn(N, generator=torch.Generator().manual_seed(4))
    into = x.clone()
    capacity = 900  # full within the first chunk: the later ones are still prepared

    def prepare(start, end):
        into[start:end] += addend[start:end]

    def take(chunk, local, found):
        chunk.index_fill_(0, local, 0.0)

    positions, values = selection.select_in_chunks(into, torch.tensor(2.5), capacity, prepare=prepare, take=take)
    total = x + addend
    expected = (total.abs() >= 2.5).nonzero().view(-1)[:capacity]
    assert torch.equal(positions, expected) and torch.equal(values, total[expected])
    total[expected] = 0.0
    assert torch.equal(into, total)


@pytest.mark.parametrize("name", list(TOPKS))
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_fused_compress_residual_equals_compress_then_residual(name, dtype):
    x = torch.randn(N, generator=torch.Generator().manual_seed(5), dtype=dtype)
    fused, plain = x.clone(), x.clone()
    torch.manual_seed(0)
    got = TOPKS[name]().compress_residual_(fused)
    torch.manual_seed(0)
    compressor = TOPKS[name]()
    expected = Compressor.compress_residual_(compressor, plain)
    assert torch.equal(compressor.decompress(got), compressor.decompress(expected))
    assert torch.equal(fused, plain)
    assert int(got.meta["valid"].sum()) >= 0.99 * round(0.01 * N)


@pytest.fixture(params=["chunked", "device_path"])
def path(request, monkeypatch):
    """The CPU's chunked pass, or the device's code (the sum formed first, then selected) on CPU tensors."""
    if request.param == "device_path":
        monkeypatch.setattr(selection, "CHUNKED_DEVICES", ())
    return request.param


@pytest.mark.parametrize("name", list(TOPKS))
def test_fused_compress_residual_of_a_sum_equals_it_on_the_sum(name, path):
    a = torch.randn(N, generator=torch.Generator().manual_seed(6))
    b = torch.randn(N, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)  # a narrower residual
    out = torch.full((N,), float("nan"))  # its old values are never read
    torch.manual_seed(1)
    got = TOPKS[name]().compress_residual_(out, sum_of=(a, b))
    plain = a + b
    torch.manual_seed(1)
    compressor = TOPKS[name]()
    expected = Compressor.compress_residual_(compressor, plain)
    assert torch.equal(compressor.decompress(got), compressor.decompress(expected))
    assert torch.equal(out, plain)
    assert torch.equal(a, torch.randn(N, generator=torch.Generator().manual_seed(6)))  # inputs untouched


# The two error-feedback calls, each with the dtype of residual it serves: absorb_sum_ adds the gradient
# into a residual of its dtype, absorb_into_ forms the sum in the gradient for a narrower residual.
ABSORBS = {"absorb_sum_": torch.float32, "absorb_into_": torch.bfloat16}


def _absorb(call, compressor, residual, grad, scale, keep, write_back, *, fused):
    # fused: the compressor's own method; otherwise the base class's default composition.
    method = getattr(type(compressor) if fused else Compressor, call)
    tensors = (residual, grad) if call == "absorb_sum_" else (grad, residual)
    return method(compressor, *tensors, scale, keep, write_back=write_back)


@pytest.mark.parametrize("name", list(TOPKS))
@pytest.mark.parametrize("call", list(ABSORBS))
@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("factor", [None, 1.0, 4.0])
def test_fused_absorb_equals_the_default_composition(name, call, keep, factor, path):
    # absorb_into_: the sum is formed in the float32 gradient, selected, stored rounded into the
    # bfloat16 residual chunk by chunk. With write_back, the sent values enter the gradient in the
    # selecting pass (exactly_k: every candidate, then the rejected ones are put back). Gradient,
    # residual and payload equal the plain composition's.
    residual = (torch.randn(N, generator=torch.Generator().manual_seed(11)) * 0.1).to(ABSORBS[call])
    grad = torch.randn(N, generator=torch.Generator().manual_seed(12))
    if not keep:  # a refused step: the caller's scale is 0
        grad[[7, 1_100_000, 1_200_000]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    scale = torch.tensor(0.5 if keep else 0.0)
    write_back = None if factor is None else torch.tensor(factor)
    into, addend, into_plain, addend_plain = residual.clone(), grad.clone(), residual.clone(), grad.clone()
    torch.manual_seed(3)
    got = _absorb(call, TOPKS[name](), into, addend, scale, torch.tensor(keep), write_back, fused=True)
    torch.manual_seed(3)
    compressor = TOPKS[name]()
    expected = _absorb(call, compressor, into_plain, addend_plain, scale, torch.tensor(keep), write_back, fused=False)
    sent = compressor.decompress(got)
    assert torch.equal(sent, compressor.decompress(expected))
    assert torch.equal(into, into_plain) and torch.equal(addend, addend_plain)
    # The gradient is left zeroed, or holding what is sent times write_back.
    assert torch.equal(addend, torch.zeros_like(addend) if factor is None else sent * factor)
    if factor is not None:
        assert (torch.count_nonzero(addend) > 0) == keep
    if keep:
        assert not torch.equal(into, residual) and torch.count_nonzero(sent) > 0
    else:
        assert torch.equal(into, residual) and torch.count_nonzero(sent) == 0


def test_fast_topk_drops_nan_from_what_it_sends():
    x = torch.randn(N, generator=torch.Generator().manual_seed(10))
    x[[3, 600_000, 1_200_000]] = float("nan")
    payload = gk.TopK(0.01).compress(x)
    indices, values = payload.tensors
    valid = payload.meta["valid"]
    assert not bool(values.isnan().any())
    assert not set(indices[valid].tolist()) & {3, 600_000, 1_200_000}
    assert torch.equal(values[valid], x[indices[valid].long()])
