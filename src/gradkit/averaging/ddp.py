"""Sync control for a model wrapped in `DistributedDataParallel`: DDP's own all-reduce, driven by the pipeline."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gradkit import _foreach, distributed
from gradkit.accumulation import Items
from gradkit.averaging.collectives import global_count, sum_flat_
from gradkit.averaging.sync import SyncControl, grads_of

__all__ = ["DDPSync"]


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
        return global_count(items, device, [self.group], "DDP pipeline: all-reduce of the item count", None)

    def global_micro_steps(self, micro_steps: int, *, complete: bool) -> Items:
        # DDP needs every rank to run its synced backward together, so a complete window is
        # complete everywhere (K x world); a flushed one may differ in length per rank.
        if complete:
            return micro_steps * self.world_size
        return self.global_items(micro_steps)

    defers_scale = True

    def reduce_(self, params: Sequence[Tensor], scale: Tensor | float, *, complete: bool) -> None:
        factor = self.reduce_sum_(params, scale, complete=complete)
        _foreach.scale_(grads_of(params), factor)

    def reduce_sum_(self, params: Sequence[Tensor], scale: Tensor | float, *, complete: bool) -> Tensor | float:
        self._missing = None
        if complete:
            # DDP already averaged over its world size during backward (and, with
            # find_unused_parameters=True, left globally unused gradients None): undo the mean.
            return scale * self.world_size
        self._sum_flushed(params)
        return scale

    def _sum_flushed(self, params: Sequence[Tensor]) -> None:
        """A flushed window's last backward ran without DDP's all-reduce: sum by hand.

        Every rank issues the same collectives whatever gradients it holds: one per
        (device, dtype) over every parameter (zeros where this rank has no gradient),
        then one of the per-parameter presence counts."""
        missing = [i for i, p in enumerate(params) if p.grad is None]
        for i in missing:
            params[i].grad = torch.zeros_like(params[i])
        try:
            grads = [p.grad for p in params]
            sum_flat_(grads, self.group, "DDP pipeline: all-reduce of a flushed window's gradients", None)
            present = torch.ones(len(params), dtype=torch.int32, device=params[0].device)
            for i in missing:
                present[i] = 0
            distributed.run(
                dist.all_reduce,
                "DDP pipeline: all-reduce of which parameters have gradients",
                None,
                present,
                group=self.group,
            )
        except BaseException:
            for i in missing:
                params[i].grad = None
            raise
        self._missing = (missing, present[missing]) if missing else None

    def missing_grads(self) -> tuple[list[int], Tensor] | None:
        return self._missing

    def bytes_sent(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.ddp.parameters() if p.requires_grad)
