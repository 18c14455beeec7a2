"""The report of one boundary (``pipe.last``), assembled from the step's tensors without a host read.

The boundary knows the norms before and after the clip stages, the skip decision (a host
bool, or a device flag when the optimizer skips on the device) and the window's global
count; the pipeline's sync knows the bytes it sent, and its noise probe the window's sample.
`step_report` puts them into one `StepReport`, every value a tensor on the norm's device.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gradkit._scalars import on_device
from gradkit.step_report import StepReport

__all__ = ["step_report"]


def step_report(
    pipe: Any, *, total_norm: Tensor, norm_after: Tensor, skip: bool | Tensor, count: int | Tensor
) -> StepReport:
    """The `StepReport` of the boundary that `pipe` (a `GradientPipeline`) is finishing.

    Args:
        pipe: the pipeline, its window not yet reset (its step count, micro-steps, sync and noise probe).
        total_norm: the gradient's global norm before the clip stages.
        norm_after: the global norm after them (`total_norm` when none ran).
        skip: the skip decision, a host bool or a device bool tensor.
        count: the window's global count (items, or micro-steps in mean mode).

    Returns:
        The report, built without a host read.

    Example:
        >>> pipe.last = step_report(pipe, total_norm=norm, norm_after=norm, skip=False, count=32)
    """
    items = on_device(count, total_norm.device)
    return StepReport(
        step=pipe.steps + 1,
        micro_steps=pipe.window.micro_steps,
        items=items,
        total_norm=total_norm,
        norm_after=norm_after,
        clip_coef=torch.where(total_norm > 0, norm_after / total_norm, torch.ones_like(total_norm)),
        skipped=skip if isinstance(skip, Tensor) else torch.tensor(skip),
        bytes_sent=pipe.sync.bytes_sent(),
        dense_bytes=pipe.sync.dense_bytes(),
        noise=pipe.probe.sample(total_norm, items),
    )
