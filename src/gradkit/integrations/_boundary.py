"""The optimizer-step boundary inside someone else's training loop: clip stages, then the tracker.

Trainers (Hugging Face, Lightning, Accelerate loops) own accumulation, averaging
and loss scaling; they hand over the gradients that are about to be applied:
accumulated, averaged across processes and unscaled. From there on this runs
what `GradientPipeline` runs at its boundary, in the same order: global norm ->
clip stages -> ``tracker.observe`` -> (the trainer's ``optimizer.step``) ->
``tracker.after_step``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gradkit._scalars import on_device
from gradkit.clipping import ClipStage
from gradkit.context import Attached, GradContext, same_params
from gradkit.step_report import StepReport

__all__ = ["Boundary", "check_clip", "check_tracker", "layer_group"]


def check_clip(clip: object) -> list[ClipStage]:
    """`clip` (None, one clip stage or a list of them) as a list, or a TypeError naming it."""
    if clip is None:
        return []
    stages = list(clip) if isinstance(clip, (list, tuple)) else [clip]
    for stage in stages:
        if not isinstance(stage, ClipStage):
            raise TypeError(
                f"clip must be a gradkit clip stage or a list of them (e.g. gk.ZClip() or [gk.ClipByGlobalNorm(1.0)]), "
                f"got {type(stage).__name__} {stage!r}"
            )
    return stages


def check_tracker(tracker: object) -> Any:
    """`tracker` (None or an object with the tracker protocol), or a TypeError naming it."""
    if tracker is not None and not all(callable(getattr(tracker, m, None)) for m in ("wants", "observe", "after_step")):
        raise TypeError(
            "tracker must have wants(step), observe(ctx, report) and after_step(ctx, report), e.g. "
            "gk.Tracker('runs/x'), "
            f"got {type(tracker).__name__} {tracker!r}"
        )
    return tracker


def layer_group(module: str) -> str:
    """The layer group of a module name: up to its first numbered component ("transformer.h.3.attn" ->
    "transformer.h.3"), else its first component ("lm_head" -> "lm_head")."""
    parts = module.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return parts[0]


class Boundary:
    """Clip stages and a tracker run at each optimizer step of a foreign training loop.

    Args:
        tracker: a ``gk.Tracker`` (or any object with its protocol), or None.
        clip: a gradkit clip stage or a list of them, or None.

    Raises:
        TypeError: for a tracker or clip stage of the wrong kind (before any state is set).

    Example:
        >>> boundary = Boundary(gk.Tracker("runs/x"), gk.ZClip())
        >>> boundary.attach(model)
        >>> report = boundary.before_step(step=1, micro_steps=2, items=2)   # gradients final, unscaled
        >>> optimizer.step(); boundary.after_step()
    """

    def __init__(self, tracker: Any = None, clip: Any = None) -> None:
        self.clip = check_clip(clip)
        self.tracker = check_tracker(tracker)
        # Each stage's state as given: other parameters start their clip stages from it (no other sum's history).
        self._initial = [copy.deepcopy(stage.state_dict()) for stage in self.clip]
        self._attached: Attached | None = None  # the parameters, with what each step's context needs found once
        self.last: StepReport | None = None
        self._ctx: GradContext | None = None
        self._logged: tuple = (None, None)  # (step, time) of the record last turned into trainer log scalars

    @property
    def names(self) -> list[str]:
        """The names of the trainable parameters attached (empty before `attach`)."""
        return self._attached.names if self._attached is not None else []

    @property
    def params(self) -> list[Tensor]:
        """The trainable parameters attached (empty before `attach`)."""
        return self._attached.params if self._attached is not None else []

    def attach(self, module: nn.Module) -> None:
        """Learn the trainable parameters of `module` (its unwrapped form) and attach the tracker.

        Attached to other parameters than before (a new model, e.g. a hyperparameter search's next trial, or the
        same model with a layer frozen or unfrozen: `context.same_params`), the clip stages go back to their state
        when this boundary was built, since the norms they followed were of another sum; the same parameters
        again (a second ``fit`` or ``train()`` of the same model) keep it. The tracker is attached every time: it
        writes a new run header and numbers steps from 1 again, as the trainer does.
        """
        if not isinstance(module, nn.Module):
            raise TypeError(f"the model must be an nn.Module, got {type(module).__name__}")
        while isinstance(getattr(module, "module", None), nn.Module) and isinstance(
            module, (nn.parallel.DistributedDataParallel, nn.DataParallel)
        ):
            module = module.module
        pairs = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        names, params = [n for n, _ in pairs], [p for _, p in pairs]
        if self._attached is not None and not same_params(self.names, self.params, names, params):
            for stage, state in zip(self.clip, self._initial):  # the stages' history is of another sum of norms
                stage.load_state_dict(copy.deepcopy(state))
        # Made anew on every attach (once a training): the same parameters may have moved to another device
        # or dtype since the last one (``model.double()``, a trainer's ``.cpu()``), and the grouping with them.
        self._attached = Attached(names, params)
        if self.tracker is not None and callable(getattr(self.tracker, "attach", None)):
            self.tracker.attach(module, self.names, self.params, clip=self.clip)

    @torch.no_grad()
    def before_step(
        self, *, step: int, micro_steps: int, items: int, pre_clip: Callable[[], None] | None = None
    ) -> StepReport:
        """Norm, clip stages and ``tracker.observe`` on the gradients about to be applied.

        Args:
            step: the optimizer step about to happen (1-based).
            micro_steps: backward calls in the window.
            items: what the window averaged over (micro-batches x processes in mean mode).
            pre_clip: runs after the pre-clip norm is taken and before the stages (a trainer's own
                clipping that the caller took over, so that the tracker sees the gradient before it).

        Returns:
            The step's report (tensors; no host read here).
        """
        if self._attached is None or not self.params:
            raise RuntimeError("the boundary is not attached to a model; call attach(model) before the first step")
        ctx = self._attached.context()  # type: ignore[union-attr]
        total = ctx.total_norm()
        ctx.pre_clip_norms = ctx.norms() if len(ctx) else None  # stages replace, never mutate, the cache
        if pre_clip is not None:
            pre_clip()
            ctx.modified()
        for stage in self.clip:
            stage.apply_(ctx)
        norm_after = ctx.total_norm() if (self.clip or pre_clip is not None) else total
        self.last = StepReport(
            step=step,
            micro_steps=micro_steps,
            items=on_device(items, total.device),  # no copy of a Python number to the GPU (it would wait)
            total_norm=total,
            norm_after=norm_after,
            clip_coef=torch.where(total > 0, norm_after / total, torch.ones_like(total)),
            # The trainer applies the step whatever the gradient holds; a non-finite norm is
            # still counted as a skipped-worthy step by the tracker (its alerts name the layer).
            skipped=~torch.isfinite(total),
        )
        if self.tracker is not None:
            self.tracker.observe(ctx, self.last)
        self._ctx = ctx
        return self.last

    def after_step(self) -> None:
        """``tracker.after_step`` once the trainer's optimizer has stepped (completes ||Δw||/||w||)."""
        ctx, self._ctx = self._ctx, None
        if ctx is not None and self.tracker is not None:
            self.tracker.after_step(ctx, self.last)

    def new_scalars(self, prefix: str = "gradkit/") -> dict[str, float]:
        """Scalars of the tracker records logged since the last call (the latest one wins): the
        pre-clip gradient norm per layer group, the clip rate and the alert count."""
        history: Sequence[dict] = getattr(self.tracker, "history", None) or []
        # The newest record, told by its step and time (a history kept to its last N records stays N long,
        # and a second training numbers its steps from 1 again).
        record = history[-1] if history else None
        if record is None or (record.get("step"), record.get("time")) == self._logged:
            return {}
        self._logged = (record.get("step"), record.get("time"))
        groups: dict[str, float] = {}
        for module, entry in record.get("modules", {}).items():
            norm = entry.get("norm_pre_clip")
            if norm is not None:
                key = layer_group(module)
                groups[key] = groups.get(key, 0.0) + norm**2
        scalars = {f"{prefix}grad_norm/{key}": math.sqrt(sq) for key, sq in groups.items()}
        scalars[f"{prefix}grad_norm"] = record["global"]["norm_pre_clip"]
        scalars[f"{prefix}clip_rate"] = record["global"]["clip_rate"]
        scalars[f"{prefix}alerts"] = float(len(record.get("alerts", [])))
        return scalars

    def close(self) -> None:
        """Flush and close the tracker's log (if it has a ``close``)."""
        self.after_step()
        if self.tracker is not None and callable(getattr(self.tracker, "close", None)):
            self.tracker.close()
