"""The sync-control protocol: how the gradients of several processes meet.

`GradientPipeline` asks a `SyncControl` when a backward may communicate, what
the window's counts are summed over all processes, and to turn each gradient
into the sum over processes times a scale. `LocalSync` is the one-process
answer; `DDPSync`, `FSDPSync` and `Average` are the distributed ones.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from torch import Tensor, nn

from gradkit import _foreach
from gradkit.accumulation import Items

__all__ = ["SyncControl", "LocalSync", "grads_of"]


class SyncControl:
    """How gradients of several processes meet: the capability the pipeline needs from
    DDP, from `gk.Average`, or from nothing (one process)."""

    #: how many processes' gradients meet in `reduce_`
    world_size: int = 1
    #: whether p.grad still holds this process's own window gradient when `reduce_` starts
    local_grads_at_boundary: bool = False
    #: whether the reduced gradient is only an approximation (compressed averaging)
    lossy: bool = False
    #: whether `reduce_sum_` can leave the multiplication by the scale to its caller: the
    #: pipeline folds it into the clip's multiply, so that a step writes every gradient once
    defers_scale: bool = False
    #: whether a rank whose window is empty takes part in the other ranks' `flush` (several
    #: processes whose collectives must match whatever the length of each rank's last window)
    joins_empty_flush: bool = True

    @property
    def attached(self) -> bool:
        """Whether this control is bound to parameters by `attach` (no `detach` since).

        A pipeline whose constructor raises undoes only a binding it made itself: a control that
        was already attached (another pipeline's, still in use, rebound to the same parameters by a
        notebook cell run again) stays attached, bound to what the failed constructor gave it: the
        same parameters, except for a one-process `gk.Average` without a compressor, which any model
        may rebind (it then counts the failed model's dense bytes). Controls that each pipeline
        builds for itself (one process, DDP, FSDP) are never shared, and say False.
        """
        return False

    def attach(
        self,
        names: Sequence[str],
        params: Sequence[Tensor],
        *,
        sparse: Collection[str] = (),
        module: nn.Module | None = None,
    ) -> None:
        """Called once by the pipeline with the parameters it manages, the names of those
        whose gradients are sparse, and the module they belong to (None for bare parameters)."""

    def detach(self) -> None:
        """Undo `attach`: remove any hooks and forget the parameters, so that the control may be attached
        again (the pipeline calls it when its constructor raises after attaching)."""

    def set_sync(self, enabled: bool) -> None:
        """Say whether the *next* forward/backward ends a window (and may communicate)."""

    def global_items(self, items: Items) -> Items:
        """The item count summed over all processes."""
        return items

    def global_micro_steps(self, micro_steps: int, *, complete: bool) -> Items:
        """Mean mode's divisor: the window's micro-steps summed over all processes.

        `complete` says whether this process's window reached its boundary (a
        flushed one did not). Every process must get the same number, whatever
        the length of its own last window."""
        return micro_steps * self.world_size

    def begin_reduction(self, local_count: Items, scale: Tensor | float, loss_scale: Tensor | None = None) -> None:
        """Called once per window before its gradients may be packed: this process's item
        (or micro-step) count, the `scale` that `reduce_` will be called with, and, for a
        `lossy` sync, the AMP loss scale the gradients carry (None without a GradScaler)."""

    def reduce_(self, params: Sequence[Tensor], scale: Tensor | float, *, complete: bool) -> None:
        """Make each parameter's gradient the sum over processes, times `scale`.

        `complete` says whether the window reached its boundary, so that its last
        backward ran with sync on; a flushed window's did not."""
        _foreach.scale_(grads_of(params), scale)

    def reduce_sum_(self, params: Sequence[Tensor], scale: Tensor | float, *, complete: bool) -> Tensor | float:
        """`reduce_`, but the multiplication by a factor may be left to the caller.

        Returns:
            The factor each gradient still has to be multiplied by to equal what `reduce_`
            leaves (1.0 when nothing is left). Controls with `defers_scale` return the
            scale instead of making a pass that only multiplies.
        """
        self.reduce_(params, scale, complete=complete)
        return 1.0

    def missing_grads(self) -> tuple[list[int], Tensor] | None:
        """After `reduce_`: the positions (in its `params`) of the parameters this process
        had no gradient for in the window, and a device tensor of how many processes had
        one for each. The pipeline sets those that no process had back to None, as DDP
        leaves them (an optimizer with weight decay must not see a zero). None: nothing to drop."""
        return None

    def after_step(self, params: Sequence[Tensor], *, skipped: bool = False, contributed: bool = True) -> None:
        """Called after every window's boundary, stepped or skipped; `contributed` is False
        when this process had no items in the window."""

    def bytes_sent(self) -> int:
        """Payload bytes this process sent for the last window."""
        return 0

    def dense_bytes(self) -> int:
        """What the last window's gradients would have taken uncompressed."""
        return self.bytes_sent()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(
                f"{type(self).__name__} has no state, got keys {sorted(state)}; pass the state saved with the same "
                "average="
            )


class LocalSync(SyncControl):
    """One process, or gradients that are averaged elsewhere: nothing to control."""

    defers_scale = True

    def reduce_sum_(self, params: Sequence[Tensor], scale: Tensor | float, *, complete: bool) -> Tensor | float:
        # p.grad already holds the window's sum: the scale is all that is left.
        return scale


def grads_of(params: Sequence[Tensor]) -> list[Tensor]:
    return [p.grad for p in params if p.grad is not None]
