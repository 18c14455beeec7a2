"""Error feedback loses nothing: what was sent plus the residual is the sum of the inputs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

import gradkit as gk
from compression_cases import DETERMINISTIC, F64, WRAPPABLE, build

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


ef_shapes = st.one_of(
    st.just(()),
    st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple),
    st.just((130, 131)),  # above the sample size: TopK's sampled-threshold path with padding
)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", WRAPPABLE)
def test_error_feedback_loses_nothing_in_the_gradients_own_dtype(name, dtype):
    # A cast to the input's own dtype must still copy: a payload aliasing the input would
    # make error feedback's residual (input - payload) zero and lose what was not sent.
    torch.manual_seed(0)
    ef = gk.ErrorFeedback(build(name))
    grad = torch.randn(40, generator=torch.Generator().manual_seed(1)).to(dtype)
    sent = ef.decompress(ef.compress(grad, key="w"))
    assert sent.dtype == dtype
    # exact but for the rounding of input - payload in the input's dtype (SignSGD's scaled signs)
    ulp = torch.finfo(dtype).eps * grad.abs().max().item()
    assert_close((sent + ef.residual("w").view(40)).double(), grad.double(), rtol=0, atol=2 * ulp)
    assert grad.abs().sum() > 0 and sent.abs().sum() > 0


@SETTINGS
@given(
    name=st.sampled_from(WRAPPABLE),
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
    ef = gk.ErrorFeedback(build(name))
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
    name=st.sampled_from(WRAPPABLE),
    shapes=st.lists(st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple), min_size=2, max_size=4),
    order=st.lists(st.integers(0, 3), min_size=1, max_size=30),
    seed=st.integers(0, 2**31 - 1),
)
def test_error_feedback_keys_interleaved_keep_their_own_residuals(name, shapes, order, seed):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    keys = [f"layer{i}.weight" for i in range(len(shapes))]
    ef = gk.ErrorFeedback(build(name))
    alone = {key: gk.ErrorFeedback(build(name)) for key in keys}  # one per key
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


@pytest.mark.parametrize("name", WRAPPABLE)
def test_error_feedback_discard_keeps_and_commit_applies_the_residual(name):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    shapes = {"w": (6, 5), "b": (6,)}
    grads = [{key: torch.randn(shape, generator=gen, dtype=F64) for key, shape in shapes.items()} for _ in range(3)]
    deferred = gk.ErrorFeedback(build(name))
    immediate = gk.ErrorFeedback(build(name))
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


@pytest.mark.parametrize("name", WRAPPABLE)
def test_error_feedback_committed_at_once_keeps_one_buffer(name):
    # Between steps only the residual is held: committing at once updates it in place,
    # and a deferred call's buffer replaces the old one at commit (no spare stays behind).
    torch.manual_seed(0)
    ef = gk.ErrorFeedback(build(name))
    grads = torch.randn(4, 130, 131, generator=torch.Generator().manual_seed(2))
    ef.compress(grads[0], key="w")
    held = ef._residuals._flat[(("w", (130, 131)),)]["residual"]
    for grad in grads[1:3]:
        ef.compress(grad, key="w")
        assert ef._residuals._flat[(("w", (130, 131)),)]["residual"].data_ptr() == held.data_ptr()
    ef.compress(grads[3], key="w", commit=False)
    ef.commit()
    now = ef._residuals._flat[(("w", (130, 131)),)]["residual"]
    assert now.data_ptr() != held.data_ptr()  # the deferred buffer became the residual
    assert [k for k in vars(ef) if isinstance(vars(ef)[k], dict) and vars(ef)[k]] == []  # no per-key spares


@pytest.mark.parametrize("commit", [True, False])
@pytest.mark.parametrize("name", ["topk_fast", "topk_exactly_k", "error_feedback_randomk", "signsgd"])
def test_bfloat16_residual_loses_only_its_rounding(name, commit):
    # sent + residual = sum of the gradients, up to the rounding of each step's residual to
    # bfloat16 (8 bits of mantissa): at most half an ulp of the residual per step.
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    inner = build(name)
    inner = inner.compressor if isinstance(inner, gk.ErrorFeedback) else inner
    ef = gk.ErrorFeedback(inner, residual_dtype=torch.bfloat16)
    grad_sum = torch.zeros(130, 131, dtype=F64)
    sent_sum = torch.zeros(130, 131, dtype=F64)
    bound = torch.zeros((), dtype=F64)
    for _ in range(6):
        grad = torch.randn(130, 131, generator=gen)
        payload = ef.compress(grad, key="w", commit=commit)
        if not commit:
            ef.commit()
        residual = ef.residual("w")
        assert residual.dtype == torch.bfloat16 and residual.numel() == grad.numel()
        sent_sum += ef.decompress(payload).double()
        grad_sum += grad.double()
        bound += residual.double().abs().max() * 2.0**-8
    error = (sent_sum + ef.residual("w").double().view(130, 131) - grad_sum).abs().max()
    assert 0 < error <= bound + 1e-5
    assert ef.state_dict()["residuals"]["w"].dtype == torch.bfloat16


def test_bfloat16_residual_discard_keeps_it_and_checkpoints_load():
    torch.manual_seed(0)
    ef = gk.ErrorFeedback(gk.TopK(0.1, exact=True), residual_dtype=torch.bfloat16)
    grad = torch.randn(50, generator=torch.Generator().manual_seed(4))
    ef.compress(grad, key="w")
    before = ef.residual("w").clone()
    ef.compress(grad * 1e3, key="w", commit=False)
    ef.discard()
    assert torch.equal(ef.residual("w"), before)
    again = gk.ErrorFeedback(gk.TopK(0.1, exact=True), residual_dtype=torch.bfloat16)
    again.load_state_dict(ef.state_dict())
    assert torch.equal(again.decompress(again.compress(grad, key="w")), ef.decompress(ef.compress(grad, key="w")))
    assert torch.equal(again.residual("w"), ef.residual("w")) and again.residual("w").dtype == torch.bfloat16


@pytest.mark.parametrize("residual_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("name", WRAPPABLE)
def test_absorb_is_compress_of_the_scaled_tensor_committed_in_place(name, residual_dtype):
    # The one-process step: same payload and residual as compress(tensor * scale) with the
    # same random draw, the residual updated in its own buffer, and the tensor left zeroed.
    grads = torch.randn(3, 130, 131, generator=torch.Generator().manual_seed(4))
    scale = torch.tensor(0.25)
    by_hand, absorbing = (gk.ErrorFeedback(build(name), residual_dtype=residual_dtype) for _ in range(2))
    keep = torch.tensor(True)
    held = None
    for step, grad in enumerate(grads):
        torch.manual_seed(step)
        expected = by_hand.compress(grad * scale, key="w")
        torch.manual_seed(step)
        consumed = grad.clone()
        got = absorbing.absorb_(consumed, "w", scale=scale, keep=keep)
        buffer = absorbing._residuals._flat[(("w", (130, 131)),)]["residual"]
        held = buffer.data_ptr() if held is None else held
        assert buffer.data_ptr() == held  # one buffer, updated in place
        assert torch.count_nonzero(consumed) == 0
        assert_close(absorbing.decompress(got), by_hand.decompress(expected), rtol=1e-6, atol=1e-6)
        assert_close(absorbing.residual("w"), by_hand.residual("w"), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", WRAPPABLE)
def test_absorb_with_keep_false_changes_nothing_even_for_nan(name):
    ef = gk.ErrorFeedback(build(name))
    torch.manual_seed(0)
    ef.absorb_(torch.randn(130, 131), "w", scale=torch.tensor(1.0), keep=torch.tensor(True))
    before = ef.residual("w").clone()
    bad = torch.randn(130, 131)
    bad[3, 4], bad[7, 9] = float("nan"), float("inf")
    payload = ef.absorb_(bad, "w", scale=torch.tensor(1.0), keep=torch.tensor(False))
    assert torch.equal(ef.residual("w"), before)
    assert torch.count_nonzero(ef.decompress(payload)) == 0 and torch.count_nonzero(bad) == 0


@pytest.mark.parametrize("residual_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("name", WRAPPABLE)
def test_absorb_writes_back_what_it_sends_times_the_factor(name, residual_dtype):
    # The gradient ends up holding exactly the decompressed payload (times the factor), and the
    # payload and residual are those of the call without write-back, with the same random draw.
    grads = torch.randn(2, 1100, 1001, generator=torch.Generator().manual_seed(5))  # several 2**19-entry chunks
    plain, writing = (gk.ErrorFeedback(build(name), residual_dtype=residual_dtype) for _ in range(2))
    scale, keep = torch.tensor(0.5), torch.tensor(True)
    for step, (grad, write_back) in enumerate(zip(grads, (True, torch.tensor(8.0)))):
        torch.manual_seed(step)
        expected = plain.absorb_(grad.clone(), "w", scale=scale, keep=keep)
        torch.manual_seed(step)
        written = grad.clone()
        got = writing.absorb_(written, "w", scale=scale, keep=keep, write_back=write_back)
        factor = 1.0 if write_back is True else 8.0
        assert torch.equal(writing.decompress(got), plain.decompress(expected))
        assert torch.equal(written, writing.decompress(got).view_as(written) * factor)
        assert torch.equal(writing.residual("w"), plain.residual("w"))
        assert torch.count_nonzero(written) > 0


def test_absorb_write_back_with_keep_false_leaves_the_gradient_zeroed():
    ef = gk.ErrorFeedback(gk.TopK(0.01))
    bad = torch.randn(1100, 1001)
    bad[3, 4] = float("nan")
    payload = ef.absorb_(bad, "w", scale=torch.tensor(0.0), keep=torch.tensor(False), write_back=True)
    assert torch.count_nonzero(bad) == 0 and torch.count_nonzero(ef.decompress(payload)) == 0
    assert torch.count_nonzero(ef.residual("w")) == 0


@pytest.mark.parametrize("write_back", ["yes", torch.ones(2), 1.0])
def test_absorb_refuses_a_write_back_that_is_not_a_flag_or_a_scalar_tensor(write_back):
    ef = gk.ErrorFeedback(gk.TopK(0.01))
    grad = torch.randn(1100, 1001)
    before = grad.clone()
    with pytest.raises(TypeError, match="write_back must be True, False, or a 0-d tensor"):
        ef.absorb_(grad, "w", scale=torch.tensor(1.0), keep=torch.tensor(True), write_back=write_back)
    assert torch.equal(grad, before) and ef.residual("w") is None


@pytest.mark.parametrize("n_in", [40, 400], ids=["topk-path", "sampled-path"])
@pytest.mark.parametrize("options", [{}, {"exactly_k": True}], ids=["default", "exactly_k"])
def test_a_value_beyond_float16_is_sent_saturated_and_its_excess_kept(n_in, options):
    # A gradient entry above float16's range (65504), sent as float16: a plain cast sent inf, which left -inf, then
    # NaN, in that entry's residual for good (the weight never trained again). Saturated, every step steps, the
    # residual stays finite and the entry's excess is sent over the next steps.
    torch.manual_seed(0)
    model = torch.nn.Linear(n_in, 100, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=1e-9)
    pipe = gk.GradientPipeline(model, average=gk.Average(gk.TopK(0.01, value_dtype=torch.float16, **options)))
    start = model.weight[0, 0].item()
    kept = []
    for step in range(4):
        loss = model.weight[0, 0] * 1e5 if step == 0 else model(torch.randn(4, n_in)).sum()
        pipe.backward(loss)
        assert pipe.step(opt), step
        residual = pipe.state_dict()["average"]["compressor"]["residuals"]["weight"]
        assert bool(torch.isfinite(residual).all()), step
        kept.append(residual.view(-1)[0].item())
    assert kept[0] == pytest.approx(1e5 - 65504, rel=1e-3)  # the excess, kept ...
    assert abs(kept[1]) < 10  # ... and sent on the next step
    assert start - model.weight[0, 0].item() == pytest.approx(1e-9 * 1e5, rel=1e-3)  # the whole gradient, in all


def test_narrow_saturates_finite_values_and_leaves_nan_and_inf_as_they_are():
    from gradkit.compression.base import narrow

    got = narrow(torch.tensor([1e5, -7e4, 3.0, float("inf"), -float("inf"), float("nan")]), torch.float16)
    assert got.dtype == torch.float16
    assert got[:3].tolist() == [65504.0, -65504.0, 3.0]  # the excess is the residual's
    assert got[3].item() == float("inf") and got[4].item() == -float("inf") and got[5].isnan()  # still seen


def test_a_cast_under_error_feedback_saturates_and_a_cast_alone_overflows():
    # Under error feedback the residual holds the excess: an overflow to inf left NaN in it for good, and every
    # later step was skipped (one process). Alone, FP16 still sends inf, so that its step is skipped.
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    pipe = gk.GradientPipeline(model, average=gk.Average(gk.ErrorFeedback(gk.FP16())))
    for step in range(3):
        pipe.backward(model.weight[0, 0] * 1e5 if step == 0 else model(torch.randn(3, 4)).sum())
        assert pipe.step(opt), step
        residual = pipe.state_dict()["average"]["compressor"]["residuals"]["weight"]
        assert bool(torch.isfinite(residual).all()), step
    assert gk.FP16().compress(torch.tensor([1e5, 1.0])).tensors[0][0].item() == float("inf")
    # bfloat16's range is float32's but for its last rounding step: saturated too under error feedback.
    ef = gk.ErrorFeedback(gk.BF16())
    sent = ef.decompress(ef.compress(torch.tensor([3.4e38, 1.0]), key="w"))
    assert bool(torch.isfinite(sent).all()) and bool(torch.isfinite(ef.state_dict()["residuals"]["w"]).all())
