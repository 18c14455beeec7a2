"""What every benchmark module shares: the run settings and the row it returns.

A benchmark module exposes ``run(settings) -> list[Row]``; `gradkit.bench.run` collects
the rows of all modules into one table.
"""

from __future__ import annotations

from dataclasses import dataclass

from gradkit.bench.timing import Timing

__all__ = ["Settings", "Row"]


@dataclass(frozen=True)
class Settings:
    """How long to measure and at what size."""

    warmup: int
    repeats: int
    tiny: bool = False  # shapes small enough for a test to run in seconds; numbers mean nothing
    quality_steps: int | None = None  # training steps of the quality runs (None: the benchmark's default)


@dataclass(frozen=True)
class Row:
    """gradkit against one reference on one device, and optionally against a plain copy.

    `passes` is how many times the operation streams over its bytes; a copy
    makes 2 (read + write), so the share of copy bandwidth reached is
    ``passes / 2 * copy_time / time``.
    """

    benchmark: str
    device: str
    reference: str
    goal: float  # the smallest acceptable reference_time / gradkit_time
    gradkit_time: Timing | None = None
    reference_time: Timing | None = None
    copy_time: Timing | None = None
    passes: float | None = None
    note: str = ""  # printed under the table; the reason when the row was skipped

    @property
    def skipped(self) -> bool:
        return self.gradkit_time is None or self.reference_time is None

    @property
    def ratio(self) -> float:
        """reference / gradkit time: above 1 means gradkit is faster."""
        return self.reference_time.median / self.gradkit_time.median

    def copy_bandwidth_share(self, timing: Timing) -> float | None:
        if self.copy_time is None or self.passes is None:
            return None
        return self.passes / 2 * self.copy_time.median / timing.median
