"""Grouping tensors by (device, dtype) so that `torch._foreach_*` kernels apply.

The foreach kernels need every tensor of one call on the same device with the
same dtype; models mix them (bf16 weights with fp32 norms, pipeline stages on
several GPUs), so every pass over all gradients goes through a grouping.

Finding the groups is the per-call host cost that matters once the kernels are
fast (a GPU, or many small tensors): `Groups` finds them once, as positions, and
applies them to each call's tensors with C-level picks instead of a Python loop
per tensor. `Groups.of` keeps the groupings it has found, keyed by the tensors'
(device, dtype, layout) signature, so that a list of the same kinds of tensors
(a model's gradients, step after step) is grouped once. A caller that knows its
tensors do not change kind (the pipeline, between attach and detach) can hold a
`Groups` and skip even the signature.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from operator import attrgetter, itemgetter

import torch
from torch import Tensor

__all__ = ["Groups", "Grouped", "apply", "group_tensors", "per_tensor_norms", "total_norm", "scale_"]

_KIND = attrgetter("device", "dtype", "layout")
_DEVICE = attrgetter("device")
_Pick = Callable[[Sequence[Tensor]], list[Tensor]]
# Groupings kept by `Groups.of`; a program clips a handful of parameter lists, so a few suffice.
_CACHE_SIZE = 16
_cache: dict[tuple[tuple[torch.device, torch.dtype, torch.layout], ...], Groups] = {}


class Groups:
    """Where the tensors of each (device, dtype) group sit in a list of tensors, found once.

    It holds positions, not tensors: apply it to any list of tensors of the same kinds in
    the same order (``matches`` says whether a list qualifies). Sparse tensors, which the
    foreach kernels do not take, are kept apart and treated one by one.

    Args:
        tensors: the tensors to group (their device, dtype and layout are read once).

    Example:
        >>> groups = Groups.of(grads)             # cached: grouped once per kind of list
        >>> norms = groups.stacked_norms(grads)   # one norm per tensor, in input order
        >>> groups.scale_(grads, 0.5)
    """

    __slots__ = ("count", "signature", "dense", "sparse", "_inverse", "_single_device")

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        self._build(tuple(map(_KIND, tensors)))

    @classmethod
    def of(cls, tensors: Sequence[Tensor]) -> Groups:
        """The grouping of `tensors`, from the cache when a list of the same kinds was grouped before."""
        signature = tuple(map(_KIND, tensors))
        groups = _cache.get(signature)
        if groups is None:
            groups = cls.__new__(cls)
            groups._build(signature)
            if len(_cache) >= _CACHE_SIZE:
                del _cache[next(iter(_cache))]  # the oldest entry
            _cache[signature] = groups
        return groups

    def _build(self, signature: tuple[tuple[torch.device, torch.dtype, torch.layout], ...]) -> None:
        self.count = len(signature)
        #: (device, dtype, layout) of each position: what `matches` compares
        self.signature = signature
        positions: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        sparse: list[int] = []
        for index, (device, dtype, layout) in enumerate(signature):
            if layout == torch.sparse_coo:
                sparse.append(index)
            else:
                positions.setdefault((device, dtype), []).append(index)
        #: (device, dtype, positions, pick): ``pick(tensors)`` gives the group's tensors as a list
        self.dense: list[tuple[torch.device, torch.dtype, tuple[int, ...], _Pick]] = [
            (device, dtype, tuple(indices), _picker(indices, self.count))
            for (device, dtype), indices in positions.items()
        ]
        #: positions of the sparse tensors
        self.sparse: tuple[int, ...] = tuple(sparse)
        order = [i for indices in positions.values() for i in indices] + sparse
        inverse = [0] * self.count
        for place, index in enumerate(order):
            inverse[index] = place
        # Results come out group by group; this puts them back in input order (None: already are).
        self._inverse = None if order == sorted(order) else _picker(inverse, self.count)
        self._single_device = len({device for device, _, _ in signature}) <= 1

    def matches(self, tensors: Sequence[Tensor]) -> bool:
        """Whether `tensors` have the (device, dtype, layout), position by position, this grouping was made for."""
        return len(tensors) == self.count and tuple(map(_KIND, tensors)) == self.signature

    def split(self, tensors: Sequence[Tensor]) -> list[tuple[torch.device, torch.dtype, list[Tensor]]]:
        """The dense `tensors` as (device, dtype, members) groups; no per-tensor Python loop."""
        return [(device, dtype, pick(tensors)) for device, dtype, _, pick in self.dense]

    def norms(
        self, tensors: Sequence[Tensor], norm_type: float = 2.0, *, at_least: torch.dtype | None = None
    ) -> list[Tensor]:
        """The `norm_type`-norm of each tensor, as 0-d tensors in input order; no host sync.

        With `at_least` (e.g. float32), low-precision tensors are reduced in that dtype
        instead of having their norm rounded to their own dtype.
        """
        flat = self._grouped_norms(tensors, norm_type, at_least)
        return list(flat) if self._inverse is None else self._inverse(flat)

    def stacked_norms(
        self, tensors: Sequence[Tensor], norm_type: float = 2.0, *, at_least: torch.dtype | None = None
    ) -> Tensor:
        """`norms` as one 1-D tensor on the first tensor's device (dtypes promoted as `torch.stack` does)."""
        norms = self.norms(tensors, norm_type, at_least=at_least)
        if not self._single_device:
            device = norms[0].device
            norms = [n.to(device) for n in norms]
        return torch.stack(norms)

    def total_norm(self, tensors: Sequence[Tensor], norm_type: float = 2.0) -> Tensor:
        """The `norm_type`-norm of all `tensors` together, as one vector (torch's order: group by group)."""
        if not self._single_device:  # in input order, so that the result lands on the first tensor's device
            return total_norm(self.norms(tensors, norm_type), norm_type)
        return torch.linalg.vector_norm(torch.stack(self._grouped_norms(tensors, norm_type, None)), norm_type)

    def scale_(self, tensors: Sequence[Tensor], factor: Tensor | float) -> None:
        """Multiply every tensor in place by `factor` (a Python number or a 0-d tensor); no host sync."""
        for device, _, _, pick in self.dense:
            local = factor.to(device) if isinstance(factor, Tensor) else factor
            if _foreach_supported(device):
                torch._foreach_mul_(pick(tensors), local)
            else:
                for tensor in pick(tensors):
                    tensor.mul_(local)
        for index in self.sparse:
            tensor = tensors[index]
            tensor.mul_(factor.to(tensor.device) if isinstance(factor, Tensor) else factor)

    def _grouped_norms(self, tensors: Sequence[Tensor], norm_type: float, at_least: torch.dtype | None) -> list[Tensor]:
        """Per-tensor norms group by group (dense groups, then the sparse tensors)."""
        norms: list[Tensor] = []
        for device, dtype, _, pick in self.dense:
            out_dtype = None if at_least is None else torch.promote_types(dtype, at_least)
            members = pick(tensors)
            if _foreach_supported(device):
                norms += torch._foreach_norm(members, norm_type, dtype=out_dtype)
            else:
                norms += [torch.linalg.vector_norm(t, norm_type, dtype=out_dtype) for t in members]
        for index in self.sparse:  # repeated indices add up, so coalesce before measuring
            tensor = tensors[index]
            out_dtype = None if at_least is None else torch.promote_types(tensor.dtype, at_least)
            norms.append(torch.linalg.vector_norm(tensor.coalesce().values(), norm_type, dtype=out_dtype))
        return norms


def _picker(indices: Sequence[int], count: int) -> _Pick:
    """``pick(items)``: the items at `indices` as a list, picked in C (itemgetter), not a Python loop."""
    if list(indices) == list(range(count)):
        return list
    if len(indices) == 1:
        (only,) = indices
        return lambda items: [items[only]]
    get = itemgetter(*indices)
    return lambda items: list(get(items))


def group_tensors(tensors: Sequence[Tensor]) -> dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[int]]]:
    """Split the dense `tensors` into lists of one (device, dtype), each with its original
    positions. Sparse tensors (``nn.Embedding(sparse=True)`` gradients) are left out:
    the foreach kernels do not take them, so callers treat them one by one."""
    return {
        (device, dtype): (pick(tensors), list(positions)) for device, dtype, positions, pick in Groups.of(tensors).dense
    }


class Grouped:
    """Tensors bound to their `Groups`, for several fused passes (a norm, then a multiply)."""

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        self.tensors = tensors
        self.groups = Groups.of(tensors)
        self.count = len(tensors)

    def norms(self, norm_type: float = 2.0, *, at_least: torch.dtype | None = None) -> list[Tensor]:
        """The `norm_type`-norm of each tensor, as 0-d tensors in input order; no host sync."""
        return self.groups.norms(self.tensors, norm_type, at_least=at_least)

    def scale_(self, factor: Tensor | float) -> None:
        """Multiply every tensor in place by `factor`; no host sync."""
        self.groups.scale_(self.tensors, factor)


def per_tensor_norms(
    tensors: Sequence[Tensor], norm_type: float = 2.0, *, at_least: torch.dtype | None = None
) -> list[Tensor]:
    """The `norm_type`-norm of each tensor, in input order (see `Groups.norms`)."""
    return Groups.of(tensors).norms(tensors, norm_type, at_least=at_least)


def total_norm(norms: Sequence[Tensor], norm_type: float = 2.0) -> Tensor:
    """Combine per-tensor norms into the norm of all tensors together (on the first norm's device)."""
    device = norms[0].device
    if len(set(map(_DEVICE, norms))) > 1:
        norms = [n.to(device) for n in norms]
    return torch.linalg.vector_norm(torch.stack(list(norms)), norm_type)


def scale_(tensors: Sequence[Tensor], factor: Tensor | float) -> None:
    """Multiply every tensor in place by `factor` (a Python number or a 0-d tensor); no host sync."""
    Groups.of(tensors).scale_(tensors, factor)


def apply(device: torch.device, op: str, tensors: list[Tensor], other: object) -> list[Tensor] | None:
    """``torch._foreach_<op>(tensors, other)`` (`other` a number or a list), or the same op tensor by tensor
    where `device` has no foreach kernels."""
    if _foreach_supported(device):
        return getattr(torch, "_foreach_" + op)(tensors, other)
    others = other if isinstance(other, list) else [other] * len(tensors)
    return [getattr(t, op)(o) for t, o in zip(tensors, others)]


def _foreach_supported(device: torch.device) -> bool:
    # The fused kernels exist for CPU, CUDA and the other native backends; meta and
    # custom devices fall back to a plain loop with the same results.
    return device.type in ("cpu", "cuda", "xpu", "mps", "hpu")
