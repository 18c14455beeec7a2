"""The skip decision of a step: is the window's gradient finite and its count > 0?

Made in one of two places (see `GradientPipeline`, "Skipping on the device"): on the host,
from one read of a few flags (`Skips.decide_on_host`, through `read_flags`), or on the device,
where a fused torch optimizer takes the flag as ``found_inf`` and skips its own update
(`device_flag`, `Skips.step_on_device`). `Skips` decides which applies to a step, steps the
optimizer accordingly (`Skips.step`) and counts the skipped steps of both.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from gradkit.context import GradContext

__all__ = ["FLAG_SKIP_DEVICES", "Skips", "device_flag", "read_flags"]

_log = logging.getLogger("gradkit")
#: device types whose fused optimizer kernels skip an update on ``found_inf`` (torch 2.x)
FLAG_SKIP_DEVICES = ("cpu", "cuda", "xpu")


class Skips:
    """Where a step's skip decision is made, and how many steps skipped.

    Args:
        names: the trained parameters' names (for the error naming a non-finite gradient).
        params: the trained parameters (their device types decide whether a fused kernel can skip).
        stateless_clip: no clip stage holds state (a non-finite step could not change its history).

    Example:
        >>> if skips.on_device(optimizer, nonfinite="skip", ema=None, sync=sync, devices=FLAG_SKIP_DEVICES):
        ...     skip = device_flag(total_norm, global_items)
        ... else:
        ...     ctx, total_norm, skip, own = skips.decide_on_host(ctx, total_norm, ...)
        >>> stepped = skips.step(optimizer, skip)
    """

    def __init__(self, names: Sequence[str], params: Sequence[Tensor], *, stateless_clip: bool) -> None:
        self.names, self.params = names, params
        self.stateless_clip = stateless_clip
        self.device_types = {p.device.type for p in params}
        self.noted: weakref.WeakSet = weakref.WeakSet()  # optimizers whose fallback was logged
        self.on_host = 0  # counted on the host (steps skipped after the read)
        self.counted_on_device: Tensor | None = None  # counted on the device (sync-free steps)

    @property
    def count(self) -> int:
        """Skipped steps; reads the device count, if any, on the host."""
        if self.counted_on_device is None:
            return self.on_host
        return self.on_host + int(self.counted_on_device)

    @count.setter
    def count(self, value: int) -> None:
        self.on_host, self.counted_on_device = value, None

    def on_device(
        self, optimizer: torch.optim.Optimizer, *, nonfinite: str, ema: Any, sync: Any, devices: Sequence[str]
    ) -> bool:
        """Whether this step can leave the skip decision to the optimizer, on the device (no host read)."""
        fused = getattr(optimizer, "_step_supports_amp_scaling", False) and all(
            group.get("fused") for group in optimizer.param_groups
        )
        if not fused or nonfinite != "skip" or ema is not None or sync.lossy or not self.stateless_clip:
            return False
        if not self.device_types <= set(devices):
            if optimizer not in self.noted:
                self.noted.add(optimizer)
                _log.warning(
                    "gradkit: %s(fused=True) on device type %s cannot skip a step on a device flag here; "
                    "the pipeline reads the finite flag on the host once per step instead",
                    type(optimizer).__name__,
                    sorted(self.device_types - set(devices)),
                )
            return False
        # An optimizer without state yet would create it on a skipped step (fused SGD: an
        # uninitialized momentum buffer), and dropping never-produced gradients is a host decision.
        return bool(optimizer.state) and sync.missing_grads() is None

    def decide_on_host(
        self,
        ctx: GradContext,
        total_norm: Tensor,
        *,
        global_items: int | Tensor | None,
        local_items: int | Tensor | None,
        missing: tuple[list[int], Tensor] | None,
        nonfinite: str,
        step: int,
        abandon: Callable[[], None],
    ) -> tuple[GradContext, Tensor, bool, bool]:
        """The skip decision from the step's one host read (`read_flags`).

        Args:
            ctx: the step's context, the window's gradients reduced (and unscaled).
            total_norm: its global norm.
            global_items: the window's global item count (None in mean mode).
            local_items: this process's item count (None in mean mode).
            missing: the sync's ``missing_grads()``: gradients some process may not have produced.
            nonfinite: the pipeline's policy, ``"skip"`` or ``"raise"``.
            step: the optimizer step this boundary finishes (for the error message).
            abandon: called before either error is raised (the pipeline drops the window).

        Returns:
            (the context without the gradients no process produced, the total norm, skip the
            step, this process had items in the window).

        Raises:
            ValueError: when the window's item count is <= 0.
            FloatingPointError: on a non-finite gradient with ``nonfinite="raise"`` (counted as skipped).

        Example:
            >>> ctx, total_norm, skip, own = skips.decide_on_host(
            ...     ctx, ctx.total_norm(), global_items=None, local_items=None, missing=None, nonfinite="skip", step=1,
            ...     abandon=pipe._abandon_window)
        """
        finite, counted, own, unused = read_flags(total_norm, global_items, local_items, missing)
        if not counted:
            abandon()
            raise ValueError(
                f"the window's num_items add up to {int(global_items)} (must be > 0); "
                "pass the count of items each summed loss covers"
            )
        if unused:
            # No rank produced these gradients in the window: None, as DDP leaves them (zeros
            # would move them under weight decay). Zeros add nothing to the norm already taken.
            for position in unused:
                self.params[position].grad = None
            pending = ctx.pending_factor
            ctx = GradContext(self.names, self.params)
            if pending is not None:
                ctx.defer_scale(pending)
        if not finite and ctx.pending_factor is not None:
            # No clip will run: the tracker and the error path see the scaled gradients. The
            # norm of the sum is taken in float32 (bf16/fp32 sums: float32's range; fp16 sums
            # cannot overflow it), so a sum whose norm passed ~1.8e19 reads as non-finite even
            # where the scaled gradient's would not: take the norm again, the way it was taken
            # before the fold (a second read, on non-finite steps only).
            ctx.materialize_()
            ctx.modified()
            total_norm = ctx.total_norm()
            finite = bool(torch.isfinite(total_norm))
        if not finite and nonfinite == "raise":
            self.on_host += 1
            abandon()
            raise FloatingPointError(
                f"non-finite gradient at step {step}, first in parameter {_first_nonfinite(ctx)!r}; "
                'pass nonfinite="skip" to skip such steps instead'
            )
        return ctx, total_norm, not finite, own

    def step(self, optimizer: torch.optim.Optimizer, skip: bool | Tensor) -> bool:
        """Step the optimizer as the decision `skip` says, count a skip, and say whether it was called.

        A host bool skips by not calling the optimizer; a device flag is handed to the fused
        optimizer, which is always called and skips its own update (`step_on_device`).
        The gradients are unscaled and their finiteness decided, so the optimizer is called
        directly: ``scaler.step`` would read the scaler's own inf flag on the host a second time."""
        if isinstance(skip, Tensor):
            self.step_on_device(optimizer, skip)
            return True
        if skip:
            self.on_host += 1
            return False
        optimizer.step()
        return True

    def step_on_device(self, optimizer: torch.optim.Optimizer, skip: Tensor) -> None:
        """Call the fused optimizer with the device flag `skip`, and count it (no host read)."""
        # The fused kernels skip the update and undo the step count where found_inf is 1.0,
        # as under GradScaler (which reads the same attribute); the gradients are unscaled.
        optimizer.found_inf = skip.to(torch.float32)  # type: ignore[attr-defined]
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf  # type: ignore[attr-defined]
        if self.counted_on_device is None or self.counted_on_device.device != skip.device:
            self.counted_on_device = torch.zeros((), dtype=torch.int64, device=skip.device)
        self.counted_on_device += skip


def device_flag(total_norm: Tensor, global_items: int | Tensor | None) -> Tensor:
    """The step's skip flag as a device bool: a non-finite norm or a window count <= 0."""
    # Every rank holds the same flag: a NaN/inf anywhere reached the summed gradients (or
    # the sharded norm's all-reduce), and the count is the all-reduced one.
    skip = ~torch.isfinite(total_norm)
    if isinstance(global_items, Tensor):
        skip = skip | (global_items.to(skip.device) <= 0)
    return skip


def read_flags(
    total_norm: Tensor,
    global_items: int | Tensor | None,
    local_items: int | Tensor | None,
    missing: tuple[list[int], Tensor] | None,
) -> tuple[bool, bool, bool, list[int]]:
    """(the gradient is finite, the window holds items, this process had items, positions of
    the parameters no process had a gradient for), in one host read."""
    # The one host read of the step: the optimizer cannot skip on a device flag, and
    # leaving a gradient None is a host decision. Tensor item counts ride along.
    # The norm itself is read, not an isfinite flag: its finiteness is decided on the host,
    # which spares the flag's operations (and, alone, the concatenation too).
    device = total_norm.device
    flags = []
    if isinstance(global_items, Tensor):
        flags.append((global_items.to(device) > 0).reshape(1))
    if isinstance(local_items, Tensor):
        flags.append((local_items.to(device) > 0).reshape(1))
    if missing is not None:
        flags.append(missing[1].to(device).reshape(-1) == 0)
    # Concatenated, the flags take the norm's floating dtype: 1.0 and 0.0 read as True and False.
    read = torch.cat([total_norm.reshape(1), *flags]).tolist() if flags else [total_norm.item()]
    finite = math.isfinite(read.pop(0))
    counted = bool(read.pop(0)) if isinstance(global_items, Tensor) else True
    own = bool(read.pop(0)) if isinstance(local_items, Tensor) else local_items is None or local_items > 0
    unused = [position for position, none in zip(missing[0], read) if none] if missing is not None else []
    return finite, counted, own, unused


def _first_nonfinite(ctx: GradContext) -> str:
    # Only on the error path: reads each gradient's finiteness on the host.
    for name, grad in zip(ctx.names, ctx.grads):
        if not bool(torch.isfinite(grad).all()):
            return name
    return "<none: the norm overflowed>"
