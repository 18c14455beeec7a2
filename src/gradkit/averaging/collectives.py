"""The collectives that averaging's sync controls share.

- `global_count`: a window's item (or micro-step) count summed over ranks, on the
  device, the one all-reduce every sync control's `global_items` runs;
- `sum_flat_`: tensors summed over ranks in place, one flat all-reduce per (device, dtype);
- `replicate`: the setup check and broadcast that make the replicas start equal;
- `as_timeout`: the timeout every collective waits under.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gradkit import _checks, distributed
from gradkit._scalars import on_device
from gradkit.accumulation import Items

__all__ = ["as_timeout", "global_count", "replicate", "sum_flat_"]


def global_count(
    count: Items,
    device: torch.device,
    groups: Sequence[dist.ProcessGroup],
    what: str,
    timeout: datetime.timedelta | None,
) -> Tensor:
    """`count` summed over the ranks of each group in turn, as an int64 tensor on `device`.

    `count` may be an int or a device tensor; nothing is read back to the host, so the
    pipeline reads the total with its one host read of the step.

    Example:
        >>> total = global_count(items, device, [group], "gk.Average: all-reduce of the item count", None)
    """
    total = on_device(count, device, torch.int64, copy=True)  # a copy: reduced in place
    for group in groups:
        distributed.run(dist.all_reduce, what, timeout, total, op=dist.ReduceOp.SUM, group=group)
    return total


def sum_flat_(
    tensors: Sequence[Tensor],
    group: dist.ProcessGroup,
    what: str,
    timeout: datetime.timedelta | None,
    *,
    divide_by: int | None = None,
) -> None:
    """Replace each tensor by its sum over `group` (divided by `divide_by` if given), in place.

    One flat all-reduce per (device, dtype), in the order the kinds first appear, so every
    rank issues the same collectives in the same order. Memory: one flat copy of the
    tensors of one (device, dtype) at a time.
    """
    # dict keeps first-appearance order
    for kind in dict.fromkeys((t.device, t.dtype) for t in tensors):
        members = [t for t in tensors if (t.device, t.dtype) == kind]
        flat = torch.cat([t.reshape(-1) for t in members])
        distributed.run(dist.all_reduce, what, timeout, flat, group=group)
        if divide_by is not None:
            flat.div_(divide_by)
        for tensor, chunk in zip(members, flat.split([t.numel() for t in members])):
            tensor.copy_(chunk.view_as(tensor))


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
        ValueError: naming the first tensor whose name, shape, dtype or frozen state differs across ranks.
    """
    entries = list(zip(names, params))
    if module is not None:
        managed = {id(p) for p in params}
        # Marked: a parameter frozen on one rank but trained on another would otherwise pass (the same
        # tensors, in the same order when it comes last) and the averaged lists would differ in size.
        entries += [(f"{name} (frozen)", p) for name, p in module.named_parameters() if id(p) not in managed]
        if buffers:
            entries += [(f"buffer {name}", b) for name, b in module.named_buffers()]
    tensors = [tensor for _, tensor in entries]
    distributed.check_same_parameters([name for name, _ in entries], tensors, group, owner, timeout)
    distributed.broadcast_parameters(tensors, group, timeout)


def as_timeout(seconds: float | None) -> datetime.timedelta | None:
    """`seconds` as the timeout a collective waits under; None keeps the process group's.

    Raises:
        ValueError: `seconds` is not a positive number.
    """
    if seconds is None:
        return None
    why = "pass seconds, e.g. 60, or None for the process group's timeout"
    return datetime.timedelta(seconds=_checks.positive_number("timeout", seconds, why))
