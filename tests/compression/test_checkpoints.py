"""Checkpoints continue bit-identically, load on another bucket layout, and a failed step
or load leaves the state as it was."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import gradkit as gk
from compression_cases import (
    BUCKET,
    F64,
    STATEFUL,
    assert_same_state,
    checkpoint_inputs,
    checkpointed,
    roundtrip,
    run_steps,
)
from gradkit.compression.keyed_state import KeyedState


@pytest.mark.parametrize("split", [0, 1, 6, 16])
@pytest.mark.parametrize("name", STATEFUL)
def test_restored_state_continues_bit_identically(name, split):
    make, keyed = checkpointed(name)
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


def test_keyed_state_loads_across_bucket_layouts():
    bucket = KeyedState(["residual"])
    state = bucket.get(BUCKET, torch.zeros(15, dtype=F64))
    state["residual"].copy_(torch.arange(15, dtype=F64))
    saved = roundtrip(bucket.state_dict())
    assert torch.equal(saved["residual"]["w"], torch.arange(12, dtype=F64))
    assert torch.equal(saved["residual"]["b"], torch.arange(12, 15, dtype=F64))

    single = KeyedState(["residual"])
    single.load_state_dict(saved, "test")
    assert torch.equal(
        single.get((("b", (3,)),), torch.zeros(3, dtype=F64))["residual"], torch.arange(12, 15, dtype=F64)
    )
    assert torch.equal(
        single.get((("w", (4, 3)),), torch.zeros(12, dtype=F64))["residual"], torch.arange(12, dtype=F64)
    )

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
    grads = [
        {"w": torch.randn(4, 3, generator=gen, dtype=F64), "b": torch.randn(3, generator=gen, dtype=F64)}
        for _ in range(6)
    ]

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


@pytest.mark.parametrize(
    "make",
    [lambda: gk.ErrorFeedback(gk.FP16()), lambda: gk.DGC(0.3, value_dtype=torch.float64), lambda: gk.PowerSGD(1)],
)
def test_state_follows_each_parameter_when_the_bucket_layout_changes(make):
    # DDP rebuilds its buckets after the first iteration: the same compressor object then sees
    # new layouts. Its per-parameter state must move with the parameters, as a checkpoint would.
    gen = torch.Generator().manual_seed(0)
    grads = [
        {"w": torch.randn(4, 3, generator=gen, dtype=F64), "b": torch.randn(3, generator=gen, dtype=F64)}
        for _ in range(5)
    ]
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
    with pytest.raises(
        ValueError,
        match=r"the residual kept for parameter 'w' must have 8 entries \(its size here\), got 6; pass a distinct key=",
    ):
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
                    pipe.backward(
                        model(x).pow(2).sum() * (float("nan") if bad == "nan" else 1.0),
                        num_items=torch.tensor(0 if bad == "zero_items" else 5),
                    )
                    pipe.step(opt)
            pipe.backward(model(x).pow(2).sum(), num_items=torch.tensor(5))
            pipe.step(opt)
        return {
            "compressor": average.state_dict(),
            "params": {str(i): p.detach().clone() for i, p in enumerate(model.parameters())},
        }

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


@pytest.mark.parametrize(
    "make",
    [lambda: gk.ErrorFeedback(gk.TopK(0.5, exact=True)), lambda: gk.DGC(0.5), lambda: gk.PowerSGD(1)],
    ids=["ErrorFeedback", "DGC", "PowerSGD"],
)
def test_an_immediate_commit_keeps_other_keys_deferred(make):
    # The stateful compressors alike: compress(commit=True) keeps its own call's state, not the others'.
    compressor = make()
    tensor = torch.tensor([[3.0, 1.0, 0.0, 2.0], [1.0, -2.0, 0.5, 0.0], [0.0, 1.0, 4.0, -1.0]])  # rank 3: r=1 misses
    compressor.compress(tensor, key="a", commit=False)
    compressor.compress(tensor, key="b")  # commit=True: b's state only
    compressor.discard()  # a's deferred state goes
    state = compressor.state_dict()
    kept = state["residuals"] if "residuals" in state else state["velocity"]
    assert kept["a"].count_nonzero() == 0 and kept["b"].count_nonzero() > 0
    assert "a" not in state.get("q", {})  # PowerSGD's warm start: a's Q is not kept either


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

            def commit(ef=ef, errors=errors):
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


def test_a_residual_of_another_size_is_refused_by_one_check_on_load_and_at_first_use():
    # Through gk.Average the parameters' sizes are known at load; loaded into the compressor itself, at first
    # use. Both refuse with the same words, and leave the state as it was.
    model = torch.nn.Linear(4, 3).double()
    average = gk.Average(gk.TopK(0.5))
    pipe = gk.GradientPipeline(model, average=average)
    pipe.backward(model(torch.ones(2, 4, dtype=F64)).sum())
    pipe.step(torch.optim.SGD(model.parameters(), lr=0.1))
    saved = average.state_dict()
    bad = {
        "compressor": {
            **saved["compressor"],
            "residuals": {"weight": torch.ones(7, dtype=F64), "bias": torch.ones(3, dtype=F64)},
        }
    }
    words = r"the residuals? kept for parameter 'weight' must have 12 entries \(its size here\), got 7; load the state"
    with pytest.raises(ValueError, match="Average.load_state_dict: " + words):
        average.load_state_dict(bad)
    assert_same_state(average.state_dict(), saved)
    ef = gk.ErrorFeedback(gk.TopK(0.5))
    ef.load_state_dict(bad["compressor"])
    with pytest.raises(ValueError, match="^" + words):
        ef.compress(torch.ones(3, 4, dtype=F64), key="weight")
    assert_same_state(ef.state_dict(), bad["compressor"])
