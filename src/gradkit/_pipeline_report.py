"""The report of one boundary (``pipe.last``), assembled from the step's tensors without a host read.

The boundary knows the norms before and after the clip stages, the skip decision (a host
bool, or a device flag when the optimizer skips on the device) and the window's global
count; the pipeline's sync knows the bytes it sent, and its noise probe the window's sample.
`step_report` puts them into one `StepReport`, every value a tensor on the norm's device.
What only the report needs (the count and a host decision as tensors, the norm after the
stages, the clip coefficient) is left to its first read (`Later`): a step whose report
nobody reads makes none of those operations. With a tracker, which reads them every step,
they are made at once.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch
from torch import Tensor

from gradkit._scalars import on_device
from gradkit.context import GradContext
from gradkit.step_report import Later, StepReport

__all__ = ["norm_after", "step_report"]


def norm_after(ctx: GradContext) -> Tensor | Later:
    """The global norm of `ctx`'s gradients as the clip stages left them, computed when first read.

    The same operation as ``ctx.total_norm()``, on the per-parameter norms the stages left
    (they replace the context's cache, never change it in place), so reading it later
    gives what reading it now would.

    Example:
        >>> after = norm_after(ctx)   # after the clip stages ran on ctx
    """
    if not len(ctx):
        return ctx.total_norm()
    return Later(torch.linalg.vector_norm, ctx.norms())


def step_report(
    pipe: Any, *, total_norm: Tensor, norm_after: Tensor | Later, skip: bool | Tensor, count: int | Tensor
) -> StepReport:
    """The `StepReport` of the boundary that `pipe` (a `GradientPipeline`) is finishing.

    Args:
        pipe: the pipeline, its window not yet reset (its step count, micro-steps, sync and noise probe).
        total_norm: the gradient's global norm before the clip stages.
        norm_after: the global norm after them (`total_norm` when none ran), or its `Later`.
        skip: the skip decision, a host bool or a device bool tensor.
        count: the window's global count (items, or micro-steps in mean mode).

    Returns:
        The report, built without a host read.

    Example:
        >>> pipe.last = step_report(pipe, total_norm=norm, norm_after=norm, skip=False, count=32)
    """
    device = total_norm.device
    # A tensor count is moved at once (it may be the caller's own num_items tensor).
    items = Later(on_device, count, device) if not isinstance(count, Tensor) else on_device(count, device)
    report = StepReport(
        step=pipe.steps + 1,
        micro_steps=pipe.window.micro_steps,
        items=items,
        total_norm=total_norm,
        norm_after=norm_after,
        clip_coef=Later(_clip_coef, total_norm, norm_after),
        skipped=skip if isinstance(skip, Tensor) else Later(torch.tensor, skip),
        bytes_sent=pipe.sync.bytes_sent(),
        dense_bytes=pipe.sync.dense_bytes(),
        # Without a tracker no window is measured: no sample to take (and no item count to make for it).
        noise=None if pipe.probe.wants is None else pipe.probe.sample(total_norm, _value(items)),
    )
    if pipe.tracker is not None:
        # A tracker reads the clip coefficient and the skip flag every step: made here, they stay
        # the step's work, not the tracker's (the same operations either way).
        for field in fields(report):
            getattr(report, field.name)
    return report


def _clip_coef(total_norm: Tensor, norm_after: Tensor) -> Tensor:
    # norm_after / total_norm, and 1 where nothing was measured (a zero norm).
    return torch.where(total_norm > 0, norm_after / total_norm, torch.ones_like(total_norm))


def _value(value: Tensor | Later) -> Tensor:
    return value.value() if isinstance(value, Later) else value
