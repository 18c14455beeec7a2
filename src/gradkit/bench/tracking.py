"""Tracking overhead: a training step through GradientPipeline with gk.Tracker against the same step without.

Rows (CPU, timed interleaved with and without a tracker writing JSONL):

- a ~6M-parameter MLP (1024 -> 2048 -> 2048 -> 16, batch 64, SGD with momentum,
  global-norm clipping) at ``every=1`` and ``every=10`` (a sample is then ten steps,
  one of them logged);
- the cost against the number of parameter tensors: N = 10, 100, 1000, 3000 tensors
  (N/2 ``Linear(8, 8)`` layers), ``Tracker(every=1)`` (ordinary logged steps, detail
  every 10th), and at N = 1000 with ``detail_every=1`` (every step a detail step);
  the note gives the tracker's cost per tensor;
- every step a detail step on N = 1000 mid-size tensors (500 ``Linear(64, 64)``: 4096-element
  weights), where the detail passes' cost per element shows, not only their cost per tensor.

`run_cuda`: the [cuda] twin on a GPT-2-small-sized transformer (12 layers, width 768,
50257-token vocabulary, bf16 autocast, fused AdamW), ``Tracker(every=1)`` against the
untracked step, at 8x512 tokens (the host is the bound) and 16x1024 (the GPU is), and at
8x512 with ordinary logged steps only (no detail step after the first), which splits the
first row's cost into its ordinary and detail parts.
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Callable

import torch
from torch import nn

import gradkit
from gradkit.bench import gpu
from gradkit.bench.common import Row, Settings
from gradkit.bench.timing import measure

__all__ = ["run", "run_cuda"]

FULL_SIZES = (1024, 2048, 2048, 16)
TINY_SIZES = (32, 64, 64, 4)
BATCH = 64
REFERENCE = "no tracker"
GOAL = 0.95  # at most ~5% slower
GOAL_MANY = 1 / 1.10  # at most 10% slower with many tiny tensors
GOAL_CUDA = 1 / 1.03  # at most 3% slower on a GPU
MAX_REPEATS = 21  # a step takes ~0.1 s on a laptop CPU; more repeats add minutes, not information
TENSOR_COUNTS = (10, 100, 1000, 3000)
TINY_TENSOR_COUNTS = (10, 100)
DETAIL_TENSORS = 1000
MID_WIDTH = 64  # Linear(64, 64): 4096-element weights, above a CPU's flattening limit (`tracking.stats.SMALL_CPU`)
NO_DETAIL = 10**9  # a detail_every no run reaches: only step 1 is a detail step
GPT = {"vocab": 50257, "context": 1024, "width": 768, "layers": 12, "heads": 12, "batch": 8, "seq": 512}
TINY_GPT = {"vocab": 256, "context": 32, "width": 32, "layers": 2, "heads": 2, "batch": 2, "seq": 16}


def _mlp(sizes: tuple[int, ...]) -> nn.Module:
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def run(settings: Settings) -> list[Row]:
    rows = _mlp_rows(settings)
    counts = TINY_TENSOR_COUNTS if settings.tiny else TENSOR_COUNTS
    for tensors in counts:
        rows.append(_many_row(settings, tensors, detail=False))
    rows.append(_many_row(settings, min(DETAIL_TENSORS, counts[-1]), detail=True))
    rows.append(_many_row(settings, min(DETAIL_TENSORS, counts[-1]), detail=True, width=MID_WIDTH))
    return rows


def _mlp_rows(settings: Settings) -> list[Row]:
    sizes = TINY_SIZES if settings.tiny else FULL_SIZES
    torch.manual_seed(0)
    base = _mlp(sizes)
    numel = sum(p.numel() for p in base.parameters())
    x, y = torch.randn(BATCH, sizes[0]), torch.randn(BATCH, sizes[-1])
    rows = []
    with tempfile.TemporaryDirectory() as log_dir:
        for every in (1, 10):
            trackers = {"gradkit": gradkit.Tracker(f"{log_dir}/every{every}", every=every), "reference": None}
            timings = _time_pair(settings, base, trackers, x, y, number=every)  # a sample spans one logging period
            rows.append(
                _row(
                    f"training step + Tracker(every={every}), MLP {numel / 1e6:.1f}M params, batch {BATCH}",
                    "cpu",
                    GOAL,
                    timings,
                    lead=f"every={every}",
                )
            )
    return rows


def _many_row(settings: Settings, tensors: int, *, detail: bool, width: int = 8) -> Row:
    """Tracker(every=1) on N/2 Linear(width, width) layers (N tensors): the per-tensor cost of the tracker."""
    torch.manual_seed(0)
    base = nn.Sequential(*[nn.Linear(width, width) for _ in range(tensors // 2)])
    x, y = torch.randn(16, width), torch.randn(16, width)
    with tempfile.TemporaryDirectory() as log_dir:
        tracker = gradkit.Tracker(log_dir, every=1, detail_every=1 if detail else None)
        timings = _time_pair(settings, base, {"gradkit": tracker, "reference": None}, x, y, number=10)
    with_tracker, without = timings["gradkit"].median, timings["reference"].median
    what = "every step a detail step (detail_every=1)" if detail else "detail every 10th"
    kind = "tiny tensors" if width == 8 else f"tensors of Linear({width}, {width}) layers"
    return _row(
        f"training step + Tracker(every=1), {tensors} {kind}, {what}",
        "cpu",
        GOAL_MANY,
        timings,
        lead=f"{tensors} {kind}, {what}",
        tail=f"; tracker {(with_tracker - without) / tensors * 1e6:.1f} us per tensor",
        digits=2,
    )


def _row(label: str, device: str, goal: float, timings: dict, *, lead: str, tail: str = "", digits: int = 1) -> Row:
    """A tracked-against-untracked row, its note: `lead`, both step times and the difference, `tail`."""
    tracked, untracked = timings["gradkit"].median, timings["reference"].median
    note = (
        f"{lead}: with tracker {tracked * 1e3:.{digits}f} ms/step, without {untracked * 1e3:.{digits}f} ms/step "
        f"({tracked / untracked - 1:+.1%}){tail}"
    )
    return Row(label, device, REFERENCE, goal, gradkit_time=timings["gradkit"], reference_time=timings["reference"],
               note=note)  # fmt: skip


def _time_pair(settings: Settings, base: nn.Module, trackers: dict, x, y, *, number: int) -> dict:
    steps = {}
    for name, tracker in trackers.items():
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        pipe = gradkit.GradientPipeline(model, clip=gradkit.ClipByGlobalNorm(1.0), tracker=tracker)
        steps[name] = _step(pipe, model, opt, x, y)
    try:
        return measure(steps, warmup=min(settings.warmup, 2), repeats=min(settings.repeats, MAX_REPEATS), number=number)
    finally:
        for tracker in trackers.values():
            if tracker is not None:
                tracker.close()


def _step(pipe, model, opt, x, y) -> Callable[[], None]:
    def step() -> None:
        pipe.backward(((model(x) - y) ** 2).mean())
        pipe.step(opt)

    return step


class _GPT(nn.Module):
    """A GPT-2-sized decoder (pre-norm blocks, tied embedding) for the [cuda] row."""

    def __init__(self, vocab: int, context: int, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, width), nn.Embedding(context, width)
        block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)  # fmt: skip
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.ln_f = nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        seq = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(seq, device=tokens.device)
        h = self.wte(tokens) + self.wpe(torch.arange(seq, device=tokens.device))
        h = self.ln_f(self.blocks(h, mask=mask, is_causal=True))
        return h @ self.wte.weight.T


def run_cuda(settings: Settings) -> list[Row]:
    """The [cuda] rows: GPT-2-small-sized steps with and without `Tracker(every=1)`, at the batch the issue
    names (8 x 512 tokens, where the host launches kernels about as fast as the GPU runs them) and at a
    GPU-bound one (16 x 1024), where the tracker's host work overlaps the GPU's and only its kernels count."""
    shape = TINY_GPT if settings.tiny else GPT
    big = dict(shape, batch=2 * shape["batch"], seq=2 * shape["seq"])  # 4x the tokens
    label = "[cuda] training step + Tracker(every=1), GPT-2-small-sized, bf16 autocast, fused AdamW"
    labels = [label, label + f", batch {big['batch']}x{big['seq']} (GPU-bound)", label + ", ordinary logged steps only"]
    if not gpu.available():
        return gpu.skipped(labels, REFERENCE, GOAL_CUDA)
    fewer = Settings(warmup=settings.warmup, repeats=min(settings.repeats, MAX_REPEATS), tiny=settings.tiny)
    # The third row splits the first one's cost: the same step with no detail step, so what is left is the cost of
    # an ordinary logged step (the cached norms, the record, the alerts, the JSONL line), and the first row's excess
    # over it is the detail steps' share.
    return [
        _cuda_row(labels[0], shape, settings),
        _cuda_row(labels[1], big, fewer),
        _cuda_row(labels[2], shape, fewer, detail_every=NO_DETAIL),
    ]


def _cuda_row(label: str, shape: dict, settings: Settings, *, detail_every: int | None = None) -> Row:
    batch, seq = shape["batch"], shape["seq"]
    torch.manual_seed(0)
    base = _GPT(**{k: shape[k] for k in ("vocab", "context", "width", "layers", "heads")}).cuda()
    tokens = torch.randint(0, shape["vocab"], (batch, seq + 1), device="cuda")
    steps = {}
    with tempfile.TemporaryDirectory() as log_dir:
        trackers = {"gradkit": gradkit.Tracker(log_dir, every=1, detail_every=detail_every), "reference": None}
        for name, tracker in trackers.items():
            model = copy.deepcopy(base)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
            pipe = gradkit.GradientPipeline(model, clip=gradkit.ClipByGlobalNorm(1.0), tracker=tracker)
            steps[name] = _gpt_step(pipe, model, opt, tokens)
        timings = gpu.measure_cuda(steps, settings, number=5)
        host = {name: _host_time(step) for name, step in steps.items()}
        trackers["gradkit"].close()
    params = sum(p.numel() for p in base.parameters())
    del steps, base
    torch.cuda.empty_cache()  # the next row's model starts from a free device
    return _row(
        label,
        "cuda",
        GOAL_CUDA,
        timings,
        lead=f"{gpu.device_name()}, {params / 1e6:.0f}M params, batch {batch}x{seq}",
        tail=f"; host time per step (kernels queued, no wait) {host['gradkit'] * 1e3:.1f} and "
        f"{host['reference'] * 1e3:.1f} ms",
    )


def _host_time(step: Callable[[], None], number: int = 5) -> float:
    """Seconds per step that the host takes to queue it (the device finishes afterwards)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(number):
        step()
    elapsed = (time.perf_counter() - start) / number
    torch.cuda.synchronize()
    return elapsed


def _gpt_step(pipe, model, opt, tokens) -> Callable[[], None]:
    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(tokens[:, :-1])
            loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        pipe.backward(loss)
        pipe.step(opt)

    return step
