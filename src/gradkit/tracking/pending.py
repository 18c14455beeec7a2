"""Logged steps on their way to a record: the open step, then the host copies in flight, in step order.

A logging step copies its statistics to the host without waiting (`host_read.HostRead.start`).
It stays open until ``optimizer.step`` has run (its ||Δw|| needs the updated weights), is
then sealed into the queue, and is handed out for writing once its copies have completed,
oldest first: records are never reordered, and the step's path never waits.
"""

from __future__ import annotations

import datetime
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import torch

from gradkit.context import GradContext
from gradkit.step_report import StepReport
from gradkit.tracking import record as _record
from gradkit.tracking import summary as _summary
from gradkit.tracking.counters import SinceLastLog
from gradkit.tracking.host_read import HostRead, InFlight
from gradkit.tracking.kept import KeptShapes
from gradkit.tracking.noise_scale import NoiseScale
from gradkit.tracking.nonfinite import GradRefs
from gradkit.tracking.stats import host_dtype

__all__ = ["Logged", "Pending"]


class Logged:
    """A logged step between its statistics (observe) and its record (written once its host copies completed).

    Its fields are those of the step: ``step``, ``report``, ``detail``, ``flight`` (the `host_read.InFlight` read
    of its statistics), ``names``, ``params``, ``numels``, ``before`` (a `record.WeightCopy` of the weights
    before the step, or None), ``histograms``, ``grads`` (`nonfinite.GradRefs` or None), ``events`` (a
    re-check's hook firings, or None), ``since``, ``bytes_since``, ``last_logged``, ``gathered`` and ``short``
    (the statistics were measured in float32: written with 9 significant digits).
    """

    def __init__(self, **fields: Any) -> None:
        self.deltas: InFlight | None = None
        self.__dict__.update(fields)

    @classmethod
    def start(
        cls, ctx: GradContext, report: StepReport, *, step: int, detail: bool, counters: SinceLastLog,
        noise: NoiseScale, gather: bool, histogram_bins: int | None, update_ratio: bool, recheck: tuple | None,
        new_event: Callable[[torch.device], Any], timeout: datetime.timedelta | None = None,
        kept: KeptShapes | None = None,
    ) -> Logged:  # fmt: skip
        """Start logged step `step`'s host read (no host sync) and return it, open until ``optimizer.step``.

        Args:
            ctx, report: the step's gradients and report.
            detail: measure the detail statistics (and copy the weights for ||Δw||, if `update_ratio`).
            counters: what was counted since the last log (read with the step).
            noise: the noise-scale EMAs (read with the step).
            gather: all-gather every rank's table (waiting at most `timeout`; None: the process group's).
            histogram_bins: make TensorBoard histograms on a detail step (this waits), or None.
            recheck: a re-check's hook firings and flags (`NonfiniteWatch.take_recheck`), or None.
            new_event: marks the host copy done (`host_read.device_event`).
            kept: the element counts and detail layout kept for the step's parameter list (`kept.KeptShapes`);
                None finds them from the tensors.
        """
        kept = kept if kept is not None else KeptShapes()
        layout = kept.layout(ctx) if detail and len(ctx) else None
        if detail or gather or not len(ctx):
            table = _record.param_table(ctx, report.total_norm.device, detail=detail, layout=layout)
        else:  # an ordinary step: its two norm columns, read as they are (no table made of them)
            table = _record.norm_columns(ctx)
        ranks = _record.gather_tables(table, timeout) if gather else None
        read = {"clipped": counters.clipped, "skipped_steps": counters.skipped}
        extra = {} if recheck is None or recheck[1] is None else {"recheck": recheck[1]}
        flight = _record.start_step(table, report, read, noise, ranks, extra=extra, new_event=new_event)
        histograms = None
        if detail and histogram_bins is not None and len(ctx):
            histograms = _record.histograms(ctx, flight, histogram_bins)  # waits: TensorBoard, detail steps
        before = None
        # Dense gradients have their weight's kind: the weights group as the gradients do.
        weight_groups = ctx.groups() if len(ctx) and not ctx.groups().sparse else None
        if detail and update_ratio and len(ctx):
            # Held until after_step: one copy of the weights (shards). A skipped step's ratios are zeros.
            # The gradients' layout serves the weights when they group alike (dense gradients: not sharded).
            before = _record.WeightCopy(ctx.params, weight_groups, layout if weight_groups is not None else None)
        # Without counts on the device, a non-finite record counts NaN/Inf on the host (if the grads are unchanged).
        grads = None if detail or ctx.sharded else GradRefs(ctx.grads)
        return cls(
            step=step, report=report, detail=detail, flight=flight, names=list(ctx.names), params=list(ctx.params),
            numels=kept.numels(ctx), before=before, histograms=histograms, grads=grads,
            events=None if recheck is None else recheck[0], since=counters.since, bytes_since=counters.bytes,
            last_logged=counters.last_logged, gathered=ranks is not None,
            short=len(ctx) > 0 and ctx.norms().dtype != torch.float64,
        )  # fmt: skip

    def done(self) -> bool:
        return self.flight.done() and (self.deltas is None or self.deltas.done())

    def wait(self) -> None:
        self.flight.wait()
        if self.deltas is not None:
            self.deltas.wait()

    def record(self, got: dict[str, Any]) -> _record.StepRecord:
        """The step's record from its read values `got` (alerts empty), strict JSON as built."""
        columns = got["columns"]
        counts = self.grads.counts(columns[0], columns[1]) if self.grads is not None else {}
        return _record.assemble(
            got, self.report, step=self.step, layout=_summary.Layout.of(self.names), numels=self.numels,
            counts=counts, since=self.since, bytes_since=self.bytes_since, detail=self.detail, gathered=self.gathered,
            deltas=self.update_norms(), short=self.short,
        )  # fmt: skip

    def update_norms(self) -> list[float] | None:
        """The read ||Δw|| per parameter, or None when the weights were not copied."""
        return self.deltas.values()["deltas"] if self.deltas is not None else None


class Pending:
    """The logged steps not yet written: at most one open (waiting for ``optimizer.step``), the rest in flight.

    Example:
        >>> pending = Pending()
        >>> pending.open = Logged(step=1, flight=flight, before=None, ...)
        >>> pending.seal(device_event)        # after optimizer.step
        >>> for logged in pending.completed():       # polls, never waits
        ...     write(logged)
    """

    def __init__(self) -> None:
        self.open: Logged | None = None
        self._queue: deque[Logged] = deque()

    def seal(self, new_event: Callable[[torch.device], Any]) -> None:
        """The open step is complete (the optimizer has stepped): start the read of its ||Δw|| and queue it."""
        logged, self.open = self.open, None
        if logged is None:
            return
        deltas = logged.before.norms(logged.params) if logged.before is not None else None
        logged.before = None
        if deltas is not None:  # None: no update ratio, as the weights changed form (see WeightCopy.norms)
            read = HostRead(deltas.device, host_dtype(deltas.device))
            read.add("deltas", deltas)
            logged.deltas = read.start(new_event)
        self._queue.append(logged)

    def weaken(self) -> None:
        """Hold the gradients of every step not yet written weakly (their steps are over: see `GradRefs`)."""
        for logged in ([self.open] if self.open is not None else []) + list(self._queue):
            if logged.grads is not None:
                logged.grads.weaken()

    def completed(self, *, wait: bool = False) -> Iterator[Logged]:
        """The queued steps whose host copies have completed, oldest first, each removed as it is handed out
        (every one, after waiting for it, if `wait`)."""
        queue = self._queue
        while queue and (wait or queue[0].done()):
            logged = queue.popleft()
            if wait:
                logged.wait()
            yield logged
