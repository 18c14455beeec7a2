"""Which sync control drives a model: DDP's flag, FSDP2's reduce-scatter, gradkit's own, or none."""

from __future__ import annotations

from torch import nn

from gradkit.averaging.ddp import DDPSync
from gradkit.averaging.fsdp import FSDPSync, check_average, is_fsdp
from gradkit.averaging.sync import LocalSync, SyncControl

__all__ = ["sync_control_for"]


def sync_control_for(model: object, average: SyncControl | None = None) -> SyncControl:
    """The sync control that fits `model` (DDP's flag, FSDP2's reduce-scatter, or none), or `average` if given."""
    if is_fsdp(model):
        return check_average(average) if average is not None else FSDPSync(model)
    if average is not None:
        return average
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return DDPSync(model)
    return LocalSync()
