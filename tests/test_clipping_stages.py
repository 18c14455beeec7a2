"""Norm-scaling stages and GradContext, against torch and independent references.

The adaptive stages (AGC, AutoClip, ZClip) are checked against plain
Python/numpy versions written from their docstrings and papers, on synthetic
norm sequences with spikes.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

import gradkit as gk
import param_sets
from host_reads import forbid_host_sync
from param_sets import clone_params, make_params

INF = float("inf")
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
EXACT64 = {"rtol": 1e-12, "atol": 1e-15}

# -- building gradients ----------------------------------------------------------------

tensor_specs = param_sets.tensor_specs(max_dims=4, max_log_scale=2)
float64_specs = tensor_specs.map(lambda s: (s[0], torch.float64, s[2], s[3]))


def grads_of(params):
    return [p.grad.clone() for p in params if p.grad is not None]


def global_norm(params):
    grads = [p.grad.double().flatten() for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.cat(grads)) if grads else torch.zeros((), dtype=torch.float64)


def tolerance(params):
    dtypes = {p.grad.dtype for p in params if p.grad is not None}
    return {"rtol": 2e-6, "atol": 1e-9} if torch.float32 in dtypes else EXACT64


def assert_grads_close(actual, expected, **tol):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert (a.grad is None) == (e.grad is None)
        if a.grad is not None:
            assert a.grad.dtype == e.grad.dtype
            assert_close(a.grad, e.grad, **tol)


def has_empty_grad(params):
    return any(p.grad is not None and p.grad.numel() == 0 for p in params)


def two_param_step(stage, norm, angle=0.7, seed=0):
    """Apply `stage` to a two-tensor gradient of global L2 norm `norm` (float64).

    Returns the gradient before and after, concatenated.
    """
    gen = torch.Generator().manual_seed(seed)
    directions = [
        torch.randn(5, generator=gen, dtype=torch.float64),
        torch.randn(2, 3, generator=gen, dtype=torch.float64),
    ]
    parts = [math.cos(angle), math.sin(angle)]
    params = []
    for direction, part in zip(directions, parts):
        p = torch.nn.Parameter(torch.zeros_like(direction))
        p.grad = direction / torch.linalg.vector_norm(direction) * (norm * part)
        params.append(p)
    before = torch.cat([p.grad.flatten().clone() for p in params])
    stage(gk.GradContext(["a", "b"], params))
    return before, torch.cat([p.grad.flatten() for p in params])


def run_sequence(stage, norms):
    """The gradient after `stage` at each step, for a gradient of each given norm."""
    return [two_param_step(stage, n, seed=t)[1] for t, n in enumerate(norms)]


def norm_sequence(n, spikes, seed, scale=1.0):
    """`n` norms around `scale` with multiplicative `spikes` {step: factor}."""
    rng = np.random.default_rng(seed)
    norms = scale * (1.0 + 0.3 * rng.random(n))
    for step, factor in spikes.items():
        norms[step] *= factor
    return [float(x) for x in norms]


def torch_coefficient(norm, threshold):
    """torch's clip_grad_norm_ coefficient for a total norm and a max norm."""
    return min(1.0, threshold / (norm + 1e-6))


# -- fixed-threshold stages against torch ------------------------------------------------


@SETTINGS
@given(
    specs=st.lists(tensor_specs, min_size=0, max_size=6),
    seed=st.integers(0, 2**31 - 1),
    norm_type=st.sampled_from([2.0, 1.0, INF, 0.5, 3.7]),
    max_norm=st.floats(1e-2, 1e2),
    through_context=st.booleans(),
)
def test_clip_by_global_norm_matches_torch(specs, seed, norm_type, max_norm, through_context):
    ours = make_params(specs, seed)
    theirs = clone_params(ours)
    stage = gk.ClipByGlobalNorm(max_norm, norm_type=norm_type)
    if through_context:
        ctx = gk.GradContext.from_parameters(ours)
        if len(ctx):
            ctx.norms()  # a primed cache must give the same result
        target = ctx
    else:
        target = ours
    if norm_type == INF and has_empty_grad(ours):
        with pytest.raises(RuntimeError):
            stage(target)
        return
    torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)
    stage(target)
    assert_grads_close(ours, theirs, **tolerance(ours))


@SETTINGS
@given(specs=st.lists(tensor_specs, min_size=0, max_size=6), seed=st.integers(0, 2**31 - 1), value=st.floats(1e-3, 1e2))
def test_clip_by_value_matches_torch(specs, seed, value):
    ours = make_params(specs, seed)
    theirs = clone_params(ours)
    if any(p.grad is not None for p in theirs):  # torch fails on a list without gradients
        torch.nn.utils.clip_grad_value_(theirs, value)
    gk.ClipByValue(value)(ours)
    assert_grads_close(ours, theirs, rtol=0, atol=0)


@SETTINGS
@given(
    specs=st.lists(tensor_specs, min_size=0, max_size=6), seed=st.integers(0, 2**31 - 1), max_norm=st.floats(1e-2, 1e2)
)
def test_clip_per_layer_matches_torch_per_tensor(specs, seed, max_norm):
    ours = make_params(specs, seed)
    theirs = clone_params(ours)
    for p in theirs:
        torch.nn.utils.clip_grad_norm_([p], max_norm)
    gk.ClipPerLayer(max_norm)(ours)
    assert_grads_close(ours, theirs, **tolerance(ours))


def test_stages_accept_a_single_tensor():
    for stage, clip in [
        (gk.ClipByGlobalNorm(0.5), lambda p: torch.nn.utils.clip_grad_norm_(p, 0.5)),
        (gk.ClipPerLayer(0.5), lambda p: torch.nn.utils.clip_grad_norm_(p, 0.5)),
        (gk.ClipByValue(0.5), lambda p: torch.nn.utils.clip_grad_value_(p, 0.5)),
    ]:
        (p,) = make_params([((4, 3), torch.float64, True, 1)], seed=1)
        (q,) = clone_params([p])
        clip(q)
        stage(p)
        assert_close(p.grad, q.grad, **EXACT64)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("kind", ["create_graph", "leaf"])
def test_stages_work_on_grads_that_require_grad(kind):
    for stage, reference in [
        (gk.ClipByGlobalNorm(1.0), lambda p: torch.nn.utils.clip_grad_norm_(p, 1.0)),
        (gk.ClipPerLayer(1.0), lambda p: torch.nn.utils.clip_grad_norm_(p, 1.0)),
        (gk.ClipByValue(1.0), lambda p: torch.nn.utils.clip_grad_value_(p, 1.0)),
    ]:
        ours, theirs = [], []
        for params in (ours, theirs):
            w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
            if kind == "create_graph":
                (w * w * w).sum().backward(create_graph=True)
            else:
                w.grad = torch.tensor([3.0, 12.0, 27.0], dtype=torch.float64, requires_grad=True)
            params.append(w)
        reference(theirs)
        stage(ours)
        assert_close(ours[0].grad.detach(), theirs[0].grad.detach(), **EXACT64)
        assert type(ours[0].grad.grad_fn) is type(theirs[0].grad.grad_fn)  # the clip is not recorded


# -- AGC ------------------------------------------------------------------------------------


def agc_reference(weight, grad, clip, eps):
    """Unit-wise AGC in numpy: units are rows (dim 0) of a >= 2-d tensor, else the whole tensor."""
    w = weight.detach().numpy().astype(np.float64)
    g = grad.numpy().astype(np.float64).copy()
    rows = w.shape[0] if w.ndim >= 2 else 1
    w2 = w.reshape(rows, w.size // rows if rows else 0)
    g2 = g.reshape(w2.shape)
    for i in range(rows):
        w_norm = max(math.sqrt(float(np.sum(w2[i] ** 2))), eps)
        g_norm = math.sqrt(float(np.sum(g2[i] ** 2)))
        if g_norm / w_norm > clip:
            g2[i] *= clip * w_norm / g_norm
    return torch.from_numpy(g2.reshape(g.shape))


agc_shapes = st.one_of(
    st.just(()),
    st.sampled_from([(0,), (3, 0), (0, 2), (4, 3, 2, 2)]),
    st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple),
)


@SETTINGS
@given(
    layers=st.lists(
        st.tuples(agc_shapes, st.integers(-3, 1), st.integers(-3, 1), st.booleans()),
        min_size=1,
        max_size=5,
    ),
    seed=st.integers(0, 2**31 - 1),
    clip=st.sampled_from([0.01, 0.1, 0.5]),
    eps=st.sampled_from([1e-3, 1e-2]),
)
def test_agc_matches_unitwise_reference(layers, seed, clip, eps):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape, w_scale, g_scale, zero_first_row in layers:
        w = torch.randn(shape, generator=gen, dtype=torch.float64) * 10.0**w_scale
        if zero_first_row and w.ndim >= 1 and w.shape[0] > 0:
            w[0] = 0  # a zero-initialised unit: its threshold comes from eps
        p = torch.nn.Parameter(w)
        p.grad = torch.randn(shape, generator=gen, dtype=torch.float64) * 10.0**g_scale
        params.append(p)
    expected = [agc_reference(p, p.grad, clip, eps) for p in params]
    gk.AGC(clip, eps)(params)
    for p, e in zip(params, expected):
        assert_close(p.grad, e, **EXACT64)


def test_agc_clips_only_units_over_the_ratio_and_honours_exclude():
    # Rows of the weight have norms 1, 2 and 0 (eps floor); gradient rows norms 0.5, 0.01, 0.5.
    weight = torch.nn.Parameter(torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]], dtype=torch.float64))
    bias = torch.nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))  # norm 5
    head = torch.nn.Parameter(torch.ones(2, 2, dtype=torch.float64))
    names = ["stem.weight", "stem.bias", "fc.weight"]

    def fresh_grads():
        weight.grad = torch.tensor([[0.5, 0.0], [0.0, 0.01], [0.0, 0.5]], dtype=torch.float64)
        bias.grad = torch.tensor([0.6, 0.8], dtype=torch.float64)  # norm 1, ratio 0.2
        head.grad = torch.full((2, 2), 10.0, dtype=torch.float64)

    fresh_grads()
    gk.AGC(clip=0.1, eps=1e-3, exclude=("fc.*",))(gk.GradContext(names, [weight, bias, head]))
    # row 0: ratio 0.5 > 0.1 -> norm 0.1; row 1: ratio 0.005, kept; row 2: 0.5/1e-3 -> norm 1e-4.
    assert_close(weight.grad, torch.tensor([[0.1, 0.0], [0.0, 0.01], [0.0, 1e-4]], dtype=torch.float64), **EXACT64)
    assert_close(bias.grad, torch.tensor([0.3, 0.4], dtype=torch.float64), **EXACT64)  # to 0.1 * 5
    assert torch.equal(head.grad, torch.full((2, 2), 10.0, dtype=torch.float64))  # excluded
    # Several patterns; a plain parameter list is named by position.
    fresh_grads()
    gk.AGC(clip=0.1, exclude=("*.bias", "fc.weight"))(gk.GradContext(names, [weight, bias, head]))
    assert torch.equal(bias.grad, torch.tensor([0.6, 0.8], dtype=torch.float64))
    assert torch.equal(head.grad, torch.full((2, 2), 10.0, dtype=torch.float64))
    assert not torch.equal(weight.grad[0], torch.tensor([0.5, 0.0], dtype=torch.float64))
    fresh_grads()
    gk.AGC(clip=0.1, exclude=("0", "2"))([weight, bias, head])
    assert torch.equal(weight.grad[0], torch.tensor([0.5, 0.0], dtype=torch.float64))
    assert_close(bias.grad, torch.tensor([0.3, 0.4], dtype=torch.float64), **EXACT64)


def test_agc_on_named_parameters_honours_exclude_and_refuses_patterns_no_position_matches():
    # Outside a pipeline: named_parameters() gives the names the patterns mean; unnamed tensors are named by
    # position, and a pattern none of them matches ("fc.*") is refused instead of clipping the layer it names.
    model = torch.nn.Sequential()
    model.add_module("stem", torch.nn.Linear(2, 3))
    model.add_module("fc", torch.nn.Linear(3, 2))
    for p in model.parameters():
        p.grad = torch.full_like(p, 100.0)
    gk.AGC(0.01, exclude=("fc.*",))(model.named_parameters())
    assert torch.equal(model.fc.weight.grad, torch.full((2, 3), 100.0))  # left out
    assert model.stem.weight.grad.abs().max() < 100.0  # clipped
    before = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"matches none of the parameters.*'0' to '3'.*named_parameters"):
        gk.AGC(0.01, exclude=("fc.*",))(model.parameters())
    assert all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters()))  # nothing changed
    with pytest.raises(TypeError, match=r"item #0 is tuple \('stem.weight', Parameter"):
        gk.clip_grad_norm_(model.named_parameters(), 1.0)  # torch's signature: tensors only, said in one line


@pytest.mark.parametrize("make", [lambda: gk.AutoClip(10, history=50), lambda: gk.ZClip(warmup=3)],
                         ids=["autoclip", "zclip"])  # fmt: skip
def test_a_non_finite_step_leaves_the_history_as_it_was(make):
    # Called on every step (on parameters, or by a trainer's callback), a NaN or inf norm must not enter the
    # history: AutoClip's percentile and ZClip's statistics would be NaN from then on, and clipping would stop
    # (or make every later gradient NaN). The same run with the bad steps left out is the reference.
    norms = norm_sequence(20, {12: 50.0, 16: 80.0}, seed=3)
    bad = {4: math.nan, 9: math.inf}
    stage, reference = make(), make()
    for t, norm in enumerate(norms):
        if t in bad:
            two_param_step(stage, bad[t], seed=t)
        before, after = two_param_step(stage, norm, seed=t)
        _, expected = two_param_step(reference, norm, seed=t)
        assert torch.isfinite(after).all(), t
        assert_close(after, expected, **EXACT64, msg=lambda m, t=t: f"step {t}: {m}")
    assert any(not torch.equal(a, b) for a, b in [two_param_step(stage, 500.0, seed=99)])  # still clips a spike


# -- AutoClip -------------------------------------------------------------------------------


def autoclip_reference(norms, percentile, history):
    """Coefficients of AutoClip: clip like torch at the percentile of the last `history` norms."""
    seen, coefficients = [], []
    for norm in norms:
        seen = (seen + [norm])[-history:] if history else seen + [norm]
        threshold = float(np.percentile(np.array(seen), percentile))  # linear interpolation
        coefficients.append(torch_coefficient(norm, threshold))
    return coefficients


AUTOCLIP_NORMS = [50.0, 60.0, 55.0] + norm_sequence(27, {6: 20.0, 11: 8.0, 12: 30.0, 20: 0.05, 24: 15.0}, seed=1)


@pytest.mark.parametrize("percentile", [10, 50, 90, 100])
@pytest.mark.parametrize("history", [1, 5, 10_000])
def test_autoclip_matches_percentile_reference(percentile, history):
    coefficients = autoclip_reference(AUTOCLIP_NORMS, percentile, history)
    stage = gk.AutoClip(percentile, history=history)
    for t, norm in enumerate(AUTOCLIP_NORMS):
        before, after = two_param_step(stage, norm, seed=t)
        assert_close(after, before * coefficients[t], **EXACT64, msg=lambda m, t=t: f"step {t}: {m}")
    if history > 1 and percentile <= 50:  # with history 1 the threshold is the current norm
        assert min(coefficients) < 0.5  # the sequence does make it clip


@pytest.mark.parametrize("percentile", [10, 50])
def test_autoclip_history_is_a_bounded_ring(percentile):
    # Large norms first: an unbounded history would keep them and clip far less later.
    bounded = autoclip_reference(AUTOCLIP_NORMS, percentile, 5)
    unbounded = autoclip_reference(AUTOCLIP_NORMS, percentile, None)
    assert not np.allclose(bounded, unbounded)
    stage = gk.AutoClip(percentile, history=5)
    for t, norm in enumerate(AUTOCLIP_NORMS):
        before, after = two_param_step(stage, norm, seed=t)
        assert_close(after, before * bounded[t], **EXACT64)
    # The ring holds exactly the last five norms, in some order.
    kept = sorted(stage.state_dict()["norms"].tolist())
    assert_close(
        torch.tensor(kept, dtype=torch.float64),
        torch.tensor(sorted(AUTOCLIP_NORMS[-5:]), dtype=torch.float64),
        **EXACT64,
    )
    assert stage.state_dict()["count"] == len(AUTOCLIP_NORMS)


# -- ZClip ----------------------------------------------------------------------------------


class ZClipReference:
    """ZClip in plain Python, from its docstring and the paper (Kumar et al. 2025)."""

    def __init__(self, alpha, z_thresh, warmup, eps=1e-6):
        self.alpha, self.z_thresh, self.warmup, self.eps = alpha, z_thresh, warmup, eps
        self.collected = []
        self.mean = self.var = None

    def step(self, norm):
        """The coefficient applied to a gradient of global norm `norm`."""
        if self.mean is None:
            self.collected.append(norm)
            if len(self.collected) == self.warmup:
                self.mean = sum(self.collected) / self.warmup
                self.var = sum((x - self.mean) ** 2 for x in self.collected) / self.warmup
            return 1.0
        std = math.sqrt(self.var)
        z = (norm - self.mean) / (std + self.eps)
        if z > self.z_thresh:
            applied = self.mean + self.z_thresh**2 * std / z
            coefficient = torch_coefficient(norm, applied)
        else:
            applied, coefficient = norm, 1.0
        self.mean = self.alpha * self.mean + (1 - self.alpha) * applied
        self.var = self.alpha * self.var + (1 - self.alpha) * (applied - self.mean) ** 2
        return coefficient


ZCLIP_SPIKES = {2: 1.8, 9: 6.0, 14: 25.0, 15: 3.0, 22: 4.0, 28: 8.0, 30: 0.2}


@pytest.mark.parametrize(
    ("alpha", "z_thresh", "warmup", "scale"),
    [(0.97, 2.5, 5, 1.0), (0.8, 1.5, 3, 1.0), (0.9, 2.5, 1, 1.0), (0.9, 2.0, 4, 1e-5), (0.95, 3.0, 6, 1e3)],
)
def test_zclip_matches_reference(alpha, z_thresh, warmup, scale):
    norms = norm_sequence(36, ZCLIP_SPIKES, seed=2, scale=scale)
    reference = ZClipReference(alpha, z_thresh, warmup)
    stage = gk.ZClip(alpha, z_thresh, warmup=warmup)
    coefficients = []
    for t, norm in enumerate(norms):
        coefficient = reference.step(norm)
        coefficients.append(coefficient)
        before, after = two_param_step(stage, norm, seed=t)
        if coefficient == 1.0:
            assert torch.equal(after, before), f"step {t} is no spike and must be left alone"
        else:
            assert_close(after, before * coefficient, **EXACT64, msg=lambda m, t=t: f"step {t}: {m}")
    state = stage.state_dict()
    assert_close(state["mean"], torch.tensor(reference.mean, dtype=torch.float64), **EXACT64)
    assert_close(state["var"], torch.tensor(reference.var, dtype=torch.float64), rtol=1e-10, atol=1e-30)
    assert sum(c < 0.9 for c in coefficients) >= 2  # spikes were clipped
    assert coefficients[2] == 1.0 or warmup < 3  # a spike during warm-up is collected, not clipped


# -- properties -----------------------------------------------------------------------------

property_params = st.tuples(st.lists(float64_specs, min_size=1, max_size=5), st.integers(0, 2**31 - 1))


@SETTINGS
@given(built=property_params, max_norm=st.floats(0.1, 10.0))
def test_clipping_twice_equals_clipping_once(built, max_norm):
    specs, seed = built
    # A second norm clip moves a gradient whose norm is max_norm * n / (n + 1e-6) by
    # about 1e-6 / max_norm (torch's coefficient); nothing more.
    rtol = 2e-6 / max_norm + 1e-12
    for stage, tol in [
        (gk.ClipByGlobalNorm(max_norm), {"rtol": rtol, "atol": 1e-15}),
        (gk.ClipPerLayer(max_norm), {"rtol": rtol, "atol": 1e-15}),
        (gk.ClipByValue(max_norm), {"rtol": 0, "atol": 0}),
        (lambda p: gk.clip_grad_norm_(p, max_norm), {"rtol": rtol, "atol": 1e-15}),
    ]:
        params = make_params(specs, seed)
        stage(params)
        once = clone_params(params)
        stage(params)
        assert_grads_close(params, once, **tol)


@SETTINGS
@given(built=property_params, max_norm=st.floats(0.01, 10.0))
def test_clipping_never_increases_the_norm(built, max_norm):
    specs, seed = built
    for stage in [gk.ClipByGlobalNorm(max_norm), gk.ClipPerLayer(max_norm), gk.ClipByValue(max_norm), gk.AGC(max_norm)]:
        params = make_params(specs, seed)
        before = [p.grad.clone() if p.grad is not None else None for p in params]
        norm_before = global_norm(params)
        stage(params)
        assert global_norm(params) <= norm_before * (1 + 1e-12)
        for p, g in zip(params, before):
            if g is not None:  # no single element grows either
                assert bool((p.grad.abs() <= g.abs() * (1 + 1e-12)).all())
    params = make_params(specs, seed)
    gk.ClipByGlobalNorm(max_norm)(params)
    assert global_norm(params) <= max_norm * (1 + 1e-12)


@SETTINGS
@given(built=property_params, margin=st.floats(1.001, 100.0))
def test_nothing_changes_below_the_threshold(built, margin):
    specs, seed = built
    params = make_params(specs, seed)
    grads = [p.grad for p in params if p.grad is not None]
    assume(grads)
    largest_element = max((float(g.abs().max()) for g in grads if g.numel()), default=0.0)
    largest_layer = max(float(torch.linalg.vector_norm(g)) for g in grads)
    total = float(global_norm(params))
    for stage, threshold in [
        (gk.ClipByGlobalNorm, total),
        (gk.ClipPerLayer, largest_layer),
        (gk.ClipByValue, largest_element),
        (lambda m: lambda p: gk.clip_grad_norm_(p, m), total),
    ]:
        params = make_params(specs, seed)
        expected = grads_of(params)
        stage(threshold * margin + 1e-5)(params)
        for got, want in zip(grads_of(params), expected):
            assert torch.equal(got, want)


# -- GradContext ----------------------------------------------------------------------------


def fresh_norms(ctx):
    return gk.GradContext(ctx.names, ctx.params).norms()


@SETTINGS
@given(
    specs=st.lists(tensor_specs, min_size=1, max_size=5),
    seed=st.integers(0, 2**31 - 1),
    factor=st.floats(-10.0, 10.0),
    as_tensor=st.booleans(),
)
def test_context_cache_follows_scale(specs, seed, factor, as_tensor):
    params = make_params(specs, seed)
    ctx = gk.GradContext.from_parameters(params)
    if not len(ctx):
        return
    ctx.norms()
    ctx.scale_(torch.tensor(factor) if as_tensor else factor)
    assert_close(ctx.norms(), fresh_norms(ctx), rtol=1e-5, atol=1e-6)
    assert_close(ctx.total_norm(), torch.linalg.vector_norm(fresh_norms(ctx)), rtol=1e-5, atol=1e-6)


@SETTINGS
@given(specs=st.lists(tensor_specs, min_size=1, max_size=5), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_context_cache_follows_scale_each(specs, seed, data):
    params = make_params(specs, seed)
    ctx = gk.GradContext.from_parameters(params)
    if not len(ctx):
        return
    factors = data.draw(st.lists(st.floats(-10.0, 10.0), min_size=len(ctx), max_size=len(ctx)))
    ctx.norms()
    expected = [g * f for g, f in zip(grads_of(params), factors)]
    ctx.scale_each_(torch.tensor(factors, dtype=torch.float64))
    for g, e in zip(ctx.grads, expected):
        assert_close(g, e, rtol=2e-6, atol=1e-9)
    assert_close(ctx.norms(), fresh_norms(ctx), rtol=1e-5, atol=1e-6)


def test_context_modified_invalidates_the_cache():
    params = make_params([((3, 4), torch.float64, True, 0), ((5,), torch.float64, True, 0)], seed=3)
    ctx = gk.GradContext.from_parameters(params)
    cached = ctx.norms().clone()
    ctx.grads[1].mul_(3.0)
    assert torch.equal(ctx.norms(), cached)  # the cache does not see in-place changes ...
    ctx.modified()  # ... until told
    assert_close(ctx.norms(), fresh_norms(ctx), **EXACT64)
    assert_close(ctx.norms()[1], cached[1] * 3, **EXACT64)


@pytest.mark.parametrize(
    "stage",
    [
        gk.ClipByGlobalNorm(0.5),
        gk.ClipByGlobalNorm(0.5, norm_type=1.0),
        gk.ClipPerLayer(0.3),
        gk.ClipByValue(0.05),
        gk.AGC(0.01),
        gk.AutoClip(50),
        gk.ZClip(warmup=1),
    ],
    ids=lambda s: type(s).__name__,
)
def test_stages_keep_the_context_cache_right(stage):
    for step in range(3):
        params = make_params(
            [((3, 4), torch.float32, True, 0), ((5,), torch.float64, True, 1), ((2,), torch.float32, False, 0)],
            seed=step,
        )
        ctx = gk.GradContext.from_parameters(params)
        ctx.norms()
        stage(ctx)
        assert_close(ctx.norms(), fresh_norms(ctx), rtol=2e-6, atol=1e-9)


def test_context_skips_params_without_grad_and_handles_none_at_all():
    params = make_params(
        [((2,), torch.float32, True, 0), ((3,), torch.float32, False, 0), ((4,), torch.float32, True, 0)], seed=0
    )
    ctx = gk.GradContext(["a", "b", "c"], params)
    assert ctx.names == ["a", "c"] and len(ctx) == 2
    assert_close(
        ctx.norms(), torch.stack([torch.linalg.vector_norm(params[0].grad), torch.linalg.vector_norm(params[2].grad)])
    )
    empty = gk.GradContext(["x"], [torch.nn.Parameter(torch.ones(2))])
    assert len(empty) == 0
    assert empty.norms().shape == (0,)
    assert empty.total_norm() == 0


def test_context_norms_of_bf16_are_float32():
    p = torch.nn.Parameter(torch.zeros(1000, dtype=torch.bfloat16))
    p.grad = torch.linspace(-1, 1, 1000).to(torch.bfloat16)
    norms = gk.GradContext.from_parameters([p]).norms()
    assert norms.dtype == torch.float32
    assert_close(norms[0].double(), torch.linalg.vector_norm(p.grad.double()), rtol=1e-6, atol=0)


# -- state_dict -----------------------------------------------------------------------------


def round_trip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def assert_states_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
        else:
            assert type(a[key]) is type(b[key]) and a[key] == b[key], key


STATEFUL = {
    "AutoClip": (lambda: gk.AutoClip(30, history=6), [0, 3, 6, 13]),
    "ZClip": (lambda: gk.ZClip(0.9, 2.0, warmup=5), [0, 2, 5, 12]),
}


@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_state_dict_round_trip_continues_bit_identically(name):
    make, split_points = STATEFUL[name]
    norms = norm_sequence(24, {4: 12.0, 8: 9.0, 16: 20.0, 17: 5.0}, seed=5)
    uninterrupted = make()
    expected = run_sequence(uninterrupted, norms)
    for split in split_points:
        first = make()
        run_sequence(first, norms[:split])
        restored = make()
        restored.load_state_dict(round_trip(first.state_dict()))
        assert_states_equal(restored.state_dict(), first.state_dict())
        for t in range(split, len(norms)):
            _, after = two_param_step(restored, norms[t], seed=t)
            assert torch.equal(after, expected[t]), f"split {split}, step {t}"
        assert_states_equal(restored.state_dict(), uninterrupted.state_dict())
    # Restoring really matters: a fresh stage would diverge.
    fresh = make()
    diverged = [two_param_step(fresh, norms[t], seed=t)[1] for t in range(12, len(norms))]
    assert not all(torch.equal(a, b) for a, b in zip(diverged, expected[12:]))


def test_stateless_stages_have_empty_state():
    for stage in [gk.ClipByGlobalNorm(1.0), gk.ClipByValue(1.0), gk.ClipPerLayer(1.0), gk.AGC()]:
        assert stage.state_dict() == {}
        stage.load_state_dict(round_trip({}))
        with pytest.raises(ValueError, match="bogus"):
            stage.load_state_dict({"bogus": 1})


# -- bad input ------------------------------------------------------------------------------

BAD_POSITIVE = [0, -1.0, float("nan"), float("inf"), "1.0", True, None]
BAD_CONSTRUCTIONS = [
    *[(lambda v=v: gk.ClipByGlobalNorm(v), "max_norm") for v in BAD_POSITIVE],
    *[(lambda v=v: gk.ClipPerLayer(v), "max_norm") for v in BAD_POSITIVE],
    *[(lambda v=v: gk.ClipByGlobalNorm(1.0, norm_type=v), "norm_type") for v in [0, -2.0, float("nan"), "abc", None]],
    *[(lambda v=v: gk.ClipByValue(v), "value") for v in [0, -0.5, float("nan"), "1", True]],
    *[(lambda v=v: gk.AGC(clip=v), "clip") for v in [0, -0.01, float("nan"), "0.01", True]],
    *[(lambda v=v: gk.AGC(eps=v), "eps") for v in [0, -1e-3, float("nan"), "1e-3"]],
    (lambda: gk.AGC(exclude="fc.*"), "exclude"),
    *[(lambda v=v: gk.AutoClip(v), "percentile") for v in [0, -5, 100.5, 1000, float("nan"), "10", True]],
    *[(lambda v=v: gk.AutoClip(10, history=v), "history") for v in [0, -1, 2.5, "10", True]],
    *[(lambda v=v: gk.ZClip(alpha=v), "alpha") for v in [0, 1, 1.5, -0.5, float("nan"), "0.9", True]],
    *[(lambda v=v: gk.ZClip(z_thresh=v), "z_thresh") for v in [0, -2.5, float("nan"), "2.5"]],
    *[(lambda v=v: gk.ZClip(warmup=v), "warmup") for v in [0, -3, 2.5, "25", True]],
]


@pytest.mark.parametrize(("build", "name"), BAD_CONSTRUCTIONS)
def test_bad_hyperparameters_raise_naming_the_parameter(build, name):
    with pytest.raises((ValueError, TypeError), match=rf"^{name}\b"):
        build()


def used_autoclip():
    stage = gk.AutoClip(40, history=4)
    run_sequence(stage, [1.0, 3.0, 2.0])
    return stage


def used_zclip():
    stage = gk.ZClip(0.9, 2.0, warmup=3)
    run_sequence(stage, [1.0, 1.2, 0.9, 1.1, 5.0])
    return stage


def edited(stage, **changes):
    state = stage.state_dict()
    for key, value in changes.items():
        if value is _DROP:
            del state[key]
        else:
            state[key] = value
    return state


_DROP = object()
BAD_STATES = [
    ("AutoClip", {"count": _DROP}, "count"),
    ("AutoClip", {"norms": _DROP}, "norms"),
    ("AutoClip", {"bogus": 1}, "bogus"),
    ("AutoClip", {"norms": torch.zeros(5, dtype=torch.float64)}, "norms"),
    ("AutoClip", {"norms": torch.zeros(2, 2, dtype=torch.float64)}, "norms"),
    ("AutoClip", {"norms": [0.0, 0.0, 0.0, 0.0]}, "norms"),
    ("AutoClip", {"count": "3"}, "count"),
    ("AutoClip", {"count": 2.5}, "count"),
    ("AutoClip", {"count": True}, "count"),
    ("AutoClip", {"count": -1}, "count"),
    ("ZClip", {"mean": _DROP}, "mean"),
    ("ZClip", {"extra": torch.zeros(())}, "extra"),
    ("ZClip", {"warmup_norms": torch.zeros(4, dtype=torch.float64)}, "warmup_norms"),
    ("ZClip", {"warmup_norms": "abc"}, "warmup_norms"),
    ("ZClip", {"mean": torch.zeros(2, dtype=torch.float64)}, "mean"),
    ("ZClip", {"var": torch.zeros(1, dtype=torch.float64)}, "var"),
    ("ZClip", {"mean": 0.5}, "mean"),
    ("ZClip", {"var": None}, "var"),
    ("ZClip", {"count": "4"}, "count"),
    ("ZClip", {"count": -2}, "count"),
]


@pytest.mark.parametrize(("owner", "changes", "name"), BAD_STATES)
def test_bad_state_raises_naming_the_entry_and_changes_nothing(owner, changes, name):
    stage = used_autoclip() if owner == "AutoClip" else used_zclip()
    before = stage.state_dict()
    with pytest.raises((ValueError, TypeError), match=rf"\b{name}\b"):
        stage.load_state_dict(edited(stage, **changes))
    assert_states_equal(stage.state_dict(), before)


@pytest.mark.parametrize("owner", ["AutoClip", "ZClip"])
def test_load_state_dict_rejects_a_non_dict(owner):
    stage = used_autoclip() if owner == "AutoClip" else used_zclip()
    before = stage.state_dict()
    with pytest.raises(TypeError, match="load_state_dict"):
        stage.load_state_dict([("count", 1)])
    assert_states_equal(stage.state_dict(), before)


# -- no host sync ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: gk.ClipByGlobalNorm(0.5),
        lambda: gk.ClipByGlobalNorm(0.5, norm_type=INF),
        lambda: gk.ClipPerLayer(0.3),
        lambda: gk.ClipByValue(0.05),
        lambda: gk.AGC(0.01, exclude=("1",)),
        lambda: gk.AutoClip(20, history=3),
        lambda: gk.ZClip(0.9, 1.0, warmup=2),
    ],
    ids=["global", "global_inf", "per_layer", "value", "agc", "autoclip", "zclip"],
)
def test_stages_make_no_host_sync(monkeypatch, make):
    stage = make()
    steps = [
        make_params([((3, 4), torch.float32, True, s % 3), ((5,), torch.float32, True, 0)], seed=s) for s in range(6)
    ]
    contexts = [gk.GradContext.from_parameters(p) for p in steps]
    with monkeypatch.context() as patch:
        forbid_host_sync(patch)
        for ctx in contexts:  # past warm-up and around the history ring
            stage(ctx)
        with pytest.raises(AssertionError, match="host sync"):  # the patch is in force
            bool(contexts[0].total_norm() > 0)
