"""Norm-scaling stages with fixed thresholds: global norm, value, per layer.

A stage is configuration plus explicit state (optax style). It is called with
a `GradContext` (inside `GradientPipeline`) or with plain parameters, and
changes the gradients in place.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from gradkit import _checks, _foreach
from gradkit._stateful import Stateful
from gradkit.clipping.functional import check_group, check_norm_type, clip_coefficient, clip_grad_value_, reduce_norm
from gradkit.context import GradContext
from gradkit.distributed import WeakGroup

__all__ = ["ClipStage", "ClipByGlobalNorm", "ClipByValue", "ClipPerLayer"]

_MAX_NORM_FIX = "pass the largest gradient norm to allow, e.g. 1.0"


class ClipStage(Stateful):
    """Base of every norm-scaling stage: ``stage(ctx_or_parameters)`` clips in place (parameters, or
    ``named_parameters()`` pairs, whose names a name-matching stage such as ``AGC(exclude=...)`` needs)."""

    @torch.no_grad()
    def __call__(self, grads: GradContext | Iterable[Tensor] | Iterable[tuple[str, Tensor]] | Tensor) -> None:
        ctx = grads if isinstance(grads, GradContext) else GradContext.from_parameters(grads)
        if len(ctx):
            self.apply_(ctx)

    def apply_(self, ctx: GradContext) -> None:
        """Change ``ctx.grads`` in place (and update this stage's state)."""
        raise NotImplementedError


class ClipByGlobalNorm(ClipStage):
    """Scale all gradients together so that their global norm is at most `max_norm`.

    The same rule as `clip_grad_norm_`; inside the pipeline it reuses the
    per-parameter L2 norms the step already computed, so it costs one
    multiply pass and no extra read.

    Args:
        max_norm: the largest allowed global norm (> 0, finite).
        norm_type: p of the p-norm; 2 reuses the cached norms.
        group: the process group the parameters are sharded over, if any.

    Example:
        >>> pipe = gk.GradientPipeline(model, clip=gk.ClipByGlobalNorm(1.0))
    """

    def __init__(self, max_norm: float, *, norm_type: float = 2.0, group: dist.ProcessGroup | None = None) -> None:
        self.max_norm = _checks.positive_number("max_norm", max_norm, _MAX_NORM_FIX)
        self.norm_type = check_norm_type(norm_type)
        check_group(group)
        self._group = WeakGroup(group)

    @property
    def group(self) -> dist.ProcessGroup | None:
        """The group the norm is reduced over (None: this process alone); held weakly."""
        return self._group()

    @torch.no_grad()
    def __call__(self, grads: GradContext | Iterable[Tensor] | Tensor) -> None:
        ctx = grads if isinstance(grads, GradContext) else GradContext.from_parameters(grads)
        # With a group, a rank whose shard has no gradient still joins the norm's all-reduce.
        if len(ctx) or self.group is not None:
            self.apply_(ctx)

    def apply_(self, ctx: GradContext) -> None:
        if self.norm_type == 2.0 or not ctx.grads:
            total = ctx.total_norm()  # from the cache; a deferred factor is folded into the multiply below
        else:
            ctx.materialize_()  # this norm reads the gradients themselves
            total = _foreach.total_norm(_foreach.per_tensor_norms(ctx.grads, self.norm_type), self.norm_type)
        if self.group is not None:
            total = reduce_norm(total, self.norm_type, self.group)
        # The coefficient is min(1, max_norm / (total + 1e-6)) with max_norm > 0: never negative.
        ctx.scale_(clip_coefficient(total, self.max_norm), nonnegative=True)


class ClipByValue(ClipStage):
    """Clamp every gradient element to [-value, value] (torch's `clip_grad_value_`).

    Example:
        >>> pipe = gk.GradientPipeline(model, clip=gk.ClipByValue(0.5))
    """

    def __init__(self, value: float) -> None:
        self.value = _checks.positive_number("value", value, "pass the largest absolute gradient value to allow")

    def apply_(self, ctx: GradContext) -> None:
        clip_grad_value_(ctx.params, self.value)
        ctx.modified()


class ClipPerLayer(ClipStage):
    """Clip each parameter's gradient to an L2 norm of at most `max_norm`, separately.

    Each parameter tensor counts as one layer. One fused multiply with a
    coefficient per tensor; the cached norms stay valid.

    Example:
        >>> pipe = gk.GradientPipeline(model, clip=gk.ClipPerLayer(0.1))
    """

    def __init__(self, max_norm: float) -> None:
        self.max_norm = _checks.positive_number("max_norm", max_norm, _MAX_NORM_FIX)

    def apply_(self, ctx: GradContext) -> None:
        ctx.scale_each_(clip_coefficient(ctx.norms(), self.max_norm))


def state_tensor(value: Any, name: str, owner: str) -> Tensor:
    """A state entry as a tensor, with an error naming it when it is not one."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{owner}.load_state_dict: {name!r} must be a tensor, got {type(value).__name__}")
    return value
