"""Payloads against their definitions: sparse ones carry exact values at their indices, unbiased
compressors are unbiased, DGC matches a plain momentum-correction loop, PowerSGD reconstructs
low-rank matrices exactly."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

import gradkit as gk
from compression_cases import (
    ALL,
    F64,
    SPARSIFIERS,
    assert_same_state,
    build,
    energy,
    gaussian,
    sent_indices,
    sent_mask,
    with_zeros,
    z_bound,
)
from gradkit.compression.base import count_for, index_dtype
from gradkit.compression.sparsify import positions_at_least

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


SPARSE_INPUTS = {
    "gaussian_50k": lambda: gaussian(50_000, seed=1),
    "gaussian_7x5": lambda: gaussian(35, seed=2).view(7, 5),
    "many_zeros_50k": lambda: with_zeros(50_000, 300, seed=3),
    "all_zeros_20k": lambda: torch.zeros(20_000),
    "numel_1": lambda: torch.tensor([-2.5]),
    "numel_2": lambda: torch.tensor([0.5, -3.0]),
    "scalar": lambda: torch.tensor(1.75),
    "float64_3d": lambda: gaussian(120, seed=4, dtype=F64).view(4, 5, 6),
}


@pytest.mark.parametrize("input_name", sorted(SPARSE_INPUTS))
@pytest.mark.parametrize("compressor_name", SPARSIFIERS)
def test_sparse_payload_has_exact_values_at_its_indices_and_zeros_elsewhere(compressor_name, input_name):
    torch.manual_seed(0)
    x = SPARSE_INPUTS[input_name]()
    compressor = build(compressor_name)
    payload = compressor.compress(x)
    indices, values = payload.tensors
    assert indices.dtype == torch.int32  # half the index bytes of int64
    assert values.dtype == x.dtype
    assert payload.shape == x.shape and payload.dtype == x.dtype
    valid = payload.meta.get("valid")
    if valid is not None:  # padding sends index 0 with value 0
        assert torch.equal(values[~valid], torch.zeros_like(values[~valid]))
        assert torch.equal(indices[~valid].long(), torch.zeros_like(indices[~valid].long()))
    sent = sent_indices(payload)
    assert sent.unique().numel() == sent.numel(), "an index is sent twice"
    mask = sent_mask(payload)
    dense = compressor.decompress(payload)
    assert dense.shape == x.shape and dense.dtype == x.dtype
    flat, dense = x.reshape(-1), dense.reshape(-1)
    assert torch.equal(dense[mask], flat[mask])
    assert torch.equal(dense[~mask], torch.zeros_like(dense[~mask]))
    if isinstance(compressor, gk.Threshold):
        assert torch.equal(mask, flat.abs() >= compressor.tau)


@pytest.mark.parametrize(
    "n, density",
    [
        (1, 0.5),
        (1, 0.001),
        (2, 0.01),
        (2, 1.0),
        (37, 0.3),
        (1000, 0.01),
        (1000, 0.0004),
        (40_000, 0.001),
        (40_000, 0.02),
    ],
)
def test_exact_topk_keeps_exactly_k_largest_magnitudes(n, density):
    x = gaussian(n, seed=n)
    payload = gk.TopK(density, exact=True).compress(x)
    k = min(n, max(1, round(density * n)))
    mask = sent_mask(payload)
    assert payload.tensors[0].numel() == k and int(mask.sum()) == k
    if k < n:
        assert x[mask].abs().min() >= x[~mask].abs().max()


@pytest.mark.parametrize(
    "name, make",
    [
        ("gaussian", lambda g: torch.randn(1_000_000, generator=g)),
        ("cauchy", lambda g: torch.empty(1_000_000).cauchy_(generator=g)),
        (
            "pareto_1.5",
            lambda g: (
                (1 - torch.rand(1_000_000, generator=g)).pow_(-1 / 1.5) * torch.randn(1_000_000, generator=g).sign()
            ),
        ),
        (
            "lognormal_signs",
            lambda g: torch.randn(1_000_000, generator=g).exp_().pow_(3) * torch.randn(1_000_000, generator=g).sign(),
        ),
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_fast_topk_count_and_energy_against_exact(name, make, seed):
    torch.manual_seed(seed)
    x = make(torch.Generator().manual_seed(100 + seed))
    density = 0.01
    k = round(density * x.numel())
    fast = gk.TopK(density).compress(x)
    exact = gk.TopK(density, exact=True).compress(x)
    count = int(fast.meta["valid"].sum())
    assert 0.5 * k <= count <= 1.5 * k, f"{name}: sent {count} entries for k = {k}"
    assert fast.tensors[0].numel() == math.ceil(1.5 * k)  # a fixed size: ranks all-gather in one go
    kept = energy(gk.TopK(density).decompress(fast))
    best = energy(gk.TopK(density).decompress(exact))
    assert kept >= 0.9 * best, f"{name}: kept {kept / best:.3f} of top-k's energy"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 3 * 2**20 + 13),  # across the CPU path's 2**20-entry chunks and 8-entry words
    threshold=st.floats(0.01, 4.0),
    capacity_share=st.floats(0.001, 1.0),
    nans=st.integers(0, 5),
    seed=st.integers(0, 2**16),
)
@example(n=7, threshold=0.1, capacity_share=1.0, nans=0, seed=0)
@example(n=2**20, threshold=3.0, capacity_share=0.5, nans=2, seed=1)
def test_selected_positions_match_the_plain_mask(n, threshold, capacity_share, nans, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    x[torch.randint(n, (nans,), generator=g)] = float("nan")
    cut = torch.tensor(threshold)
    capacity = max(1, round(capacity_share * n))
    expected = (x.abs() >= cut).nonzero().view(-1)[:capacity]  # NaN compares False
    got = positions_at_least(x, cut, capacity)
    assert got.numel() == capacity
    assert torch.equal(got[: expected.numel()], expected)
    assert bool((got[expected.numel() :] == -1).all())


@pytest.mark.parametrize("density", [0.01, 0.001])
def test_fast_topk_count_stays_near_its_aim_at_low_density(density):
    # The sample is sized for ~256 hits at any density: the count stays within ~6% of
    # 1.2·k (a fixed 16,384-entry sample would hold ~20 hits at 0.1%: a ~22% spread).
    n = 1_000_000
    k = round(density * n)
    counts = []
    for seed in range(8):
        torch.manual_seed(seed)
        x = torch.randn(n, generator=torch.Generator().manual_seed(50 + seed))
        counts.append(int(gk.TopK(density).compress(x).meta["valid"].sum()))
    assert all(1.0 * k <= c <= 1.4 * k for c in counts), f"counts {counts} for k = {k}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, F64])
@pytest.mark.parametrize("nonzeros", [0, 400, 6000])
def test_fast_topk_on_many_exact_zeros_sends_no_zeros(dtype, nonzeros):
    torch.manual_seed(0)
    n, density = 200_000, 0.01
    k = round(density * n)
    x = with_zeros(n, nonzeros, seed=nonzeros, dtype=dtype)
    payload = gk.TopK(density).compress(x)
    mask = sent_mask(payload)
    assert not bool((x[mask] == 0).any()), "zeros were sent as entries"
    dense = gk.TopK(density).decompress(payload)
    assert torch.equal(dense[mask], x[mask])
    if nonzeros <= k:  # fewer candidates than k: every one of them is sent
        assert torch.equal(mask, x != 0)
    else:
        assert 0.5 * k <= int(mask.sum()) <= 1.5 * k
        exact = gk.TopK(density, exact=True)
        assert energy(dense) >= 0.9 * energy(exact.decompress(exact.compress(x)))


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("shape", [(), (1,), (2,), (3, 4), (50_000,)])
def test_topk_density_one_returns_the_tensor_exactly(exact, shape):
    x = gaussian(max(1, math.prod(shape)), seed=7).view(shape)
    compressor = gk.TopK(1.0, exact=exact)
    assert torch.equal(compressor.decompress(compressor.compress(x)), x)


@pytest.mark.parametrize(
    "make",
    [
        lambda dt: gk.TopK(0.01, value_dtype=dt),
        lambda dt: gk.TopK(0.01, exact=True, value_dtype=dt),
        lambda dt: gk.Threshold(1.0, value_dtype=dt),
        lambda dt: gk.DGC(0.01, value_dtype=dt),
    ],
)
def test_float16_values_halve_the_value_bytes(make):
    torch.manual_seed(0)
    x = gaussian(60_000, seed=5)
    full, half = make(None), make(torch.float16)
    torch.manual_seed(0)
    payload_full = full.compress(x)
    torch.manual_seed(0)
    payload_half = half.compress(x)
    assert payload_half.tensors[1].dtype == torch.float16
    assert payload_half.tensors[1].nbytes * 2 == payload_full.tensors[1].nbytes
    assert payload_half.tensors[0].nbytes == payload_full.tensors[0].nbytes
    dense = half.decompress(payload_half)
    assert dense.dtype == torch.float32
    mask = sent_mask(payload_half)
    assert torch.equal(dense[mask], x[mask].half().float())


def test_index_dtype_is_int32_below_2_to_the_31():
    assert index_dtype(2**31 - 1) == torch.int32
    assert index_dtype(2**31) == torch.int64
    assert count_for(0.01, 0) == 0 and count_for(0.01, 1) == 1 and count_for(0.01, 1000) == 10


@pytest.mark.parametrize("shape", [(0,), (0, 5), (5, 0)])
@pytest.mark.parametrize("name", ALL)
def test_empty_tensors_round_trip(name, shape):
    compressor = build(name)
    x = torch.zeros(shape)
    dense = compressor.decompress(compressor.compress(x))
    assert dense.shape == x.shape and dense.dtype == x.dtype


def qsgd_variance(x: torch.Tensor, levels: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-entry variance of one QSGD decompression, (norm/s)² p(1-p) with p the fractional
    level, and the quantization step norm/s."""
    flat = x.reshape(-1).double()
    padded = torch.cat([flat, flat.new_zeros((-flat.numel()) % block)]).view(-1, block)
    norms = torch.linalg.vector_norm(padded, dim=1, keepdim=True)
    scaled = padded.abs() / norms * levels
    p = scaled - scaled.floor()
    return ((norms / levels) ** 2 * p * (1 - p)).view(-1)[: flat.numel()], (norms / levels).expand_as(padded).reshape(
        -1
    )[: flat.numel()]


def assert_unbiased(mean: torch.Tensor, x: torch.Tensor, variance: torch.Tensor, draws: int, slack: torch.Tensor):
    """Per-entry and aggregate z-scores of `mean` (of `draws` independent samples) around `x`."""
    error = (mean - x).reshape(-1)
    sd = (variance.reshape(-1) / draws).sqrt() + slack.reshape(-1)
    z = error.abs() / sd
    bound = z_bound(error.numel())
    assert float(z.max()) <= bound, f"entry {int(z.argmax())}: z = {float(z.max()):.2f} > {bound:.2f}"
    # A bias along x's own direction (e.g. rounding towards or away from zero) adds up over entries.
    weights = x.reshape(-1).sign()
    aggregate = (weights * error).sum() / ((weights**2 * sd**2).sum().sqrt())
    assert abs(float(aggregate)) <= z_bound(1), f"aggregate z = {float(aggregate):.2f}"


def test_qsgd_is_unbiased():
    levels, block, draws = 4, 64, 4000
    x = gaussian(300, seed=11, dtype=F64)  # 300 = 4 blocks of 64 and a partial one
    x[::17] = 0.0
    compressor = gk.QSGD(levels, block=block, seed=0)
    total = torch.zeros_like(x)
    for _ in range(draws):
        payload = compressor.compress(x)
        sample = compressor.decompress(payload)
        assert sample.dtype == F64 and sample.shape == x.shape
        total += sample
    variance, step = qsgd_variance(x, levels, block)
    # The quantizer works in float32: allow its rounding on top of the sampling noise.
    assert_unbiased(total / draws, x, variance, draws, slack=step * 1e-6)
    assert payload.tensors[1].dtype == torch.int8
    assert int(payload.tensors[1].abs().max()) <= levels


def test_randomk_scaled_is_unbiased():
    n, density, draws = 40, 0.25, 5000
    x = gaussian(n, seed=12, dtype=F64).view(5, 8)
    compressor = gk.RandomK(density, seed=4)
    k = round(density * n)
    total = torch.zeros_like(x)
    for _ in range(draws):
        payload = compressor.compress(x)
        assert payload.tensors[0].numel() == k  # only the values travel
        total += compressor.decompress(payload)
    # Each of k draws (with replacement) hits an entry with probability 1/n and adds x·n/k:
    # Var = x² · (n/k) · (1 - 1/n) per decompression.
    variance = x**2 * (n / k) * (1 - 1 / n)
    assert_unbiased(total / draws, x, variance, draws, slack=x.abs() * 1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("compressor, wire", [(gk.FP16(), torch.float16), (gk.BF16(), torch.bfloat16)])
def test_casts_round_trip_within_their_precision(compressor, wire, dtype):
    gen = torch.Generator().manual_seed(0)
    # Magnitudes over six decades, all normal numbers in float16.
    signs = torch.where(torch.rand(2000, generator=gen) < 0.5, -1.0, 1.0).to(F64)
    x = (signs * 10.0 ** (torch.rand(2000, generator=gen, dtype=F64) * 6 - 3)).to(dtype).view(40, 50)
    payload = compressor.compress(x)
    assert payload.tensors[0].dtype == wire
    assert payload.nbytes == x.numel() * 2
    dense = compressor.decompress(payload)
    assert dense.dtype == dtype and dense.shape == x.shape
    # Round to nearest: relative error at most half a unit in the last place.
    assert bool(((dense - x).abs() <= x.abs() * torch.finfo(wire).eps / 2).all())


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("n", [1, 7, 1073, 8192])
def test_signsgd_sends_mean_magnitude_times_sign(n, dtype):
    x = gaussian(n, seed=n, dtype=dtype)
    x[::5] = 0.0  # zero counts as positive
    compressor = gk.SignSGD()
    payload = compressor.compress(x)
    dense = compressor.decompress(payload)
    assert dense.dtype == dtype and dense.shape == x.shape
    expected = x.double().abs().mean() * torch.where(x >= 0, 1.0, -1.0).double()
    assert_close(dense.double(), expected, rtol=1e-6, atol=0)
    scale_bytes = 4
    assert payload.nbytes == math.ceil(n / 8) + scale_bytes
    if n % 8 == 0:  # one bit per entry: 32x fewer bytes than float32, plus the scale
        assert (payload.nbytes - scale_bytes) * 32 == n * 4


@pytest.mark.parametrize("n, m, r", [(30, 20, 1), (30, 20, 3), (64, 9, 2), (12, 50, 4), (40, 30, 6)])
def test_powersgd_reconstructs_a_rank_r_matrix_exactly(n, m, r):
    gen = torch.Generator().manual_seed(n * m + r)
    matrix = torch.randn(n, r, generator=gen, dtype=F64) @ torch.randn(r, m, generator=gen, dtype=F64)
    compressor = gk.PowerSGD(rank=r)
    payload = compressor.compress(matrix, key="w")
    assert payload.nbytes == (n + m) * r * 8  # two thin factors went on the wire
    assert_close(compressor.decompress(payload), matrix, rtol=0, atol=1e-10)
    assert float(compressor.state_dict()["residuals"]["w"].abs().max()) <= 1e-10
    # One rank less cannot do it: the test sees a lossy approximation.
    if r > 1:
        lower = gk.PowerSGD(rank=r - 1)
        assert float((lower.decompress(lower.compress(matrix, key="w")) - matrix).abs().max()) > 1e-3


@pytest.mark.parametrize("shape, r", [((6, 5), 3), ((4, 4), 2), ((8, 2), 2), ((3, 3, 3), 3), ((17,), 1), ((), 1)])
def test_powersgd_sends_uncompressible_tensors_as_they_are(shape, r):
    x = gaussian(max(1, math.prod(shape)), seed=3, dtype=F64).view(shape)
    compressor = gk.PowerSGD(rank=r)
    payload = compressor.compress(x, key="w")
    assert torch.equal(compressor.decompress(payload), x)
    assert payload.nbytes == x.numel() * 8
    assert torch.equal(compressor.state_dict()["residuals"]["w"], torch.zeros(x.numel(), dtype=F64))


@pytest.mark.parametrize("rank", [1, 2])
def test_powersgd_error_feedback_tracks_the_sum_of_inputs(rank):
    gen = torch.Generator().manual_seed(rank)
    matrix = torch.randn(40, 30, generator=gen, dtype=F64)  # full rank: never sent exactly
    compressor = gk.PowerSGD(rank=rank)
    sent_sum = torch.zeros_like(matrix)
    errors = {}
    for t in range(1, 101):
        sent_sum += compressor.decompress(compressor.compress(matrix, key="w"))
        residual = compressor.state_dict()["residuals"]["w"].view_as(matrix)
        assert_close(sent_sum + residual, t * matrix, rtol=0, atol=1e-9)
        errors[t] = float(torch.linalg.norm(sent_sum / t - matrix) / torch.linalg.norm(matrix))
    # Without the residual the average would stay a rank-r approximation (error ~0.9).
    assert errors[100] < 0.25 and errors[100] < 0.5 * errors[25]


def test_powersgd_warm_start_and_error_feedback_match_a_plain_power_iteration():
    gen = torch.Generator().manual_seed(5)
    inputs = [
        torch.randn(16, 9, generator=gen, dtype=F64)
        + 3 * torch.outer(torch.ones(16, dtype=F64), torch.arange(9, dtype=F64))
        for _ in range(6)
    ]
    compressor = gk.PowerSGD(rank=2)
    compressor.compress(inputs[0], key="w")
    state = compressor.state_dict()
    q, error = state["q"]["w"], state["residuals"]["w"].view(16, 9)  # continue from the first step's state
    for matrix in inputs[1:]:
        corrected = matrix + error
        p_hat = torch.linalg.qr(corrected @ q).Q  # one power-iteration step from the previous Q
        q = corrected.T @ p_hat
        approximation = p_hat @ q.T
        error = corrected - approximation
        assert_close(compressor.decompress(compressor.compress(matrix, key="w")), approximation, rtol=1e-10, atol=1e-10)
        assert_close(compressor.state_dict()["q"]["w"], q, rtol=1e-10, atol=1e-10)


def test_powersgd_bucket_of_a_matrix_and_a_vector_loses_nothing():
    layout = (("w", (12, 10)), ("b", (12,)))
    gen = torch.Generator().manual_seed(0)
    compressor = gk.PowerSGD(rank=1)
    grad_sum = torch.zeros(132, dtype=F64)
    sent_sum = torch.zeros(132, dtype=F64)
    for _ in range(5):
        flat = torch.randn(132, generator=gen, dtype=F64)
        sent = compressor.decompress(compressor.compress(flat, key=layout))
        assert torch.equal(sent[120:], flat[120:])  # the vector goes as it is
        grad_sum += flat
        sent_sum += sent
    residuals = compressor.state_dict()["residuals"]
    assert_close(sent_sum + torch.cat([residuals["w"], residuals["b"]]), grad_sum, rtol=0, atol=1e-12)


# -- DGC against a plain-Python reference ----------------------------------------------------------


def dgc_reference(grads, density, momentum, clip_norm=None):
    """Momentum correction, local clipping, top-k of the velocity, momentum factor masking.

    Plain Python floats, step by step from the paper; yields (sent, u, v) per step.
    """
    n = len(grads[0])
    u, v = [0.0] * n, [0.0] * n
    for g in grads:
        if clip_norm is not None:
            norm = math.sqrt(sum(gi * gi for gi in g))
            g = [gi * min(1.0, clip_norm / (norm + 1e-6)) for gi in g]
        u = [momentum * ui + gi for ui, gi in zip(u, g)]
        v = [vi + ui for vi, ui in zip(v, u)]
        k = min(n, max(1, round(density * n)))
        chosen = sorted(range(n), key=lambda i: abs(v[i]), reverse=True)[:k]
        sent = [0.0] * n
        for i in chosen:
            sent[i] = v[i]
            u[i] = 0.0
            v[i] = 0.0
        yield sent, list(u), list(v)


@SETTINGS
@given(
    n=st.integers(1, 60),
    density=st.sampled_from([0.05, 0.1, 0.3, 1.0]),
    momentum=st.sampled_from([0.0, 0.5, 0.9]),
    clip_norm=st.sampled_from([None, 0.5, 5.0]),
    steps=st.integers(1, 8),
    seed=st.integers(0, 2**31 - 1),
)
def test_dgc_matches_plain_momentum_correction(n, density, momentum, clip_norm, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(n, generator=gen, dtype=F64) for _ in range(steps)]
    dgc = gk.DGC(density, momentum, clip_norm=clip_norm)
    for grad, (sent, u, v) in zip(grads, dgc_reference([g.tolist() for g in grads], density, momentum, clip_norm)):
        dense = dgc.decompress(dgc.compress(grad, key="w"))
        assert_close(dense, torch.tensor(sent, dtype=F64), rtol=1e-12, atol=1e-12)
        state = dgc.state_dict()
        assert_close(state["momentum"]["w"], torch.tensor(u, dtype=F64), rtol=1e-12, atol=1e-12)
        assert_close(state["velocity"]["w"], torch.tensor(v, dtype=F64), rtol=1e-12, atol=1e-12)
    assert dgc.state_dict()["steps"] == {"w": steps}


def test_dgc_density_warmup_schedule():
    dgc = gk.DGC(0.001, warmup_steps=8)
    assert [dgc.density_at(s) for s in range(11)] == [
        0.25,
        0.25,
        0.0625,
        0.0625,
        0.015625,
        0.015625,
        0.004,
        0.004,
        0.001,
        0.001,
        0.001,
    ]
    assert [gk.DGC(0.1, warmup_steps=4).density_at(s) for s in range(6)] == [0.25, 0.1, 0.1, 0.1, 0.1, 0.1]
    assert [gk.DGC(0.01).density_at(s) for s in range(3)] == [0.01] * 3
    # The schedule is what compress uses, counted per key (n = 2000: 500, 125, 31, 8, 2 entries).
    gen = torch.Generator().manual_seed(0)
    counts = []
    for _ in range(10):
        payload = dgc.compress(torch.randn(2000, generator=gen, dtype=F64), key="w")
        counts.append(int(sent_mask(payload).sum()))
    assert counts == [500, 500, 125, 125, 31, 31, 8, 8, 2, 2]
    other = dgc.compress(torch.randn(2000, generator=gen, dtype=F64), key="b")
    assert int(sent_mask(other).sum()) == 500  # a new key starts its own warm-up


def test_dgc_discard_keeps_state_and_step_commit_applies_them():
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(300, generator=gen, dtype=F64) for _ in range(3)]
    deferred, immediate = gk.DGC(0.05, warmup_steps=4), gk.DGC(0.05, warmup_steps=4)
    deferred.compress(grads[0], key="w")
    immediate.compress(grads[0], key="w")
    before = deferred.state_dict()
    deferred.compress(grads[1] * 1e3, key="w", commit=False)
    assert_same_state(deferred.state_dict(), before)
    deferred.discard()
    assert_same_state(deferred.state_dict(), before)
    sent = deferred.decompress(deferred.compress(grads[2], key="w", commit=False))
    assert_same_state(deferred.state_dict(), before)
    deferred.commit()
    assert torch.equal(sent, immediate.decompress(immediate.compress(grads[2], key="w")))
    assert_same_state(deferred.state_dict(), immediate.state_dict())


def test_dgc_local_clipping():
    dgc = gk.DGC(1.0, momentum=0.0, clip_norm=0.5)
    big = gaussian(50, seed=1, dtype=F64) * 10
    sent = dgc.decompress(dgc.compress(big, key="w"))
    assert_close(float(torch.linalg.vector_norm(sent)), 0.5, rtol=1e-6, atol=0)
    assert_close(sent, big * (0.5 / (float(torch.linalg.vector_norm(big)) + 1e-6)), rtol=1e-12, atol=0)
    small = big / float(torch.linalg.vector_norm(big)) * 0.1
    assert torch.equal(dgc.decompress(dgc.compress(small, key="w")), small)  # below the norm: as it is


@pytest.mark.parametrize("exactly_k", [False, True])
def test_dgc_masks_exactly_the_sent_entries_on_the_sampled_path(exactly_k):
    # Above the sample size the payload has padding (index 0, not valid): masking at the sent
    # indices must zero momentum and velocity there and leave every other entry, index 0 included
    # when it is not sent, exactly as the momentum correction made it.
    gen = torch.Generator().manual_seed(7)
    n, momentum = 50_000, 0.9
    dgc = gk.DGC(0.01, momentum, exactly_k=exactly_k)
    u, v = torch.zeros(n, dtype=F64), torch.zeros(n, dtype=F64)
    for step in range(3):
        grad = torch.randn(n, generator=gen, dtype=F64)
        if step == 1:
            grad[0] = 1e-9  # index 0 small: never selected, while padding points at it
        payload = dgc.compress(grad, key="w")
        u = u * momentum + grad
        v = v + u
        sent = sent_mask(payload)
        assert sent.sum() > 0.9 * 0.01 * n and payload.meta.get("valid") is not None  # padded slots
        assert torch.equal(dgc.decompress(payload)[sent], v[sent])
        u, v = torch.where(sent, 0.0, u), torch.where(sent, 0.0, v)
        state = dgc.state_dict()
        assert torch.equal(state["momentum"]["w"], u) and torch.equal(state["velocity"]["w"], v)
    assert not bool(sent[0]) and state["velocity"]["w"][0] != 0
