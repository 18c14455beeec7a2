"""GradContext: the gradients of one optimizer step, as the stages see them.

Norm-scaling stages, the tracker and the step report all need per-parameter
norms. The context computes them once (one fused pass per device and dtype),
keeps them as a tensor on the gradients' device, and keeps them right when a
stage rescales the gradients, so later stages and the tracker read them for
free instead of making another pass over every gradient.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from gradkit import _dtensor, _foreach

__all__ = ["GradContext"]


class GradContext:
    """Named parameters that have a gradient, with cached per-parameter L2 norms.

    Parameters whose ``.grad`` is None are left out, as torch's clipping does.

    Args:
        names: one name per parameter (used by name-based state and reports).
        params: the parameters, in the same order.

    Example:
        >>> ctx = GradContext.from_parameters(model.parameters())
        >>> gk.ClipByGlobalNorm(1.0)(ctx)
        >>> ctx.total_norm()   # the norm after clipping, from the cache
    """

    def __init__(self, names: Sequence[str], params: Sequence[Tensor]) -> None:
        names, params = list(names), list(params)
        if len(names) != len(params):
            raise ValueError(f"names has {len(names)} entries but params has {len(params)}; pass one name per parameter")
        for name, p in zip(names, params):
            if not isinstance(name, str):
                raise TypeError(f"names must be strings, got {type(name).__name__} {name!r}; pass the parameter names, e.g. from model.named_parameters()")
            if not isinstance(p, Tensor):
                raise TypeError(f"params must be tensors, got {type(p).__name__} for {name!r}; pass the parameters, e.g. list(model.parameters())")
        kept = [(name, p) for name, p in zip(names, params) if p.grad is not None]
        self.names: list[str] = [name for name, _ in kept]
        self.params: list[Tensor] = [p for _, p in kept]
        self.grads: list[Tensor] = [p.grad for p in self.params]  # type: ignore[misc]
        #: whether some gradients are DTensor shards (FSDP2, tensor parallel): norms are then reduced across ranks
        self.sharded: bool = _dtensor.any_dtensor(self.grads)
        # The pieces this rank holds (the gradients themselves when unsharded): every pass runs on them.
        self._local: list[Tensor] = _dtensor.locals_of(self.grads) if self.sharded else self.grads
        self._norms: Tensor | None = None
        #: per-parameter norms before the clip stages ran (set by the pipeline), for trackers
        self.pre_clip_norms: Tensor | None = None

    @classmethod
    def from_parameters(cls, parameters: Iterable[Tensor] | Tensor) -> GradContext:
        """A context over plain parameters, named by their position."""
        params = check_parameters(parameters)
        return cls([str(i) for i in range(len(params))], params)

    def __len__(self) -> int:
        return len(self.grads)

    def norms(self) -> Tensor:
        """Per-parameter gradient L2 norms as one 1-D tensor (no host sync; cached).

        For DTensor gradients (FSDP2 or tensor-parallel shards) these are the norms of
        the *full* gradients, the same on every rank: one all-reduce of the squared
        shard norms for all parameters (replicated copies counted once). Every rank
        must then call it at the same point, as the pipeline does.
        """
        if not self.grads:
            return torch.zeros(0)
        if self._norms is None:
            per_tensor = _foreach.per_tensor_norms(self._local, 2.0, at_least=torch.float32)
            # At least float32, so that bf16 gradients do not get a bf16-rounded norm.
            dtype = functools.reduce(torch.promote_types, (n.dtype for n in per_tensor), torch.float32)
            device = per_tensor[0].device
            norms = torch.stack([n.to(device, dtype) for n in per_tensor])
            if self.sharded:
                norms = _dtensor.reduce_sums(norms.square(), self.grads).sqrt()
            self._norms = norms
        return self._norms

    def total_norm(self) -> Tensor:
        """The global L2 norm of all gradients (0-d tensor; 0 when there are none).

        A plain tensor, the same on every rank, also when the gradients are DTensor shards.
        """
        if not self.grads:
            return torch.zeros(())
        return torch.linalg.vector_norm(self.norms())

    def scale_(self, factor: Tensor | float) -> None:
        """Multiply every gradient by one factor, keeping the cached norms right."""
        if not self.grads:
            return
        _foreach.scale_(self._local, factor)
        if self._norms is not None:
            # |factor|: a norm is never negative, whatever the sign of the factor.
            self._norms = self._norms * (factor.to(self._norms).abs() if isinstance(factor, Tensor) else abs(factor))

    def scale_each_(self, factors: Tensor) -> None:
        """Multiply gradient i by ``factors[i]`` (a 1-D tensor), keeping the cached norms right."""
        if not self.grads:
            return
        for (device, _), (members, positions) in _foreach.group_tensors(self._local).items():
            local = factors.to(device)
            torch._foreach_mul_(members, [local[i] for i in positions])
        for grad, factor in zip(self._local, factors):
            if grad.is_sparse:
                grad.mul_(factor.to(grad.device))
        if self._norms is not None:
            self._norms = self._norms * factors.to(self._norms).abs()

    def modified(self) -> None:
        """Say that the gradients changed in a way the cache cannot follow (value clipping, AGC)."""
        self._norms = None


def check_parameters(parameters: object) -> list[Tensor]:
    """`parameters` (one tensor or an iterable of tensors) as a list, or a TypeError naming it."""
    if isinstance(parameters, Tensor):
        return [parameters]
    try:
        params = list(parameters)  # type: ignore[call-overload]
    except TypeError:
        raise TypeError(f"parameters must be a tensor or an iterable of tensors, got {type(parameters).__name__}; pass model.parameters()") from None
    for index, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"parameters must hold tensors, but item #{index} is {type(p).__name__} {p!r}; pass model.parameters()")
    return params
