"""On a CUDA GPU: compressors and clipping run without a single device sync, and match their definitions.

Every test here is marked `cuda`: ``pytest -m cuda`` selects exactly these, and
tests/conftest.py skips them where ``torch.cuda.is_available()`` is False. Each
call under test runs inside ``torch.cuda.set_sync_debug_mode("error")``, which
raises on any operation that waits for the device (``.item()``, a pageable copy,
``nonzero()``); checks that read results run after the mode is restored.
"""

from __future__ import annotations

import pytest
import torch

import gradkit as gk
from gradkit.compression import triton_select
from gradkit.compression.selection import positions_at_least, sampled_threshold
from host_reads import no_cuda_syncs

pytestmark = pytest.mark.cuda

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)  # the sampled thresholds draw from the global generators (CUDA's included)


def test_the_sync_trap_is_set():
    x = torch.ones(4, device=CUDA)
    with pytest.raises(RuntimeError), no_cuda_syncs():
        x.sum().item()
    assert torch.cuda.get_sync_debug_mode() == 0  # restored


def gradient_like(n: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Heavy-tailed entries (Student's t with 3 degrees of freedom), drawn on the GPU."""
    g = torch.Generator(device=CUDA).manual_seed(seed)
    chi2 = torch.randn(3, n, generator=g, device=CUDA).square().sum(0) / 3
    return (torch.randn(n, generator=g, device=CUDA) / chi2.sqrt()).to(dtype)


def top_k_energy(x: torch.Tensor, k: int) -> float:
    return float(torch.topk(x.abs().double(), k, sorted=False).values.square().sum())


def sent(payload: gk.Payload) -> torch.Tensor:
    indices = payload.tensors[0].long()
    valid = payload.meta.get("valid")
    return indices[valid] if valid is not None else indices


K = 10_000  # 1% of the 1M entries below
#: name -> (make, keyed, slots sent at each of the 4 steps)
COMPRESSORS = {
    "topk_exactly_k": (lambda: gk.TopK(0.01, exactly_k=True), False, [K] * 4),
    "topk_fast": (lambda: gk.TopK(0.01), False, [15_000] * 4),
    "topk_exactly_k_fp16_values": (lambda: gk.TopK(0.01, exactly_k=True, value_dtype=torch.float16), False, [K] * 4),
    "threshold_fixed_size": (lambda: gk.Threshold(2.0, max_density=0.01), False, [K] * 4),
    "randomk": (lambda: gk.RandomK(0.01, seed=1), False, [K] * 4),
    "randomk_unscaled": (lambda: gk.RandomK(0.01, seed=1, scale=False), False, [K] * 4),
    "dgc_exactly_k": (lambda: gk.DGC(0.01, exactly_k=True), True, [K] * 4),
    # the warm-up's densities: 25%, 6.25%, 1.5625%, then the target
    "dgc_warmup": (
        lambda: gk.DGC(0.01, warmup_steps=4, exactly_k=True, clip_norm=1.0),
        True,
        [250_000, 62_500, 15_625, K],
    ),
    "error_feedback_topk_exactly_k": (lambda: gk.ErrorFeedback(gk.TopK(0.01, exactly_k=True)), True, [K] * 4),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(COMPRESSORS))
def test_compress_and_decompress_never_sync(name, dtype):
    make, keyed, slots = COMPRESSORS[name]
    compressor = make()
    inputs = [gradient_like(1_000_000, seed, dtype) for seed in range(4)]
    torch.cuda.synchronize()
    payloads, dense = [], []
    with no_cuda_syncs():
        for x in inputs:
            payload = compressor.compress(x, key="w") if keyed else compressor.compress(x)
            payloads.append(payload)
            dense.append(compressor.decompress(payload))
    torch.cuda.synchronize()
    for x, payload, out, size in zip(inputs, payloads, dense, slots):
        assert out.shape == x.shape and out.dtype == x.dtype and out.device.type == "cuda"
        assert all(t.device.type == "cuda" for t in payload.tensors)
        assert payload.tensors[0].numel() == size
        assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("n", [10_000_000, 1_000_003])
@pytest.mark.parametrize("density", [0.01, 0.001])
def test_exactly_k_payload_size_and_energy_on_the_gpu(n, density):
    x = gradient_like(n, seed=n)
    k = round(density * n)
    compressor = gk.TopK(density, exactly_k=True)
    with no_cuda_syncs():
        payload = compressor.compress(x)
        dense = compressor.decompress(payload)
    indices, values = payload.tensors
    assert indices.numel() == k and values.numel() == k
    assert bool(payload.meta["valid"].all())
    assert sent(payload).unique().numel() == k
    kept = float(dense.double().square().sum())
    assert kept >= 0.9 * top_k_energy(x, k)
    assert torch.equal(dense[sent(payload)], x[sent(payload)])


def test_threshold_fixed_size_on_the_gpu():
    x = gradient_like(2_000_000, seed=3)
    compressor = gk.Threshold(4.0, max_density=0.01)
    with no_cuda_syncs():
        payload = compressor.compress(x)
    assert payload.tensors[0].numel() == 20_000
    mask = torch.zeros(x.numel(), dtype=torch.bool, device=CUDA)
    mask[sent(payload)] = True
    above = x.abs() >= 4.0
    if int(above.sum()) <= 20_000:
        assert torch.equal(mask, above)
    else:
        assert bool(above[mask].all()) and int(mask.sum()) == 20_000


def test_device_positions_match_the_plain_mask_on_the_gpu():
    x = gradient_like(3_000_001, seed=5)
    x[::100_003] = float("nan")
    cut = torch.full((), 4.0, device=CUDA)  # about 2.8% of Student's t(3) entries lie above
    with no_cuda_syncs():
        got = positions_at_least(x, cut, 200_000)
    if triton_select.usable(x):  # one Triton kernel: positions unsorted, NaN never selected
        expected = (x.abs() >= cut).nonzero().view(-1)
        assert torch.equal(got[: expected.numel()].sort().values, expected)
    else:
        expected = ((x.abs() >= cut) | x.isnan()).nonzero().view(-1)
        assert torch.equal(got[: expected.numel()], expected)
    assert expected.numel() < 200_000
    assert bool((got[expected.numel() :] == -1).all())


def test_triton_selection_matches_the_torch_path_on_the_gpu():
    if not triton_select.usable(torch.zeros(1, device=CUDA)):
        pytest.skip("Triton is not installed")
    x = gradient_like(10_000_000, seed=6)
    k = 100_000
    with no_cuda_syncs():
        cut = sampled_threshold(x, k, 1.2)
        positions, values, valid = triton_select.select_at_least(
            x, cut, 150_000, index_dtype=torch.int32, value_dtype=torch.float32
        )
        payload = gk.TopK(0.01).compress(x)
    expected = (x.abs() >= cut).nonzero().view(-1)
    # The sampled threshold aims at 1.2·k; its count spreads ~7% (3.5 standard deviations either way).
    assert 0.75 * 1.2 * k < expected.numel() < 1.25 * 1.2 * k
    assert torch.equal(positions[valid].long().sort().values, expected)
    assert torch.equal(values[valid], x[positions[valid].long()])
    exact = torch.topk(x.abs(), k).values.square().sum()
    sent = payload.tensors[1].square().sum()
    assert sent >= 0.9 * exact


def test_topk_captured_in_a_cuda_graph_draws_a_new_sample_at_every_replay():
    if not triton_select.usable(torch.zeros(1, device=CUDA)):
        pytest.skip("Triton is not installed")
    x = gradient_like(2_000_000, seed=11)
    compressor = gk.TopK(0.01)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles the kernels) off the capture, as capture requires
        compressor.compress(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        payload = compressor.compress(x)  # the sample's start drawn on the device: a host number would freeze
    counts = set()
    for _ in range(6):
        graph.replay()
        torch.cuda.synchronize()
        indices, values = payload.tensors
        valid = payload.meta["valid"]
        assert torch.equal(values[valid], x[indices[valid].long()])
        assert 0.75 * 1.2 * 20_000 < int(valid.sum()) <= indices.numel()
        counts.add(int(valid.sum()))
    assert len(counts) > 1  # each replay sampled from another start


def test_randomk_on_the_gpu_is_unbiased_and_its_draw_is_shared():
    x = gradient_like(100_000, seed=9, dtype=torch.float64)
    a, b = gk.RandomK(0.05, seed=4), gk.RandomK(0.05, seed=4)  # two ranks with the same seed
    total = torch.zeros_like(x)
    draws = 400
    with no_cuda_syncs():
        for _ in range(draws):
            pa, pb = a.compress(x), b.compress(x)
            total += a.decompress(pa)
    assert torch.equal(pa.tensors[0], pb.tensors[0])
    # Per entry: Var = x²·(n/k)·(1 - 1/n) per draw; the mean over all entries of the z-scores squared is ~1.
    n, k = x.numel(), 5000
    variance = x.square() * (n / k) * (1 - 1 / n) / draws
    z2 = ((total / draws - x).square() / variance).mean()
    assert 0.8 < float(z2) < 1.2


@pytest.mark.parametrize("make", [lambda: gk.TopK(0.01, exactly_k=True), lambda: gk.Threshold(2.0, max_density=0.01)])
def test_error_feedback_loop_loses_nothing_without_a_sync(make):
    compressor = gk.ErrorFeedback(make())
    inputs = [gradient_like(500_000, seed, torch.float64) for seed in range(6)]
    sent_sum = torch.zeros_like(inputs[0])
    torch.cuda.synchronize()
    with no_cuda_syncs():
        for x in inputs:
            sent_sum += compressor.decompress(compressor.compress(x, key="w"))
    residual = compressor.residual("w").view(-1)
    torch.testing.assert_close(sent_sum + residual, torch.stack(inputs).sum(0), rtol=0, atol=1e-9)


def cuda_params(shapes, seed):
    g = torch.Generator(device=CUDA).manual_seed(seed)
    params = [torch.nn.Parameter(torch.empty(shape, device=CUDA)) for shape in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, device=CUDA)
    return params


SHAPES = [(768, 768), (768,), (3072, 768), (1,), (50257, 64)]


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
@pytest.mark.parametrize("max_norm", [1.0, 1e6])
def test_clip_grad_norm_matches_torch_without_a_sync(norm_type, max_norm):
    ours, theirs = cuda_params(SHAPES, seed=1), cuda_params(SHAPES, seed=1)
    torch.cuda.synchronize()
    with no_cuda_syncs():
        total = gk.clip_grad_norm_(ours, max_norm, norm_type)
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type, foreach=True)
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=0)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


def test_grad_norms_match_torch_without_a_sync():
    params = cuda_params(SHAPES, seed=2)
    torch.cuda.synchronize()
    with no_cuda_syncs():
        norms = gk.grad_norms(params)
    assert norms.device.type == "cuda"
    expected = torch.stack([torch.linalg.vector_norm(p.grad) for p in params])
    torch.testing.assert_close(norms, expected, rtol=1e-5, atol=0)


# -- the pipeline's step: no sync with a fused optimizer ------------------------------------------

PIPELINE_CONFIGS = {
    "plain": dict(),
    "accumulation": dict(accumulation_steps=4),
    "clip": dict(accumulation_steps=4, clip=gk.ClipByGlobalNorm(1.0)),
    "scaler-bf16": dict(accumulation_steps=4, clip=gk.ClipByGlobalNorm(1.0), scaler=True),
    "average-one-process": dict(accumulation_steps=2, average=True),
    "tracker-every-10": dict(accumulation_steps=2, tracker=True),
}


def pipeline_step(model, pipe, opt, autocast: bool, nan: bool = False) -> None:
    for _ in range(pipe.accumulation_steps):
        x = torch.randn(8, 32, device=CUDA)
        if nan:
            x = x * float("nan")  # a multiply, not an indexed write: the NaN is made on the device
        y = torch.randint(0, 4, (8,), device=CUDA)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = torch.nn.functional.cross_entropy(model(x), y, reduction="sum")
        pipe.backward(loss, num_items=torch.full((), 8, device=CUDA))
        pipe.step(opt)


def cuda_pipeline(config: str):
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 4)).to(CUDA)
    kwargs = dict(PIPELINE_CONFIGS[config])
    if kwargs.pop("scaler", False):
        kwargs["scaler"] = torch.amp.GradScaler("cuda")
    if kwargs.pop("average", False):
        kwargs["average"] = gk.Average()
    if kwargs.pop("tracker", False):
        kwargs["tracker"] = gk.Tracker(every=10)
    pipe = gk.GradientPipeline(model, **kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    return model, pipe, opt


@pytest.mark.parametrize("config", sorted(PIPELINE_CONFIGS))
def test_pipeline_steps_with_a_fused_optimizer_never_sync(config):
    model, pipe, opt = cuda_pipeline(config)
    autocast = config == "scaler-bf16"
    pipeline_step(model, pipe, opt, autocast)  # the optimizer's first step creates its state (one read)
    with no_cuda_syncs():
        for _ in range(12):
            pipeline_step(model, pipe, opt, autocast)
    torch.cuda.synchronize()
    assert pipe.steps == 13 and all(torch.isfinite(p).all() for p in model.parameters())


def test_a_nan_step_skips_on_the_gpu_without_a_sync():
    model, pipe, opt = cuda_pipeline("clip")
    pipeline_step(model, pipe, opt, autocast=False)
    before = [p.detach().clone() for p in model.parameters()]
    with no_cuda_syncs():
        pipeline_step(model, pipe, opt, autocast=False, nan=True)
    assert bool(pipe.last.skipped) and pipe.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# --- Tracker: logging steps never wait for the device --------------------------------------------------------


def _tracked_model():
    torch.manual_seed(0)
    layers = [torch.nn.Linear(32, 32) for _ in range(6)] + [torch.nn.Linear(32, 4)]
    return torch.nn.Sequential(*layers).to(CUDA)


def _tracked_step(tracker, opt, names, params, step: int) -> torch.Tensor:
    """A step tracked by hand (observe, the optimizer, after_step) with no clip; its total norm, on the device."""
    from gradkit.context import GradContext
    from gradkit.tracking.record import standalone_report

    ctx = GradContext(names, params)
    report = standalone_report(ctx, step, 64)  # the norms before and after are the same
    tracker.observe(ctx, report)
    opt.step()
    tracker.after_step(ctx, report)
    return report.total_norm


def test_tracker_protocol_makes_no_sync_and_writes_every_record(tmp_path):
    from gradkit.tracking.writers import read_jsonl

    model = _tracked_model()
    names, params = zip(*model.named_parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
    tracker = gk.Tracker(tmp_path, every=1, detail_every=3)
    tracker.attach(model, names, params)
    x, y = torch.randn(64, 32, device=CUDA), torch.randn(64, 4, device=CUDA)
    expected = []
    for step in range(1, 13):
        ((model(x) - y) ** 2).mean().backward()
        with no_cuda_syncs():
            total = _tracked_step(tracker, opt, names, params, step)
        expected.append(total.clone())
        opt.zero_grad(set_to_none=True)
    tracker.close()
    records = [r for r in read_jsonl(tmp_path / "tracking.jsonl") if r["type"] == "step"]
    assert [r["step"] for r in records] == list(range(1, 13))
    for record, total in zip(records, expected):
        assert record["global"]["norm_pre_clip"] == pytest.approx(total.item(), rel=1e-5)
    detail = records[2]
    assert detail["detail"] and detail["params"]["0.weight"]["max_abs"] > 0
    assert detail["params"]["0.weight"]["nan"] == 0 and detail["modules"]["0"]["update_to_weight"] > 0


def test_tracked_pipeline_steps_make_no_sync_inside_the_tracker(tmp_path):
    from gradkit.tracking.writers import read_jsonl

    model = _tracked_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    tracker = gk.Tracker(tmp_path, every=1, detail_every=4)
    for name in ("observe", "after_step"):  # the pipeline's own reads are its business; the tracker's are none
        method = getattr(tracker, name)

        def trapped(*args, _method=method, **kwargs):
            with no_cuda_syncs():
                return _method(*args, **kwargs)

        setattr(tracker, name, trapped)
    pipe = gk.GradientPipeline(model, clip=gk.ClipByGlobalNorm(0.1), tracker=tracker)
    x, y = torch.randn(64, 32, device=CUDA), torch.randn(64, 4, device=CUDA)
    norms = []
    for _ in range(10):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = ((model(x).float() - y) ** 2).mean()
        pipe.backward(loss)
        pipe.step(opt)
        norms.append(pipe.last.total_norm.clone())
    tracker.close()
    records = [r for r in read_jsonl(tmp_path / "tracking.jsonl") if r["type"] == "step"]
    assert [r["step"] for r in records] == list(range(1, 11))
    for record, norm in zip(records, norms):
        assert record["global"]["norm_pre_clip"] == pytest.approx(norm.item(), rel=1e-5)
        assert record["global"]["clip_coef"] <= 1.0


def test_counts_on_the_host_go_on_with_flags_on_the_gpu():
    # A tracker resumed on a GPU holds its loaded counts on the host; a skip may be decided on the host. Neither
    # may start the count over (they did), nor wait for the device.
    from gradkit.tracking.counters import _add

    with no_cuda_syncs():
        total = _add(torch.tensor(5), torch.ones((), dtype=torch.bool, device=CUDA))  # a count from a checkpoint
        total = _add(total, torch.tensor(True))  # a skip decided on the host
    assert total.device.type == "cuda" and total.dtype == torch.int64 and int(total) == 7


# --- Host reads in flight: the event follows the copy, each read keeps its own pinned memory ------------------


def test_host_reads_behind_a_busy_stream_are_not_done_until_their_copies_land_and_keep_their_values():
    from gradkit.tracking.host_read import HostRead

    values = [torch.arange(1000, device=CUDA, dtype=torch.float32) * (i + 1) for i in range(3)]
    torch.cuda.synchronize()
    flights = []
    with no_cuda_syncs():
        torch.cuda._sleep(50_000_000)  # tens of ms of device time queued ahead of the copies
        for value in values:
            read = HostRead(CUDA, torch.float64)
            read.add("value", value)
            read.add("total", value.sum())
            read.add("host", torch.tensor(2.5))  # already on the host: read where it is
            flights.append(read.start())
            value.mul_(-1)  # changed after the read started: the read has what was there
        polled = [flight.done() for flight in flights]
    assert not any(polled)  # a poll never waits, and the event is recorded after the copy
    for i, flight in enumerate(flights):
        flight.wait()
        assert flight.done() and flight.host.is_pinned()
        got = flight.values()
        assert got["value"] == (torch.arange(1000, dtype=torch.float64) * (i + 1)).tolist()
        assert got["total"] == 499500.0 * (i + 1) and got["host"] == 2.5


# --- The noise scale's small batch, foreign loops and compressed averaging: no Python number copied to the GPU ----


def _window(model, pipe, opt, mode: str) -> None:
    """One window of two micro-batches: a mean loss, or a summed one with an int or a device item count."""
    for _ in range(pipe.accumulation_steps):
        x, y = torch.randn(16, 32, device=CUDA), torch.randn(16, 4, device=CUDA)
        error = (model(x) - y).square()
        if mode == "mean":
            pipe.backward(error.mean())
        else:
            pipe.backward(error.sum(), num_items=16 if mode == "int" else torch.full((), 16, device=CUDA))
        pipe.step(opt)


@pytest.mark.parametrize("mode", ["mean", "int", "device"])
def test_windows_measuring_the_noise_scale_make_no_sync(mode, tmp_path):
    # Each logged window measures the gradient noise scale (the first micro-batch against the window): its batch
    # sizes are made on the device, whatever num_items is (a Python number copied to a GPU waits for the stream).
    from gradkit.tracking.writers import read_jsonl

    model = _tracked_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    pipe = gk.GradientPipeline(model, accumulation_steps=2, tracker=gk.Tracker(tmp_path, every=1, detail_every=3))
    _window(model, pipe, opt, mode)  # the optimizer's first step creates its state (one read)
    with no_cuda_syncs():
        for _ in range(4):
            _window(model, pipe, opt, mode)
    pipe.tracker.close()
    records = [r for r in read_jsonl(tmp_path / "tracking.jsonl") if r["type"] == "step"]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    small, big = (1.0, 2.0) if mode == "mean" else (16.0, 32.0)  # micro-batches, or items
    for record in records:
        noise = record["noise"]
        assert noise["small_batch"] == small and noise["big_batch"] == big and noise["small_sq"] > 0


def test_a_foreign_loops_boundary_makes_no_sync(tmp_path):
    # The trainers' integrations (Hugging Face, Lightning, Accelerate) report `items` as a Python int.
    from gradkit.integrations._boundary import Boundary
    from gradkit.tracking.writers import read_jsonl

    model = _tracked_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    boundary = Boundary(gk.Tracker(tmp_path, every=1, detail_every=3), gk.ClipByGlobalNorm(0.1))
    boundary.attach(model)
    x, y = torch.randn(64, 32, device=CUDA), torch.randn(64, 4, device=CUDA)
    norms = []
    for step in range(1, 7):
        ((model(x) - y) ** 2).mean().backward()
        with no_cuda_syncs():
            report = boundary.before_step(step=step, micro_steps=2, items=4)
            opt.step()
            boundary.after_step()
        norms.append(report.total_norm.clone())
        opt.zero_grad(set_to_none=True)
    boundary.close()
    records = [r for r in read_jsonl(tmp_path / "tracking.jsonl") if r["type"] == "step"]
    assert [r["step"] for r in records] == list(range(1, 7))
    for record, norm in zip(records, norms):
        assert record["global"]["items"] == 4 and record["global"]["norm_pre_clip"] == pytest.approx(norm.item())


def test_compressed_averaging_on_one_process_with_a_mean_loss_makes_only_the_skip_read(monkeypatch):
    # One process, a mean loss: the window's scale is a Python float, made a device factor per gradient.
    # A lossy sync's step decides on the host (its error feedback must know whether the step was skipped):
    # that one read of the flags is let through; nothing else may wait for the device.
    from gradkit import _skip

    reads = []

    def read_outside_the_trap(*args):
        reads.append(1)
        torch.cuda.set_sync_debug_mode(0)
        try:
            return read_flags(*args)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    read_flags = _skip.read_flags
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 512), torch.nn.GELU(), torch.nn.Linear(512, 4)).to(CUDA)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    pipe = gk.GradientPipeline(model, accumulation_steps=2, average=gk.Average(gk.TopK(0.05)))
    _window(model, pipe, opt, "mean")
    monkeypatch.setattr(_skip, "read_flags", read_outside_the_trap)
    with no_cuda_syncs():
        for _ in range(4):
            _window(model, pipe, opt, "mean")
    torch.cuda.synchronize()
    assert len(reads) == 4  # the one read per step, and only it
    assert pipe.steps == 5 and not bool(pipe.last.skipped)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


# --- A tracker behind a busy GPU: records come later, in order, with the values measured at their steps ----------


def test_tracker_records_behind_a_busy_gpu_come_later_in_order_with_their_steps_values(tmp_path):
    from gradkit.tracking.writers import read_jsonl

    torch.manual_seed(0)
    # 131,072 weights (measured by foreach), 4,096 and the biases (flattened, segment sums): both paths.
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Tanh(), torch.nn.Linear(512, 8)).to(CUDA)
    names, params = zip(*model.named_parameters())
    opt = torch.optim.AdamW(params, lr=1e-2, fused=True)
    tracker = gk.Tracker(tmp_path, every=1, detail_every=2)
    tracker.attach(model, names, params)
    x, y = torch.randn(64, 256, device=CUDA), torch.randn(64, 8, device=CUDA)
    expected = []
    for step in range(1, 9):
        ((model(x) - y) ** 2).mean().backward()
        before = [p.detach().clone() for p in params]
        with no_cuda_syncs():
            torch.cuda._sleep(20_000_000)  # the device falls behind: the copies land after the host moved on
            total = _tracked_step(tracker, opt, names, params, step)
        # Kept on the device, read after the loop: a read here would let the device catch up every step.
        max_abs = torch.stack([p.grad.abs().max() for p in params])
        ratios = torch.stack([(p.detach() - b).norm() / b.norm() for p, b in zip(params, before)])
        expected.append((total.clone(), max_abs, ratios))
        opt.zero_grad(set_to_none=True)
    assert len(tracker.history) <= 5  # several steps' copies were still in flight: written later, not waited for
    tracker.close()
    expected = [(t.item(), m.tolist(), r.tolist()) for t, m, r in expected]
    records = [r for r in read_jsonl(tmp_path / "tracking.jsonl") if r["type"] == "step"]
    assert [r["step"] for r in records] == list(range(1, 9))
    for record, (total, max_abs, ratios) in zip(records, expected):
        assert record["global"]["norm_pre_clip"] == pytest.approx(total, rel=1e-6)
        if not record["detail"]:
            continue
        for name, top, ratio in zip(names, max_abs, ratios):
            entry = record["params"][name]
            assert entry["max_abs"] == pytest.approx(top, rel=1e-7) and entry["nan"] == 0 and entry["inf"] == 0
            assert entry["update_to_weight"] == pytest.approx(ratio, rel=1e-4)
