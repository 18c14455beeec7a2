"""Tracker: per-layer gradient statistics over time, alerts, noise scale, logs.

The tracker observes each optimizer step of a `GradientPipeline` (or is
called by hand after ``backward()``), and does real work only on logging
steps (step 1 and every `every`-th step). Between them it keeps two counters
on the device (clipped steps, skipped steps) and reads nothing on the host.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gradkit import _checks, _dtensor, _foreach
from gradkit import distributed as gdist
from gradkit.clipping import ClipByGlobalNorm
from gradkit.context import GradContext
from gradkit.step_report import StepReport
from gradkit.tracking import stats as _stats
from gradkit.tracking.alerts import GLOBAL, Alert, AlertRules, logger
from gradkit.tracking.noise_scale import NoiseScale, batch_advice
from gradkit.tracking.nonfinite import NonfiniteLocator
from gradkit.tracking.writers import SCHEMA, check_log_dir, check_writers, clean, make_writers

__all__ = ["Tracker"]

_CLIP_TOLERANCE = 1e-6  # clip_coef below 1 - this counts as a clipped step (rounding leaves exact 1 alone)


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
        if meta is not None and not isinstance(meta, dict):
            raise TypeError(f"meta must be a dict of run settings or None, got {type(meta).__name__} {meta!r}; pass e.g. {{'max_norm': 1.0}}")
        self.meta = dict(meta or {})
        try:
            json.dumps(self.meta, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise ValueError(f"meta must hold JSON values (numbers, strings, lists, dicts): {error}; convert the offending value, e.g. str(x)") from None
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
        self._locator: NonfiniteLocator | None = None
        self._forced: set[int] = set()  # steps logged out of turn (after a non-finite step)
        self._clipped: Tensor | None = None  # device counters since the last log
        self._skipped: Tensor | None = None
        self._since = 0
        self._bytes = 0
        self._last_logged = 0
        self._pending: dict[str, Any] | None = None  # a logged record waiting for its update ratios

    # -- the pipeline protocol -------------------------------------------------------

    def attach(self, module: nn.Module | None, names: Sequence[str], params: Sequence[Tensor], *, clip: Sequence[Any] = ()) -> None:
        """Learn the model (once, at setup) and write the run header (with the clip threshold, if any)."""
        self._names, self._params = list(names), list(params)
        thresholds = [stage.max_norm for stage in clip if isinstance(stage, ClipByGlobalNorm)]
        if thresholds and "max_norm" not in self.meta:
            self.meta["max_norm"] = min(thresholds)  # the report draws it as the clip line
        self._locator = NonfiniteLocator(module, self._names, self._params)
        modules = list(dict.fromkeys(_stats.module_of(n) for n in self._names))
        from gradkit import _version as gradkit  # the version alone: its own module, no cycle with gradkit/__init__

        header = {"type": "run", "schema": SCHEMA, "version": gradkit.__version__, "time": time.time(),
                  "every": self.every, "params": self._names, "modules": modules, "meta": self.meta}  # fmt: skip
        for writer in self._writers:
            if hasattr(writer, "path"):
                writer.write(header)

    def wants(self, step: int) -> bool:
        """Whether optimizer step `step` (1-based) is a logging step: 1, every `every`-th, or one forced by a non-finite step."""
        return step == 1 or step % self.every == 0 or step in self._forced

    def observe(self, ctx: GradContext, report: StepReport) -> None:
        """Record the step's final gradients (after clipping, before ``optimizer.step``).

        On non-logging steps: two small device ops (count clipped and skipped
        steps), no host read.
        """
        self._finish_pending()
        step = int(report.step)
        self.step = step
        self._count(report)
        if not self.wants(step):
            return
        self._forced.discard(step)
        if not (self.writes or self.gather or ctx.sharded):  # sharded: every rank joins the reductions
            self._reset_counters()
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
            self._since += 1
            return
        ctx = GradContext(self._names, self._params)
        ctx.pre_clip_norms = ctx.norms() if len(ctx) else None
        total = ctx.total_norm()
        count = torch.tensor(math.nan if items is None else float(items), device=total.device)
        report = StepReport(
            step=step,
            micro_steps=1,
            items=count,
            total_norm=total,
            norm_after=total,
            clip_coef=torch.ones_like(total),
            skipped=~torch.isfinite(total),
        )
        self.observe(ctx, report)

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
        if self._locator is None:
            raise RuntimeError("the tracker is not attached to a model yet: pass it to GradientPipeline(tracker=...) or call tracker.track(model) first")
        locator, was_armed = self._locator, self._locator.armed
        locator.arm()
        try:
            loss = closure()
            if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
                raise TypeError("the closure must return the scalar loss of a forward pass with grad enabled, e.g. lambda: loss_fn(model(x), y)")
            params = [p for p in self._params if p.requires_grad]
            torch.autograd.grad(loss.reshape(()), params, allow_unused=True)
        finally:
            if not was_armed:
                locator.disarm()
        found = locator.result()
        if found is None:
            logger.info("locate_nonfinite: every gradient of the replayed batch is finite")
            return None
        name, how = found
        alert = Alert(self.step, "nonfinite", name, f"replay: first module in backward order with a non-finite gradient is {name!r}: {how}")
        self._raise_alerts([alert])
        for writer in self._writers:
            if hasattr(writer, "path"):
                writer.write({"type": "alert", "schema": SCHEMA, **alert.to_dict()})
        return name

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

    def _count(self, report: StepReport) -> None:
        # The only work of a non-logging step: device-side counters, no host read.
        if self._clipped is None or self._clipped.device != report.clip_coef.device:
            self._clipped = torch.zeros((), dtype=torch.int64, device=report.clip_coef.device)
        if self._skipped is None or self._skipped.device != report.skipped.device:
            self._skipped = torch.zeros((), dtype=torch.int64, device=report.skipped.device)
        self._clipped += report.clip_coef < 1 - _CLIP_TOLERANCE
        self._skipped += report.skipped
        self._since += 1
        self._bytes += int(report.bytes_sent)

    def _reset_counters(self) -> None:
        self._clipped.zero_()
        self._skipped.zero_()
        self._since, self._bytes, self._last_logged = 0, 0, self.step

    def _log(self, ctx: GradContext, report: StepReport) -> None:
        step = self.step
        if report.noise is not None:
            self.noise.update(report.noise)
        g2, trace, b_simple = self.noise.estimate()
        norms = ctx.norms() if len(ctx) else torch.zeros(0, device=report.total_norm.device)
        device = norms.device
        dtype = _stats.host_dtype(device)
        detail = step == 1 or step % self.detail_every == 0 or bool(report.skipped)
        grads, weights = _dtensor.locals_of(ctx.grads), _dtensor.locals_of(ctx.params)
        table = (
            _stats.param_stats(grads, weights, norms, ctx.pre_clip_norms, detail=detail)
            if len(ctx)
            else torch.zeros(0, len(_stats.COLUMNS), device=device, dtype=dtype)
        )
        if ctx.sharded and detail and len(ctx):
            table = _full_table(table, ctx)
        ranks = self._gather(table)
        noise = report.noise
        scalars = [report.total_norm, report.norm_after, report.clip_coef, report.skipped, report.items, self._clipped, self._skipped, g2, trace, b_simple, self.noise.measured()]
        if noise is not None:
            scalars += [noise.small_sq, noise.small_batch, noise.big_sq, noise.big_batch]
        parts = [table.reshape(-1), torch.stack([s.detach().to(device, dtype).reshape(()) for s in scalars])]
        if ranks is not None:
            parts.append(ranks.reshape(-1))
        values = torch.cat(parts).tolist()  # the one host read of a logging step
        width = len(_stats.COLUMNS)
        p = len(ctx)
        rows = [values[i * width : (i + 1) * width] for i in range(p)]
        s = values[p * width : p * width + len(scalars)]
        norm_pre, norm_after, clip_coef, skipped, items, clipped_n, skipped_n, g2_v, trace_v, bs_v, measured = s[:11]
        bad = [i for i, row in enumerate(rows) if not (math.isfinite(row[0]) and math.isfinite(row[1]))]
        counts = _nonfinite_counts(ctx, grads, bad)
        numels = [g.numel() for g in ctx.grads]
        params, modules = _stats.summarize(ctx.names, numels, rows, counts)
        dense = getattr(report, "dense_bytes", None)  # carried by reports of compressing averagers, if any
        record = {
            "type": "step",
            "schema": SCHEMA,
            "step": step,
            "time": time.time(),
            "steps_since_log": self._since,
            "detail": detail,
            "global": {
                "norm_pre_clip": norm_pre, "norm": norm_after, "clip_coef": clip_coef,
                "clipped_steps": int(clipped_n), "clip_rate": clipped_n / max(self._since, 1),
                "skipped": bool(skipped), "skipped_steps": int(skipped_n), "items": items,
                "bytes_sent": int(report.bytes_sent), "bytes_since_log": self._bytes,
                "dense_bytes": None if dense is None else int(dense),
                "compression_ratio": dense / report.bytes_sent if dense is not None and report.bytes_sent else None,
            },  # fmt: skip
            "modules": modules,
            "params": params,
            "noise": self._noise_record(s[11:], g2_v, trace_v, bs_v, items) if measured else None,
            "alerts": [],
            "ranks": None if ranks is None else self._rank_records(ctx, values[p * width + len(scalars) :], numels),
        }
        alerts = self.rules.check(step, {m: v["norm_pre_clip"] for m, v in modules.items()}, norm_pre)
        alerts += self._nonfinite_alerts(step, ctx, params, int(skipped_n))
        record["alerts"] = [a.to_dict() for a in alerts]
        self._raise_alerts(alerts)
        self.last_alerts = alerts
        histograms = None
        if detail and self._writers and "tensorboard" in self.writer_names and len(ctx):
            histograms = _stats.histograms(ctx.names, grads, modules, self.histogram_bins)  # of this rank's shards
        before = None
        if detail and self.update_ratio and not skipped and len(ctx):
            before = [p.detach().clone() for p in weights]  # held until after_step: one copy of the weights (shards)
        self._pending = {"record": record, "names": list(ctx.names), "params": list(ctx.params), "before": before, "histograms": histograms}
        self._reset_counters()

    def _noise_record(self, sample: list[float], g2: float, trace: float, b_simple: float, items: float) -> dict[str, Any]:
        small_sq, small_batch, big_sq, big_batch = sample if sample else (math.nan, math.nan, math.nan, math.nan)
        estimate = b_simple if math.isfinite(b_simple) else None
        return {
            "small_sq": small_sq, "small_batch": small_batch, "big_sq": big_sq, "big_batch": big_batch,
            "g2": g2, "trace": trace, "b_simple": estimate,
            "advice": batch_advice(estimate, _batch_of_step(items, big_batch)),
        }  # fmt: skip

    def _finish_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        record, before = pending["record"], pending["before"]
        if before is not None:
            after = [_dtensor.local(p).detach() for p in pending["params"]]
            for _, (members, positions) in _foreach.group_tensors(before).items():
                torch._foreach_sub_(members, [after[i] for i in positions])
            deltas = _foreach.per_tensor_norms(before, 2.0, at_least=torch.float32)
            device = deltas[0].device
            deltas = torch.stack([d.to(device) for d in deltas])
            if _dtensor.any_dtensor(pending["params"]):  # norms of the full updates, from the shards'
                deltas = _dtensor.reduce_sums(deltas.double().square(), pending["params"]).sqrt()
            values = deltas.tolist()  # the update ratio's host read
        elif record["global"]["skipped"]:
            values = [0.0] * len(pending["names"])  # a skipped step does not move the weights
        else:
            values = None
        if values is not None:
            sums: dict[str, float] = {}
            for name, delta in zip(pending["names"], values):
                entry = record["params"][name]
                entry["update_to_weight"] = delta / entry["weight_norm"] if entry["weight_norm"] > 0 else None
                module = _stats.module_of(name)
                sums[module] = sums.get(module, 0.0) + delta**2
            for module, sq in sums.items():
                entry = record["modules"][module]
                entry["update_to_weight"] = math.sqrt(sq) / entry["weight_norm"] if entry["weight_norm"] > 0 else None
        record = clean(record)
        self.history.append(record)
        for writer in self._writers:
            writer.write(record, pending["histograms"])

    # -- alerts ------------------------------------------------------------------------

    def _nonfinite_alerts(self, step: int, ctx: GradContext, params: dict[str, dict], skipped_since: int) -> list[Alert]:
        locator = self._locator
        bad = [name for name in ctx.names if params[name]["nan"] or params[name]["inf"]]
        if locator is not None and locator.armed:
            found = locator.result()
            locator.disarm()
            if found is not None:
                name, how = found
                return [Alert(step, "nonfinite", name, f"step {step}: first module in backward order with a non-finite gradient is {name!r}: {how} (located by hooks)")]
            if not bad:
                logger.info(
                    "step %d: the non-finite gradient did not recur on the re-checked step; to locate it, replay the "
                    "offending batch with tracker.locate_nonfinite(lambda: loss_fn(model(x), y))", step,
                )  # fmt: skip
        if bad:
            # Parameters are registered in forward order, so the last one hit is the first in backward order.
            first = bad[-1]
            module = _stats.module_of(first)
            nan = sum(params[n]["nan"] for n in bad)
            inf = sum(params[n]["inf"] for n in bad)
            self._arm(step)
            return [Alert(step, "nonfinite", module,
                          f"step {step}: non-finite gradient ({nan} NaN, {inf} Inf in {len(bad)} parameters); first in backward "
                          f"order by parameter: {first!r}. Hooks re-check step {step + 1} to name the module that produced it", float(nan + inf))]  # fmt: skip
        if skipped_since:
            self._arm(step)
            return [Alert(step, "nonfinite", GLOBAL,
                          f"step {step}: {skipped_since} step(s) since step {self._last_logged} were skipped for a non-finite gradient; "
                          f"hooks re-check step {step + 1}", float(skipped_since))]  # fmt: skip
        return []

    def _arm(self, step: int) -> None:
        if self._locator is not None:
            self._locator.arm()
            self._forced.add(step + 1)  # log the re-checked step, so its host read is on a logging step

    def _raise_alerts(self, alerts: list[Alert]) -> None:
        for alert in alerts:
            if self.writes or self.gather:  # ranks that only join sharded reductions stay quiet
                logger.warning("%s [%s] %s", alert.kind, alert.name, alert.message)
        self.alerts.extend(alerts)

    # -- ranks -----------------------------------------------------------------------

    def _gather(self, table: Tensor) -> Tensor | None:
        if not (self.gather and dist.is_available() and dist.is_initialized()):
            return None
        out = [torch.empty_like(table) for _ in range(dist.get_world_size())]
        gdist.run(dist.all_gather, "Tracker(gather=True): all_gather of per-rank gradient statistics", None, out, table.contiguous())
        return torch.stack(out)

    def _rank_records(self, ctx: GradContext, values: list[float], numels: list[int]) -> list[dict[str, float]]:
        width, p = len(_stats.COLUMNS), len(ctx)
        out = []
        for r in range(len(values) // max(width * p, 1)):
            chunk = values[r * width * p : (r + 1) * width * p]
            rows = [chunk[i * width : (i + 1) * width] for i in range(p)]
            _, modules = _stats.summarize(ctx.names, numels, rows, {})
            out.append({m: v["norm_pre_clip"] for m, v in modules.items()})
        return out

    # -- state -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Step, counters, noise EMAs and alert state, as plain tensors and numbers (history is in the log)."""
        return {
            "step": self.step,
            "last_logged": self._last_logged,
            "since": self._since,
            "bytes": self._bytes,
            "clipped": (self._clipped if self._clipped is not None else torch.zeros((), dtype=torch.int64)).clone(),
            "skipped": (self._skipped if self._skipped is not None else torch.zeros((), dtype=torch.int64)).clone(),
            "forced": sorted(self._forced),
            "armed": bool(self._locator is not None and self._locator.armed),
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
        for key in ("step", "last_logged", "since", "bytes"):
            _checks.non_negative_int(key, state[key], "pass the dict from Tracker.state_dict()")
        for key in ("clipped", "skipped"):
            if not isinstance(state[key], Tensor) or state[key].numel() != 1:
                raise TypeError(f"Tracker.load_state_dict: {key!r} must be a one-element tensor from Tracker.state_dict()")
        alerts = [Alert(**a) for a in state["alerts"]]
        noise_before, rules_before = self.noise.state_dict(), self.rules.state_dict()
        try:
            self.noise.load_state_dict(state["noise"])
            self.rules.load_state_dict(state["rules"])
        except Exception:
            self.noise.load_state_dict(noise_before)
            self.rules.load_state_dict(rules_before)
            raise
        self.step, self._last_logged, self._since, self._bytes = (int(state[k]) for k in ("step", "last_logged", "since", "bytes"))
        self._clipped = state["clipped"].detach().long().reshape(()).clone()
        self._skipped = state["skipped"].detach().long().reshape(()).clone()
        self._forced = {int(s) for s in state["forced"]}
        self.alerts = alerts
        if state["armed"] and self._locator is not None:
            self._locator.arm()


def _full_table(table: Tensor, ctx: GradContext) -> Tensor:
    """The detail columns of a table computed from this rank's shards, made those of the full
    parameters: max |g| as the max, nonzero counts and squared weight norms as sums (two collectives)."""
    columns = list(_stats.COLUMNS)
    at = {name: columns.index(name) for name in ("max_abs", "nonzero", "weight_norm")}
    p = len(ctx)
    sums = _dtensor.reduce_sums(torch.cat([table[:, at["nonzero"]], table[:, at["weight_norm"]].square()]), ctx.grads + ctx.params)
    table = table.clone()
    table[:, at["max_abs"]] = _dtensor.reduce_max(table[:, at["max_abs"]].contiguous(), ctx.grads)
    table[:, at["nonzero"]] = sums[:p]
    table[:, at["weight_norm"]] = sums[p:].sqrt()
    return table


def _nonfinite_counts(ctx: GradContext, grads: Sequence[Tensor], bad: Sequence[int]) -> dict[int, tuple[int, int]]:
    """(NaN, Inf) counts of the parameters at `bad`, over full parameters when sharded (norms are
    full-parameter values, so every rank has the same `bad` and joins the reduction)."""
    if not (ctx.sharded and bad):
        return _stats.nonfinite_counts(grads, bad)
    local = torch.stack([torch.stack([torch.isnan(grads[i]).sum(), torch.isinf(grads[i]).sum()]) for i in bad]).double()
    total = _dtensor.reduce_sums(local.T.reshape(-1), [ctx.grads[i] for i in bad] * 2).reshape(2, -1)
    return {i: (int(nan), int(inf)) for i, nan, inf in zip(bad, total[0].tolist(), total[1].tolist())}


def _batch_of_step(items: float, big_batch: float) -> float | None:
    """The batch the advice speaks of: the step's items over all ranks (the measured big
    batch can be one rank's window, when compressed averaging made the global one lossy)."""
    for value in (items, big_batch):
        if math.isfinite(value) and value > 0:
            return value
    return None
