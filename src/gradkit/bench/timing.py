"""Interleaved timing of candidates that do the same work.

Every round runs each candidate once, so a slow stretch on a shared machine
(another process, frequency scaling) lands on all candidates alike instead of
on whichever happened to run then. Medians ignore the odd preempted sample.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Timing", "measure", "summarize"]


@dataclass(frozen=True)
class Timing:
    """Seconds per call: the median and the quartiles around it."""

    median: float
    q1: float
    q3: float

    @property
    def spread(self) -> float:
        """Half the interquartile range, relative to the median."""
        return (self.q3 - self.q1) / 2 / self.median


def measure(
    candidates: dict[str, Callable[[], object]],
    *,
    repeats: int,
    warmup: int = 2,
    number: int = 1,
    sync: Callable[[], None] | None = None,
) -> dict[str, Timing]:
    """Time each candidate `repeats` times, interleaved, after `warmup` untimed rounds.

    Args:
        candidates: name -> a call with no arguments.
        repeats: timed rounds; each gives one sample per candidate.
        warmup: untimed rounds first (allocator, page faults, lazy init).
        number: calls per sample, back to back; raise it when one call is
            short next to the timer and `sync` overhead (GPU kernels).
        sync: called before and after each sample, e.g. ``torch.cuda.synchronize``,
            so that asynchronous work is inside the sample it belongs to.
    """
    names = list(candidates)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        # Rotate the starting candidate so that none always runs right after the same one.
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            call = candidates[name]
            if sync is not None:
                sync()
            start = time.perf_counter()
            for _ in range(number):
                call()
            if sync is not None:
                sync()
            if round_index >= warmup:
                samples[name].append((time.perf_counter() - start) / number)
    return {name: summarize(times) for name, times in samples.items()}


def summarize(times: list[float]) -> Timing:
    """The median and quartiles of samples timed elsewhere (e.g. in worker processes)."""
    if len(times) < 2:
        return Timing(times[0], times[0], times[0])
    q1, median, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return Timing(median, q1, q3)
