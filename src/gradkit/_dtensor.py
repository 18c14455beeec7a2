"""Per-tensor statistics of DTensors (FSDP2 and tensor-parallel shards), reduced to full-tensor values.

A gradient sharded by FSDP2 (``fully_shard``) or by tensor parallelism is a
``DTensor``: each rank holds a local piece. A norm computed from the piece is a
partial value. This module turns per-piece sums (squares, counts) and maxima into
the values of the *full* tensors, for all tensors of a step in one collective:

- a rank whose coordinate along a ``Replicate`` mesh dimension is not 0 holds a
  copy of a piece another rank already counts, so it contributes 0 to sums;
- the contributions are then summed over the mesh (for meshes spanning every
  process, that is one all-reduce over the default group for all tensors).

Plain tensors are taken as they are (a replicated gradient: nothing to reduce).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from gradkit import distributed

try:
    from torch.distributed.tensor import DTensor, Partial, Replicate
except ImportError:  # torch built without distributed support
    DTensor = Partial = Replicate = None  # type: ignore[assignment,misc]

__all__ = ["is_dtensor", "any_dtensor", "local", "locals_of", "reduce_sums", "reduce_max"]


def is_dtensor(tensor: object) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def any_dtensor(tensors: Sequence[object]) -> bool:
    # Over the distinct types, not the tensors: a model has a thousand gradients but one or two types.
    return DTensor is not None and any(issubclass(kind, DTensor) for kind in set(map(type, tensors)))


def local(tensor: Tensor) -> Tensor:
    """The piece of `tensor` this rank holds (the tensor itself when it is not a DTensor).

    Writing into it in place writes into the DTensor: they share storage.
    """
    if not is_dtensor(tensor):
        return tensor
    if any(isinstance(p, Partial) for p in tensor.placements):
        raise ValueError(
            f"a DTensor gradient with placements {tensor.placements} holds partial sums, whose norm is undefined; "
            "redistribute it to Shard or Replicate placements before clipping or tracking (FSDP2 does this in its "
            "reduce-scatter)"
        )
    return tensor._local_tensor  # to_local() would add an autograd node for nothing


def locals_of(tensors: Sequence[Tensor]) -> list[Tensor]:
    """`local` of each tensor; a new list of the same tensors when none is a DTensor."""
    return [local(t) for t in tensors] if any_dtensor(tensors) else list(tensors)


def reduce_sums(values: Tensor, tensors: Sequence[Tensor]) -> Tensor:
    """Full-tensor sums from per-piece sums: ``values[i]`` is this rank's sum over its piece of ``tensors[i]``.

    Entries of plain tensors are returned unchanged. No host sync; the collectives
    are issued only when some tensor is a DTensor, and by every rank alike (the
    tensors must be the same on every rank, as a model's parameters are).

    Args:
        values: a 1-D tensor, one entry per tensor (e.g. sums of squares, counts).
        tensors: the tensors the entries belong to.

    Returns:
        A new 1-D tensor of the same dtype: the sums over the full tensors.
    """
    return _reduce(values, tensors, dist.ReduceOp.SUM)


def reduce_max(values: Tensor, tensors: Sequence[Tensor]) -> Tensor:
    """Full-tensor maxima from per-piece maxima (see `reduce_sums`)."""
    return _reduce(values, tensors, dist.ReduceOp.MAX)


def _reduce(values: Tensor, tensors: Sequence[Tensor], op: dist.ReduceOp.RedOpType) -> Tensor:
    meshes: dict[int, tuple[object, list[int]]] = {}
    for index, tensor in enumerate(tensors):
        if is_dtensor(tensor):
            meshes.setdefault(id(tensor.device_mesh), (tensor.device_mesh, []))[1].append(index)
    if not meshes:
        return values
    out = values.clone()
    if op == dist.ReduceOp.SUM:
        # A replicated copy is counted on coordinate 0 of its Replicate dimensions only.
        keep = torch.ones(len(tensors), dtype=torch.bool)
        for mesh, indices in meshes.values():
            coordinate = mesh.get_coordinate()
            for index in indices:
                keep[index] = all(
                    c == 0 for c, p in zip(coordinate, tensors[index].placements) if isinstance(p, Replicate)
                )
        out = torch.where(keep.to(out.device), out, torch.zeros_like(out))
    world = dist.get_world_size()
    if all(mesh.size() == world for mesh, _ in meshes.values()):
        # Every mesh spans all processes: one all-reduce over the default group does it all.
        positions = sorted(i for _, indices in meshes.values() for i in indices)
        part = out[positions].contiguous()
        distributed.run(dist.all_reduce, "DTensor statistics: all-reduce over the device mesh", None, part, op=op)
        out[positions] = part
        return out
    for mesh, indices in meshes.values():
        part = out[indices].contiguous()
        for dim in range(mesh.ndim):  # sums (or maxima) along each mesh dimension in turn cover the mesh
            distributed.run(
                dist.all_reduce,
                f"DTensor statistics: all-reduce along mesh dimension {dim}",
                None,
                part,
                op=op,
                group=mesh.get_group(dim),
            )
        out[indices] = part
    return out
