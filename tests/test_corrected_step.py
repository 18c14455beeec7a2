"""Error feedback formed in the bucket (`gradkit.averaging.corrected`): bit for bit the plain path.

The distributed compressed step under `gk.ErrorFeedback` writes ``gradient + residual`` into the
bucket, sends from it, puts the sum over ranks into the gradients, and at commit makes the bucket's
tensor the residual. These tests hold it to the plain composition (pack, then
``ErrorFeedback.compress(..., commit=False)``, then the sum into the bucket), on real gloo processes
and piece by piece, and check that a skipped step leaves every residual bit-identical.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradkit as gk
from dist_helpers import run_workers
from gradkit.averaging import compressed
from gradkit.averaging.buckets import Bucket
from gradkit.averaging.corrected import MAX_PIECES, corrected_inputs, hand_back_to, pack_corrected_
from gradkit.averaging.payloads import compress_keyed, decompress_sum, scatter_sum_into


def _model() -> nn.Module:
    torch.manual_seed(0)
    # 64*300 + 300 + 300*90 + 90 entries: several buckets of 16 KiB hold more than TopK's smallest sample.
    return nn.Sequential(nn.Linear(64, 300), nn.Tanh(), nn.Linear(300, 90))


def _train(rank: int, world: int, fused: bool, nan_step: int | None) -> dict:
    """Four steps of Average(TopK(0.01)); with `nan_step`, rank 1's gradient is NaN at that step.
    Returns per step the gradients the optimizer saw, the residuals and whether it stepped."""
    if not fused:
        compressed.corrected_inputs = lambda *args: False  # the plain path, in this process only
    packed = []  # buckets that took the corrected path
    pack = compressed.pack_corrected_
    compressed.pack_corrected_ = lambda *args: packed.append(1) or pack(*args)
    model = _model()
    average = gk.Average(gk.TopK(0.01), bucket_mb=0.06, first_bucket_mb=0.06)
    pipe = gk.GradientPipeline(model, average=average)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    for step in range(4):
        torch.manual_seed(100 * step + rank)
        x, y = torch.randn(8, 64), torch.randn(8, 90)
        loss = nn.functional.mse_loss(model(x), y)
        if nan_step == step and rank == 1:
            loss = loss * float("nan")
        pipe.backward(loss)
        grads = {}

        def keep_grads(opt, *args, grads=grads, **kwargs):
            grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

        handle = optimizer.register_step_pre_hook(keep_grads)
        stepped = pipe.step(optimizer)
        handle.remove()
        residuals = average.state_dict()["compressor"]["residuals"]
        seen.append({"grads": grads, "stepped": stepped, "residuals": {k: v.clone() for k, v in residuals.items()}})
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"steps": seen, "params": params, "packed": len(packed), "buckets": len(average.buckets)}


@pytest.fixture(scope="module")
def runs():
    # Steps 0, 1 and 3 are ordinary; at step 2 rank 1's NaN makes both ranks skip.
    return {fused: run_workers(_train, 2, fused, 2, timeout=120) for fused in (True, False)}


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
        assert a[key].dtype == b[key].dtype


def test_the_step_in_the_bucket_is_bit_for_bit_the_plain_step(runs):
    for fused_rank, plain_rank in zip(runs[True], runs[False]):
        assert fused_rank["buckets"] > 1 and fused_rank["packed"] == 4 * fused_rank["buckets"]
        assert plain_rank["packed"] == 0
        for fused, plain in zip(fused_rank["steps"], plain_rank["steps"]):
            assert fused["stepped"] == plain["stepped"]
            _same(fused["residuals"], plain["residuals"])
            if fused["stepped"]:
                _same(fused["grads"], plain["grads"])
        _same(fused_rank["params"], plain_rank["params"])


def test_residuals_are_nonzero_and_a_skipped_step_leaves_them_bit_identical(runs):
    for rank in runs[True]:
        steps = rank["steps"]
        assert [s["stepped"] for s in steps] == [True, True, False, True]
        assert any(bool(r.abs().sum() > 0) for r in steps[1]["residuals"].values())
        _same(steps[2]["residuals"], steps[1]["residuals"])  # the skipped step changed nothing
        assert not all(torch.equal(steps[3]["residuals"][k], v) for k, v in steps[2]["residuals"].items())


def _bucket(sizes: list[int]) -> tuple[Bucket, list[torch.Tensor]]:
    params = [torch.zeros(size) for size in sizes]
    return Bucket(0, list(range(len(sizes))), params), params


@pytest.mark.parametrize("scale", [0.25, torch.tensor(1 / 3, dtype=torch.float64), 1.0])
def test_pack_corrected_equals_pack_then_add(scale):
    sizes = [300_000, 7, 900_000, 1]  # pieces that cross the pass's chunks
    bucket, params = _bucket(sizes)
    torch.manual_seed(1)
    grads = [torch.randn(size) for size in sizes]
    residual = torch.randn(sum(sizes))
    for p, g in zip(params, grads):
        p.grad = g
    bucket.pack(params, scale)
    expected = bucket.buffer + residual
    low, high = torch.aminmax(bucket.buffer)
    bad = pack_corrected_(bucket, grads, scale, residual)
    assert torch.equal(bucket.buffer, expected)
    assert not bool(bad) and bool(torch.isfinite(low) & torch.isfinite(high))
    grads[2][123_456] = float("inf")
    assert bool(pack_corrected_(bucket, grads, scale, residual))
    grads[2][123_456], grads[0][5] = 0.0, float("nan")
    assert bool(pack_corrected_(bucket, grads, scale, residual))


@pytest.mark.parametrize("exactly_k", [False, True])
def test_scatter_into_pieces_equals_the_scatter_into_one_tensor(exactly_k):
    sizes = [20_000, 1, 50_000, 30]
    torch.manual_seed(2)
    compressor = gk.TopK(0.05, exactly_k=exactly_k)
    flat = torch.randn(sum(sizes))
    flat[20_000:20_500] = float("nan")  # NaN entries are padding in the middle of a payload
    payloads = [compressor.compress(flat), compressor.compress(flat * 3), compressor.compress(-flat * 0)]
    assert payloads[0].meta.get("ascending", False) is not exactly_k
    assert exactly_k or (payloads[0].tensors[0] == 0).sum() > 1  # padding (slots past the count, and NaN)
    expected = decompress_sum(compressor, payloads, torch.empty_like(flat))
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    parts = [(p.tensors[0], p.tensors[1]) for p in payloads]
    for ascending in {False, not exactly_k}:
        pieces = [torch.full((size,), 7.0) for size in sizes]
        assert scatter_sum_into(pieces, offsets, parts, ascending=ascending) is pieces[0]
        got = torch.cat(pieces)
        assert torch.equal(got, expected) and torch.equal(got.signbit(), expected.signbit())


@pytest.mark.parametrize("density", [0.01, 1.0])
def test_compress_corrected_commits_by_swapping_and_discards_by_keeping(density):
    torch.manual_seed(3)
    plain, fused = gk.ErrorFeedback(gk.TopK(density)), gk.ErrorFeedback(gk.TopK(density))
    layout = (("a", (40_000,)), ("b", (25_000,)))
    handed = []
    for step in range(3):
        tensor = torch.randn(65_000)
        torch.manual_seed(10 + step)
        expected = plain.compress(tensor, key=layout, commit=False)
        residual = fused.residual_for(layout, tensor)
        before = residual.clone()
        corrected = tensor + residual
        torch.manual_seed(10 + step)
        payload = fused.compress_corrected_(corrected, layout, hand_back=handed.append)
        assert all(torch.equal(a, b) for a, b in zip(payload.tensors, expected.tensors))
        if step == 1:  # a skipped step: the old residual, bit for bit, and nothing handed back
            plain.discard(), fused.discard()
            assert torch.equal(fused.residual_for(layout, tensor), before) and len(handed) == 1
            continue
        plain.commit(), fused.commit()
        assert fused.residual_for(layout, tensor).data_ptr() == corrected.data_ptr()  # the caller's tensor, no copy
        assert handed[-1] is residual
        _same(fused.state_dict()["residuals"], plain.state_dict()["residuals"])


def test_the_bucket_gets_the_old_residual_as_its_buffer():
    bucket, _ = _bucket([10, 20])
    old = torch.randn(30)
    hand_back_to(bucket)(old)
    assert bucket.buffer is old and bucket.views[1].data_ptr() == old[10:].data_ptr()
    hand_back_to(bucket)(torch.randn(31))  # another size: a buffer of its own
    assert bucket.buffer.numel() == 30 and bucket.buffer is not old


def test_which_buckets_take_the_corrected_path():
    bucket, params = _bucket([100, 50])
    grads = [torch.randn(100), torch.randn(50)]
    ef = gk.ErrorFeedback(gk.TopK(0.1))
    assert corrected_inputs(ef, bucket, grads)
    assert not corrected_inputs(gk.TopK(0.1), bucket, grads)  # no error feedback
    assert not corrected_inputs(gk.ErrorFeedback(gk.FP16()), bucket, grads)  # not sparse
    assert not corrected_inputs(ef, bucket, [grads[0], None])  # a missing gradient
    assert not corrected_inputs(ef, bucket, [grads[0], torch.randn(100)[::2]])  # not contiguous
    assert not corrected_inputs(ef, bucket, [grads[0], grads[1].double()])  # another dtype
    assert not corrected_inputs(ef, bucket, [bucket.views[0], grads[1]])  # a view of the bucket
    many, _ = _bucket([2] * (MAX_PIECES + 1))
    assert not corrected_inputs(ef, many, [torch.randn(2)] * (MAX_PIECES + 1))


def test_a_plain_path_payload_matches():
    # compress_keyed (the plain path) and the pieces agree on a bucket's layout.
    ef = gk.ErrorFeedback(gk.TopK(1.0))
    layout = (("w", (3,)),)
    payload = compress_keyed(ef, torch.tensor([1.0, -2.0, 3.0]), layout)
    assert torch.equal(ef.decompress(payload), torch.tensor([1.0, -2.0, 3.0]))
