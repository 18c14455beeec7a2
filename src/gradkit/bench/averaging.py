"""Gradient averaging: a gradkit training step (GradientPipeline + gk.Average()) against DDP.

Two processes on this machine, gloo over loopback, one thread each. Both
candidates live in the same two processes (same model weights, same data) and
run alternately, step by step, so a slow stretch of the shared machine hits
both. A step is forward + backward (with the bucketed all-reduce overlapped) +
optimizer step, timed on rank 0 after a barrier. The model is an MLP of a few
wide Linear layers (~25M parameters, ~100 MB of gradients), so communication
and the gradient passes matter, not just the matrix products.

The per-tensor rows run the same pair on chains of tiny ``Linear(8, 8)`` layers
holding N = 10, 100, 1000 and 3000 parameter tensors (all in one pair of worker
processes), where the host work per tensor is what counts.
"""

from __future__ import annotations

from gradkit.bench.common import Row, Settings
from gradkit.bench.processes import free_port, run_workers
from gradkit.bench.timing import summarize

__all__ = ["run", "FULL_SIZES", "step_rows"]

FULL_SIZES = (1024, 4096, 4096, 1024)  # 25.2M parameters
TINY_SIZES = (32, 64, 64, 8)
BATCH = 32
REFERENCE = "DDP"
GOAL = 1 / 1.05  # gradkit at most 5% slower than DDP
TENSOR_COUNTS = (10, 100, 1000, 3000)
TINY_TENSOR_COUNTS = (10, 100)
TENSOR_GOAL = 1 / 1.2  # at most 20% slower than DDP's C++ reducer on tiny tensors
TENSOR_BATCH = 8
MAX_REPEATS = 25
TIMEOUT = 300.0


def run(settings: Settings) -> list[Row]:
    sizes = TINY_SIZES if settings.tiny else FULL_SIZES
    init = f"tcp://127.0.0.1:{free_port()}"
    args = _worker_args(sizes, "ddp", init, settings)
    results = run_workers([(args + ["--rank", str(rank)], {"GLOO_SOCKET_IFNAME": "lo"}) for rank in (0, 1)], TIMEOUT)
    where = "2 processes, gloo on loopback"
    rows = step_rows(results[0], where, "cpu", REFERENCE, GOAL, "gradkit / DDP", "<= 1.05")
    return rows + tensor_rows(settings)


def tensor_rows(settings: Settings) -> list[Row]:
    """`Average()` against DDP on chains of tiny layers, one row per tensor count."""
    counts = TINY_TENSOR_COUNTS if settings.tiny else TENSOR_COUNTS
    init = f"tcp://127.0.0.1:{free_port()}"
    # Steps of a few milliseconds: more of them than for the large model, for stable medians.
    repeats = min(settings.repeats * 4, 200)
    args = [
        "average", "--world", "2", "--init", init, "--pair", "ddp", "--tensors", ",".join(map(str, counts)),
        "--batch", str(TENSOR_BATCH), "--warmup", str(max(min(settings.warmup, 5), 2)), "--repeats", str(repeats),
    ]  # fmt: skip
    results = run_workers([(args + ["--rank", str(rank)], {"GLOO_SOCKET_IFNAME": "lo"}) for rank in (0, 1)], TIMEOUT)
    rows = []
    for result in results[0]:
        where = f"{result['tensors']} tensors (Linear(8, 8) chain), 2 processes, gloo on loopback"
        rows += step_rows(result, where, "cpu", REFERENCE, TENSOR_GOAL, "gradkit / DDP", "<= 1.2", batch=TENSOR_BATCH)
    return rows


def _worker_args(sizes: tuple[int, ...], pair: str, init: str, settings: Settings) -> list[str]:
    return [
        "average", "--world", "2", "--init", init, "--pair", pair,
        "--sizes", ",".join(map(str, sizes)), "--batch", str(BATCH),
        "--warmup", str(min(settings.warmup, 3)), "--repeats", str(min(settings.repeats, MAX_REPEATS)),
    ]  # fmt: skip


def step_rows(
    result: dict, where: str, device: str, reference: str, goal: float, label: str, goal_text: str, batch: int = BATCH
) -> list[Row]:
    """One row from an `average` worker's result: gradkit's step against the reference step."""
    mine, theirs = summarize(result["samples"]["gradkit"]), summarize(result["samples"]["reference"])
    params = result["params"]
    ratio = mine.median / theirs.median
    met = theirs.median / mine.median >= goal
    sent = result["bytes_sent"]
    note = (
        f"{where}: {label} step time {ratio:.3f} (goal {goal_text}: {'met' if met else 'MISSED'}); "
        f"bytes sent per step: gradkit {sent['gradkit'] / 1e6:.2f} MB, {reference} {sent['reference'] / 1e6:.2f} MB; "
        f"{len(result['samples']['gradkit'])} interleaved steps each"
    )
    name = "Average(TopK(0.01))" if reference.startswith("dense") else "Average() step"
    return [
        Row(
            f"{name}, {'MLP ' if 'tensors' not in where else ''}{_count(params)} params, batch {batch}, {where}",
            device,
            reference,
            goal,
            gradkit_time=mine,
            reference_time=theirs,
            note=note,
        )
    ]


def _count(params: int) -> str:
    return f"{params / 1e6:.1f}M" if params >= 1e6 else f"{params / 1e3:.1f}k"
