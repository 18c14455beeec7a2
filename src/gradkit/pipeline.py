"""GradientPipeline: everything between ``loss.backward()`` and ``optimizer.step()``, in order.

One optimizer step::

    micro-batch 1..K:  backward(loss, num_items)       grads sum in p.grad; DDP syncs only on the last
    boundary:          normalize by items or micro-batches
                       unscale (GradScaler), exactly once
                       global norm -> finite?           the one host read of the step, or a device flag
                       clip stages (finite steps only)  -> optimizer.step -> report -> zero grads

Two ways to skip a non-finite step (see `GradientPipeline`, "Skipping on the device"):
the default reads one flag on the host and does not call the optimizer; with a fused
torch optimizer (``fused=True`` Adam, AdamW, SGD, Adagrad) the flag stays on the device
and the optimizer skips its own update, as under ``GradScaler``: no host sync at all.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gradkit import _names, _pipeline_checks, _pipeline_state
from gradkit._pipeline_report import StepInputs
from gradkit._reduction import WindowReduction
from gradkit._skip import FLAG_SKIP_DEVICES, Skips, device_flag
from gradkit.accumulation import Window, check_num_items
from gradkit.averaging import SyncControl, sync_control_for
from gradkit.clipping.stages import ClipByGlobalNorm, ClipStage
from gradkit.context import Attached, GradContext
from gradkit.step_report import NoiseSample, StepReport
from gradkit.tracking.noise_scale import NoiseProbe

__all__ = ["FLAG_SKIP_DEVICES", "GradientPipeline", "NoiseSample", "StepReport"]


class GradientPipeline:
    """Accumulate, normalize, unscale, clip and step: the gradient path of a training loop.

    Args:
        model: an ``nn.Module`` (DDP-wrapped or not), or an iterable of parameters
            or of ``(name, parameter)`` pairs. Only parameters that require grad count.
        accumulation_steps: micro-batches per optimizer step (>= 1).
        average: cross-process averaging (``gk.Average``); None on one process or under DDP.
        clip: a norm-scaling stage or a list of them, applied in order.
        tracker: an observer of each step (``gk.Tracker``), or None. The protocol:
            ``wants(step) -> bool`` (measure the window ending at optimizer step
            `step`?), ``observe(ctx, report)`` after the clip stages and before
            ``optimizer.step`` (final gradients, weights before the update),
            ``after_step(ctx, report)`` after it, and optionally
            ``attach(module_or_None, names, params, clip=stages)`` once at setup.
        scaler: a ``torch.amp.GradScaler``: the loss is scaled in `backward`, the
            gradients unscaled exactly once at the boundary, before clipping.
        nonfinite: ``"skip"`` (default) skips the optimizer step when the gradient
            holds NaN/inf, leaving optimizer and stage state untouched and counting
            it in `skipped_steps`; ``"raise"`` raises ``FloatingPointError`` instead.
        ema: a ``gk.EMA`` (anything with ``update()``), updated after every real, not
            skipped, optimizer step. Its state is its own: save ``ema.state_dict()`` beside this one's.

    Skipping on the device:
        By default the step reads one flag on the host (is the gradient finite?, and, with
        tensor item counts, is the window's count > 0?) and does not call the optimizer on a
        non-finite step. With a fused torch optimizer (``fused=True`` Adam, AdamW, SGD or
        Adagrad) on CPU, CUDA or XPU, the flag goes to the optimizer as ``optimizer.found_inf``
        and it skips on the device: no host read, and `step` then returns True meaning "the
        optimizer was called" (``pipe.last.skipped`` is a device bool tensor). The read is
        kept where the step needs a host decision (``nonfinite="raise"``, an ``ema``, compressed
        averaging, a clip stage with state, a missing gradient, an optimizer's first step).
        docs/norm-scaling.md ("Skipping on the device") has the whole table, and how to drive an
        LR scheduler in each mode.

    Example:
        >>> pipe = gk.GradientPipeline(model, accumulation_steps=4, clip=gk.ClipByGlobalNorm(1.0))
        >>> for x, y in loader:
        ...     loss = F.cross_entropy(model(x), y, reduction="sum")
        ...     pipe.backward(loss, num_items=y.numel())
        ...     pipe.step(optimizer)
        >>> pipe.flush(optimizer)   # end of data: step on the incomplete window
    """

    def __init__(
        self,
        model: nn.Module | Iterable[nn.Parameter] | Iterable[tuple[str, nn.Parameter]],
        *,
        accumulation_steps: int = 1,
        average: Any = None,
        clip: ClipStage | Sequence[ClipStage] | None = None,
        tracker: Any = None,
        scaler: Any = None,
        nonfinite: str = "skip",
        ema: Any = None,
    ) -> None:
        self.accumulation_steps, self.clip, self.nonfinite = _pipeline_checks.arguments(
            model, accumulation_steps, clip, nonfinite, average, tracker, scaler, ema
        )
        self.names, self.params, self._frozen = _names.trainable(model)
        _pipeline_checks.ema_model(ema, self.params)
        self._check_optimizer = _pipeline_checks.OptimizerCheck(self.params)
        self.ema = ema
        self.tracker = tracker
        self.scaler = scaler
        self.sync: SyncControl = sync_control_for(model, average)
        #: names, parameters and their gradients' grouping, found once for every step's context
        self._attached = Attached(self.names, self.params)
        # One pass fewer: a global L2 clip first multiplies every gradient anyway, so the
        # window's 1/N rides along with its coefficient (see `_finish_window`).
        first = self.clip[0] if self.clip else None
        self._fold = self.sync.defers_scale and isinstance(first, ClipByGlobalNorm) and first.norm_type == 2.0
        self.window = Window()
        self.steps = 0
        # Stages without state have no history that a non-finite step could change.
        self.skips = Skips(self.names, self.params, stateless_clip=all(not stage.state_dict() for stage in self.clip))
        #: the last boundary's report, or what makes it on the first read of `last`
        self._last: StepReport | StepInputs | None = None
        #: the window's global count and scale, settled before any gradient is communicated
        self.reduction = WindowReduction(self.sync, self.params, scaler)
        # Attach last: the averager (across ranks) first, then the tracker (which writes the run's header).
        module = _names.unwrap(model)
        # An averager another pipeline still uses (a notebook cell run again rebinds it) stays attached
        # if this constructor fails: only a binding made here is undone.
        was_attached = self.sync.attached
        self.sync.attach(
            self.names,
            self.params,
            sparse=_names.sparse_gradient_names(model),
            module=module if isinstance(module, nn.Module) else None,
        )
        try:
            if tracker is not None and callable(getattr(tracker, "attach", None)):
                # The tracker's hooks go on the module as the user runs it (compiled or not), DDP unwrapped.
                module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
                module = module if isinstance(module, nn.Module) else None
                tracker.attach(module, self.names, self.params, clip=self.clip)
            #: the tracker's noise-scale measurement, taken at two moments of the windows it logs (made after
            #: the attach, which settles where the window's gradients are at the boundary)
            self.probe = NoiseProbe(
                self.names,
                self.params,
                wants=tracker.wants if tracker is not None else None,
                accumulation_steps=self.accumulation_steps,
                scaler=scaler,
                lossy=self.sync.lossy,
                local_window=self.sync.local_grads_at_boundary,
            )
            self._prepare_next_micro_step()
        except BaseException:
            # Leave nothing attached (hooks, the averager's binding), so a corrected retry can use the same one.
            if not was_attached:
                self.sync.detach()
            raise

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped for a non-finite gradient (or a count <= 0).

        Steps skipped on the device are counted there: asking reads that count (a host
        read; do it when you log, not every step)."""
        return self.skips.count

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self.skips.count = value

    @property
    def last(self) -> StepReport | None:
        """The last boundary's `StepReport` (None before the first), made on its first read and then kept.

        A step whose report nobody reads makes none of the report's tensors (the item count, the norm
        after the clip stages, the clip coefficient, a host skip decision as a tensor; on a GPU each is
        a kernel launch). The values are the step's whenever it is read: what they are made from is
        captured at the step, host values (step, micro-steps, bytes, the noise sample) included. The
        tensors are made at the first read, on the stream current then (the norms' device); with a
        tracker, which reads the report every step, at the step. Later reads return the same object,
        until the next boundary.

        Example:
            >>> if pipe.step(optimizer) and step % 100 == 0:
            ...     print(float(pipe.last.total_norm), float(pipe.last.clip_coef))
        """
        if isinstance(self._last, StepInputs):
            self._last = self._last.report()
        return self._last

    @last.setter
    def last(self, report: StepReport | None) -> None:
        self._last = report

    # -- the loop ------------------------------------------------------------------

    def backward(self, loss: Tensor, num_items: int | Tensor | None = None) -> None:
        """Backpropagate one micro-batch's loss into ``p.grad`` (no communication but on the last).

        Args:
            loss: a scalar loss; reduced with ``sum`` when `num_items` is given,
                with ``mean`` otherwise.
            num_items: how many items (tokens, samples) the summed loss covers.

        Raises:
            ValueError / TypeError: for a bad loss or `num_items`, or for mixing
                item and mean mode within a window; nothing changes then.
            Whatever the loss's backward raises (out of memory, an autograd Function):
                the window's count is left as it was, without this micro-batch; the
                gradients autograd had already added to ``p.grad`` stay there.
        """
        _pipeline_checks.backward_call(
            loss, micro_steps=self.window.micro_steps, accumulation_steps=self.accumulation_steps
        )
        if self.window.micro_steps == 0:
            _pipeline_checks.converted(self._attached)
        items = check_num_items(num_items)
        if isinstance(items, Tensor) and self.window.micro_steps == 0:
            # The first count is held until the boundary (the window's total, the noise probe, the report): a
            # copy, so that a caller refilling one count buffer for each micro-batch changes none of them. Later
            # counts are added into a new tensor at once.
            items = items.clone()
        self.window.check_mode(items)
        _pipeline_checks.frozen(self._frozen)
        self._run_backward(loss, items)
        if self.window.micro_steps == 0:
            self.probe.after_first_backward(items, step=self.steps + 1)
        self.window.add(items)
        self._prepare_next_micro_step()

    def _run_backward(self, loss: Tensor, items: int | Tensor | None) -> None:
        """``loss.backward()``; before the boundary's, the window's count and scale are settled, and undone
        if that backward raises (an out-of-memory skip loop goes on with the window as it was)."""
        boundary = self.window.micro_steps + 1 == self.accumulation_steps
        try:
            if boundary:
                # The boundary backward may start communicating: settle the window's scale first.
                total = items if self.window.items is None or items is None else self.window.items + items
                self.reduction.begin_boundary(total, self.window.micro_steps + 1)
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        except BaseException:
            if boundary:
                self.reduction.cancel()
            raise

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Step the optimizer if this micro-step ends a window.

        Returns:
            False before the boundary. On the boundary, with the host read: True when
            the optimizer stepped, False when a non-finite gradient made the step skip.
            Skipping on the device (a fused optimizer, see the class docstring): True,
            meaning the optimizer was called and may have skipped its update on the
            device; ``last.skipped`` says which, as a device tensor.

        Raises:
            RuntimeError: when no `backward` came since the last step.
            TypeError / ValueError: `optimizer` is not a torch optimizer, or holds none of the
                pipeline's parameters; nothing changes then.
        """
        self._check_optimizer(optimizer)
        if self.window.micro_steps == 0:
            raise RuntimeError("step() was called before any backward() in this window; call pipe.backward(loss) first")
        if self.window.micro_steps < self.accumulation_steps:
            return False
        return self._finish_window(optimizer)

    def flush(self, optimizer: torch.optim.Optimizer) -> bool:
        """Step on an incomplete window (end of data), normalized by what it holds.

        On one process: returns False, and does nothing, when the window is empty.
        Under several processes (``gk.Average``, DDP) every rank calls it at the end of
        its data: a rank whose window is empty joins the others' flush with no gradients
        (they count as missing, as a parameter this rank never used does), and when the
        window is empty on every rank, every rank returns False having changed nothing.
        An empty flush after a boundary in which some rank already flushed (a full last
        window on this rank, a shorter one flushed elsewhere) has nothing left to join
        and returns False without communicating.

        Returns:
            True when the optimizer stepped (see `step`), False when nothing was done.

        Example:
            >>> for x, y in loader:
            ...     pipe.backward(loss_fn(model(x), y), num_items=y.numel())
            ...     pipe.step(optimizer)
            >>> pipe.flush(optimizer)   # on every rank, whatever its last window holds
        """
        self._check_optimizer(optimizer)
        if self.window.micro_steps == 0 and not self.reduction.join_empty_flush(self.window):
            return False
        return self._finish_window(optimizer)

    # -- the boundary --------------------------------------------------------------

    @torch.no_grad()
    def _finish_window(self, optimizer: torch.optim.Optimizer) -> bool:
        """The boundary, in order; True when the optimizer was called (see `step`)."""
        _pipeline_checks.frozen(self._frozen)
        global_items, scale, count = self.reduction.settled(self.window)

        # Reduce: sum over processes, times the scale that makes it the window's mean gradient.
        self.probe.before_reduction(self.window)
        ctx = self._reduce(scale)

        # Unscale: divide the AMP loss scale out, exactly once.
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
            ctx.modified()

        # Norm and skip: a device flag the fused optimizer skips on, or the step's one host read.
        ctx, total_norm, skip, contributed = self._norm_and_skip(optimizer, ctx, global_items)
        ctx.pre_clip_norms = self.probe.pre_clip_norms(ctx)

        # Clip: the stages in order, on finite steps; with a device flag on every step (they have no
        # state, and a non-finite gradient stays non-finite for the optimizer to skip).
        clipped = bool(self.clip) and (isinstance(skip, Tensor) or not skip)
        for stage in self.clip if clipped else ():
            stage.apply_(ctx)

        # Report: what happened, captured now and made on the first read of `last`. A tracker reads it
        # every step: made here, its operations stay the step's, and it sees the final gradient and the
        # old weights.
        self._last = StepInputs(self, ctx=ctx, clipped=clipped, total_norm=total_norm, skip=skip, count=count)
        if self.tracker is not None:
            self.tracker.observe(ctx, self.last)

        # Step: the optimizer (which may skip on the device), or nothing on a skipped step.
        stepped = self.skips.step(optimizer, skip)
        if self.scaler is not None:
            self.scaler.update()  # after a skip, it lowers the scale: unscale_ recorded the inf
        self.sync.after_step(self.params, skipped=not stepped, contributed=contributed)
        if self.ema is not None and stepped:
            self.ema.update()  # after local SGD's parameter averaging, if any: the weights as the step left them
        if self.tracker is not None:
            self.tracker.after_step(ctx, self.last)
        self._end_window()
        return stepped

    def _reduce(self, scale: Tensor | float) -> GradContext:
        """Sum the gradients over processes, times `scale`, and return them as the step's context."""
        complete = self.window.micro_steps == self.accumulation_steps
        # With a global clip first, the scale is folded into the clip's multiply: every norm below
        # is |scale| x the norm of the sum (exactly what the scaled gradients give, up to rounding),
        # and one pass writes scale x coefficient. A GradScaler's unscale_ must see the scaled
        # gradients (its inf check and order), so with one enabled the scale is applied first.
        if self._fold and (self.scaler is None or not self.scaler.is_enabled()):
            pending = self.sync.reduce_sum_(self.params, scale, complete=complete)
            ctx = self._attached.context()
            ctx.defer_scale(pending)
            return ctx
        self.sync.reduce_(self.params, scale, complete=complete)
        return self._attached.context()

    def _norm_and_skip(
        self, optimizer: torch.optim.Optimizer, ctx: GradContext, global_items: int | Tensor | None
    ) -> tuple[GradContext, Tensor, bool | Tensor, bool]:
        """(the context without the gradients no process produced, its total norm, the skip decision,
        this process contributed items). The decision is a device flag when the fused optimizer can
        skip on the device (no host read), else a host bool from the step's one read."""
        total_norm = ctx.total_norm()
        if self.skips.on_device(
            optimizer, nonfinite=self.nonfinite, ema=self.ema, sync=self.sync, devices=FLAG_SKIP_DEVICES
        ):
            # Only exact syncs skip on the device: every gradient was produced, and their after_step
            # does not depend on the skip.
            return ctx, total_norm, device_flag(total_norm, global_items), True
        ctx, total_norm, skip, own = self.skips.decide_on_host(
            ctx,
            total_norm,
            global_items=global_items,
            local_items=self.window.items,
            missing=self.sync.missing_grads(),
            nonfinite=self.nonfinite,
            step=self.steps + 1,
            abandon=self._abandon_window,
        )
        # An empty window that joined another rank's flush contributed nothing.
        return ctx, total_norm, skip, own and self.window.micro_steps > 0

    def _abandon_window(self) -> None:
        # A step that raises is a skipped step for the averager: compressor state computed
        # for it (residuals, DGC's momentum) is discarded, not left pending for the next one.
        self.sync.after_step(self.params, skipped=True)
        self._end_window()

    def _end_window(self) -> None:
        for p in self.params:
            p.grad = None
        self.probe.reset()
        self.reduction.reset()
        self.window.reset()
        self.steps += 1
        self._prepare_next_micro_step()

    def _prepare_next_micro_step(self) -> None:
        self.sync.set_sync(self.window.micro_steps + 1 >= self.accumulation_steps)

    # -- state ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly, as plain tensors and numbers.

        Taken mid-window, it holds the partial (un-normalized) gradients by
        parameter name, so resuming loses nothing; it also holds the clip
        stages', the averaging's (compressor residuals, DGC momentum, PowerSGD
        factors, RandomK/QSGD draws), the scaler's and the tracker's state.
        It loads with ``torch.load(weights_only=True)``. Torch's global RNG is
        not in it (TopK's sampled threshold and unseeded QSGD draw from it):
        save ``torch.get_rng_state()`` with it for a bit-identical resume.
        Residuals differ per rank: under torch.distributed every rank saves its own.
        """
        return _pipeline_state.save(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned; all or nothing.

        Raises:
            ValueError / TypeError: for missing or unexpected keys, unknown
                parameter names or shapes, or stage states that do not fit; the
                pipeline is unchanged then.
        """
        _pipeline_state.load(self, state)
        self._prepare_next_micro_step()
