"""The report of one boundary (``pipe.last``), captured at the step and made on its first read.

The boundary knows the norms before and after the clip stages, the skip decision (a host
bool, or a device flag when the optimizer skips on the device) and the window's global
count; the pipeline's sync knows the bytes it sent, and its noise probe the window's sample.
`StepInputs` captures them at the step, without a host read and without making a tensor
the report alone needs (the count and a host decision as tensors, the norm after the clip
stages, the clip coefficient); `StepInputs.report` makes those and returns the `StepReport`,
every value a tensor on the norm's device. A step whose report nobody reads makes none of
those operations; with a tracker, which reads the report every step, it is made at the step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gradkit._scalars import on_device
from gradkit.context import GradContext
from gradkit.step_report import StepReport

__all__ = ["StepInputs"]


class StepInputs:
    """What one boundary's `StepReport` is made of, captured at the step; `report` makes the report.

    Host values (the step, the micro-steps, the bytes sent and the noise sample) are taken here.
    The tensors kept are ones nobody changes afterwards: the norm before the clip stages, the
    per-parameter norms the stages left (they replace the context's cache, never change it in
    place; the gradients themselves may change, e.g. an optimizer that adds weight decay into
    ``p.grad``) and the count (the window's own: a caller's ``num_items`` tensor is copied as it comes in).
    So a report made later holds what one made at the step would.

    Args:
        pipe: the `GradientPipeline`, its window not yet reset (its step count, micro-steps,
            sync and noise probe).
        ctx: the step's context, after the clip stages.
        clipped: whether the clip stages ran.
        total_norm: the gradient's global norm before the clip stages.
        skip: the skip decision, a host bool or a device bool tensor.
        count: the window's global count (items, or micro-steps in mean mode).

    Example:
        >>> inputs = StepInputs(pipe, ctx=ctx, clipped=True, total_norm=norm, skip=False, count=32)
        >>> inputs.report().clip_coef
    """

    __slots__ = ("step", "micro_steps", "total_norm", "norms_after", "skip", "count", "items", "sent", "noise")

    def __init__(
        self,
        pipe: Any,
        *,
        ctx: GradContext,
        clipped: bool,
        total_norm: Tensor,
        skip: bool | Tensor,
        count: int | Tensor,
    ) -> None:
        self.step: int = pipe.steps + 1
        self.micro_steps: int = pipe.window.micro_steps
        self.total_norm = total_norm
        #: the per-parameter norms as the stages left them (None: no stage ran, or no gradient)
        self.norms_after: Tensor | None = ctx.norms() if clipped and len(ctx) else None
        self.skip = skip
        self.count = count
        self.items: Tensor | None = None
        self.sent: tuple[int, int] = (pipe.sync.bytes_sent(), pipe.sync.dense_bytes())
        self.noise = None
        if pipe.probe.wants is not None:  # with a tracker: its sample is taken at the step, from the count
            self.noise = pipe.probe.sample(total_norm, self._items())

    def _items(self) -> Tensor:
        if self.items is None:
            self.items = on_device(self.count, self.total_norm.device)
        return self.items

    def report(self) -> StepReport:
        """The step's `StepReport`, its tensors made now (on the norm's device, without a host read)."""
        total_norm, device = self.total_norm, self.total_norm.device
        # As the step's own work: no autograd, and plain tensors even under an inference-mode read.
        with torch.inference_mode(False), torch.no_grad():
            norm_after = total_norm if self.norms_after is None else torch.linalg.vector_norm(self.norms_after)
            skip = self.skip
            return StepReport(
                step=self.step,
                micro_steps=self.micro_steps,
                items=self._items(),
                total_norm=total_norm,
                norm_after=norm_after,
                # 1 where nothing was measured (a zero norm).
                clip_coef=torch.where(total_norm > 0, norm_after / total_norm, torch.ones_like(total_norm)),
                skipped=skip if isinstance(skip, Tensor) else torch.full((), skip, dtype=torch.bool, device=device),
                bytes_sent=self.sent[0],
                dense_bytes=self.sent[1],
                noise=self.noise,
            )
