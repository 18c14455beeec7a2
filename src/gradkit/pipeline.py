"""GradientPipeline: everything between ``loss.backward()`` and ``optimizer.step()``, in order.

One optimizer step::

    micro-batch 1..K:  backward(loss, num_items)       grads sum in p.grad; DDP syncs only on the last
    boundary:          normalize by items or micro-batches
                       unscale (GradScaler), exactly once
                       global norm -> finite?           the one host read of the step
                       clip stages (finite steps only)  -> optimizer.step -> report -> zero grads
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gradkit import _checks, _names
from gradkit.accumulation import Window, check_num_items
from gradkit.averaging import SyncControl, sync_control_for
from gradkit.clipping.stages import ClipStage
from gradkit.context import GradContext

__all__ = ["GradientPipeline", "NoiseSample", "StepReport"]


@dataclass
class NoiseSample:
    """Squared norms of one gradient at two batch sizes, for the gradient noise scale
    (McCandlish et al. 2018). Batch sizes are in items, or in micro-batches in mean mode."""

    small_sq: Tensor
    small_batch: Tensor
    big_sq: Tensor
    big_batch: Tensor


@dataclass
class StepReport:
    """What happened at one optimizer step; values are tensors, read them when you log.

    Attributes:
        step: optimizer steps finished so far, skipped ones included.
        micro_steps: backward calls in the window.
        items: items in the window summed over processes (micro-batches × processes in mean mode).
        total_norm: global L2 norm of the normalized, unscaled gradient before clipping.
        norm_after: global L2 norm after the clip stages (equal to `total_norm` without stages).
        clip_coef: norm_after / total_norm (1 when nothing was clipped).
        skipped: True when the step was skipped for a non-finite gradient.
        bytes_sent: payload bytes this process sent to average the window (0 on one process).
        dense_bytes: what the same gradients take uncompressed; ``dense_bytes / bytes_sent``
            is the compression ratio.
        noise: gradient norms at two batch sizes, on windows the tracker measures (else None).
    """

    step: int
    micro_steps: int
    items: Tensor
    total_norm: Tensor
    norm_after: Tensor
    clip_coef: Tensor
    skipped: Tensor
    bytes_sent: int = 0
    dense_bytes: int = 0
    noise: NoiseSample | None = None


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

    The step reads one flag on the host (whether the gradient is finite): skipping
    an optimizer step cannot be decided on the device. Nothing else syncs.

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
    ) -> None:
        self.accumulation_steps = _checks.positive_int(
            "accumulation_steps", accumulation_steps, "pass how many micro-batches make one optimizer step, e.g. 4"
        )
        self.clip = _check_stages(clip)
        self.nonfinite = _checks.choice("nonfinite", nonfinite, ("skip", "raise"))
        if average is not None and not isinstance(average, SyncControl):
            raise TypeError(f"average must be gk.Average(...) or gk.ModelAverager(...), got {type(average).__name__}")
        if average is not None and isinstance(model, nn.parallel.DistributedDataParallel):
            raise ValueError(
                "the model is wrapped in DistributedDataParallel, which already averages gradients; "
                "pass average=None to let DDP do it, or pass the unwrapped module to average with gradkit"
            )
        if tracker is not None and not all(callable(getattr(tracker, m, None)) for m in ("wants", "observe", "after_step")):
            raise TypeError(f"tracker must have wants(step), observe(ctx, report) and after_step(ctx, report) (e.g. gk.Tracker), got {type(tracker).__name__}")
        if scaler is not None and not all(callable(getattr(scaler, m, None)) for m in ("scale", "unscale_", "step", "update")):
            raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        self.names, self.params, self._frozen = _named_parameters(model)
        self.tracker = tracker
        self.scaler = scaler
        self.sync: SyncControl = sync_control_for(model, average)
        module = _names.unwrap(model)
        self.sync.attach(self.names, self.params, sparse=_sparse_gradient_names(model), module=module if isinstance(module, nn.Module) else None)
        if tracker is not None and callable(getattr(tracker, "attach", None)):
            module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
            tracker.attach(module if isinstance(module, nn.Module) else None, self.names, self.params, clip=self.clip)
        self.window = Window()
        self.steps = 0
        self.skipped_steps = 0
        self.last: StepReport | None = None
        self._measure = False  # whether the tracker measures this window (noise-scale inputs)
        self._small: tuple[Tensor, Tensor] | None = None
        # (global items or None in mean mode, scale, the window's global count for the report)
        self._reduction: tuple[int | Tensor | None, Tensor | float, int | Tensor] | None = None
        self._prepare_next_micro_step()

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
        """
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise TypeError(f"loss must be a scalar tensor, got {shape}; reduce it with .sum() or .mean() first")
        if not loss.requires_grad:
            raise ValueError(
                "loss does not require grad (computed under torch.no_grad(), or from frozen parameters); nothing to backpropagate: "
                "pass a loss computed with grad enabled from the parameters being trained"
            )
        if self.window.micro_steps >= self.accumulation_steps:
            raise RuntimeError(
                f"backward() was called {self.window.micro_steps + 1} times in a window of "
                f"accumulation_steps={self.accumulation_steps}; call pipe.step(optimizer) after each backward()"
            )
        items = check_num_items(num_items)
        self.window.check_mode(items)
        self._check_frozen()
        if self.window.micro_steps + 1 == self.accumulation_steps:
            # The boundary backward may start communicating: settle the window's scale first.
            total = (items if self.window.items is None else self.window.items + items) if items is not None else None
            self._begin_reduction(total, self.window.micro_steps + 1, complete=True)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        if self.window.micro_steps == 0:
            self._measure = self.tracker is not None and bool(self.tracker.wants(self.steps + 1))
            if self._measure and self.accumulation_steps > 1:
                # The first micro-batch alone is the small batch; only on measured windows.
                count = _batch(items if items is not None else 1)
                sq = self._local_norms()[1].square().sum()
                # A summed loss's gradient is count x the mean; a mean loss's already is the mean.
                self._small = (sq / count.to(sq) ** 2 if items is not None else sq, count)
        self.window.add(items)
        self._prepare_next_micro_step()

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Step the optimizer if this micro-step ends a window.

        Returns:
            True when the optimizer stepped; False before the boundary or when a
            non-finite gradient made the step skip (see `last`).

        Raises:
            RuntimeError: when no `backward` came since the last step.
        """
        _check_optimizer(optimizer)
        if self.window.micro_steps == 0:
            raise RuntimeError("step() was called before any backward() in this window; call pipe.backward(loss) first")
        if self.window.micro_steps < self.accumulation_steps:
            return False
        return self._finish_window(optimizer)

    def flush(self, optimizer: torch.optim.Optimizer) -> bool:
        """Step on an incomplete window (end of data), normalized by what it holds.

        Returns False, and does nothing, when the window is empty.
        """
        _check_optimizer(optimizer)
        if self.window.micro_steps == 0:
            return False
        return self._finish_window(optimizer)

    # -- the boundary --------------------------------------------------------------

    def _begin_reduction(self, local_items: int | Tensor | None, micro_steps: int, *, complete: bool) -> None:
        if local_items is not None:
            global_items = count = self.sync.global_items(local_items)
            scale = Window.scale_for(global_items, micro_steps, self.sync.world_size)
        else:
            # Mean mode: one divisor for every rank, the micro-steps of all ranks' windows,
            # also when their last windows differ in length.
            global_items, count = None, self.sync.global_micro_steps(micro_steps, complete=complete)
            scale = 1.0 / count.to(torch.float64) if isinstance(count, Tensor) else 1.0 / count
        loss_scale = None
        if self.sync.lossy and self.scaler is not None and self.scaler.is_enabled():
            # Only compression needs it. The scale as a device tensor, read without a host
            # sync (and created on the parameters' device if this is the scaler's first use).
            loss_scale = self.scaler.scale(torch.ones((), device=self.params[0].device))
        self.sync.begin_reduction(local_items if local_items is not None else micro_steps, scale, loss_scale)
        self._reduction = (global_items, scale, count)

    @torch.no_grad()
    def _finish_window(self, optimizer: torch.optim.Optimizer) -> bool:
        self._check_frozen()
        if self._reduction is None:  # a flushed window: its last backward was not the boundary
            self._begin_reduction(self.window.items, self.window.micro_steps, complete=False)
        global_items, scale, count = self._reduction
        local = self._measure_local_window() if self._measure and self.sync.local_grads_at_boundary else None
        complete = self.window.micro_steps == self.accumulation_steps
        self.sync.reduce_(self.params, scale, complete=complete)
        ctx = GradContext(self.names, self.params)
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
            ctx.modified()
        total_norm = ctx.total_norm()
        skip, contributed, unused = self._must_skip(total_norm, global_items, self.sync.missing_grads())
        if unused:
            # No rank produced these gradients in the window: None, as DDP leaves them (zeros
            # would move them under weight decay). Zeros add nothing to the norm above.
            for position in unused:
                self.params[position].grad = None
            ctx = GradContext(self.names, self.params)
        ctx.pre_clip_norms = ctx.norms() if len(ctx) else None  # stages replace, never mutate, the cache
        if local is not None and self.sync.lossy and len(ctx):
            # Compressed averaging zeroes most entries: layer statistics and alerts should
            # judge this rank's dense gradient, so the tracker gets its norms.
            by_name = dict(zip(*local[:2]))
            ctx.pre_clip_norms = torch.stack([by_name.get(n, torch.zeros_like(local[1][0])) for n in ctx.names]).to(ctx.norms())
        if skip and self.nonfinite == "raise":
            self.skipped_steps += 1
            self._abandon_window()
            raise FloatingPointError(
                f"non-finite gradient at step {self.steps}, first in parameter {_first_nonfinite(ctx)!r}; "
                'pass nonfinite="skip" to skip such steps instead'
            )
        if not skip:
            for stage in self.clip:
                stage.apply_(ctx)
        norm_after = total_norm if skip or not self.clip else ctx.total_norm()
        items = torch.as_tensor(count, device=total_norm.device)
        self.last = StepReport(
            step=self.steps + 1,
            micro_steps=self.window.micro_steps,
            items=items,
            total_norm=total_norm,
            norm_after=norm_after,
            clip_coef=torch.where(total_norm > 0, norm_after / total_norm, torch.ones_like(total_norm)),
            skipped=torch.tensor(skip),
            bytes_sent=self.sync.bytes_sent(),
            dense_bytes=self.sync.dense_bytes(),
            noise=self._noise_sample(local, total_norm, items),
        )
        if self.tracker is not None:
            self.tracker.observe(ctx, self.last)
        if skip:
            self.skipped_steps += 1
            if self.scaler is not None:
                self.scaler.update()  # lowers the scale: unscale_ recorded the inf
        elif self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        self.sync.after_step(self.params, skipped=skip, contributed=contributed)
        if self.tracker is not None:
            self.tracker.after_step(ctx, self.last)
        self._end_window()
        return not skip

    def _local_norms(self) -> tuple[list[str], Tensor]:
        """Names and L2 norms of this rank's gradients as they are now (loss scale divided out)."""
        ctx = GradContext(self.names, self.params)
        norms = ctx.norms().double() if len(ctx) else torch.zeros(0, dtype=torch.float64)
        if self.scaler is not None and self.scaler.is_enabled():
            norms = norms / self.scaler._get_scale_async().double().to(norms.device)
        return ctx.names, norms

    def _measure_local_window(self) -> tuple[list[str], Tensor, Tensor]:
        """This rank's window gradient before averaging: names, per-parameter norms of its
        mean, and its batch (items, or micro-steps in mean mode)."""
        names, norms = self._local_norms()
        count = _batch(self.window.items if self.window.item_mode else self.window.micro_steps).to(norms.device)
        return names, norms / count, count

    def _noise_sample(self, local: tuple[list[str], Tensor, Tensor] | None, total_norm: Tensor, items: Tensor) -> NoiseSample | None:
        """Two batch sizes of one gradient: the first micro-batch or this rank's window (small),
        and the averaged window (big) unless compression made it lossy, then this rank's window."""
        small, big = self._small, (total_norm.double() ** 2, items.double())
        if local is not None:
            local_sq = (local[1].square().sum(), local[2])
            if self.sync.lossy:
                big = local_sq
            elif small is None:
                small = local_sq
        if small is None or (local is not None and self.sync.lossy and self._small is None):
            return None
        device = small[0].device
        return NoiseSample(small[0], small[1].to(device), big[0].to(device), big[1].to(device))

    def _must_skip(
        self, total_norm: Tensor, global_items: int | Tensor | None, missing: tuple[list[int], Tensor] | None
    ) -> tuple[bool, bool, list[int]]:
        """(skip the step, this process had items in the window, positions of parameters no
        process had a gradient for)."""
        # The one host read of the step: the optimizer cannot skip on a device flag, and
        # leaving a gradient None is a host decision. Tensor item counts ride along.
        device = total_norm.device
        local_items = self.window.items
        flags = [torch.isfinite(total_norm).reshape(1)]
        if isinstance(global_items, Tensor):
            flags.append((global_items.to(device) > 0).reshape(1))
        if isinstance(local_items, Tensor):
            flags.append((local_items.to(device) > 0).reshape(1))
        if missing is not None:
            flags.append(missing[1].to(device).reshape(-1) == 0)
        read = torch.cat(flags).tolist()
        finite = read.pop(0)
        if isinstance(global_items, Tensor) and not read.pop(0):
            self._abandon_window()
            raise ValueError(
                f"the window's num_items add up to {int(global_items)} (must be > 0); "
                "pass the count of items each summed loss covers"
            )
        own = bool(read.pop(0)) if isinstance(local_items, Tensor) else local_items is None or local_items > 0
        unused = [position for position, none in zip(missing[0], read) if none] if missing is not None else []
        return not finite, own, unused

    def _check_frozen(self) -> None:
        """Refuse a parameter that was frozen when the pipeline was built and trains now: its
        gradient would reach the optimizer unaveraged, unnormalized and never reset."""
        for name, p in self._frozen:
            if p.requires_grad:
                raise RuntimeError(
                    f"parameter {name!r} did not require grad when the GradientPipeline was built but requires it now; "
                    "build a new GradientPipeline (and a new gk.Average) after unfreezing parameters, "
                    "or freeze it again with requires_grad_(False)"
                )

    def _abandon_window(self) -> None:
        # A step that raises is a skipped step for the averager: compressor state computed
        # for it (residuals, DGC's momentum) is discarded, not left pending for the next one.
        self.sync.after_step(self.params, skipped=True)
        self._end_window()

    def _end_window(self) -> None:
        for p in self.params:
            p.grad = None
        self._measure, self._small, self._reduction = False, None, None
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
        items = self.window.items
        return {
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "micro_steps": self.window.micro_steps,
            "items": items.clone() if isinstance(items, Tensor) else items,
            "grads": {n: p.grad.detach().clone() for n, p in zip(self.names, self.params) if p.grad is not None}
            if self.window.micro_steps
            else {},
            "clip": [stage.state_dict() for stage in self.clip],
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "average": self.sync.state_dict(),
            "tracker": self.tracker.state_dict() if callable(getattr(self.tracker, "state_dict", None)) else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned; all or nothing.

        Raises:
            ValueError / TypeError: for missing or unexpected keys, unknown
                parameter names or shapes, or stage states that do not fit; the
                pipeline is unchanged then.
        """
        _checks.state_keys("GradientPipeline", state, {"steps", "skipped_steps", "micro_steps", "items", "grads", "clip", "scaler", "average", "tracker"})
        # Every value is checked before anything is loaded: a bad one changes nothing.
        steps = _checks.non_negative_int("steps", state["steps"], "pass the state from GradientPipeline.state_dict()")
        skipped_steps = _checks.non_negative_int("skipped_steps", state["skipped_steps"], "pass the state from GradientPipeline.state_dict()")
        grads = self._checked_grads(state["grads"])
        if not isinstance(state["clip"], list) or len(state["clip"]) != len(self.clip):
            raise ValueError(
                f"GradientPipeline.load_state_dict: the state has {len(state['clip']) if isinstance(state['clip'], list) else state['clip']!r} "
                f"clip stage states, this pipeline has {len(self.clip)} stages; build the pipeline with the same clip stages"
            )
        micro_steps = _checks.non_negative_int("micro_steps", state["micro_steps"], "pass the state from GradientPipeline.state_dict()")
        if micro_steps >= self.accumulation_steps:
            raise ValueError(f"micro_steps={micro_steps} does not fit accumulation_steps={self.accumulation_steps}; build the pipeline with the accumulation_steps it was saved with")
        items = state["items"]
        if not (items is None or isinstance(items, Tensor) or (isinstance(items, int) and not isinstance(items, bool))):
            raise TypeError(f"GradientPipeline.load_state_dict: 'items' must be None, an int or a tensor, got {type(items).__name__}")
        if items is not None:
            try:
                items = check_num_items(items)
            except (TypeError, ValueError) as error:
                raise type(error)(f"GradientPipeline.load_state_dict: 'items': {error}") from None
        parts = list(zip(self.clip, state["clip"])) + [(self.sync, state["average"])]
        if self.scaler is not None and state["scaler"] is not None:
            parts.append((self.scaler, state["scaler"]))
        if state["tracker"] is not None and callable(getattr(self.tracker, "load_state_dict", None)):
            parts.append((self.tracker, state["tracker"]))
        _load_all_or_nothing(parts)
        self.steps = steps
        self.skipped_steps = skipped_steps
        self.window.micro_steps = micro_steps
        self.window.items = items
        by_name = dict(zip(self.names, self.params))
        for p in self.params:
            p.grad = None
        for name, grad in grads.items():
            by_name[name].grad = grad.to(by_name[name]).clone()
        self._prepare_next_micro_step()

    def _checked_grads(self, grads: object) -> dict[str, Tensor]:
        if not isinstance(grads, dict):
            raise TypeError(f"GradientPipeline.load_state_dict: 'grads' must be a dict of tensors, got {type(grads).__name__}")
        shapes = {n: p.shape for n, p in zip(self.names, self.params)}
        for name, grad in grads.items():
            if name not in shapes:
                raise ValueError(f"GradientPipeline.load_state_dict: the state has a gradient for unknown parameter {name!r}; load it into the model it was saved from")
            if not isinstance(grad, Tensor) or grad.shape != shapes[name]:
                got = tuple(grad.shape) if isinstance(grad, Tensor) else type(grad).__name__
                raise ValueError(f"GradientPipeline.load_state_dict: gradient {name!r} has shape {got}, the parameter has {tuple(shapes[name])}")
        return grads


def _sparse_gradient_names(model: object) -> set[str]:
    """Names of parameters whose gradients are sparse (embeddings built with sparse=True)."""
    model = _names.unwrap(model)
    if not isinstance(model, nn.Module):
        return set()
    return {
        _names.bare_name(f"{prefix}.weight") if prefix else "weight"
        for prefix, module in model.named_modules()
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.sparse
    }


def _load_all_or_nothing(parts: list[tuple[Any, dict[str, Any]]]) -> None:
    """Load each (object, state) pair; if one fails, put every object back as it was."""
    before = [obj.state_dict() for obj, _ in parts]
    try:
        for obj, obj_state in parts:
            obj.load_state_dict(obj_state)
    except Exception:
        for (obj, _), obj_state in zip(parts, before):
            obj.load_state_dict(obj_state)
        raise


def _named_parameters(model: object) -> tuple[list[str], list[nn.Parameter], list[tuple[str, nn.Parameter]]]:
    """Names and parameters that require grad, and the (name, parameter) pairs that do not;
    DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes are dropped so that state saved
    with and without them is interchangeable."""
    model = _names.unwrap(model)
    if isinstance(model, nn.Module):
        pairs = _names.named_parameters(model)
    elif isinstance(model, Tensor):
        raise TypeError("model must be an nn.Module or an iterable of parameters, got a single tensor; wrap it in a list: [param]")
    else:
        try:
            items = list(model)  # type: ignore[call-overload]
        except TypeError:
            raise TypeError(f"model must be an nn.Module or an iterable of parameters, got {type(model).__name__}") from None
        pairs = [item if isinstance(item, tuple) else (str(i), item) for i, item in enumerate(items)]
    for name, p in pairs:
        if not isinstance(p, Tensor):
            raise TypeError(f"parameter {name!r} is a {type(p).__name__}, not a tensor; pass model.parameters() or model.named_parameters()")
    frozen = [(name, p) for name, p in pairs if not p.requires_grad]
    pairs = [(name, p) for name, p in pairs if p.requires_grad]
    if not pairs:
        raise ValueError("the model has no parameters that require grad; pass the module being trained (or unfreeze some parameters)")
    return [name for name, _ in pairs], [p for _, p in pairs], frozen


def _check_optimizer(optimizer: object) -> None:
    # Checked before the boundary touches any gradient: a wrong argument changes nothing.
    if not callable(getattr(optimizer, "step", None)) or not hasattr(optimizer, "param_groups"):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}; pass the optimizer of the model: pipe.step(optimizer)")


def _check_stages(clip: object) -> list[ClipStage]:
    stages = [] if clip is None else [clip] if isinstance(clip, ClipStage) else clip
    if not isinstance(stages, (list, tuple)) or not all(isinstance(s, ClipStage) for s in stages):
        raise TypeError(f"clip must be a clipping stage (e.g. gk.ClipByGlobalNorm(1.0)) or a list of them, got {clip!r}")
    return list(stages)


def _batch(count: int | Tensor) -> Tensor:
    return torch.as_tensor(count, dtype=torch.float64)


def _first_nonfinite(ctx: GradContext) -> str:
    # Only on the error path: reads each gradient's finiteness on the host.
    for name, grad in zip(ctx.names, ctx.grads):
        if not bool(torch.isfinite(grad).all()):
            return name
    return "<none: the norm overflowed>"
