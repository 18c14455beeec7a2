"""Gradient accumulation: micro-step bookkeeping, item-count normalization, sync control.

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
"""

from __future__ import annotations

import numbers
from collections.abc import Collection, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gradkit import _foreach, distributed

__all__ = ["Window", "SyncControl", "LocalSync", "DDPSync", "sync_control_for", "check_num_items"]

Items = int | Tensor


def check_num_items(num_items: object) -> Items | None:
    """`num_items` if it is None, a positive int, or a 1-element integer tensor.

    A tensor's value is not read here (that would be a host sync); the window's
    total is checked at the step, where the pipeline reads the host anyway.
    """
    if num_items is None:
        return None
    if isinstance(num_items, Tensor):
        if num_items.numel() != 1 or num_items.is_floating_point() or num_items.is_complex() or num_items.dtype == torch.bool:
            raise TypeError(
                f"num_items must be an int or a 1-element integer tensor, got a {num_items.dtype} tensor of shape "
                f"{tuple(num_items.shape)}; pass the number of items (e.g. tokens) the summed loss covers"
            )
        return num_items.detach().reshape(())
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


class SyncControl:
    """How gradients of several processes meet: the capability the pipeline needs from
    DDP, from `gk.Average`, or from nothing (one process)."""

    #: how many processes' gradients meet in `reduce_`
    world_size: int = 1
    #: whether p.grad still holds this process's own window gradient when `reduce_` starts
    local_grads_at_boundary: bool = False
    #: whether the reduced gradient is only an approximation (compressed averaging)
    lossy: bool = False

    def attach(self, names: Sequence[str], params: Sequence[Tensor], *, sparse: Collection[str] = (), module: nn.Module | None = None) -> None:
        """Called once by the pipeline with the parameters it manages, the names of those
        whose gradients are sparse, and the module they belong to (None for bare parameters)."""

    def set_sync(self, enabled: bool) -> None:
        """Say whether the *next* forward/backward ends a window (and may communicate)."""

    def global_items(self, items: Items) -> Items:
        """The item count summed over all processes."""
        return items

    def global_micro_steps(self, micro_steps: int, *, complete: bool) -> Items:
        """Mean mode's divisor: the window's micro-steps summed over all processes.

        `complete` says whether this process's window reached its boundary (a
        flushed one did not). Every process must get the same number, whatever
        the length of its own last window."""
        return micro_steps * self.world_size

    def begin_reduction(self, local_count: Items, scale: Tensor | float, loss_scale: Tensor | None = None) -> None:
        """Called once per window before its gradients may be packed: this process's item
        (or micro-step) count, the `scale` that `reduce_` will be called with, and, for a
        `lossy` sync, the AMP loss scale the gradients carry (None without a GradScaler)."""

    def reduce_(self, params: Sequence[Tensor], scale: Tensor | float, *, complete: bool) -> None:
        """Make each parameter's gradient the sum over processes, times `scale`.

        `complete` says whether the window reached its boundary, so that its last
        backward ran with sync on; a flushed window's did not."""
        _foreach.scale_(grads_of(params), scale)

    def missing_grads(self) -> tuple[list[int], Tensor] | None:
        """After `reduce_`: the positions (in its `params`) of the parameters this process
        had no gradient for in the window, and a device tensor of how many processes had
        one for each. The pipeline sets those that no process had back to None, as DDP
        leaves them (an optimizer with weight decay must not see a zero). None: nothing to drop."""
        return None

    def after_step(self, params: Sequence[Tensor], *, skipped: bool = False, contributed: bool = True) -> None:
        """Called after every window's boundary, stepped or skipped; `contributed` is False
        when this process had no items in the window."""

    def bytes_sent(self) -> int:
        """Payload bytes this process sent for the last window."""
        return 0

    def dense_bytes(self) -> int:
        """What the last window's gradients would have taken uncompressed."""
        return self.bytes_sent()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no state, got keys {sorted(state)}; pass the state saved with the same average=")


class LocalSync(SyncControl):
    """One process, or gradients that are averaged elsewhere: nothing to control."""


class DDPSync(SyncControl):
    """Sync control for a model wrapped in `DistributedDataParallel`.

    DDP decides in *forward* whether the following backward all-reduces (it
    reads ``require_backward_grad_sync``, which `no_sync()` toggles), so a
    ``no_sync()`` around ``backward()`` alone would come too late. The pipeline
    therefore sets the flag ahead of each micro-step: off for all but the last
    micro-step of a window.
    """

    def __init__(self, ddp: nn.parallel.DistributedDataParallel) -> None:
        self.ddp = ddp
        self.group = ddp.process_group
        self.world_size = dist.get_world_size(self.group)
        self._missing: tuple[list[int], Tensor] | None = None

    def set_sync(self, enabled: bool) -> None:
        self.ddp.require_backward_grad_sync = enabled

    def global_items(self, items: Items) -> Items:
        device = next(self.ddp.parameters()).device
        total = torch.as_tensor(items, dtype=torch.int64, device=device).clone()
        distributed.run(dist.all_reduce, "DDP pipeline: all-reduce of the item count", None, total, op=dist.ReduceOp.SUM, group=self.group)
        return total

    def global_micro_steps(self, micro_steps: int, *, complete: bool) -> Items:
        # DDP needs every rank to run its synced backward together, so a complete window is
        # complete everywhere (K x world); a flushed one may differ in length per rank.
        if complete:
            return micro_steps * self.world_size
        return self.global_items(micro_steps)

    def reduce_(self, params: Sequence[Tensor], scale: Tensor | float, *, complete: bool) -> None:
        self._missing = None
        if complete:
            # DDP already averaged over its world size during backward (and, with
            # find_unused_parameters=True, left globally unused gradients None): undo the mean.
            _foreach.scale_(grads_of(params), scale * self.world_size)
            return
        self._reduce_flushed(params, scale)

    def _reduce_flushed(self, params: Sequence[Tensor], scale: Tensor | float) -> None:
        """A flushed window's last backward ran without DDP's all-reduce: sum by hand.

        Every rank issues the same collectives whatever gradients it holds: one per
        (device, dtype) over every parameter (zeros where this rank has no gradient),
        then one of the per-parameter presence counts."""
        missing = [i for i, p in enumerate(params) if p.grad is None]
        for i in missing:
            params[i].grad = torch.zeros_like(params[i])
        try:
            for kind in dict.fromkeys((p.device, p.dtype) for p in params):
                grads = [p.grad for p in params if (p.device, p.dtype) == kind]
                flat = torch.cat([g.reshape(-1) for g in grads])
                distributed.run(dist.all_reduce, "DDP pipeline: all-reduce of a flushed window's gradients", None, flat, group=self.group)
                for grad, chunk in zip(grads, flat.split([g.numel() for g in grads])):
                    grad.copy_(chunk.view_as(grad))
            present = torch.ones(len(params), dtype=torch.int32, device=params[0].device)
            for i in missing:
                present[i] = 0
            distributed.run(dist.all_reduce, "DDP pipeline: all-reduce of which parameters have gradients", None, present, group=self.group)
        except BaseException:
            for i in missing:
                params[i].grad = None
            raise
        _foreach.scale_(grads_of(params), scale)
        self._missing = (missing, present[missing]) if missing else None

    def missing_grads(self) -> tuple[list[int], Tensor] | None:
        return self._missing

    def bytes_sent(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.ddp.parameters() if p.requires_grad)


def grads_of(params: Sequence[Tensor]) -> list[Tensor]:
    return [p.grad for p in params if p.grad is not None]


def sync_control_for(model: object, average: SyncControl | None = None) -> SyncControl:
    """The sync control that fits `model` (DDP's flag, FSDP2's reduce-scatter, or none), or `average` if given."""
    from gradkit import fsdp  # late: gradkit.fsdp builds on this module

    if fsdp.is_fsdp(model):
        return fsdp.check_average(average) if average is not None else fsdp.FSDPSync(model)
    if average is not None:
        return average
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return DDPSync(model)
    return LocalSync()
