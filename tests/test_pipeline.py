"""GradientPipeline: the step anatomy, non-finite steps, GradScaler, state, host reads."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import gradkit as gk
from host_reads import count_host_reads


def make_model(seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 2)).to(dtype)


def batches(count: int, size: int = 8, seed: int = 1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 6, generator=g).to(dtype), torch.randn(size, 2, generator=g).to(dtype)) for _ in range(count)
    ]


def loss_of(model, x, y):
    return ((model(x) - y) ** 2).mean()


def run(pipe, model, optimizer, data, *, poison=None):
    """Feed `data` through `pipe`; `poison` = index of a micro-batch whose loss becomes NaN."""
    stepped = []
    for i, (x, y) in enumerate(data):
        loss = loss_of(model, x, y)
        if i == poison:
            loss = loss * float("nan")
        pipe.backward(loss)
        stepped.append(pipe.step(optimizer))
    return stepped


def test_clipping_sees_the_normalized_gradient_like_a_manual_loop():
    model, reference = make_model(), make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    pipe = gk.GradientPipeline(model, accumulation_steps=2, clip=gk.ClipByGlobalNorm(0.05))
    data = batches(4)
    run(pipe, model, opt, data)
    for window in (data[0:2], data[2:4]):
        for x, y in window:
            (loss_of(reference, x, y) / 2).backward()
        norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
        ref_opt.step()
        ref_opt.zero_grad()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
    torch.testing.assert_close(pipe.last.total_norm, norm)
    assert pipe.last.norm_after.item() == pytest.approx(0.05, rel=1e-4)
    assert pipe.last.clip_coef.item() == pytest.approx(0.05 / norm.item(), rel=1e-4)


def test_nonfinite_step_is_skipped_and_leaves_every_state_untouched():
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    stages = [gk.ZClip(warmup=2), gk.AutoClip(percentile=50), gk.ClipByGlobalNorm(1.0)]
    pipe = gk.GradientPipeline(model, accumulation_steps=2, clip=stages)
    run(pipe, model, opt, batches(6))  # three healthy steps: ZClip is past warm-up
    params = [p.detach().clone() for p in model.parameters()]
    opt_state = copy.deepcopy(opt.state_dict())
    stage_states = copy.deepcopy([s.state_dict() for s in stages])
    stepped = run(pipe, model, opt, batches(2, seed=9), poison=1)
    assert stepped == [False, False]
    assert bool(pipe.last.skipped) and pipe.skipped_steps == 1 and pipe.steps == 4
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert all(p.grad is None for p in model.parameters())  # the bad window is dropped
    after = opt.state_dict()
    for key, state in opt_state["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(after["state"][key][name])), name
    for before, stage in zip(stage_states, stages):
        for key, value in before.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(stage.state_dict()[key])), key
    assert run(pipe, model, opt, batches(2, seed=10)) == [False, True]  # and training goes on


def test_nonfinite_raise_names_the_parameter():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pipe = gk.GradientPipeline(model, nonfinite="raise")
    x, y = batches(1)[0]
    pipe.backward(loss_of(model, x, y))
    model[2].bias.grad[0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"'2\.bias'"):
        pipe.step(opt)


class CountingScaler(torch.amp.GradScaler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.unscale_calls = 0

    def unscale_(self, optimizer):
        self.unscale_calls += 1
        return super().unscale_(optimizer)


def test_grad_scaler_unscales_once_per_window_and_matches_the_unscaled_run():
    model, reference = make_model(dtype=torch.float32), make_model(dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    scaler = CountingScaler("cpu", init_scale=2.0**10, growth_interval=1)
    pipe = gk.GradientPipeline(model, accumulation_steps=3, clip=gk.ClipByGlobalNorm(0.5), scaler=scaler)
    ref_pipe = gk.GradientPipeline(reference, accumulation_steps=3, clip=gk.ClipByGlobalNorm(0.5))
    data = batches(6, dtype=torch.float32)
    run(pipe, model, opt, data[:2])
    assert scaler.get_scale() == 2.0**10  # the scale moves only at the boundary
    run(pipe, model, opt, data[2:])
    run(ref_pipe, reference, ref_opt, data)
    assert scaler.unscale_calls == 2
    assert scaler.get_scale() == 2.0**12  # grew once per optimizer step, not per micro-step
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_grad_scaler_overflow_skips_and_lowers_the_scale():
    model = make_model(dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    pipe = gk.GradientPipeline(model, accumulation_steps=2, scaler=scaler)
    params = [p.detach().clone() for p in model.parameters()]
    stepped = run(pipe, model, opt, batches(2, dtype=torch.float32), poison=0)
    assert stepped == [False, False] and pipe.skipped_steps == 1
    assert scaler.get_scale() == 2.0**9
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))


def test_bf16_autocast_path_trains():
    model = make_model(dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pipe = gk.GradientPipeline(model, accumulation_steps=2, clip=gk.ClipByGlobalNorm(1.0))
    teacher = torch.randn(6, 2)
    data = [(x, x @ teacher) for x, _ in batches(8, dtype=torch.float32)]
    first = sum(loss_of(model, x, y).item() for x, y in data)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(5):
            run(pipe, model, opt, data)
    assert pipe.last.total_norm.dtype == torch.float32
    last = sum(loss_of(model, x, y).item() for x, y in data)
    assert last < 0.95 * first
    assert pipe.skipped_steps == 0


class Recorder:
    """A minimal tracker: measures every other window and records what it is shown."""

    def __init__(self):
        self.calls = []
        self.weights_seen = []

    def wants(self, step):
        return step % 2 == 0

    def observe(self, ctx, report):
        self.calls.append((list(ctx.names), report.total_norm.clone(), report.step, report.noise))
        self.weights_seen.append(ctx.params[0].detach().clone())

    def after_step(self, ctx, report):
        self.weights_seen.append(ctx.params[0].detach().clone())


def test_tracker_observes_each_step_with_names_and_report():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = Recorder()
    pipe = gk.GradientPipeline(model, accumulation_steps=2, tracker=tracker)
    run(pipe, model, opt, batches(4))
    assert [c[2] for c in tracker.calls] == [1, 2]
    assert tracker.calls[0][0] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    before, after = tracker.weights_seen[:2]
    assert not torch.equal(before, after)  # observe sees the weights before the update, after_step after


def test_noise_sample_on_measured_windows_is_first_micro_batch_vs_window():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = Recorder()
    pipe = gk.GradientPipeline(model, accumulation_steps=3, tracker=tracker)
    data = batches(6, size=5)
    run(pipe, model, opt, data[:3])
    assert tracker.calls[0][3] is None  # step 1 is not measured
    reference = copy.deepcopy(model)
    x = [b[0] for b in data[3:]]
    y = [b[1] for b in data[3:]]
    for xi, yi in zip(x, y):
        pipe.backward(((model(xi) - yi) ** 2).sum(), num_items=5)
        pipe.step(opt)
    noise = tracker.calls[1][3]
    first = torch.autograd.grad(((reference(x[0]) - y[0]) ** 2).sum() / 5, list(reference.parameters()))
    window = torch.autograd.grad(
        ((reference(torch.cat(x)) - torch.cat(y)) ** 2).sum() / 15, list(reference.parameters())
    )

    def sq(gs):
        return sum(float((g.double() ** 2).sum()) for g in gs)

    assert float(noise.small_sq) == pytest.approx(sq(first), rel=1e-9)
    assert float(noise.big_sq) == pytest.approx(sq(window), rel=1e-9)
    assert float(noise.small_batch) == 5 and float(noise.big_batch) == 15


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("num_items", [None, 8, torch.tensor(8)])
def test_one_host_read_per_optimizer_step_and_none_between(monkeypatch, num_items, compressed):
    # Compressed: the skip decision, the item counts and whether this process had items share the read.
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stages = [gk.ZClip(warmup=1), gk.AutoClip(), gk.ClipPerLayer(1.0), gk.ClipByGlobalNorm(1.0), gk.AGC()]
    average = gk.Average(gk.TopK(0.5)) if compressed else None
    pipe = gk.GradientPipeline(model, accumulation_steps=3, clip=stages, average=average)
    data = batches(6)
    losses = [loss_of(model, x, y) for x, y in data[:3]]
    counter = count_host_reads(monkeypatch)
    for loss in losses[:2]:
        pipe.backward(loss, num_items=num_items)
        pipe.step(opt)
    assert counter["n"] == 0
    pipe.backward(losses[2], num_items=num_items)
    pipe.step(opt)
    assert counter["n"] == 1


def test_state_dict_mid_window_resumes_bit_identically(tmp_path):
    data = batches(16, seed=4)

    def fresh():
        model = make_model()
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        pipe = gk.GradientPipeline(model, accumulation_steps=4, clip=[gk.ZClip(warmup=2), gk.AutoClip(history=3)])
        return model, opt, pipe

    model, opt, pipe = fresh()
    run(pipe, model, opt, data)

    model2, opt2, pipe2 = fresh()
    run(pipe2, model2, opt2, data[:10])  # stop in the middle of the third window
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model2.state_dict(), "opt": opt2.state_dict(), "pipe": pipe2.state_dict()}, path)
    model3, opt3, pipe3 = fresh()
    ckpt = torch.load(path, weights_only=True)
    model3.load_state_dict(ckpt["model"])
    opt3.load_state_dict(ckpt["opt"])
    pipe3.load_state_dict(ckpt["pipe"])
    assert pipe3.window.micro_steps == 2
    run(pipe3, model3, opt3, data[10:])
    for a, b in zip(model.parameters(), model3.parameters()):
        assert torch.equal(a, b)
    assert pipe3.steps == pipe.steps == 4


def test_state_dict_with_scaler_and_tensor_items_round_trips():
    model = make_model(dtype=torch.float32)
    pipe = gk.GradientPipeline(model, accumulation_steps=2, scaler=torch.amp.GradScaler("cpu", init_scale=64.0))
    x, y = batches(1, dtype=torch.float32)[0]
    pipe.backward(((model(x) - y) ** 2).sum(), num_items=torch.tensor(8))
    buffer = io.BytesIO()
    torch.save(pipe.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    other = gk.GradientPipeline(
        make_model(dtype=torch.float32), accumulation_steps=2, scaler=torch.amp.GradScaler("cpu")
    )
    other.load_state_dict(state)
    assert other.scaler.get_scale() == 64.0
    assert int(other.window.items) == 8 and other.window.micro_steps == 1


@pytest.mark.parametrize(
    "mutate, words",
    [
        (lambda s: s.pop("steps"), "missing keys"),
        (lambda s: s.update(extra=1), "unexpected keys"),
        (lambda s: s["grads"].update({"nope.weight": torch.zeros(1)}), "unknown parameter 'nope.weight'"),
        (lambda s: s["grads"].update({"0.weight": torch.zeros(3)}), "has shape"),
        (lambda s: s["clip"].append({}), "clip stage states"),
        (lambda s: s.update(micro_steps=7), "micro_steps"),
        (lambda s: s["clip"][0].update(count="x"), "count"),
    ],
)
def test_bad_state_dict_is_rejected_and_changes_nothing(mutate, words):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pipe = gk.GradientPipeline(model, accumulation_steps=2, clip=[gk.ZClip(warmup=2)])
    run(pipe, model, opt, batches(3))  # one step done, one micro-step pending
    state = pipe.state_dict()
    before = copy.deepcopy(state)
    mutate(state)
    with pytest.raises((ValueError, TypeError), match=words):
        pipe.load_state_dict(state)
    after = pipe.state_dict()
    assert after["steps"] == before["steps"] and after["micro_steps"] == before["micro_steps"]
    assert all(torch.equal(after["grads"][k], v) for k, v in before["grads"].items())
    assert all(
        torch.equal(torch.as_tensor(after["clip"][0][k]), torch.as_tensor(v)) for k, v in before["clip"][0].items()
    )


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"clip": "norm"}, TypeError, "clip must be a clipping stage"),
        ({"clip": [gk.ClipByGlobalNorm(1.0), 3]}, TypeError, "clip must be a clipping stage"),
        ({"tracker": object()}, TypeError, "tracker must have wants"),
        ({"scaler": object()}, TypeError, "GradScaler"),
        ({"nonfinite": "ignore"}, ValueError, "nonfinite"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, words):
    with pytest.raises(error, match=words):
        gk.GradientPipeline(make_model(), **kwargs)


def test_models_without_trainable_parameters_are_rejected():
    with pytest.raises(ValueError, match="no parameters that require grad"):
        gk.GradientPipeline([])
    frozen = make_model().requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters that require grad"):
        gk.GradientPipeline(frozen)
    with pytest.raises(TypeError, match="single tensor"):
        gk.GradientPipeline(nn.Parameter(torch.zeros(2)))
    with pytest.raises(TypeError, match="not a tensor"):
        gk.GradientPipeline([1, 2])


def test_parameters_and_named_pairs_are_accepted():
    model = make_model()
    assert gk.GradientPipeline(model.parameters()).names == ["0", "1", "2", "3"]
    assert gk.GradientPipeline(model.named_parameters()).names[0] == "0.weight"


def test_parameters_without_grad_are_skipped():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pipe = gk.GradientPipeline(model, clip=gk.ClipByGlobalNorm(1.0))
    x, y = batches(1)[0]
    before = model[0].weight.detach().clone()
    pipe.backward(((model[2](x.new_ones(8, 12)) - y) ** 2).mean())  # only the last layer gets grads
    assert pipe.step(opt)
    assert torch.equal(before, model[0].weight)


def test_a_parameter_unfrozen_after_setup_is_refused_naming_it():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    pipe = gk.GradientPipeline(model, accumulation_steps=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pipe.backward(model(torch.randn(5, 3)).square().mean())
    model[0].weight.requires_grad_(True)
    before = [p.grad.clone() for p in model[1].parameters()]
    with pytest.raises(RuntimeError, match=r"'0.weight'.*build a new GradientPipeline"):
        pipe.backward(model(torch.randn(5, 3)).square().mean())
    with pytest.raises(RuntimeError, match="'0.weight'"):
        pipe.flush(opt)
    assert all(torch.equal(a, p.grad) for a, p in zip(before, model[1].parameters()))  # nothing changed
    assert model[0].weight.grad is None
    model[0].weight.requires_grad_(False)  # frozen again: the pipeline goes on
    assert pipe.flush(opt)


@pytest.mark.parametrize("clip", [None, gk.ClipByGlobalNorm(1.0), gk.AutoClip()], ids=["none", "global", "auto"])
def test_a_model_converted_in_place_after_setup_is_refused_naming_it(clip):
    # model.double() keeps the parameter objects: the pipeline's grouping is of the old dtype. A clear error before
    # the backward, not a norm of the wrong dtype after it (with the window left half-counted).
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    pipe = gk.GradientPipeline(model, clip=clip)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pipe.backward(model(torch.randn(5, 3)).square().mean())
    assert pipe.step(opt)
    model.double()
    with pytest.raises(RuntimeError, match=r"'0.weight'.*torch.float32 on cpu, now torch.float64 on cpu.*new Grad"):
        pipe.backward(model(torch.randn(5, 3, dtype=torch.float64)).square().mean())
    assert pipe.window.micro_steps == 0 and all(p.grad is None or not p.grad.any() for p in model.parameters())
    model.float()  # converted back: the pipeline goes on
    pipe.backward(model(torch.randn(5, 3)).square().mean())
    assert pipe.step(opt) and pipe.steps == 2


# -- one pass fewer: the window's scale folded into the global clip's multiply -------------------


class GradRecorder:
    """A tracker that keeps every report and the gradients it is shown, every step."""

    def __init__(self):
        self.reports, self.grads, self.pre_clip = [], [], []

    def wants(self, step):
        return True

    def observe(self, ctx, report):
        self.reports.append(report)
        self.grads.append([g.clone() for g in ctx.grads])
        self.pre_clip.append(ctx.pre_clip_norms.clone())

    def after_step(self, ctx, report):
        pass


def fold_run(fold: bool, *, optimizer="sgd", num_items=None, max_norm=0.05, poison=None, steps=4):
    model = make_model()
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:  # fused: the skip stays on the device
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    tracker = GradRecorder()
    pipe = gk.GradientPipeline(model, accumulation_steps=3, clip=gk.ClipByGlobalNorm(max_norm), tracker=tracker)
    assert pipe._fold
    pipe._fold = fold
    for i, (x, y) in enumerate(batches(3 * steps)):
        loss = ((model(x) - y) ** 2).sum() if num_items is not None else loss_of(model, x, y)
        if i == poison:
            loss = loss * float("nan")
        items = None if num_items is None else num_items(x)
        pipe.backward(loss, num_items=items)
        pipe.step(opt)
    return model, tracker, pipe


@pytest.mark.parametrize("optimizer", ["sgd", "fused"])
@pytest.mark.parametrize(
    "num_items", [None, lambda x: x.shape[0] * 2, lambda x: torch.tensor(x.shape[0] * 2)], ids=["mean", "int", "tensor"]
)
@pytest.mark.parametrize("max_norm", [0.05, 100.0], ids=["clipping", "not-clipping"])
def test_folded_scale_sees_and_leaves_what_the_separate_pass_does(optimizer, num_items, max_norm):
    kwargs = dict(optimizer=optimizer, num_items=num_items, max_norm=max_norm, poison=4)
    (model_a, rec_a, pipe_a), (model_b, rec_b, pipe_b) = [fold_run(fold, **kwargs) for fold in (False, True)]
    assert len(rec_a.reports) == len(rec_b.reports) == 4
    seen = zip(rec_a.reports, rec_b.reports, rec_a.grads, rec_b.grads, rec_a.pre_clip, rec_b.pre_clip)
    for ra, rb, ga, gb, na, nb in seen:
        for field in ("total_norm", "norm_after", "clip_coef", "skipped", "items"):
            torch.testing.assert_close(getattr(rb, field), getattr(ra, field), rtol=1e-12, atol=0, equal_nan=True)
            assert getattr(rb, field).dtype == getattr(ra, field).dtype
        torch.testing.assert_close(nb, na, rtol=1e-12, atol=0, equal_nan=True)
        for a, b in zip(ga, gb):  # the tracker's gradients: scaled and clipped the same, skipped step included
            torch.testing.assert_close(b, a, rtol=1e-12, atol=0, equal_nan=True)
    assert bool(rec_b.reports[1].skipped) and not bool(rec_b.reports[0].skipped)
    assert pipe_b.skipped_steps == pipe_a.skipped_steps == 1
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-12, atol=1e-15)


def test_folded_step_writes_every_gradient_once(monkeypatch):
    calls = []
    real = torch._foreach_mul_

    def counting(tensors, *args, **kwargs):
        calls.append(len(tensors))
        return real(tensors, *args, **kwargs)

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pipe = gk.GradientPipeline(model, accumulation_steps=2, clip=gk.ClipByGlobalNorm(0.05))
    data = batches(2)
    monkeypatch.setattr(torch, "_foreach_mul_", counting)
    run(pipe, model, opt, data)
    assert calls == [4]  # one multiply over the four gradients: scale and clip together

    calls.clear()
    pipe._fold = False
    run(pipe, model, opt, data)
    assert calls == [4, 4]  # the separate scale pass, then the clip


def test_folded_norm_overflow_of_the_sum_is_taken_again_scaled():
    # A float32 sum whose norm overflows float32 (~1.8e19) while the scaled gradient is finite:
    # the folded path must not skip where the separate pass would not.
    results = []
    for fold in (False, True):
        torch.manual_seed(0)
        model = nn.Linear(4, 1).float()
        opt = torch.optim.SGD(model.parameters(), lr=1e-30)
        pipe = gk.GradientPipeline(model, clip=gk.ClipByGlobalNorm(1.0))
        pipe._fold = fold
        loss = model(torch.full((2, 4), 1e20)).sum()
        pipe.backward(loss, num_items=10**10)
        assert pipe.step(opt)
        results.append((pipe.last.total_norm, pipe.last.skipped, [p.detach().clone() for p in model.parameters()]))
    (norm_a, skip_a, params_a), (norm_b, skip_b, params_b) = results
    assert torch.isfinite(norm_a) and torch.isfinite(norm_b) and not skip_a and not skip_b
    torch.testing.assert_close(norm_b, norm_a)
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(b, a)


@pytest.mark.parametrize(
    "clip",
    [[gk.ClipPerLayer(0.1), gk.ClipByGlobalNorm(0.05)], gk.ClipByGlobalNorm(0.05, norm_type=1.0), gk.ClipByValue(0.01)],
)
def test_no_fold_unless_a_global_l2_clip_comes_first(clip):
    pipe = gk.GradientPipeline(make_model(), clip=clip)
    assert not pipe._fold


def test_context_defer_scale_folds_into_the_next_multiply():
    grads = [torch.randn(5, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)]
    params = [torch.zeros_like(g) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    ctx = gk.GradContext(["a", "b"], params)
    ctx.defer_scale(torch.tensor(0.25, dtype=torch.float64))
    expected = torch.linalg.vector_norm(torch.cat([0.25 * g.flatten() for g in grads]))
    torch.testing.assert_close(ctx.total_norm(), expected, rtol=1e-12, atol=0)
    assert torch.equal(params[0].grad, grads[0])  # nothing written yet
    ctx.scale_(0.5)
    assert ctx.pending_factor is None
    for p, g in zip(params, grads):
        torch.testing.assert_close(p.grad, g * 0.125, rtol=1e-15, atol=0)
    torch.testing.assert_close(ctx.total_norm(), expected * 0.5, rtol=1e-12, atol=0)


def test_an_average_is_attached_again_on_one_process_when_no_state_carries_over():
    # A notebook cell run again builds the pipeline again with the same Average: allowed where nothing would be
    # shared (no compressor, or the very same parameters); a compressor's residuals are not handed to other ones.
    model, other = nn.Linear(3, 2), nn.Linear(3, 2)
    plain = gk.Average()
    gk.GradientPipeline(model, average=plain)
    pipe = gk.GradientPipeline(other, average=plain)
    pipe.backward(other(torch.ones(4, 3)).sum())
    assert pipe.step(torch.optim.SGD(other.parameters(), lr=0.1))
    compressed = gk.Average(gk.TopK(0.5))
    gk.GradientPipeline(model, average=compressed)
    gk.GradientPipeline(model, average=compressed)
    with pytest.raises(ValueError, match="already attached to a pipeline"):
        gk.GradientPipeline(other, average=compressed)
    # The very same tensors under other names are other parameters too: a compressor's state is kept by name.
    renamed = [(f"renamed.{name}", p) for name, p in model.named_parameters()]
    with pytest.raises(ValueError, match="already attached to a pipeline"):
        gk.GradientPipeline(renamed, average=compressed)


class FailingBackward(torch.autograd.Function):
    """Identity forward whose backward raises, as an out-of-memory error in the middle of backward does."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise torch.OutOfMemoryError("out of memory in backward (simulated)")


AVERAGES = {"one-process": lambda: None, "average": gk.Average, "compressed": lambda: gk.Average(gk.TopK(1.0))}


@pytest.mark.parametrize("then", ["flush", "next-micro-batch"])
@pytest.mark.parametrize("num_items", ["int", "tensor", "mean"])
@pytest.mark.parametrize("average", sorted(AVERAGES))
def test_a_boundary_backward_that_raises_leaves_the_window_as_it_was(average, num_items, then):
    # An out-of-memory skip loop catches the error and goes on: the window must hold the micro-batches whose
    # backward ran, counted as before the failed call (which had already settled the boundary's count).
    def count(n):
        return {"int": n, "tensor": torch.tensor(n), "mean": None}[num_items]

    w = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    pipe = gk.GradientPipeline([w], accumulation_steps=2, average=AVERAGES[average]())
    optimizer = torch.optim.SGD([w], lr=1.0)
    per = 1 if num_items == "mean" else 10
    pipe.backward((w * 1.0).sum() * per, num_items=count(10))  # a mean gradient of 1
    with pytest.raises(torch.OutOfMemoryError):
        pipe.backward(FailingBackward.apply((w * 1.0).sum() * 90), num_items=count(90))
    assert pipe.window.micro_steps == 1 and pipe.reduction.current is None
    assert (pipe.window.items is None) if num_items == "mean" else (int(pipe.window.items) == 10)
    if then == "flush":
        assert pipe.flush(optimizer)
        items = 10
    else:
        per = 1 if num_items == "mean" else 30
        pipe.backward((w * 1.0).sum() * per, num_items=count(30))  # the next micro-batch ends the window
        assert pipe.step(optimizer)
        items = 40
    assert w.item() == -1.0  # the mean gradient of the micro-batches the window holds
    if num_items != "mean":
        assert int(pipe.last.items) == items
