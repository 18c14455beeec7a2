"""Tracker: per-layer gradient statistics over time, alerts, noise scale, logs.

The tracker observes each optimizer step of a `GradientPipeline` (or is
called by hand after ``backward()``), and does real work only on logging
steps (step 1 and every `every`-th step). Between them it keeps two counters
on the device (clipped steps, skipped steps) and reads nothing on the host.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gradkit import _checks, _dtensor
from gradkit._stateful import load_all_or_nothing
from gradkit._version import __version__
from gradkit.clipping import ClipByGlobalNorm
from gradkit.context import GradContext
from gradkit.step_report import StepReport
from gradkit.tracking import record as _record
from gradkit.tracking import stats as _stats
from gradkit.tracking.alerts import Alert, AlertRules, logger
from gradkit.tracking.counters import SinceLastLog
from gradkit.tracking.noise_scale import NoiseScale
from gradkit.tracking.nonfinite import NonfiniteLocator, NonfiniteWatch, nonfinite_counts
from gradkit.tracking.writers import SCHEMA, check_log_dir, check_meta, check_writers, clean, make_writers

__all__ = ["Tracker"]


class Tracker:
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
        meta: run settings written to the log header (e.g. ``{"max_norm": 1.0,
            "batch_size": 64}``); the report draws ``max_norm`` as the clip threshold.

    Raises:
        TypeError / ValueError: for a bad `every`, an unknown writer, an unwritable
            `log_dir`, or `meta` that is not JSON-serialisable.
        ImportError: "tensorboard" in `writers` without the tensorboard package.

    Host reads happen on logging steps only: one transfer for all statistics,
    one more for the update ratios, and one more on a step with NaN/Inf
    gradients (their counts). Only rank 0 writes (torch.distributed rank when
    initialised); other ranks do nothing on logging steps unless `gather`.

    Memory: on logging steps only, one copy of the trainable weights held from
    ``observe`` to ``after_step`` (for ||Δw||; ``update_ratio=False`` removes
    it), and ``P x 5`` statistics; `history` keeps one dict per logged step.

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
    ) -> None:
        self.every = _checks.positive_int("every", every, "log every N-th optimizer step, e.g. every=10")
        self.detail_every = (
            max(self.every, 10)
            if detail_every is None
            else _checks.positive_int("detail_every", detail_every, "pass how often logged steps get full statistics, e.g. 10")
        )
        self.writer_names = check_writers(writers)
        if alerts is not None and not isinstance(alerts, AlertRules):
            raise TypeError(f"alerts must be gradkit.tracking.AlertRules(...) or None, got {type(alerts).__name__}")
        self.rules = alerts if alerts is not None else AlertRules()
        self.noise = NoiseScale(noise_beta)
        self.update_ratio = _checks.flag("update_ratio", update_ratio, "pass False to skip the weight copy on logging steps")
        self.histogram_bins = _checks.positive_int("histogram_bins", histogram_bins, "pass a bin count, e.g. 64")
        self.gather = _checks.flag("gather", gather, "pass True to collect every rank's statistics on rank 0")
        self.meta = check_meta(meta)
        self.rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.writes = self.rank == 0
        self.log_dir = check_log_dir(log_dir) if self.writes else None
        self._writers = make_writers(self.writer_names, self.log_dir) if self.writes else []
        #: one dict per logged step (the JSONL record), for notebooks
        self.history: list[dict[str, Any]] = []
        #: every alert so far, oldest first
        self.alerts: list[Alert] = []
        #: the alerts of the latest logged step
        self.last_alerts: list[Alert] = []
        #: the last optimizer step observed
        self.step = 0
        self._names: list[str] | None = None
        self._params: list[Tensor] = []
        self._nonfinite = NonfiniteWatch()
        self._counters = SinceLastLog()
        self._pending: dict[str, Any] | None = None  # a logged record waiting for its update ratios

    @property
    def _locator(self) -> NonfiniteLocator | None:
        return self._nonfinite.locator

    # -- the pipeline protocol -------------------------------------------------------

    def attach(self, module: nn.Module | None, names: Sequence[str], params: Sequence[Tensor], *, clip: Sequence[Any] = ()) -> None:
        """Learn the model (once, at setup) and write the run header (with the clip threshold, if any)."""
        self._names, self._params = list(names), list(params)
        thresholds = [stage.max_norm for stage in clip if isinstance(stage, ClipByGlobalNorm)]
        if thresholds and "max_norm" not in self.meta:
            self.meta["max_norm"] = min(thresholds)  # the report draws it as the clip line
        self._nonfinite.attach(module, self._names, self._params)
        modules = list(dict.fromkeys(_stats.module_of(n) for n in self._names))
        header = {"type": "run", "schema": SCHEMA, "version": __version__, "time": time.time(),
                  "every": self.every, "params": self._names, "modules": modules, "meta": self.meta}  # fmt: skip
        self._write_to_files(header)

    def wants(self, step: int) -> bool:
        """Whether optimizer step `step` (1-based) is a logging step: 1, every `every`-th, or one forced by a non-finite step."""
        return step == 1 or step % self.every == 0 or self._nonfinite.forces(step)

    def observe(self, ctx: GradContext, report: StepReport) -> None:
        """Record the step's final gradients (after clipping, before ``optimizer.step``).

        On non-logging steps: two small device ops (count clipped and skipped
        steps), no host read.
        """
        self._finish_pending()
        step = int(report.step)
        self.step = step
        self._counters.count(report)
        if not self.wants(step):
            return
        self._nonfinite.forced.discard(step)
        if not (self.writes or self.gather or ctx.sharded):  # sharded: every rank joins the reductions
            self._counters.reset(step)
            return
        self._log(ctx, report)

    def after_step(self, ctx: GradContext | None = None, report: StepReport | None = None) -> None:
        """Complete a logged step with ||Δw||/||w|| (the weights are updated now) and write it."""
        self._finish_pending()

    # -- standalone use --------------------------------------------------------------

    def track(self, model: nn.Module | Sequence[tuple[str, Tensor]] | None = None, *, items: int | None = None) -> None:
        """Observe the gradients in ``p.grad`` after ``backward()``, without a pipeline.

        Call it once per optimizer step, before ``optimizer.step()``. Without
        clip stages, the norms before and after clipping are the same and no
        noise scale is measured. The update ratio of a logged step is completed
        by ``after_step()`` (call it after ``optimizer.step()``), or else at the
        next `track` call.

        Args:
            model: the module (or ``named_parameters()`` pairs); needed on the
                first call, optional after (the same model is assumed).
            items: how many items the step's batch held, for the log.

        Raises:
            RuntimeError: no model on the first call.
            ValueError: the model's parameters differ from the first call's.

        Example:
            >>> loss.backward(); tracker.track(model); optimizer.step(); tracker.after_step()
        """
        if model is not None:
            pairs = list(model.named_parameters()) if isinstance(model, nn.Module) else list(model)
            names = [n for n, p in pairs if p.requires_grad]
            if self._names is None:
                self.attach(model if isinstance(model, nn.Module) else None, names, [p for n, p in pairs if p.requires_grad])
            elif names != self._names:
                raise ValueError("track(model): the parameters differ from the ones this tracker was attached to; use one Tracker per model")
        elif self._names is None:
            raise RuntimeError("track() needs the model on its first call: tracker.track(model)")
        self._finish_pending()
        step = self.step + 1
        if not self.wants(step):
            self.step = step
            self._counters.since += 1
            return
        ctx = GradContext(self._names, self._params)
        ctx.pre_clip_norms = ctx.norms() if len(ctx) else None
        total = ctx.total_norm()
        count = torch.tensor(math.nan if items is None else float(items), device=total.device)
        self.observe(ctx, StepReport(
            step=step, micro_steps=1, items=count, total_norm=total, norm_after=total,
            clip_coef=torch.ones_like(total), skipped=~torch.isfinite(total),
        ))  # fmt: skip

    def locate_nonfinite(self, closure: Callable[[], Tensor]) -> str | None:
        """Replay one batch with hooks and name the first module, in backward order, making the gradient non-finite.

        Use it when a non-finite step did not recur on the next step (the
        tracker re-checks that one by itself): rerun the offending batch.
        Gradients are computed with ``torch.autograd.grad``, so ``p.grad`` is
        left untouched.

        Args:
            closure: runs the forward pass and returns the scalar loss, e.g.
                ``lambda: loss_fn(model(x), y)``.

        Returns:
            The module name ("(loss)" when the loss itself was non-finite), or
            None when every gradient was finite. A found origin is also an alert.

        Example:
            >>> tracker.locate_nonfinite(lambda: F.cross_entropy(model(x_bad), y_bad))
            '4.attn'
        """
        alert = self._nonfinite.replay(closure, self._params, self.step)
        if alert is None:
            return None
        self._raise_alerts([alert])
        self._write_to_files({"type": "alert", "schema": SCHEMA, **alert.to_dict()})
        return alert.name

    def close(self) -> None:
        """Write a logged step still waiting for its update ratio, and close the writers."""
        self._finish_pending()
        for writer in self._writers:
            writer.close()
        self._writers = []

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the logging step ------------------------------------------------------------

    def _log(self, ctx: GradContext, report: StepReport) -> None:
        step = self.step
        if report.noise is not None:
            self.noise.update(report.noise)
        detail = step == 1 or step % self.detail_every == 0 or bool(report.skipped)
        table = _record.param_table(ctx, report.total_norm.device, detail=detail)
        ranks = _record.gather_tables(table) if self.gather else None
        counters = {"clipped": self._counters.clipped, "skipped_steps": self._counters.skipped}
        got = _record.read_step(table, report, counters, self.noise, ranks)  # the one host read of a logging step
        grads = _dtensor.locals_of(ctx.grads)
        bad = [i for i, row in enumerate(got["table"]) if not (math.isfinite(row[0]) and math.isfinite(row[1]))]
        counts = nonfinite_counts(ctx.sharded, ctx.grads, grads, bad)
        numels = [g.numel() for g in ctx.grads]
        params, modules = _stats.summarize(ctx.names, numels, got["table"], counts)
        rank_norms = None if ranks is None else _record.rank_norms(ctx.names, numels, got["ranks"])
        since, last_logged = self._counters.since, self._counters.last_logged
        record = _record.step_record(got, report, step=step, since=since, bytes_since=self._counters.bytes,
                                     detail=detail, params=params, modules=modules, ranks=rank_norms)  # fmt: skip
        alerts = self.rules.check(step, {m: v["norm_pre_clip"] for m, v in modules.items()}, got["total_norm"])
        skipped_since = int(got["skipped_steps"])
        alerts += self._nonfinite.alerts(step, ctx.names, params, skipped_since=skipped_since, last_logged=last_logged)
        record["alerts"] = [a.to_dict() for a in alerts]
        self._raise_alerts(alerts)
        self.last_alerts = alerts
        histograms = None
        if detail and self._writers and "tensorboard" in self.writer_names and len(ctx):
            histograms = _stats.histograms(ctx.names, grads, modules, self.histogram_bins)  # of this rank's shards
        before = None
        if detail and self.update_ratio and not record["global"]["skipped"] and len(ctx):
            # Held until after_step: one copy of the weights (shards).
            before = [p.detach().clone() for p in _dtensor.locals_of(ctx.params)]
        self._pending = {"record": record, "names": list(ctx.names), "params": list(ctx.params), "before": before,
                         "histograms": histograms}  # fmt: skip
        self._counters.reset(step)

    def _finish_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        _record.complete_update_ratios(pending["record"], pending["names"], pending["params"], pending["before"])
        record = clean(pending["record"])
        self.history.append(record)
        for writer in self._writers:
            writer.write(record, pending["histograms"])

    def _raise_alerts(self, alerts: list[Alert]) -> None:
        for alert in alerts:
            if self.writes or self.gather:  # ranks that only join sharded reductions stay quiet
                logger.warning("%s [%s] %s", alert.kind, alert.name, alert.message)
        self.alerts.extend(alerts)

    def _write_to_files(self, entry: dict[str, Any]) -> None:
        for writer in self._writers:
            if hasattr(writer, "path"):  # the file writers: TensorBoard takes step records only
                writer.write(entry)

    # -- state -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Step, counters, noise EMAs and alert state, as plain tensors and numbers (history is in the log)."""
        return {
            "step": self.step,
            **self._counters.state_dict(),
            **self._nonfinite.state_dict(),
            "noise": self.noise.state_dict(),
            "rules": self.rules.state_dict(),
            "alerts": [a.to_dict() for a in self.alerts],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned; all or nothing.

        Raises:
            ValueError / TypeError: for missing or unexpected keys or bad values; the tracker is unchanged then.
        """
        _checks.state_keys("Tracker", state, {"step", "last_logged", "since", "bytes", "clipped", "skipped", "forced", "armed", "noise", "rules", "alerts"})
        _checks.non_negative_int("step", state["step"], "pass the dict from Tracker.state_dict()")
        SinceLastLog.check_state(state)
        alerts = [Alert(**a) for a in state["alerts"]]
        load_all_or_nothing([(self.noise, state["noise"]), (self.rules, state["rules"])])
        self.step = int(state["step"])
        self._counters.load_state_dict(state)
        self.alerts = alerts
        self._nonfinite.load_state_dict(state)
