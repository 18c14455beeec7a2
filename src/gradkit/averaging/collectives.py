"""The collectives that averaging's sync controls share: timeouts and the setup broadcast."""

from __future__ import annotations

import datetime
from collections.abc import Sequence

import torch.distributed as dist
from torch import Tensor, nn

from gradkit import _checks, distributed

__all__ = ["as_timeout", "replicate"]


def replicate(
    names: Sequence[str],
    params: Sequence[Tensor],
    module: nn.Module | None,
    group: dist.ProcessGroup,
    timeout: datetime.timedelta | None,
    owner: str,
    *,
    buffers: bool,
) -> None:
    """Make the replicas equal, as DDP does at construction: check that every rank holds the
    same tensors, then copy rank 0's values of every parameter (frozen ones included) and,
    with `buffers`, every buffer of `module` to all ranks.

    Raises:
        ValueError: naming the first tensor whose name, shape or dtype differs across ranks.
    """
    entries = list(zip(names, params))
    if module is not None:
        managed = {id(p) for p in params}
        entries += [(name, p) for name, p in module.named_parameters() if id(p) not in managed]
        if buffers:
            entries += [(f"buffer {name}", b) for name, b in module.named_buffers()]
    tensors = [tensor for _, tensor in entries]
    distributed.check_same_parameters([name for name, _ in entries], tensors, group, owner)
    distributed.broadcast_parameters(tensors, group, timeout)



def as_timeout(seconds: float | None) -> datetime.timedelta | None:
    if seconds is None:
        return None
    return datetime.timedelta(seconds=_checks.positive_number("timeout", seconds, "pass seconds, e.g. 60, or None for the process group's timeout"))
