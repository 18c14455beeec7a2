"""Fixed-size payloads: exactly k slots from a sampled threshold, the top-k's energy, no host reads.

Every test runs twice: on the CPU selection path, and on the device path (the one CUDA
takes: trunc division and `nonzero_static`) called with CPU tensors, so that the GPU's
code is what these assertions check.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import gradkit as gk
from compression_cases import F64, energy, sent_indices, sent_mask, with_zeros
from gradkit.compression import selection, sparsify
from host_reads import forbid_host_sync

N = 1_000_000


@pytest.fixture(params=["cpu_path", "device_path"])
def path(request, monkeypatch):
    if request.param == "device_path":
        monkeypatch.setattr(selection, "CHUNKED_DEVICES", ())  # a CPU tensor takes the device's code
        monkeypatch.setattr(selection, "positions_at_least", selection.positions_at_least_device)
        monkeypatch.setattr(sparsify, "positions_at_least", selection.positions_at_least_device)
    return request.param


def gradient_like(name: str, seed: int) -> torch.Tensor:
    """Heavy-tailed entries with random signs, the way real gradients are distributed."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.randn(N, generator=g).sign()
    if name == "gaussian":
        return torch.randn(N, generator=g)
    if name == "student_t3":  # gaussian / sqrt(chi2(3)/3)
        chi2 = torch.randn(3, N, generator=g).square().sum(0) / 3
        return torch.randn(N, generator=g) / chi2.sqrt()
    if name == "pareto_1.5":
        return (1 - torch.rand(N, generator=g)).pow_(-1 / 1.5) * signs
    if name == "lognormal":
        return torch.randn(N, generator=g).exp_() * signs
    if name == "layers":  # blocks whose scales differ by decades, like a model's layers
        scales = 10.0 ** torch.linspace(-4, 0, 8).repeat_interleave(N // 8)
        return torch.randn(N, generator=g) * scales
    raise ValueError(name)


def top_k_energy(x: torch.Tensor, k: int) -> float:
    return float(torch.topk(x.abs().double(), k, sorted=False).values.square().sum())


@pytest.mark.parametrize("name", ["gaussian", "student_t3", "pareto_1.5", "lognormal", "layers"])
@pytest.mark.parametrize("density", [0.01, 0.001])
def test_exactly_k_sends_k_entries_with_the_top_k_energy(path, name, density):
    torch.manual_seed(1)
    x = gradient_like(name, seed=7)
    k = round(density * N)
    compressor = gk.TopK(density, exactly_k=True)
    payload = compressor.compress(x)
    indices, values = payload.tensors
    assert indices.numel() == k and values.numel() == k  # the wire size is known in advance
    assert indices.dtype == torch.int32 and values.dtype == x.dtype
    valid = payload.meta["valid"]
    assert valid.numel() == k and bool(valid.all()), f"{int(valid.sum())} of {k} slots used"
    assert sent_indices(payload).unique().numel() == k
    kept = energy(compressor.decompress(payload))
    assert kept >= 0.9 * top_k_energy(x, k)
    # Candidates between k and 2k: the k kept are the exact top-k (no ties in continuous data).
    exact = torch.zeros(N, dtype=torch.bool)
    exact[torch.topk(x.abs(), k, sorted=False).indices] = True
    assert torch.equal(sent_mask(payload), exact)


def test_the_small_k_bounds_the_topk_docstring_names():
    # TopK's docstring and sparse-gradients.md: k of at most 213 (189 with exactly_k) goes to torch.topk.
    for target, last_exact in ((selection.EXACT_K_TARGET, 189), (sparsify._TARGET, 213)):
        assert not selection.sampling_aims_well(10**7, last_exact, target)
        assert selection.sampling_aims_well(10**7, last_exact + 1, target)
    assert not selection.sampling_aims_well(selection.MIN_SAMPLE, 1000, sparsify._TARGET)  # small tensors too


@pytest.mark.parametrize("k", [1, 10, 150])
@pytest.mark.parametrize("exactly_k", [False, True])
def test_a_small_k_is_the_exact_top_k_in_every_call(k, exactly_k):
    # A sample of a big tensor holds ~1.2·k entries above its threshold when k is small (not the 256 that aim
    # within ~6%): the count strayed (1 call in 4 overflowed 1.5·k at k=10) and exactly_k missed the top-k in
    # ~1 call in 8. torch.topk selects such a k, exactly, in every call.
    n = 20_000
    compressor = gk.TopK(k / n, exactly_k=exactly_k)
    for seed in range(40):
        x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
        payload = compressor.compress(x)
        exact = torch.zeros(n, dtype=torch.bool)
        exact[torch.topk(x.abs(), k, sorted=False).indices] = True
        assert torch.equal(sent_mask(payload), exact), seed


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, F64])
@pytest.mark.parametrize("nonzeros", [0, 2000, 20_000])
def test_exactly_k_on_many_exact_zeros_pads_instead_of_sending_zeros(path, dtype, nonzeros):
    torch.manual_seed(0)
    n, density = 200_000, 0.05
    k = round(density * n)
    x = with_zeros(n, nonzeros, seed=nonzeros, dtype=dtype)
    payload = gk.TopK(density, exactly_k=True).compress(x)
    indices, values = payload.tensors
    valid = payload.meta["valid"]
    assert indices.numel() == k and values.numel() == k
    assert torch.equal(indices[~valid], torch.zeros_like(indices[~valid]))  # padding: index 0, value 0
    assert torch.equal(values[~valid], torch.zeros_like(values[~valid]))
    mask = sent_mask(payload)
    assert not bool((x[mask] == 0).any()), "zeros were sent as entries"
    dense = gk.TopK(density).decompress(payload)
    assert torch.equal(dense[mask], x[mask])
    if nonzeros <= k:  # fewer candidates than k: every one of them is sent, the rest is padding
        assert torch.equal(mask, x != 0)
    else:
        assert int(valid.sum()) == k
        assert energy(dense) >= 0.9 * top_k_energy(x, k)


def test_exactly_k_never_sends_nan_and_sends_inf(path):
    torch.manual_seed(0)
    x = gradient_like("gaussian", seed=3)
    x[::1000] = float("nan")
    x[7::50_000] = float("inf")
    payload = gk.TopK(0.01, exactly_k=True).compress(x)
    sent = x[sent_indices(payload)]
    assert not bool(sent.isnan().any())
    assert int(sent.isinf().sum()) == 20
    assert payload.tensors[0].numel() == 10_000


def test_default_fast_path_never_sends_nan(path):
    torch.manual_seed(0)
    x = gradient_like("gaussian", seed=4)
    x[::500] = float("nan")
    payload = gk.TopK(0.01).compress(x)
    assert not bool(x[sent_indices(payload)].isnan().any())
    assert payload.tensors[0].numel() == 15_000  # the default keeps its 1.5·k slots


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 300_000),
    threshold=st.floats(0.01, 4.0),
    capacity_share=st.floats(0.001, 1.0),
    nans=st.integers(0, 5),
    infs=st.integers(0, 3),
    dtype=st.sampled_from([torch.float32, F64]),
    seed=st.integers(0, 2**16),
)
@example(n=7, threshold=0.1, capacity_share=1.0, nans=0, infs=0, dtype=torch.float32, seed=0)
def test_device_positions_match_the_plain_mask(n, threshold, capacity_share, nans, infs, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=dtype)
    x[torch.randint(n, (nans,), generator=g)] = float("nan")
    x[torch.randint(n, (infs,), generator=g)] = float("-inf")
    # The threshold as the sampled one comes: a 0-d tensor in x's dtype; entries right at it count.
    cut = torch.tensor(threshold, dtype=dtype)
    x[torch.randint(n, (2,), generator=g)] = cut
    capacity = max(1, round(capacity_share * n))
    expected = ((x.abs() >= cut) | x.isnan()).nonzero().view(-1)[:capacity]
    got = selection.positions_at_least_device(x, cut, capacity)
    assert got.numel() == capacity
    assert torch.equal(got[: expected.numel()], expected)
    assert bool((got[expected.numel() :] == -1).all())


@pytest.mark.parametrize("tau, qualifying", [(3.0, "fewer than k"), (1.0, "more than k")])
def test_threshold_fixed_size_sends_the_largest_of_those_above_tau(path, tau, qualifying):
    torch.manual_seed(0)
    x = gradient_like("gaussian", seed=5)
    density = 0.01
    k = round(density * N)
    compressor = gk.Threshold(tau, max_density=density)
    assert not compressor.variable_size and gk.Threshold(tau).variable_size
    payload = compressor.compress(x)
    assert payload.tensors[0].numel() == k and payload.tensors[1].numel() == k
    mask = sent_mask(payload)
    above = x.abs() >= tau
    if qualifying == "fewer than k":
        assert int(above.sum()) < k
        assert torch.equal(mask, above)
    else:
        assert int(above.sum()) > k
        exact = torch.zeros(N, dtype=torch.bool)
        exact[torch.topk(x.abs(), k, sorted=False).indices] = True
        assert torch.equal(mask, exact)
    dense = compressor.decompress(payload)
    assert torch.equal(dense[mask], x[mask]) and not bool(dense[~mask].any())


@pytest.mark.parametrize("n, tau", [(100, 0.5), (5000, 2.5), (3, 10.0)])
def test_threshold_fixed_size_on_small_tensors(n, tau):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    compressor = gk.Threshold(tau, max_density=0.1)
    payload = compressor.compress(x)
    k = max(1, round(0.1 * n))
    assert payload.tensors[0].numel() == k
    mask = sent_mask(payload)
    above = x.abs() >= tau
    if int(above.sum()) <= k:
        assert torch.equal(mask, above)
    else:
        assert int(mask.sum()) == k and bool(above[mask].all())
        assert float(x[mask].abs().min()) >= float(x[~mask].abs().max())


def test_dgc_exactly_k_sends_k_entries_per_tensor(path):
    torch.manual_seed(0)
    dgc = gk.DGC(0.01, exactly_k=True)
    for step in range(3):
        payload = dgc.compress(gradient_like("student_t3", seed=step)[:200_000], key="w")
        assert payload.tensors[0].numel() == 2000 and bool(payload.meta["valid"].all())
        # What was sent starts over: the velocity is zero exactly there.
        velocity = dgc.state_dict()["velocity"]["w"]
        assert not bool(velocity[sent_indices(payload)].any())


def test_bad_fixed_size_options_are_refused_by_name():
    with pytest.raises(TypeError, match="exactly_k must be True or False"):
        gk.TopK(0.01, exactly_k="yes")
    with pytest.raises(TypeError, match="exactly_k must be True or False"):
        gk.DGC(0.01, exactly_k=1)
    with pytest.raises(ValueError, match="density"):
        gk.Threshold(0.1, max_density=0.0)
    with pytest.raises((TypeError, ValueError), match="density"):
        gk.Threshold(0.1, max_density="0.1")


def test_randomk_draws_on_the_tensors_device_and_decompresses_with_that_draw():
    x = torch.randn(50_000, generator=torch.Generator().manual_seed(0))
    compressor = gk.RandomK(0.01, seed=3, scale=False)
    payload = compressor.compress(x)
    assert payload.meta["drawn_on"] == x.device
    dense = compressor.decompress(payload)
    kept = dense != 0
    assert torch.equal(dense[kept], x[kept]) and 0 < int(kept.sum()) <= 500
    # The same draw again from the step counter (the CPU generator, as before).
    g = torch.Generator().manual_seed(3 * 1_000_003 + 0)
    assert torch.equal(payload.tensors[0], x[torch.randint(50_000, (500,), generator=g)])


@pytest.mark.parametrize(
    "make, keyed, slots",
    [
        (lambda: gk.TopK(0.01, exactly_k=True), False, 3000),
        (lambda: gk.TopK(0.01), False, 4500),
        (lambda: gk.Threshold(1.0, max_density=0.01), False, 3000),
        (lambda: gk.RandomK(0.01, seed=1), False, 3000),
        (lambda: gk.DGC(0.01, exactly_k=True), True, 3000),
        (lambda: gk.ErrorFeedback(gk.TopK(0.01, exactly_k=True)), True, 3000),
    ],
)
def test_fixed_size_compressors_never_read_a_tensor_on_the_host(path, monkeypatch, make, keyed, slots):
    x = gradient_like("student_t3", seed=11)[:300_000]
    compressor = make()
    forbid_host_sync(monkeypatch)
    with pytest.raises(AssertionError, match="host sync"):  # the trap is set
        bool(x[0] > 0)
    for _ in range(2):
        payload = compressor.compress(x, key="w") if keyed else compressor.compress(x)
        dense = compressor.decompress(payload)
    monkeypatch.undo()
    assert dense.shape == x.shape and payload.tensors[0].numel() == slots
