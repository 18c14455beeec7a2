"""What the CUDA rows share: whether a GPU is here, how to time on it, and the row when it is not.

Every module with CUDA rows exposes ``run_cuda(settings) -> list[Row]``; ``run.py
--only gpu`` runs all of them (and nothing else).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gradkit.bench.common import Row, Settings
from gradkit.bench.timing import Timing, measure

__all__ = ["NO_GPU", "available", "device_name", "device_time", "measure_cuda", "skipped"]

NO_GPU = "skipped: torch.cuda.is_available() is False"


def available() -> bool:
    return torch.cuda.is_available()


def device_name() -> str:
    return torch.cuda.get_device_name()


def skipped(labels: list[str], reference: str, goal: float) -> list[Row]:
    """Rows that say why they were not measured (printed under the table, not in it)."""
    return [Row(label, "cuda", reference, goal, note=NO_GPU) for label in labels]


def measure_cuda(
    candidates: dict[str, Callable[[], object]], settings: Settings, number: int = 10
) -> dict[str, Timing]:
    """Interleaved timing with a device synchronization around each sample of `number` calls.

    Calls are queued back to back inside a sample, as a training step queues them, so the
    time per call is what the device (or the host, if it is slower at launching) needs.
    """
    return measure(
        candidates, warmup=max(2, settings.warmup), repeats=settings.repeats, number=number, sync=torch.cuda.synchronize
    )


def device_time(fn: Callable[[], object], *, number: int = 20, repeats: int = 5) -> float | None:
    """Seconds of device time per call of `fn`, without the host's launch cost: the call is captured
    once into a CUDA graph, whose replays are timed with events (median of `repeats` samples).
    None if `fn` cannot be captured (e.g. it waits for the host)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(side):  # warm-up off the capture, as capture requires
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError:
        return None
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(number):
            graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / number)
    return sorted(samples)[len(samples) // 2]
