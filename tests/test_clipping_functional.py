"""gk.clip_grad_norm_, gk.clip_grad_value_ and gk.grad_norms against torch.nn.utils.

Also: the norm reduced over a process group (real processes, gloo), input
checks, and no host sync on the hot path.
"""

from __future__ import annotations

import functools
import gc
import math
import sys
import time

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

import gradkit as gk
import param_sets
from dist_helpers import WorkerError, run_workers
from host_reads import forbid_host_sync
from param_sets import clone_params, make_params

INF = float("inf")
NORM_TYPES = [1.0, 2.0, INF, 0.5, 3.7]
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- building parameter sets --------------------------------------------------------

tensor_specs = param_sets.tensor_specs(max_dims=3, max_log_scale=3)


def tolerance(dtypes):
    """Tight tolerances for the lowest precision among `dtypes`."""
    if torch.bfloat16 in dtypes:
        return {"rtol": 1.6e-2, "atol": 1e-5}
    if torch.float32 in dtypes:
        return {"rtol": 2e-6, "atol": 1e-9}
    return {"rtol": 1e-12, "atol": 1e-15}


def assert_grads_close(actual, expected, **tol):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert (a.grad is None) == (e.grad is None)
        if a.grad is not None:
            assert a.grad.dtype == e.grad.dtype
            assert_close(a.grad, e.grad, equal_nan=True, **tol)


def has_empty_grad(params):
    return any(p.grad is not None and p.grad.numel() == 0 for p in params)


# -- clip_grad_norm_ against torch --------------------------------------------------


@SETTINGS
@given(
    specs=st.lists(tensor_specs, min_size=0, max_size=6),
    seed=st.integers(0, 2**31 - 1),
    norm_type=st.sampled_from(NORM_TYPES),
    max_norm=st.floats(1e-3, 1e3),
)
def test_clip_grad_norm_matches_torch(specs, seed, norm_type, max_norm):
    ours = make_params(specs, seed)
    theirs = clone_params(ours)
    if norm_type == INF and has_empty_grad(ours):
        # torch cannot take the max-norm of an empty tensor; neither can we.
        with pytest.raises(RuntimeError):
            torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)
        with pytest.raises(RuntimeError):
            gk.clip_grad_norm_(ours, max_norm, norm_type)
        return
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)
    total = gk.clip_grad_norm_(ours, max_norm, norm_type)
    tol = tolerance({p.grad.dtype for p in ours if p.grad is not None})
    assert total.dtype == expected.dtype
    assert_close(total, expected, **tol)
    assert_grads_close(ours, theirs, **tol)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_clip_grad_norm_bf16_and_mixed_match_torch(norm_type):
    gen = torch.Generator().manual_seed(3)
    ours = []
    for shape, dtype in [
        ((4, 8), torch.bfloat16),
        ((8,), torch.bfloat16),
        ((3, 3), torch.float32),
        ((), torch.bfloat16),
    ]:
        p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
        p.grad = (torch.randn(shape, generator=gen) * 5).to(dtype)
        ours.append(p)
    theirs = clone_params(ours)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 0.5, norm_type)
    total = gk.clip_grad_norm_(ours, 0.5, norm_type)
    assert_close(total, expected, **tolerance({torch.bfloat16}))
    assert_grads_close(ours, theirs, **tolerance({torch.bfloat16}))
    # bf16 alone: torch returns a bf16 norm, and so do we.
    only_bf16 = [p for p in clone_params(ours) if p.grad.dtype == torch.bfloat16]
    assert gk.clip_grad_norm_(only_bf16, 0.5, norm_type).dtype == torch.bfloat16


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_clip_grad_norm_is_a_no_op_below_max_norm(norm_type):
    params = make_params([((3, 4), torch.float32, True, 0), ((5,), torch.float64, True, -1)], seed=1)
    before = [p.grad.clone() for p in params]
    total = gk.clip_grad_norm_(params, 1e6, norm_type)
    assert total > 0
    for p, g in zip(params, before):
        assert torch.equal(p.grad, g)


def test_clip_grad_norm_single_tensor_and_generator():
    (p,) = make_params([((6, 2), torch.float64, True, 1)], seed=2)
    (q,) = clone_params([p])
    expected = torch.nn.utils.clip_grad_norm_(q, 0.3)
    assert_close(gk.clip_grad_norm_(p, 0.3), expected, rtol=1e-12, atol=0)
    assert_close(p.grad, q.grad, rtol=1e-12, atol=0)
    # A generator is consumed once, like torch.
    params = make_params([((4,), torch.float64, True, 1)] * 3, seed=4)
    copies = clone_params(params)
    expected = torch.nn.utils.clip_grad_norm_(iter(copies), 0.3)
    assert_close(gk.clip_grad_norm_((p for p in params), 0.3), expected, rtol=1e-12, atol=0)
    assert_grads_close(params, copies, rtol=1e-12, atol=0)


def grads_that_require_grad(kind):
    """One parameter whose .grad requires grad: from backward(create_graph=True), or set by hand (a leaf)."""
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    if kind == "create_graph":
        (w * w * w).sum().backward(create_graph=True)
    else:
        w.grad = torch.tensor([3.0, 12.0, 27.0], dtype=torch.float64, requires_grad=True)
    assert w.grad.requires_grad
    return [w]


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("kind", ["create_graph", "leaf"])
def test_clip_works_on_grads_that_require_grad_like_torch(kind):
    # torch clips under no_grad: the clip is not recorded by autograd, and a leaf gradient can be clipped.
    for ours_fn, theirs_fn in [
        (lambda p: gk.clip_grad_norm_(p, 1.0), lambda p: torch.nn.utils.clip_grad_norm_(p, 1.0)),
        (lambda p: gk.clip_grad_value_(p, 1.0), lambda p: torch.nn.utils.clip_grad_value_(p, 1.0)),
    ]:
        ours, theirs = grads_that_require_grad(kind), grads_that_require_grad(kind)
        theirs_fn(theirs)
        ours_fn(ours)
        assert_close(ours[0].grad.detach(), theirs[0].grad.detach(), rtol=1e-12, atol=0)
        assert type(ours[0].grad.grad_fn) is type(theirs[0].grad.grad_fn)
    norms = gk.grad_norms(grads_that_require_grad(kind))
    assert_close(norms.detach(), torch.tensor([math.sqrt(9 + 144 + 729)], dtype=torch.float64))
    assert not norms.requires_grad


def test_clip_grad_norm_without_grads_returns_zero_like_torch():
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))]
    assert_close(gk.clip_grad_norm_(params, 1.0), torch.nn.utils.clip_grad_norm_(params, 1.0))
    assert_close(gk.clip_grad_norm_([], 1.0), torch.tensor(0.0))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("norm_type", [1.0, 2.0, INF, 3.7])
def test_clip_grad_norm_nonfinite(bad, norm_type):
    params = make_params([((3, 4), torch.float32, True, 0), ((5,), torch.float32, True, 0)], seed=5)
    params[1].grad[2] = bad
    theirs = clone_params(params)
    with pytest.raises(RuntimeError, match="non-finite"):
        torch.nn.utils.clip_grad_norm_(clone_params(params), 1.0, norm_type, error_if_nonfinite=True)
    ours_checked = clone_params(params)
    with pytest.raises(RuntimeError, match="non-finite"):
        gk.clip_grad_norm_(ours_checked, 1.0, norm_type, error_if_nonfinite=True)
    # Raising leaves the gradients alone.
    assert_grads_close(ours_checked, params, rtol=0, atol=0)
    # Without the check: the same NaN/zero pattern torch produces.
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type)
    total = gk.clip_grad_norm_(params, 1.0, norm_type)
    assert_close(total, expected, equal_nan=True)
    assert_grads_close(params, theirs, rtol=0, atol=0)


def test_clip_grad_norm_error_if_nonfinite_passes_finite_norms():
    params = make_params([((3, 4), torch.float64, True, 1)], seed=6)
    theirs = clone_params(params)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0, error_if_nonfinite=True)
    assert_close(gk.clip_grad_norm_(params, 1.0, error_if_nonfinite=True), expected, rtol=1e-12, atol=0)
    assert_grads_close(params, theirs, rtol=1e-12, atol=0)


# -- clip_grad_value_ and grad_norms ------------------------------------------------


@SETTINGS
@given(specs=st.lists(tensor_specs, min_size=0, max_size=6), seed=st.integers(0, 2**31 - 1), clip=st.floats(1e-3, 1e2))
def test_clip_grad_value_matches_torch(specs, seed, clip):
    ours = make_params(specs, seed)
    theirs = clone_params(ours)
    if any(p.grad is not None for p in theirs):  # torch fails on a list without gradients
        torch.nn.utils.clip_grad_value_(theirs, clip)
    assert gk.clip_grad_value_(ours, clip) is None
    assert_grads_close(ours, theirs, rtol=0, atol=0)


def test_clip_grad_value_single_tensor_and_bf16():
    p = torch.nn.Parameter(torch.zeros(10, dtype=torch.bfloat16))
    p.grad = torch.linspace(-3, 3, 10).to(torch.bfloat16)
    (q,) = clone_params([p])
    torch.nn.utils.clip_grad_value_(q, 1.5)
    gk.clip_grad_value_(p, 1.5)
    assert torch.equal(p.grad, q.grad)
    assert p.grad.abs().max() <= 1.5


@SETTINGS
@given(
    specs=st.lists(tensor_specs, min_size=0, max_size=6),
    seed=st.integers(0, 2**31 - 1),
    norm_type=st.sampled_from(NORM_TYPES),
)
def test_grad_norms_are_per_parameter_vector_norms(specs, seed, norm_type):
    params = make_params(specs, seed)
    with_grad = [p for p in params if p.grad is not None]
    if norm_type == INF and has_empty_grad(params):
        with pytest.raises(RuntimeError):
            gk.grad_norms(params, norm_type)
        return
    norms = gk.grad_norms(params, norm_type)
    assert norms.shape == (len(with_grad),)
    for norm, p in zip(norms, with_grad):
        expected = torch.linalg.vector_norm(p.grad, norm_type)
        assert_close(norm.to(expected.dtype), expected, **tolerance({p.grad.dtype}))
    if with_grad:
        expected_dtype = with_grad[0].grad.dtype
        for p in with_grad[1:]:
            expected_dtype = torch.promote_types(expected_dtype, p.grad.dtype)
        assert norms.dtype == expected_dtype


def test_grad_norms_default_is_l2_and_single_tensor():
    p = torch.nn.Parameter(torch.zeros(2, 2))
    p.grad = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    assert_close(gk.grad_norms(p), torch.tensor([5.0]))
    assert_close(gk.grad_norms([p], 1), torch.tensor([7.0]))


# -- group=: the norm of a gradient sharded over processes ---------------------------

SHARD_SPECS = [((4, 3), 0), ((7,), 1), ((), 2), ((2, 2, 2), 1), ((5,), -1), ((3, 3), 0)]
GROUP_NORM_TYPES = (2.0, 1.0, INF)
GROUP_MAX_NORM = 0.7


# case -> (does `rank` hold parameter i, does parameter i have a gradient)
SHARD_CASES = {
    # round-robin shards; parameter 3 has no gradient at all
    "round_robin": (lambda rank, world_size, i: i % world_size == rank, lambda i: i != 3),
    # every gradient lives on rank 0: the other ranks hold only grad-less parameters
    "empty_shard": (lambda rank, world_size, i: (i < 3) == (rank == 0), lambda i: i < 3),
}


def full_gradient(with_grad):
    """The unsharded model's parameters, float64; `with_grad(i)` False leaves grad i None."""
    params = []
    for i, (shape, scale) in enumerate(SHARD_SPECS):
        gen = torch.Generator().manual_seed(100 + i)
        p = torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64))
        if with_grad(i):
            p.grad = torch.randn(shape, generator=gen, dtype=torch.float64) * 10.0**scale
        params.append(p)
    return params


def shard_of(case, rank, world_size):
    holds, with_grad = SHARD_CASES[case]
    return [p for i, p in enumerate(full_gradient(with_grad)) if holds(rank, world_size, i)]


def _sharded_clip_worker(rank, world_size, max_norm):
    group = dist.group.WORLD
    out = {}
    for case in SHARD_CASES:
        for norm_type in GROUP_NORM_TYPES:
            shard = shard_of(case, rank, world_size)
            total = gk.clip_grad_norm_(shard, max_norm, norm_type, group=group)
            staged = shard_of(case, rank, world_size)
            gk.ClipByGlobalNorm(max_norm, norm_type=norm_type, group=group)(staged)
            out[case, norm_type] = {
                "total": total,
                "grads": [p.grad for p in shard],
                "stage_grads": [p.grad for p in staged],
            }
    return out


def test_group_reduces_the_norm_over_shards():
    world_size = 2
    results = run_workers(_sharded_clip_worker, world_size, GROUP_MAX_NORM, timeout=90)
    for case, (holds, with_grad) in SHARD_CASES.items():
        for norm_type in GROUP_NORM_TYPES:
            full = full_gradient(with_grad)
            expected_total = torch.nn.utils.clip_grad_norm_(full, GROUP_MAX_NORM, norm_type)
            assert expected_total > GROUP_MAX_NORM  # the test must clip
            for rank, result in enumerate(results):
                got = result[case, norm_type]
                assert_close(got["total"], expected_total, rtol=1e-12, atol=0)
                expected_grads = [p.grad for i, p in enumerate(full) if holds(rank, world_size, i)]
                for key in ("grads", "stage_grads"):
                    assert len(got[key]) == len(expected_grads)
                    for g, e in zip(got[key], expected_grads):
                        assert (g is None) == (e is None), (case, norm_type, rank, key)
                        if e is not None:
                            assert_close(g, e, rtol=1e-12, atol=0)
            # Some rank's local norm differs from the global one, so the reduction is what makes this pass.
            local_totals = [
                torch.nn.utils.clip_grad_norm_(shard_of(case, rank, world_size), GROUP_MAX_NORM, norm_type)
                for rank in range(world_size)
            ]
            assert not all(torch.allclose(t.double(), expected_total) for t in local_totals)


def test_group_without_init_process_group_says_how_to_fix():
    params = make_params([((3,), torch.float32, True, 0)], seed=0)
    with pytest.raises(ValueError, match="init_process_group"):
        gk.clip_grad_norm_(params, 1.0, group=object())


# -- the worker helper itself ---------------------------------------------------------


def _failing_worker(rank, world_size):
    if rank == 1:
        raise ValueError("deliberate failure on rank one")
    dist.barrier()  # rank 0 waits on the failed peer; the helper must stop it
    return rank


def _sleeping_worker(rank, world_size):
    time.sleep(600)


def test_run_workers_propagates_worker_tracebacks():
    with pytest.raises(WorkerError) as info:
        run_workers(_failing_worker, 2, timeout=60)
    assert info.value.rank == 1
    assert "deliberate failure on rank one" in str(info.value)
    assert "_failing_worker" in str(info.value)  # the traceback text, not just the message


def test_run_workers_kills_workers_on_timeout():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish"):
        run_workers(_sleeping_worker, 2, timeout=3)
    assert time.monotonic() - start < 15


# -- bad input --------------------------------------------------------------------------

BAD_MAX_NORMS = [0, -1.0, float("nan"), float("inf"), "1.0", True, None]
BAD_NORM_TYPES = [0, -2.0, float("nan"), "abc", None]


@pytest.mark.parametrize("max_norm", BAD_MAX_NORMS)
def test_clip_grad_norm_rejects_bad_max_norm(max_norm):
    params = make_params([((3,), torch.float32, True, 2)], seed=0)
    before = params[0].grad.clone()
    with pytest.raises((ValueError, TypeError), match=r"^max_norm\b"):
        gk.clip_grad_norm_(params, max_norm)
    assert torch.equal(params[0].grad, before)


@pytest.mark.parametrize("norm_type", BAD_NORM_TYPES)
def test_rejects_bad_norm_type(norm_type):
    params = make_params([((3,), torch.float32, True, 2)], seed=0)
    before = params[0].grad.clone()
    with pytest.raises((ValueError, TypeError), match=r"^norm_type\b"):
        gk.clip_grad_norm_(params, 1.0, norm_type)
    with pytest.raises((ValueError, TypeError), match=r"^norm_type\b"):
        gk.grad_norms(params, norm_type)
    assert torch.equal(params[0].grad, before)


@pytest.mark.parametrize("clip_value", [0, -0.5, float("nan"), "1", True])
def test_clip_grad_value_rejects_bad_clip_value(clip_value):
    params = make_params([((3,), torch.float32, True, 2)], seed=0)
    before = params[0].grad.clone()
    with pytest.raises((ValueError, TypeError), match=r"^clip_value\b"):
        gk.clip_grad_value_(params, clip_value)
    assert torch.equal(params[0].grad, before)


def test_norm_type_accepts_the_string_inf_like_torch():
    params = make_params([((3, 2), torch.float64, True, 1)], seed=8)
    theirs = clone_params(params)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 0.1, "inf")
    assert_close(gk.clip_grad_norm_(params, 0.1, "inf"), expected, rtol=1e-12, atol=0)


# -- no host sync ------------------------------------------------------------------------


@pytest.mark.parametrize("norm_type", [2.0, 1.0, INF, 3.7])
def test_clip_grad_norm_makes_no_host_sync(monkeypatch, norm_type):
    params = make_params(
        [((3, 4), torch.float32, True, 1), ((5,), torch.float64, True, 0), ((2,), torch.float32, False, 0)], seed=9
    )
    theirs = clone_params(params)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 0.5, norm_type)
    with monkeypatch.context() as patch:
        forbid_host_sync(patch)
        total = gk.clip_grad_norm_(params, 0.5, norm_type)
        norms = gk.grad_norms(params)
        # The patch works: the opt-in check does read the norm on the host.
        with pytest.raises(AssertionError, match="host sync"):
            gk.clip_grad_norm_(clone_params(params), 0.5, norm_type, error_if_nonfinite=True)
    assert_close(total, expected)
    assert norms.shape == (2,)
    assert_grads_close(params, theirs, **tolerance({torch.float32}))


def test_clip_grad_value_clamps_sparse_gradients_after_summing_repeated_rows():
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    embedding(torch.tensor([1, 1, 2])).sum().mul(100).backward()  # row 1 twice: 200 per element
    gk.clip_grad_value_(embedding.parameters(), 0.5)
    dense = embedding.weight.grad.to_dense()
    assert dense.abs().max().item() == 0.5
    assert dense[1].tolist() == [0.5, 0.5, 0.5] and dense[0].abs().sum().item() == 0.0


# -- per-call host work: once per group, not once per tensor --------------------------------


def python_calls(fn):
    """How many Python-level and C-level calls `fn()` makes from Python code (sys.setprofile events)."""
    count = 0

    def profile(frame, event, arg):
        nonlocal count
        if event in ("call", "c_call"):
            count += 1

    # Garbage collection during the call would run other objects' finalizers, which count too.
    gc.collect()
    gc.disable()
    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
        gc.enable()
    return count


def linear_params(layers, dtypes=(torch.float32,)):
    """`layers` Linear(8, 8)-shaped (weight, bias) pairs with gradients, cycling through `dtypes`."""
    gen = torch.Generator().manual_seed(layers)
    params = []
    for i in range(layers):
        dtype = dtypes[i % len(dtypes)]
        for shape in ((8, 8), (8,)):
            p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
            p.grad = torch.randn(shape, generator=gen).to(dtype)
            params.append(p)
    return params


@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.float32, torch.float64)])
@pytest.mark.parametrize("call", ["clip_grad_norm_", "grad_norms"])
def test_host_work_per_call_does_not_grow_with_the_number_of_tensors(call, dtypes):
    # Warm calls (the grouping is cached after the first): the Python-level work is the same
    # for 10 and 500 tensors; only the C loops (gradient reads, the foreach kernels) grow.
    def run(params):
        if call == "clip_grad_norm_":
            return lambda: gk.clip_grad_norm_(params, 1.0)
        return lambda: gk.grad_norms(params)

    counts = []
    for layers in (5, 250):
        fn = run(linear_params(layers, dtypes))
        fn()
        counts.append(python_calls(fn))
    assert counts[0] == counts[1], counts
    # The check can fail: a per-tensor Python loop (here, torch's `norm.to(device)` per norm) shows up.
    torch_counts = []
    for layers in (5, 250):
        params = linear_params(layers, dtypes)
        torch_counts.append(python_calls(functools.partial(torch.nn.utils.clip_grad_norm_, params, 1.0, foreach=True)))
    assert torch_counts[1] > torch_counts[0] + 400


def test_groups_give_input_order_and_torch_results_for_mixed_kinds():
    gen = torch.Generator().manual_seed(11)
    f32, f64 = torch.float32, torch.float64
    kinds = [((3,), f64), ((2, 2), f32), ((4,), torch.bfloat16), ((5,), f64), ((), f32)]
    dense = [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for shape, dtype in kinds]
    embedding = torch.nn.Embedding(6, 2, sparse=True)
    embedding(torch.tensor([1, 1, 4])).sum().backward()  # repeated row: the norm is that of the summed rows
    tensors = dense[:2] + [embedding.weight.grad] + dense[2:]
    groups = gk._foreach.Groups(tensors)
    assert [(device.type, dtype) for device, dtype, _ in groups.split(tensors)] == [
        ("cpu", torch.float64),
        ("cpu", torch.float32),
        ("cpu", torch.bfloat16),
    ]  # first seen first
    assert groups.sparse == (2,)
    for norm_type in (2.0, 1.0, INF, 3.7):
        expected = [torch.linalg.vector_norm(t.to_dense() if t.is_sparse else t, norm_type) for t in tensors]
        got = groups.norms(tensors, norm_type)
        assert [n.dtype for n in got] == [t.dtype for t in tensors]
        for g, e in zip(got, expected):
            assert_close(g, e, rtol=1e-2 if g.dtype == torch.bfloat16 else 1e-6, atol=0)
        raised = groups.norms(tensors, norm_type, at_least=torch.float32)
        assert raised[3].dtype == torch.float32  # bf16 reduced in float32
        assert_close(groups.stacked_norms(tensors, norm_type), torch.stack(got))
        assert_close(groups.total_norm(tensors, norm_type), torch.linalg.vector_norm(torch.stack(got), norm_type))
    before = [t.to_dense().clone() if t.is_sparse else t.clone() for t in tensors]
    groups.scale_(tensors, torch.tensor(0.5))
    for t, b in zip(tensors, before):
        assert_close(t.to_dense() if t.is_sparse else t, b * 0.5, rtol=0, atol=0)
    # group_tensors keeps its contract: dense members by (device, dtype), with their positions.
    grouped = gk._foreach.group_tensors(tensors)
    assert {key: positions for key, (_, positions) in grouped.items()} == {
        (torch.device("cpu"), torch.float64): [0, 4],
        (torch.device("cpu"), torch.float32): [1, 5],
        (torch.device("cpu"), torch.bfloat16): [3],
    }
    for members, positions in grouped.values():
        assert all(m is tensors[i] for m, i in zip(members, positions))


def test_groups_are_cached_by_kind_and_checked_by_matches():
    a = linear_params(3)
    grads = [p.grad for p in a]
    groups = gk._foreach.Groups.of(grads)
    assert gk._foreach.Groups.of([p.grad for p in linear_params(3)]) is groups  # same kinds, other tensors
    assert groups.matches([p.grad for p in linear_params(3)])
    mixed = [p.grad for p in linear_params(3, (torch.float32, torch.float64))]
    assert not groups.matches(mixed) and not groups.matches(grads[:-1])
    other = gk._foreach.Groups.of(mixed)
    assert other is not groups and len(other.split(mixed)) == 2
    # A held grouping applied to new tensors of the same kinds gives their results, not the old ones'.
    fresh = [p.grad * 3 for p in a]
    assert_close(groups.stacked_norms(fresh), 3 * groups.stacked_norms(grads))


def test_bad_parameters_are_named_before_any_gradient_changes():
    params = make_params([((3,), torch.float32, True, 2)] * 2, seed=0)
    before = [p.grad.clone() for p in params]
    with pytest.raises(TypeError, match=r"item #1 is float 1\.5; pass model.parameters\(\)"):
        gk.clip_grad_norm_([params[0], 1.5, params[1]], 1e-3)
    with pytest.raises(TypeError, match=r"parameters must be a tensor or an iterable of tensors, got int"):
        gk.grad_norms(3)
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before))
