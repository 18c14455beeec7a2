"""What a tracker measures about its parameter list once and keeps: element counts and the detail layout.

Every logged step needs the gradients' element counts (the record's ``numel``), and a detail step the
layout of the fused statistics (`stats.FusedStats`: groups, segments, the order back). Both follow from
the parameters, not from the step: a gradient has its parameter's shape, device and dtype (autograd
enforces it on assignment). Finding them anew each step reads every tensor (hundreds of Python-level
calls at GPT-2's 148 tensors, and a lookup key as long as the list), so they are kept for the parameter
list a step comes with and found again only when another list comes.

"Another list" is decided by identity, which costs nothing per tensor: a pipeline, the trainers' callbacks
and `Tracker.track` hand every full step the same list object, with the grouping of its first full step kept
for as long as they stay attached (`context.Attached`: one list, one grouping), while a step with some
gradients missing (a layer frozen, then unfrozen) and a new attach each come with a list of their own,
measured then. So the layout is kept per list: one list never comes with another grouping. Sharded
parameters (their local pieces change shape with the mesh) are never kept.
"""

from __future__ import annotations

from torch import Tensor

from gradkit import _dtensor
from gradkit.context import GradContext
from gradkit.tracking.stats import FusedStats

__all__ = ["KeptShapes"]


class KeptShapes:
    """The element counts and the `stats.FusedStats` layout of the last parameter list seen, kept while it stays.

    Example:
        >>> kept = KeptShapes()
        >>> kept.numels(ctx)            # measured once per parameter list, then the same list object
        >>> kept.layout(ctx)            # the detail step's layout (None when sharded: found each step)
    """

    __slots__ = ("_params", "_numels", "_layout")

    def __init__(self) -> None:
        self.forget()

    def forget(self) -> None:
        """Drop what is kept (the tracker follows another model)."""
        self._params: list[Tensor] | None = None
        self._numels: list[int] = []
        self._layout: FusedStats | None = None

    def numels(self, ctx: GradContext) -> list[int]:
        """The element counts of the step's gradients (one list while the parameter list stays: do not change it)."""
        if ctx.params is not self._params:
            # A gradient has its parameter's shape: counted from the parameters, which a later list may share.
            self._params, self._numels, self._layout = ctx.params, list(map(Tensor.numel, ctx.params)), None
        return self._numels

    def layout(self, ctx: GradContext) -> FusedStats | None:
        """The fused-statistics layout of the step's gradients (kept for its parameter list, which comes with one
        grouping), or None for sharded gradients (their local pieces are laid out each step)."""
        if ctx.sharded:
            return None
        self.numels(ctx)  # forgets the layout when the list changed
        if self._layout is None:
            self._layout = FusedStats.of(_dtensor.locals_of(ctx.grads), ctx.groups())
        return self._layout
