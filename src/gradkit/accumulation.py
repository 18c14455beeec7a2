"""Gradient accumulation: micro-step bookkeeping and item-count normalization.

Autograd already sums gradients into ``p.grad`` across backward calls, so
accumulation is bookkeeping: count the micro-steps and items of a window, and
normalize once, at the boundary.

- Mean mode (no `num_items`): the gradient is the mean over micro-batches,
  each loss being a mean over its own batch (equal sizes assumed).
- Item mode (`num_items` given, losses reduced with ``sum``): the summed
  gradient is divided by the total item count of the window, summed across
  micro-batches *and* processes. That is exactly the large-batch gradient of
  the mean loss over all items, for any split into micro-batches of any length
  (the mean of per-micro-batch means is not, when lengths differ).

How the processes' gradients meet (DDP, FSDP2, `gk.Average`) is `gradkit.averaging`.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

__all__ = ["Items", "Window", "check_num_items"]

Items = int | Tensor


def check_num_items(num_items: object) -> Items | None:
    """`num_items` if it is None, a positive int, or a 1-element integer tensor.

    A tensor's value is not read here (that would be a host sync); the window's
    total is checked at the step, where the pipeline reads the host anyway. A tensor
    comes back as a 0-d int64 tensor on its device (a view of the caller's when that is
    int64 already): counts in a small integer dtype (uint8, int16) would wrap around when
    the window adds them up.
    """
    if num_items is None:
        return None
    if isinstance(num_items, Tensor):
        if (
            num_items.numel() != 1
            or num_items.is_floating_point()
            or num_items.is_complex()
            or num_items.dtype == torch.bool
        ):
            raise TypeError(
                f"num_items must be an int or a 1-element integer tensor, got a {num_items.dtype} tensor of shape "
                f"{tuple(num_items.shape)}; pass the number of items (e.g. tokens) the summed loss covers"
            )
        if num_items.device.type == "meta":  # no value to count; the step's item total would fail far from here
            raise ValueError(
                "num_items must hold a value, got a tensor on the meta device; pass the count on the loss's "
                "device or as an int"
            )
        return num_items.detach().reshape(()).to(torch.int64)
    if isinstance(num_items, bool) or not isinstance(num_items, numbers.Integral):
        raise TypeError(
            f"num_items must be an int (the count of items the summed loss covers), got "
            f"{type(num_items).__name__} {num_items!r}; for a mean loss leave num_items out"
        )
    if num_items <= 0:
        raise ValueError(
            f"num_items must be > 0, got {num_items}; skip micro-batches that hold no items, "
            "or leave num_items out for a mean loss"
        )
    return int(num_items)


class Window:
    """The micro-steps and item count of the accumulation window in progress."""

    def __init__(self) -> None:
        self.micro_steps = 0
        self.items: Items | None = None  # None until the first micro-step, and in mean mode

    @property
    def item_mode(self) -> bool:
        return self.items is not None

    def check_mode(self, num_items: Items | None) -> None:
        """Refuse to mix item mode and mean mode within one window."""
        if self.micro_steps and (num_items is not None) != self.item_mode:
            given, window = ("num_items", "without") if num_items is not None else ("no num_items", "with")
            raise ValueError(
                f"backward() got {given}, but this window's earlier micro-steps were {window} num_items; "
                "pass num_items on every micro-step (sum-reduced losses) or on none (mean losses)"
            )

    def add(self, num_items: Items | None) -> None:
        self.micro_steps += 1
        if num_items is not None:
            self.items = num_items if self.items is None else self.items + num_items

    def reset(self) -> None:
        self.micro_steps = 0
        self.items = None

    @staticmethod
    def scale_for(global_items: Items | None, micro_steps: int, world_size: int) -> Tensor | float:
        """The factor that turns the gradient *summed* over micro-steps and processes into
        the window's mean gradient: 1 / items in item mode, 1 / (micro-steps x processes)
        in mean mode."""
        if global_items is None:
            return 1.0 / (micro_steps * world_size)
        if isinstance(global_items, Tensor):
            return 1.0 / global_items.to(torch.float64)
        return 1.0 / global_items
