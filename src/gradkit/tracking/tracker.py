"""Tracker: per-layer gradient statistics over time, alerts, noise scale, logs.

The tracker observes each optimizer step of a `GradientPipeline` (or is
called by hand after ``backward()``), and does real work only on logging
steps (step 1 and every `every`-th step). Between them it keeps two counters
on the device (clipped steps, skipped steps) and reads nothing on the host.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gradkit import _checks
from gradkit._stateful import load_all_or_nothing
from gradkit.averaging.collectives import as_timeout
from gradkit.clipping import ClipByGlobalNorm
from gradkit.context import Attached, GradContext, same_params
from gradkit.step_report import StepReport
from gradkit.tracking.alerts import Alert, AlertRules, logger
from gradkit.tracking.counters import SinceLastLog
from gradkit.tracking.host_read import device_event
from gradkit.tracking.kept import KeptShapes
from gradkit.tracking.noise_scale import NoiseScale
from gradkit.tracking.nonfinite import NonfiniteLocator, NonfiniteWatch
from gradkit.tracking.pending import Logged, Pending
from gradkit.tracking.sink import RecordSink
from gradkit.tracking.standalone import ManualTracking
from gradkit.tracking.writers import check_log_dir, check_meta, check_writers

__all__ = ["Tracker"]


class Tracker(ManualTracking):
    """Gradient statistics per parameter and per module, alerts, noise scale and logs.

    On each logging step it records, per parameter and per module (a module is
    a parameter name minus its last component): the gradient L2 norm before and
    after clipping, max |g|, RMS, the fraction of exact zeros, NaN/Inf counts,
    ||g||/||w|| and the update-to-weight ratio ||Δw||/||w|| (about 1e-3 is the
    usual healthy order of magnitude); and for the step: the global norm before
    and after clipping, the clip coefficient, how many steps since the last log
    were clipped or skipped, items, bytes sent, and the gradient noise scale
    B_simple (McCandlish et al. 2018, "An Empirical Model of Large-Batch
    Training") with batch-size advice.

    Args:
        log_dir: where the writers write (created if needed); None keeps only
            the in-memory `history`.
        every: log step 1 and every `every`-th optimizer step (an int >= 1).
        detail_every: on logging steps that are multiples of it (and step 1),
            also measure what costs passes over all gradients and weights: max |g|,
            the zero fraction, ||w|| (so ||g||/||w||), ||Δw||/||w|| and histograms.
            Other logging steps reuse the step's cached norms only (norms, clip,
            skips, alerts, noise scale). Default ``max(every, 10)``; pass
            ``detail_every=every`` for full statistics on every logged step.
        writers: any of "jsonl" (``log_dir/tracking.jsonl``) and "tensorboard".
        alerts: thresholds of the alert rules (`AlertRules`); None for defaults.
        noise_beta: EMA decay of the noise-scale estimates, per measured window.
        update_ratio: measure ||Δw||/||w|| on logging steps (costs a copy of the
            weights between ``observe`` and ``after_step`` on those steps).
        histogram_bins: bins of the TensorBoard gradient histograms.
        gather: on logging steps, all-gather every rank's statistics to rank 0
            (one collective; every rank must then track the same parameters).
        timeout: seconds the gather of `gather` waits for every rank before raising
            `gk.CollectiveError` naming it (a dead or stuck peer); None (the default)
            waits the process group's timeout. On NCCL a timeout makes the logging step
            wait on the host for the gather (without one, only the stream waits).
        meta: run settings written to the log header (e.g. ``{"max_norm": 1.0,
            "batch_size": 64}``); the report draws ``max_norm`` as the clip threshold.
        history: how many logged steps `history` keeps in memory (the most recent), or
            None (the default) for all of them. The log on disk keeps every step; a long
            run that logs every step of a large model should bound it (a record holds
            about 200 bytes per parameter tensor, about 1 KB once `history` is read).
            `alerts` then keeps the alerts of those steps (and of later ones).

    Raises:
        TypeError / ValueError: for a bad `every`, `history` or `timeout`, an unknown writer, an
            unwritable `log_dir`, or `meta` that is not JSON-serialisable.
        ImportError: "tensorboard" in `writers` without the tensorboard package.

    The tracker never stalls the step: a logging step copies its statistics to the host
    without waiting, and its record is written once the copy has completed (on a GPU,
    `history` and the alerts can lag a step or a few; `flush()` catches up). Only rank 0
    writes. docs/tracking.md ("When it costs what") says what each kind of step costs,
    and when NaN/Inf counts are measured.

    Memory: on logging steps only, one copy of the trainable weights held from
    ``observe`` to ``after_step`` (for ||Δw||; ``update_ratio=False`` removes
    it), and ``P x 7`` statistics; `history` keeps one record per logged step (at most
    `history` of them when it is given).

    Example:
        >>> tracker = gk.Tracker("runs/exp1", every=10, writers=("jsonl", "tensorboard"))
        >>> pipe = gk.GradientPipeline(model, clip=gk.ClipByGlobalNorm(1.0), tracker=tracker)
        >>> ...                                  # train; then: gradkit report runs/exp1
        >>> tracker.last_alerts, tracker.history[-1]["global"]["norm"]

        Without a pipeline, after ``backward()``::

            loss.backward()
            tracker.track(model)     # before optimizer.step()
            optimizer.step()
            tracker.after_step()     # optional: completes ||Δw||/||w|| of a logged step
    """

    def __init__(
        self,
        log_dir: str | Path | None = None,
        *,
        every: int = 1,
        detail_every: int | None = None,
        writers: Sequence[str] = ("jsonl",),
        alerts: AlertRules | None = None,
        noise_beta: float = 0.95,
        update_ratio: bool = True,
        histogram_bins: int = 64,
        gather: bool = False,
        meta: dict[str, Any] | None = None,
        history: int | None = None,
        timeout: float | None = None,
    ) -> None:
        self.every, self.detail_every = _check_every(every, detail_every)
        keep = _checks.positive_int(
            "history",
            history,
            "pass how many logged steps to keep in memory, e.g. 1000, or None for all of them",
            allow_none=True,
        )
        self.writer_names = check_writers(writers)
        self.rules = AlertRules.or_default(alerts)
        self.noise = NoiseScale(noise_beta)
        self.update_ratio = _checks.flag("update_ratio", update_ratio, "pass False to skip the weight copy")
        self.histogram_bins = _checks.positive_int("histogram_bins", histogram_bins, "pass a bin count, e.g. 64")
        self.gather = _checks.flag("gather", gather, "pass True to collect every rank's statistics on rank 0")
        self.timeout = as_timeout(timeout)  # the gather's: a dead peer is a CollectiveError, not a long wait
        self.meta = check_meta(meta)
        self.rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.writes = self.rank == 0
        self.log_dir = check_log_dir(log_dir) if self.writes else None
        self._nonfinite = NonfiniteWatch()
        # The writers, history and alerts; ranks that only join sharded reductions write nothing and stay quiet.
        self._sink = RecordSink(
            self.writer_names if self.writes else (), self.log_dir, self.rules, self._nonfinite,
            loud=self.writes or self.gather, keep=keep,
        )  # fmt: skip
        #: the last optimizer step observed
        self.step = 0
        self._module: weakref.ref[nn.Module] | None = None  # the module attached, to tell it from another model
        #: the parameters attached, with what each `track()` context needs found once (None before `attach`)
        self._attached: Attached | None = None
        self._counters = SinceLastLog()
        self._kept = KeptShapes()  # element counts and the detail layout of the parameter list, found once
        self._pending = Pending()  # logged steps waiting for after_step (||Δw||) or for their host copies
        self._writes_after_step = False  # after_step is called: records are written there (see after_step)
        # How the host read of a logging step is marked done: an event recorded on the device.
        # A test may swap in an event that completes later (the CPU's completes at once).
        self._new_event: Callable[[torch.device], Any] = device_event

    @property
    def history(self) -> list[dict[str, Any]]:
        """One dict per logged step (the JSONL record), for notebooks."""
        return self._sink.history

    @property
    def alerts(self) -> list[Alert]:
        """Every alert so far, oldest first (with ``history=N``: those of the steps `history` holds, and later)."""
        return self._sink.alerts

    @property
    def last_alerts(self) -> list[Alert]:
        """The alerts of the latest logged step."""
        return self._sink.last_alerts

    @property
    def _locator(self) -> NonfiniteLocator | None:
        return self._nonfinite.locator

    # -- the pipeline protocol -------------------------------------------------------

    def attach(
        self, module: nn.Module | None, names: Sequence[str], params: Sequence[Tensor], *, clip: Sequence[Any] = ()
    ) -> None:
        """Learn the model (at setup) and write the run header (with the clip threshold, if any).

        Attached again (a new pipeline, a trainer's second ``fit``), the tracker writes the records still in
        flight first, under their own names, then a new run header, and numbers steps from 1 again: the counters
        of steps not logged yet and a re-check of a non-finite step armed under the old numbering are dropped
        (with the hooks it placed). To another model (a new one, even with the same names), it also starts its
        noise-scale estimate and alert rules' history afresh, and one warning (on the rank that writes) says
        that the new model's records follow the previous one's. The same module with other trainable
        parameters (layers frozen or unfrozen) is started afresh the same way, since the global norm and the
        noise estimate are of another sum, with a note that says so. The same parameters again
        (`context.same_params`): no message. A closed tracker (a trainer's callback closes it when a training
        ends) opens its writers again, appending: the new run header and records follow in the same files.
        """
        attached = Attached(names, params)  # checks the list (before any state changes)
        names, params = attached.names, attached.params
        if self._names is not None:
            self.flush()  # the records in flight, under their own names, before the next header
            if not same_params(self._names, self._params, names, params):
                self._follow_another(module, names, params)
            # A new attach is a new pipeline (or run), whose steps start at 1: nothing of the old numbering stays.
            self.step = 0
            self._counters = SinceLastLog()
        self._module = weakref.ref(module) if module is not None else None
        self._attached = attached  # track()'s contexts: the same list every step, so what is kept stays kept
        thresholds = [stage.max_norm for stage in clip if isinstance(stage, ClipByGlobalNorm)]
        if thresholds and "max_norm" not in self.meta:
            self.meta["max_norm"] = min(thresholds)  # the report draws it as the clip line
        self._nonfinite.attach(module, names, params)
        self._sink.start_run(names, every=self.every, meta=self.meta)

    @property
    def _names(self) -> list[str] | None:
        """The names of the parameters attached (None before `attach`)."""
        return self._attached.names if self._attached is not None else None

    @property
    def _params(self) -> list[Tensor]:
        """The parameters attached (empty before `attach`)."""
        return self._attached.params if self._attached is not None else []

    def wants(self, step: int) -> bool:
        """Whether optimizer step `step` (1-based) is a logging step.

        That is step 1, every `every`-th step, or one forced by a non-finite step.
        """
        return step == 1 or step % self.every == 0 or self._nonfinite.forces(step)

    def observe(self, ctx: GradContext, report: StepReport) -> None:
        """Record the step's final gradients (after clipping, before ``optimizer.step``).

        On non-logging steps: a few small device ops (count clipped and skipped
        steps), no host read.
        """
        step = int(report.step)
        self.step = step
        # Every step: count clipped and skipped steps on the device.
        self._counters.count(report)
        # Seal the previous step; write the records whose copies completed unless after_step will (a re-check
        # armed by a record is then of the next step, as self.step moved).
        self._drain(write=not self._writes_after_step)
        if not self.wants(step):
            return
        # A step logged to re-check a non-finite one takes the armed hooks' findings along.
        forced = self._nonfinite.forces(step)
        self._nonfinite.forced.discard(step)
        recheck = self._nonfinite.take_recheck() if forced else None
        # Ranks that neither write nor gather skip the statistics, unless sharded (every rank joins the reductions).
        if not (self.writes or self.gather or ctx.sharded):
            self._counters.reset(step)
            return
        # Start the step's host read; its record is written once the copy has completed.
        self._log(ctx, report, forced=forced, recheck=recheck)
        if not self._writes_after_step:  # the step may end (and drop its gradients) before this tracker hears
            self._pending.weaken()

    def after_step(self, ctx: GradContext | None = None, report: StepReport | None = None) -> None:
        """Complete a logged step with ||Δw|| (the weights are updated now), start its host copy, and
        write every record whose copy has completed (no wait): the step's work, the optimizer's included, is
        queued then, so a GPU is busy with it while the host encodes (observe writes only without after_step)."""
        self._writes_after_step = True
        self._drain()

    def flush(self) -> None:
        """Wait for every logged step's host copy and write its record (and alerts), in step order.

        Off the step's path: call it before reading `history` or `alerts` on a GPU, where
        records otherwise come a step or a few later. `close` and `state_dict` flush.

        Example:
            >>> tracker.flush(); tracker.history[-1]["step"] == pipe.steps   # if that step was logged
        """
        self._drain(wait=True)

    def close(self) -> None:
        """Write every logged step still waiting (for its update ratio or its host copy), and close the writers.

        A tracker used after `close` (attached again, or the same model tracked on) opens them again, appending."""
        self.flush()
        self._sink.close()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _follow_another(self, module: nn.Module | None, names: list[str], params: list[Tensor]) -> None:
        """Forget what described the previous parameters (records written) before following `names`, `params`."""
        self._kept.forget()
        self.noise = NoiseScale(self.noise.beta)  # an estimate of the previous parameters' gradient
        self.rules.forget()  # running averages of the previous parameters' norms
        if not self.writes:
            return  # one message per run, from the rank whose log it is about
        # Layers frozen or unfrozen: one model's run goes on, so no advice to keep runs apart.
        same_module = module is not None and self._module is not None and self._module() is module
        what = "the same model with other trainable parameters" if same_module else "another model"
        if self.log_dir is not None:
            where = f"a new run header in the same log ({self.log_dir / 'tracking.jsonl'}), after the previous ones"
            advice = " Use one Tracker with its own log_dir per model to keep their runs apart."
        else:
            where, advice = "the previous ones in `history`", " Use one Tracker per model to keep them apart."
        logger.warning(
            "Tracker: now following %s (%d parameter tensors, %d elements; before: %d, %d elements): its records "
            "follow %s; its noise estimate and alert history start afresh.%s",
            what, len(params), sum(p.numel() for p in params), len(self._params), sum(p.numel() for p in self._params),
            where, "" if same_module else advice,
        )  # fmt: skip

    # -- the logging step ------------------------------------------------------------

    def _log(self, ctx: GradContext, report: StepReport, *, forced: bool, recheck: tuple | None) -> None:
        """Start a logging step's host read (no host sync) and hold the step open until after_step."""
        step = self.step
        if report.noise is not None:
            self.noise.update(report.noise)
        # Full statistics (NaN/Inf counts included) on detail steps, and on a re-checked non-finite step.
        detail = step == 1 or step % self.detail_every == 0 or forced
        self._pending.open = Logged.start(
            ctx, report, step=step, detail=detail, counters=self._counters, noise=self.noise, gather=self.gather,
            timeout=self.timeout, histogram_bins=self.histogram_bins if self._sink.has_tensorboard() else None,
            update_ratio=self.update_ratio, recheck=recheck, new_event=self._new_event, kept=self._kept,
        )  # fmt: skip
        self._counters.reset(step)

    def _drain(self, *, wait: bool = False, write: bool = True) -> None:
        """Seal the open step (the optimizer has stepped) and, if `write`, write the records whose host
        copies have completed, oldest first (all of them, waiting, if `wait`)."""
        self._pending.seal(self._new_event)
        for logged in self._pending.completed(wait=wait) if write else ():
            self._sink.write(logged, next_step=self.step + 1)
        self._pending.weaken()  # records still in flight outlive their steps' gradients

    # -- state -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Step, counters, noise EMAs and alert state, as plain tensors and numbers (history is in the log).

        Flushes first (waits for the logged steps in flight), so that the alert state includes them.
        """
        self.flush()
        parts = (self._counters, self._nonfinite, self._sink)
        return {
            "step": self.step,
            "noise": self.noise.state_dict(),
            **{k: v for p in parts for k, v in p.state_dict().items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned; all or nothing.

        Raises:
            ValueError / TypeError: for missing or unexpected keys or bad values; the tracker is unchanged then.
        """
        _checks.state_keys("Tracker", state, _STATE_KEYS)
        _checks.non_negative_int("step", state["step"], "pass the dict from Tracker.state_dict()")
        SinceLastLog.check_state(state)
        alerts = [Alert(**a) for a in state["alerts"]]
        self.flush()  # records of the steps before the load are written as they were
        load_all_or_nothing([(self.noise, state["noise"]), (self.rules, state["rules"])])
        self.step = int(state["step"])
        self._counters.load_state_dict(state)
        self._sink.alerts = alerts
        self._nonfinite.load_state_dict(state)


def _check_every(every: object, detail_every: object) -> tuple[int, int]:
    """`every` and `detail_every` (default ``max(every, 10)``), checked."""
    every = _checks.positive_int("every", every, "log every N-th optimizer step, e.g. every=10")
    if detail_every is None:
        return every, max(every, 10)
    return every, _checks.positive_int(
        "detail_every", detail_every, "pass how often logged steps get full statistics, e.g. 10"
    )


# What state_dict holds: the tracker's own, SinceLastLog's, NonfiniteWatch's and RecordSink's keys.
_STATE_KEYS = set("step noise rules alerts last_logged since bytes clipped skipped forced armed".split())
