"""Compressors on one process, against their definitions and plain references.

Error feedback loses nothing; sparse payloads carry exact values at the indices
they name; unbiased compressors are unbiased (statistical tests with bounds
derived from the variance); DGC matches a plain-Python momentum-correction
loop; PowerSGD reconstructs low-rank matrices exactly; checkpoints continue
bit-identically and load on another bucket layout; bad input is refused with
an error that names the argument.
"""

from __future__ import annotations

import io
import math
from statistics import NormalDist

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

import gradkit as gk
from gradkit.compression.base import count_for, index_dtype
from gradkit.compression.keyed_state import KeyedState
from gradkit.compression.sparsify import positions_at_least

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Nearly every tensor here is tiny: intra-op threads only add barrier waits, and
    # those grow to milliseconds per op when other processes share the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- helpers ---------------------------------------------------------------------------------


def z_bound(tests: int, alpha: float = 1e-6) -> float:
    """Two-sided z-score bound for `tests` simultaneous tests at family-wise error `alpha` (Bonferroni)."""
    return NormalDist().inv_cdf(1.0 - alpha / (2 * tests))


def sent_indices(payload: gk.Payload) -> torch.Tensor:
    """The flat indices a sparse payload really sends (padding left out)."""
    indices = payload.tensors[0].long()
    valid = payload.meta.get("valid")
    return indices[valid] if valid is not None else indices


def sent_mask(payload: gk.Payload) -> torch.Tensor:
    mask = torch.zeros(payload.numel, dtype=torch.bool)
    mask[sent_indices(payload)] = True
    return mask


def roundtrip(state):
    """`state` through torch.save / torch.load(weights_only=True)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def assert_same_state(a, b, path="state"):
    """Nested dicts of tensors and numbers, equal bit for bit."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            assert_same_state(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{tuple(a.shape)} != {b.dtype}{tuple(b.shape)}"
        assert torch.equal(a, b), f"{path}: values differ"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def energy(t: torch.Tensor) -> float:
    return float((t.double() ** 2).sum())


# -- 1. error feedback loses nothing ---------------------------------------------------------------

EF_COMPRESSORS = {
    "topk": lambda: gk.TopK(0.1, exact=True),
    "topk_fast": lambda: gk.TopK(0.05),
    "topk_fp16_values": lambda: gk.TopK(0.2, value_dtype=torch.float16),
    "threshold": lambda: gk.Threshold(0.8),
    "signsgd": lambda: gk.SignSGD(),
    "randomk_unscaled": lambda: gk.RandomK(0.3, scale=False, seed=3),
    "qsgd": lambda: gk.QSGD(4, block=8, seed=0),
    "fp16": lambda: gk.FP16(),
}
# Compressors whose output depends on nothing but the input (no random state).
DETERMINISTIC = ["topk", "threshold", "signsgd", "fp16"]

ef_shapes = st.one_of(
    st.just(()),
    st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple),
    st.just((130, 131)),  # above the sample size: TopK's sampled-threshold path with padding
)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", sorted(EF_COMPRESSORS) + ["bf16"])
def test_error_feedback_loses_nothing_in_the_gradients_own_dtype(name, dtype):
    # A cast to the input's own dtype must still copy: a payload aliasing the input would
    # make error feedback's residual (input - payload) zero and lose what was not sent.
    torch.manual_seed(0)
    ef = gk.ErrorFeedback(gk.BF16() if name == "bf16" else EF_COMPRESSORS[name]())
    grad = torch.randn(40, generator=torch.Generator().manual_seed(1)).to(dtype)
    sent = ef.decompress(ef.compress(grad, key="w"))
    assert sent.dtype == dtype
    # exact but for the rounding of input - payload in the input's dtype (SignSGD's scaled signs)
    ulp = torch.finfo(dtype).eps * grad.abs().max().item()
    assert_close((sent + ef.residual("w").view(40)).double(), grad.double(), rtol=0, atol=2 * ulp)
    assert grad.abs().sum() > 0 and sent.abs().sum() > 0


@SETTINGS
@given(
    name=st.sampled_from(sorted(EF_COMPRESSORS)),
    shape=ef_shapes,
    steps=st.integers(1, 12),
    seed=st.integers(0, 2**31 - 1),
    log_scale=st.integers(-3, 2),
)
@example(name="topk_fast", shape=(130, 131), steps=6, seed=1, log_scale=0)
@example(name="topk_fp16_values", shape=(130, 131), steps=6, seed=2, log_scale=-3)
def test_error_feedback_sent_plus_residual_is_the_sum_of_gradients(name, shape, steps, seed, log_scale):
    torch.manual_seed(seed)  # the fast top-k samples its threshold from the global generator
    gen = torch.Generator().manual_seed(seed)
    ef = gk.ErrorFeedback(EF_COMPRESSORS[name]())
    grad_sum = torch.zeros(shape, dtype=F64)
    sent_sum = torch.zeros(shape, dtype=F64)
    for _ in range(steps):
        grad = torch.randn(shape, generator=gen, dtype=F64) * 10.0**log_scale
        payload = ef.compress(grad, key="w")
        sent = ef.decompress(payload)
        assert sent.shape == grad.shape and sent.dtype == F64
        grad_sum += grad
        sent_sum += sent
    residual = ef.residual("w")
    assert residual is not None and residual.numel() == grad_sum.numel()
    assert_close(sent_sum + residual.view(shape), grad_sum, rtol=0, atol=1e-9)


@SETTINGS
@given(
    name=st.sampled_from(sorted(EF_COMPRESSORS)),
    shapes=st.lists(st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple), min_size=2, max_size=4),
    order=st.lists(st.integers(0, 3), min_size=1, max_size=30),
    seed=st.integers(0, 2**31 - 1),
)
def test_error_feedback_keys_interleaved_keep_their_own_residuals(name, shapes, order, seed):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    keys = [f"layer{i}.weight" for i in range(len(shapes))]
    ef = gk.ErrorFeedback(EF_COMPRESSORS[name]())
    alone = {key: gk.ErrorFeedback(EF_COMPRESSORS[name]()) for key in keys}  # one per key
    grad_sum = {key: torch.zeros(shape, dtype=F64) for key, shape in zip(keys, shapes)}
    sent_sum = {key: torch.zeros(shape, dtype=F64) for key, shape in zip(keys, shapes)}
    for i in order:
        key = keys[i % len(keys)]
        grad = torch.randn(grad_sum[key].shape, generator=gen, dtype=F64)
        sent = ef.decompress(ef.compress(grad, key=key))
        grad_sum[key] += grad
        sent_sum[key] += sent
        if name in DETERMINISTIC:  # keys do not leak into each other
            assert torch.equal(sent, alone[key].decompress(alone[key].compress(grad, key=key)))
    for key in keys:
        residual = ef.residual(key)
        if residual is None:  # never compressed
            assert torch.equal(grad_sum[key], torch.zeros_like(grad_sum[key]))
            continue
        assert_close(sent_sum[key] + residual.view(grad_sum[key].shape), grad_sum[key], rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", sorted(EF_COMPRESSORS))
def test_error_feedback_discard_keeps_and_commit_applies_the_residual(name):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    shapes = {"w": (6, 5), "b": (6,)}
    grads = [{key: torch.randn(shape, generator=gen, dtype=F64) for key, shape in shapes.items()} for _ in range(3)]
    deferred = gk.ErrorFeedback(EF_COMPRESSORS[name]())
    immediate = gk.ErrorFeedback(EF_COMPRESSORS[name]())
    sent = {key: torch.zeros(shape, dtype=F64) for key, shape in shapes.items()}
    for key, grad in grads[0].items():
        sent[key] += deferred.decompress(deferred.compress(grad, key=key))
        immediate.compress(grad, key=key)
    before = {key: deferred.residual(key) for key in shapes}

    # A step that is thrown away (e.g. non-finite somewhere): the residuals stay as they were.
    for key, grad in grads[1].items():
        deferred.compress(grad * 1e3, key=key, commit=False)
        assert torch.equal(deferred.residual(key), before[key])  # not applied yet
    deferred.discard()
    deferred.commit()  # nothing pending any more: a no-op
    for key in shapes:
        assert torch.equal(deferred.residual(key), before[key])

    # A deferred step that is kept: commit() applies it, as committing at once does.
    for key, grad in grads[2].items():
        payload = deferred.compress(grad, key=key, commit=False)
        sent[key] += deferred.decompress(payload)
        at_once = immediate.decompress(immediate.compress(grad, key=key))
        if name in DETERMINISTIC:
            assert torch.equal(deferred.decompress(payload), at_once)
    for key in shapes:
        assert torch.equal(deferred.residual(key), before[key])
    deferred.commit()
    for key in shapes:
        if name in DETERMINISTIC:
            assert torch.equal(deferred.residual(key), immediate.residual(key))
        assert not torch.equal(deferred.residual(key), before[key])
        total = grads[0][key] + grads[2][key]  # the discarded step left no trace
        assert_close(sent[key] + deferred.residual(key).view(total.shape), total, rtol=0, atol=1e-9)


# -- 2. payloads ----------------------------------------------------------------------------------


def gaussian(n, seed=0, dtype=torch.float32):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def with_zeros(n, nonzeros, seed=0, dtype=torch.float32):
    """`n` entries of which `nonzeros` (at random places, magnitudes over six decades) are not 0."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, dtype=F64)
    where = torch.randperm(n, generator=gen)[:nonzeros]
    magnitudes = 10.0 ** (torch.rand(nonzeros, generator=gen, dtype=F64) * 6 - 4)
    x[where] = magnitudes * torch.where(torch.rand(nonzeros, generator=gen) < 0.5, -1.0, 1.0).to(F64)
    return x.to(dtype)


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
SPARSIFIERS = {
    "topk_fast": lambda: gk.TopK(0.05),
    "topk_exact": lambda: gk.TopK(0.05, exact=True),
    "threshold": lambda: gk.Threshold(1.5),
}


@pytest.mark.parametrize("input_name", sorted(SPARSE_INPUTS))
@pytest.mark.parametrize("compressor_name", sorted(SPARSIFIERS))
def test_sparse_payload_has_exact_values_at_its_indices_and_zeros_elsewhere(compressor_name, input_name):
    torch.manual_seed(0)
    x = SPARSE_INPUTS[input_name]()
    compressor = SPARSIFIERS[compressor_name]()
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
    if compressor_name == "threshold":
        assert torch.equal(mask, flat.abs() >= 1.5)


@pytest.mark.parametrize(
    "n, density",
    [(1, 0.5), (1, 0.001), (2, 0.01), (2, 1.0), (37, 0.3), (1000, 0.01), (1000, 0.0004), (40_000, 0.001), (40_000, 0.02)],
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
        ("pareto_1.5", lambda g: (1 - torch.rand(1_000_000, generator=g)).pow_(-1 / 1.5) * torch.randn(1_000_000, generator=g).sign()),
        ("lognormal_signs", lambda g: torch.randn(1_000_000, generator=g).exp_().pow_(3) * torch.randn(1_000_000, generator=g).sign()),
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
    [lambda dt: gk.TopK(0.01, value_dtype=dt), lambda dt: gk.TopK(0.01, exact=True, value_dtype=dt), lambda dt: gk.Threshold(1.0, value_dtype=dt), lambda dt: gk.DGC(0.01, value_dtype=dt)],
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


ALL_COMPRESSORS = {
    "topk": lambda: gk.TopK(0.1),
    "topk_exact": lambda: gk.TopK(0.1, exact=True),
    "randomk": lambda: gk.RandomK(0.1),
    "threshold": lambda: gk.Threshold(0.1),
    "dgc": lambda: gk.DGC(0.1),
    "fp16": lambda: gk.FP16(),
    "bf16": lambda: gk.BF16(),
    "qsgd": lambda: gk.QSGD(),
    "signsgd": lambda: gk.SignSGD(),
    "powersgd": lambda: gk.PowerSGD(1),
    "error_feedback": lambda: gk.ErrorFeedback(gk.TopK(0.1)),
}


@pytest.mark.parametrize("shape", [(0,), (0, 5), (5, 0)])
@pytest.mark.parametrize("name", sorted(ALL_COMPRESSORS))
def test_empty_tensors_round_trip(name, shape):
    compressor = ALL_COMPRESSORS[name]()
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
    return ((norms / levels) ** 2 * p * (1 - p)).view(-1)[: flat.numel()], (norms / levels).expand_as(padded).reshape(-1)[: flat.numel()]


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


@pytest.mark.parametrize("n, m, r", [(30, 20, 1), (30, 20, 3), (64, 9, 2), (12, 50, 4)])
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
    inputs = [torch.randn(16, 9, generator=gen, dtype=F64) + 3 * torch.outer(torch.ones(16, dtype=F64), torch.arange(9, dtype=F64)) for _ in range(6)]
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
    assert [dgc.density_at(s) for s in range(11)] == [0.25, 0.25, 0.0625, 0.0625, 0.015625, 0.015625, 0.004, 0.004, 0.001, 0.001, 0.001]
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


# -- 3. checkpoints ---------------------------------------------------------------------------------

CHECKPOINTED = {
    "error_feedback_topk": (lambda: gk.ErrorFeedback(gk.TopK(0.2, exact=True)), True),
    "error_feedback_randomk": (lambda: gk.ErrorFeedback(gk.RandomK(0.3, scale=False, seed=5)), True),
    "error_feedback_signsgd": (lambda: gk.ErrorFeedback(gk.SignSGD()), True),
    "error_feedback_qsgd_seeded": (lambda: gk.ErrorFeedback(gk.QSGD(4, block=8, seed=2)), True),
    "dgc": (lambda: gk.DGC(0.1, 0.9, warmup_steps=4, clip_norm=3.0), True),
    "powersgd": (lambda: gk.PowerSGD(2, seed=3), True),
    "powersgd_cold_start": (lambda: gk.PowerSGD(1, warm_start=False), True),
    "randomk": (lambda: gk.RandomK(0.1, seed=9), False),
}


def checkpoint_inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    shapes = {"w": (12, 10), "b": (12,)}
    return [(key, torch.randn(shapes[key], generator=gen, dtype=F64)) for _ in range(8) for key in ("w", "b")]


def run_steps(compressor, inputs, keyed):
    return [compressor.decompress(compressor.compress(x, key=key) if keyed else compressor.compress(x)) for key, x in inputs]


@pytest.mark.parametrize("split", [0, 1, 6, 16])
@pytest.mark.parametrize("name", sorted(CHECKPOINTED))
def test_restored_state_continues_bit_identically(name, split):
    make, keyed = CHECKPOINTED[name]
    inputs = checkpoint_inputs(seed=split)
    straight = make()
    expected = run_steps(straight, inputs, keyed)
    interrupted = make()
    run_steps(interrupted, inputs[:split], keyed)
    saved = roundtrip(interrupted.state_dict())
    restored = make()
    run_steps(restored, checkpoint_inputs(seed=99)[:3], keyed)  # state of its own, replaced by the load
    restored.load_state_dict(saved)
    assert_same_state(restored.state_dict(), interrupted.state_dict())
    resumed = run_steps(restored, inputs[split:], keyed)
    for a, b in zip(resumed, expected[split:]):
        assert torch.equal(a, b)
    assert_same_state(restored.state_dict(), straight.state_dict())


BUCKET = (("w", (4, 3)), ("b", (3,)))


def test_keyed_state_loads_across_bucket_layouts():
    bucket = KeyedState(["residual"])
    state = bucket.get(BUCKET, torch.zeros(15, dtype=F64))
    state["residual"].copy_(torch.arange(15, dtype=F64))
    saved = roundtrip(bucket.state_dict())
    assert torch.equal(saved["residual"]["w"], torch.arange(12, dtype=F64))
    assert torch.equal(saved["residual"]["b"], torch.arange(12, 15, dtype=F64))

    single = KeyedState(["residual"])
    single.load_state_dict(saved, "test")
    assert torch.equal(single.get((("b", (3,)),), torch.zeros(3, dtype=F64))["residual"], torch.arange(12, 15, dtype=F64))
    assert torch.equal(single.get((("w", (4, 3)),), torch.zeros(12, dtype=F64))["residual"], torch.arange(12, dtype=F64))

    # And back, into a bucket with the other order.
    again = KeyedState(["residual"])
    again.load_state_dict(roundtrip(single.state_dict()), "test")
    flipped = again.get((("b", (3,)), ("w", (4, 3))), torch.zeros(15, dtype=F64))["residual"]
    assert torch.equal(flipped, torch.cat([torch.arange(12, 15), torch.arange(12)]).to(F64))
    assert_same_state(again.state_dict(), saved)


@pytest.mark.parametrize("make", [lambda: gk.ErrorFeedback(gk.FP16()), lambda: gk.ErrorFeedback(gk.BF16())])
@pytest.mark.parametrize("saved_as", ["bucket", "single"])
def test_error_feedback_checkpoint_loads_on_another_bucket_layout(make, saved_as):
    # Casting is entry by entry, so a bucket and its parameters one by one give the same numbers.
    gen = torch.Generator().manual_seed(0)
    grads = [{"w": torch.randn(4, 3, generator=gen, dtype=F64), "b": torch.randn(3, generator=gen, dtype=F64)} for _ in range(6)]

    def step(ef, grad, as_bucket):
        if as_bucket:
            flat = torch.cat([grad["w"].reshape(-1), grad["b"]])
            sent = ef.decompress(ef.compress(flat, key=BUCKET))
            return {"w": sent[:12].view(4, 3), "b": sent[12:]}
        return {key: ef.decompress(ef.compress(grad[key], key=key)) for key in ("w", "b")}

    first = make()
    for grad in grads[:3]:
        step(first, grad, saved_as == "bucket")
    saved = roundtrip(first.state_dict())
    assert set(saved["residuals"]) == {"w", "b"}
    straight = make()
    for grad in grads[:3]:
        step(straight, grad, saved_as == "bucket")
    restored = make()
    restored.load_state_dict(saved)
    for grad in grads[3:]:
        expected = step(straight, grad, saved_as == "bucket")
        got = step(restored, grad, saved_as != "bucket")  # the other layout
        for key in ("w", "b"):
            assert torch.equal(got[key], expected[key])
    assert_same_state(restored.state_dict(), straight.state_dict())


@pytest.mark.parametrize("make", [lambda: gk.ErrorFeedback(gk.FP16()), lambda: gk.DGC(0.3, value_dtype=torch.float64), lambda: gk.PowerSGD(1)])
def test_state_follows_each_parameter_when_the_bucket_layout_changes(make):
    # DDP rebuilds its buckets after the first iteration: the same compressor object then sees
    # new layouts. Its per-parameter state must move with the parameters, as a checkpoint would.
    gen = torch.Generator().manual_seed(0)
    grads = [{"w": torch.randn(4, 3, generator=gen, dtype=F64), "b": torch.randn(3, generator=gen, dtype=F64)} for _ in range(5)]
    flipped = (("b", (3,)), ("w", (4, 3)))

    def step(compressor, grad, layout):
        flat = torch.cat([grad[name].reshape(-1) for name, _ in layout])
        return compressor.decompress(compressor.compress(flat, key=layout))

    live, reference = make(), make()
    for grad in grads[:2]:
        step(live, grad, BUCKET)
        step(reference, grad, BUCKET)
    moved = make()
    moved.load_state_dict(roundtrip(reference.state_dict()))  # the checkpoint route, known to be right
    for grad in grads[2:]:
        assert torch.equal(step(live, grad, flipped), step(moved, grad, flipped))
    assert_same_state(live.state_dict(), moved.state_dict())


def test_a_key_that_changes_shape_is_refused_and_keeps_its_state():
    ef = gk.ErrorFeedback(gk.TopK(0.5))
    ef.compress(torch.arange(6, dtype=F64), key="w")
    before = ef.state_dict()
    with pytest.raises(ValueError, match=r"'w' has 6 entries but 'w' has shape \(2, 4\)"):
        ef.compress(torch.ones(2, 4, dtype=F64), key="w")
    assert_same_state(ef.state_dict(), before)



@pytest.mark.parametrize("bad", ["nan", "zero_items"])
@pytest.mark.parametrize("make", [lambda: gk.TopK(0.25, exact=True), lambda: gk.DGC(0.25), lambda: gk.PowerSGD(1)])
def test_a_step_that_raises_leaves_the_compressor_state_as_before(make, bad):
    # The compressor ran for the failed step; its deferred state must be dropped, not
    # committed with (or instead of) the next step's.
    def run(with_failed_step):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3).double()
        average = gk.Average(make())
        pipe = gk.GradientPipeline(model, average=average, nonfinite="raise")
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(1)
        for step in range(3):
            x = torch.randn(5, 4, generator=gen, dtype=F64)
            if with_failed_step and step == 1:
                with pytest.raises(FloatingPointError if bad == "nan" else ValueError):
                    pipe.backward(model(x).pow(2).sum() * (float("nan") if bad == "nan" else 1.0), num_items=torch.tensor(0 if bad == "zero_items" else 5))
                    pipe.step(opt)
            pipe.backward(model(x).pow(2).sum(), num_items=torch.tensor(5))
            pipe.step(opt)
        return {"compressor": average.state_dict(), "params": {str(i): p.detach().clone() for i, p in enumerate(model.parameters())}}

    assert_same_state(run(True), run(False))



@pytest.mark.parametrize("make", [lambda: gk.TopK(0.25, exact=True), lambda: gk.DGC(0.25), lambda: gk.PowerSGD(1)])
def test_compressor_state_does_not_carry_the_amp_loss_scale(make):
    # GradScaler doubles its scale every step here: residuals and momentum kept in scaled
    # units would be wrong by that factor. The run must match the one without a scaler.
    def run(scaler):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        average = gk.Average(make())
        pipe = gk.GradientPipeline(model, average=average, scaler=scaler)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            pipe.backward(model(torch.randn(5, 4, generator=gen)).pow(2).sum(), num_items=5)
            assert pipe.step(opt)
        return average.state_dict(), [p.detach().clone() for p in model.parameters()]

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    (scaled_state, scaled_params), (plain_state, plain_params) = run(scaler), run(None)
    assert scaler.get_scale() == 2.0**15  # the scale really moved
    assert_close(scaled_params, plain_params, rtol=1e-6, atol=0)
    key = "residuals" if "residuals" in plain_state["compressor"] else "momentum"
    assert_close(scaled_state["compressor"][key], plain_state["compressor"][key], rtol=1e-6, atol=1e-9)



def test_ddp_hook_state_refuses_state_it_cannot_hold():
    from gradkit.integrations.ddp import CommHookState

    saved = {"compressor": {"residuals": {"w": torch.ones(3)}, "compressor": {}}}
    with pytest.raises(ValueError, match="no compressor"):
        CommHookState(None, None, {}, None).load_state_dict(saved)
    hooked = CommHookState(gk.ErrorFeedback(gk.TopK(0.5)), None, {}, None)
    with pytest.raises(ValueError, match="missing keys \\['compressor'\\]"):
        hooked.load_state_dict({"residuals": {}})
    hooked.load_state_dict(saved)
    assert torch.equal(hooked.state_dict()["compressor"]["residuals"]["w"], torch.ones(3))



def test_a_float16_overflow_skips_the_step():
    model = torch.nn.Linear(2, 1)
    pipe = gk.GradientPipeline(model, average=gk.Average(gk.FP16()))
    before = [p.detach().clone() for p in model.parameters()]
    pipe.backward(model(torch.full((1, 2), 1e5)).sum() * 1e3)  # gradients of 1e8: beyond float16's 65504
    assert not pipe.step(torch.optim.SGD(model.parameters(), lr=0.1))
    assert pipe.last.skipped and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))



@pytest.mark.parametrize("make", [lambda: gk.ErrorFeedback(gk.TopK(0.5, exact=True)), lambda: gk.DGC(0.5)])
def test_an_immediate_commit_keeps_other_keys_deferred(make):
    compressor = make()
    compressor.compress(torch.tensor([3.0, 1.0]), key="a", commit=False)
    compressor.compress(torch.tensor([3.0, 1.0]), key="b")  # commit=True: b's state only
    compressor.discard()  # a's deferred state goes
    state = compressor.state_dict()
    kept = state["residuals"] if "residuals" in state else state["velocity"]
    assert torch.equal(kept["a"], torch.zeros(2)) and not torch.equal(kept["b"], torch.zeros(2))


def test_commit_from_several_threads_commits_each_entry_once():
    # DDP completes a hook's futures on several threads, and each one commits.
    import sys
    import threading

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        for _ in range(30):
            ef, errors = gk.ErrorFeedback(gk.TopK(0.5, exact=True)), []
            for i in range(100):
                ef.compress(torch.tensor([2.0, 1.0]), key=f"p{i}", commit=False)

            def commit():
                try:
                    ef.commit()
                except Exception as error:  # noqa: BLE001 - reported below
                    errors.append(error)

            threads = [threading.Thread(target=commit) for _ in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert not errors, errors[:1]
            residuals = ef.state_dict()["residuals"]
            assert all(torch.equal(residuals[f"p{i}"], torch.tensor([0.0, 1.0])) for i in range(100))
    finally:
        sys.setswitchinterval(interval)


def test_loaded_state_of_another_size_is_refused_at_first_use():
    ef = gk.ErrorFeedback(gk.TopK(0.5))
    ef.load_state_dict({"residuals": {"w": torch.ones(3, dtype=F64)}, "compressor": {}})
    with pytest.raises(ValueError, match="'w'"):
        ef.compress(torch.ones(4, 3, dtype=F64), key="w")
    assert_same_state(ef.state_dict()["residuals"], {"w": torch.ones(3, dtype=F64)})
    # A bucket whose total size matches while its parts do not.
    ef.load_state_dict({"residuals": {"w": torch.ones(9, dtype=F64), "b": torch.ones(6, dtype=F64)}, "compressor": {}})
    with pytest.raises(ValueError, match="'w'"):
        ef.compress(torch.ones(15, dtype=F64), key=BUCKET)
    assert set(ef.state_dict()["residuals"]) == {"w", "b"}


# -- 4. bad input -----------------------------------------------------------------------------------

BAD_DENSITIES = [(0, ValueError), (0.0, ValueError), (-0.1, ValueError), (1.5, ValueError), (float("nan"), ValueError), ("0.1", TypeError), (None, TypeError), (True, TypeError)]
BAD_CONFIGS = [
    *[(f"{cls.__name__}(density={d!r})", lambda cls=cls, d=d: cls(d), error, "density") for cls in (gk.TopK, gk.RandomK, gk.DGC) for d, error in BAD_DENSITIES],
    ("QSGD(levels=0)", lambda: gk.QSGD(0), ValueError, "levels"),
    ("QSGD(levels=128)", lambda: gk.QSGD(128), ValueError, "levels"),
    ("QSGD(levels=2.5)", lambda: gk.QSGD(2.5), TypeError, "levels"),
    ("QSGD(block=0)", lambda: gk.QSGD(block=0), ValueError, "block"),
    ("PowerSGD(rank=0)", lambda: gk.PowerSGD(0), ValueError, "rank"),
    ("PowerSGD(rank=-1)", lambda: gk.PowerSGD(-1), ValueError, "rank"),
    ("PowerSGD(seed=-1)", lambda: gk.PowerSGD(1, seed=-1), ValueError, "seed"),
    ("Threshold(tau=0)", lambda: gk.Threshold(0), ValueError, "tau"),
    ("Threshold(tau=-1e-3)", lambda: gk.Threshold(-1e-3), ValueError, "tau"),
    ("Threshold(tau=nan)", lambda: gk.Threshold(float("nan")), ValueError, "tau"),
    ("Threshold(tau='1')", lambda: gk.Threshold("1"), TypeError, "tau"),
    ("DGC(momentum=1)", lambda: gk.DGC(0.01, 1.0), ValueError, "momentum"),
    ("DGC(momentum=-0.1)", lambda: gk.DGC(0.01, -0.1), ValueError, "momentum"),
    ("DGC(warmup_steps=-1)", lambda: gk.DGC(0.01, warmup_steps=-1), ValueError, "warmup_steps"),
    ("DGC(clip_norm=0)", lambda: gk.DGC(0.01, clip_norm=0.0), ValueError, "clip_norm"),
    ("RandomK(seed=-1)", lambda: gk.RandomK(0.1, seed=-1), ValueError, "seed"),
    *[(f"{name}(value_dtype=int8)", make, TypeError, "value_dtype") for name, make in [
        ("TopK", lambda: gk.TopK(0.1, value_dtype=torch.int8)),
        ("Threshold", lambda: gk.Threshold(0.1, value_dtype=torch.int8)),
        ("DGC", lambda: gk.DGC(0.1, value_dtype=torch.int8)),
        ("TopK", lambda: gk.TopK(0.1, value_dtype="float16")),
    ]],
    ("ErrorFeedback(object)", lambda: gk.ErrorFeedback(object()), TypeError, "compressor"),
    ("ErrorFeedback(TopK class)", lambda: gk.ErrorFeedback(gk.TopK), TypeError, "compressor"),
    ("ErrorFeedback(ErrorFeedback)", lambda: gk.ErrorFeedback(gk.ErrorFeedback(gk.TopK(0.1))), TypeError, "compressor"),
]


@pytest.mark.parametrize("make, error, name", [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_configuration_is_refused_by_name(make, error, name):
    with pytest.raises(error, match=name):
        make()


@pytest.mark.parametrize("bad", [torch.arange(6), torch.ones(3, dtype=torch.int32), torch.ones(2, dtype=torch.bool), [1.0, 2.0], 3.0, None])
@pytest.mark.parametrize("name", sorted(ALL_COMPRESSORS))
def test_compress_refuses_non_floating_tensors(name, bad):
    with pytest.raises(TypeError, match="tensor"):
        ALL_COMPRESSORS[name]().compress(bad)


def inner(compressor):
    """The compressor that makes the payloads (error feedback hands them over from the one it wraps)."""
    return compressor.compressor if isinstance(compressor, gk.ErrorFeedback) else compressor


@pytest.mark.parametrize("name", sorted(ALL_COMPRESSORS))
def test_decompress_refuses_foreign_payloads(name):
    compressor = ALL_COMPRESSORS[name]()
    x = gaussian(100, dtype=torch.float32).view(10, 10)
    for make in ALL_COMPRESSORS.values():
        other = make()
        if type(inner(other)) is type(inner(compressor)):
            continue
        payload = other.compress(x)
        with pytest.raises(ValueError, match="payload"):
            compressor.decompress(payload)
    for not_a_payload in (x, [x], None, {"tensors": [x]}):
        with pytest.raises(TypeError, match="Payload"):
            compressor.decompress(not_a_payload)


def stateful_after_steps(name):
    make, keyed = CHECKPOINTED[name]
    compressor = make()
    run_steps(compressor, checkpoint_inputs(seed=1)[:5], keyed)
    return compressor


BAD_STATES = {
    "error_feedback_randomk": [
        [],
        {},
        {"residuals": {}},
        {"residuals": {}, "compressor": {"step": 0}, "extra": 1},
        {"residuals": [], "compressor": {"step": 0}},
        {"residuals": {"w": "not a tensor"}, "compressor": {"step": 0}},
        {"residuals": {"w": torch.zeros(3)}, "compressor": {"step": -1}},
        {"residuals": {"w": torch.zeros(3)}, "compressor": {"step": "3"}},
        {"residuals": {"w": torch.zeros(3)}, "compressor": {}},
        # a valid compressor state with bad residuals: the compressor must not keep it
        {"residuals": {"w": [0.0]}, "compressor": {"step": 123}},
        {"residuals": None, "compressor": {"step": 123}},
    ],
    "error_feedback_topk": [{"residuals": {}, "compressor": {"step": 0}}, {"residuals": {"w": 1.0}, "compressor": {}}],
    "dgc": [
        [],
        {},
        {"momentum": {}, "velocity": {}},
        {"momentum": {}, "velocity": {}, "steps": {}, "extra": 0},
        {"momentum": {}, "velocity": {}, "steps": {"w": -1}},
        {"momentum": {}, "velocity": {}, "steps": {"w": 1.5}},
        {"momentum": {}, "velocity": {}, "steps": [1]},
        {"momentum": {"w": torch.zeros(3)}, "velocity": {"w": "x"}, "steps": {"w": 1}},
        {"momentum": [], "velocity": {}, "steps": {"w": 1}},
    ],
    "powersgd": [
        [],
        {},
        {"residuals": {}},
        {"residuals": {}, "q": {}, "extra": 0},
        {"residuals": {}, "q": {"w": torch.zeros(10, 1)}},  # saved with another rank
        {"residuals": {}, "q": {"w": torch.zeros(10)}},
        {"residuals": {}, "q": {"w": "x"}},
        {"residuals": {"w": "x"}, "q": {"w": torch.zeros(10, 2)}},
        {"residuals": [], "q": {}},
    ],
    "randomk": [[], {}, {"step": -1}, {"step": "3"}, {"step": 1.0}, {"step": True}, {"step": 1, "extra": 0}, None],
}


@pytest.mark.parametrize("name", sorted(BAD_STATES))
def test_failed_load_names_the_state_and_changes_nothing(name):
    compressor = stateful_after_steps(name)
    before = compressor.state_dict()
    for bad in BAD_STATES[name]:
        with pytest.raises((ValueError, TypeError), match="state_dict"):
            compressor.load_state_dict(bad)
        assert_same_state(compressor.state_dict(), before)
    # and it still continues exactly like an untouched twin
    _, keyed = CHECKPOINTED[name]
    twin = stateful_after_steps(name)
    more = checkpoint_inputs(seed=2)[:4]
    for a, b in zip(run_steps(compressor, more, keyed), run_steps(twin, more, keyed)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("compressor", [gk.TopK(0.1), gk.SignSGD(), gk.QSGD()])
def test_stateless_compressors_refuse_foreign_state(compressor):
    assert compressor.state_dict() == {}
    compressor.load_state_dict({})
    with pytest.raises(ValueError, match="state_dict"):
        compressor.load_state_dict({"step": 0})
    with pytest.raises(TypeError, match="state_dict"):
        compressor.load_state_dict([])


def test_keyed_state_refuses_bad_state_and_keeps_its_own():
    keyed = KeyedState(["momentum", "velocity"])
    keyed.get(BUCKET, torch.zeros(15))["momentum"].fill_(1.0)
    before = keyed.state_dict()
    for bad in ({}, {"momentum": {}}, {"momentum": {}, "velocity": {}, "x": {}}, {"momentum": {"w": 1}, "velocity": {}}, {"momentum": [], "velocity": {}}, None):
        with pytest.raises((ValueError, TypeError), match="load_state_dict"):
            keyed.load_state_dict(bad, "Owner")
        assert_same_state(keyed.state_dict(), before)


# -- 5. no host sync in the fast top-k ----------------------------------------------------------------

HOST_SYNCS = ["item", "tolist", "__bool__", "__int__", "__float__", "__index__"]


def test_fast_topk_never_syncs_with_the_host(monkeypatch):
    x = gaussian(200_000, seed=3)

    def host_sync(*args, **kwargs):
        raise AssertionError("host sync in the fast top-k path")

    for name in HOST_SYNCS:
        monkeypatch.setattr(torch.Tensor, name, host_sync)
    with pytest.raises(AssertionError):  # the trap is set
        bool(x[0] > 0)
    payload = gk.TopK(0.01).compress(x)
    monkeypatch.undo()
    assert "valid" in payload.meta  # it took the sampled-threshold path
    assert 1000 <= int(payload.meta["valid"].sum()) <= 3000


@pytest.mark.parametrize("inner", [gk.DGC(0.1), gk.PowerSGD(1), gk.ErrorFeedback(gk.TopK(0.1))])
def test_error_feedback_refuses_compressors_that_keep_their_own_residual(inner):
    with pytest.raises(TypeError, match="stateless compressor"):
        gk.ErrorFeedback(inner)
