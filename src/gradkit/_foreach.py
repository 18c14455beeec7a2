"""Grouping tensors by (device, dtype) so that `torch._foreach_*` kernels apply.

The foreach kernels need every tensor of one call on the same device with the
same dtype; models mix them (bf16 weights with fp32 norms, pipeline stages on
several GPUs), so every pass over all gradients goes through `group_tensors`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["group_tensors", "per_tensor_norms", "total_norm", "scale_"]


def group_tensors(tensors: Sequence[Tensor]) -> dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[int]]]:
    """Split the dense `tensors` into lists of one (device, dtype), each with its original
    positions. Sparse tensors (``nn.Embedding(sparse=True)`` gradients) are left out:
    the foreach kernels do not take them, so callers treat them one by one."""
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[int]]] = {}
    for index, tensor in enumerate(tensors):
        if tensor.is_sparse:
            continue
        members, positions = groups.setdefault((tensor.device, tensor.dtype), ([], []))
        members.append(tensor)
        positions.append(index)
    return groups


class Grouped:
    """Tensors split by (device, dtype) once, for several fused passes (a norm, then a
    multiply): grouping is the per-call host cost that matters for many small tensors.
    Sparse tensors (which the foreach kernels do not take) are handled one by one."""

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        self.count = len(tensors)
        self.groups = group_tensors(tensors)
        self.sparse = [(position, t) for position, t in enumerate(tensors) if t.is_sparse]

    def norms(self, norm_type: float = 2.0, *, at_least: torch.dtype | None = None) -> list[Tensor]:
        """The `norm_type`-norm of each tensor, as 0-d tensors in input order; no host sync.

        With `at_least` (e.g. float32), low-precision tensors are reduced in that dtype
        instead of having their norm rounded to their own dtype.
        """
        norms: list[Tensor | None] = [None] * self.count
        for (device, dtype), (members, positions) in self.groups.items():
            out_dtype = None if at_least is None else torch.promote_types(dtype, at_least)
            if _foreach_supported(device):
                group_norms = torch._foreach_norm(members, norm_type, dtype=out_dtype)
            else:
                group_norms = [torch.linalg.vector_norm(t, norm_type, dtype=out_dtype) for t in members]
            for position, norm in zip(positions, group_norms):
                norms[position] = norm
        for position, tensor in self.sparse:  # repeated indices add up, so coalesce before measuring
            out_dtype = None if at_least is None else torch.promote_types(tensor.dtype, at_least)
            norms[position] = torch.linalg.vector_norm(tensor.coalesce().values(), norm_type, dtype=out_dtype)
        return norms  # type: ignore[return-value]

    def scale_(self, factor: Tensor | float) -> None:
        """Multiply every tensor in place by `factor` (a Python number or a 0-d tensor); no host sync."""
        for (device, _), (members, _) in self.groups.items():
            local = factor.to(device) if isinstance(factor, Tensor) else factor
            if _foreach_supported(device):
                torch._foreach_mul_(members, local)
            else:
                for tensor in members:
                    tensor.mul_(local)
        for _, tensor in self.sparse:
            tensor.mul_(factor.to(tensor.device) if isinstance(factor, Tensor) else factor)


def per_tensor_norms(
    tensors: Sequence[Tensor], norm_type: float = 2.0, *, at_least: torch.dtype | None = None
) -> list[Tensor]:
    """The `norm_type`-norm of each tensor, in input order (see `Grouped.norms`)."""
    return Grouped(tensors).norms(norm_type, at_least=at_least)


def total_norm(norms: Sequence[Tensor], norm_type: float = 2.0) -> Tensor:
    """Combine per-tensor norms into the norm of all tensors together (on the first norm's device)."""
    device = norms[0].device
    if any(n.device != device for n in norms):
        norms = [n.to(device) for n in norms]
    return torch.linalg.vector_norm(torch.stack(list(norms)), norm_type)


def scale_(tensors: Sequence[Tensor], factor: Tensor | float) -> None:
    """Multiply every tensor in place by `factor` (a Python number or a 0-d tensor); no host sync."""
    Grouped(tensors).scale_(factor)


def _foreach_supported(device: torch.device) -> bool:
    # The fused kernels exist for CPU, CUDA and the other native backends; meta and
    # custom devices fall back to a plain loop with the same results.
    return device.type in ("cpu", "cuda", "xpu", "mps", "hpu")
