"""The window's global count: how many items (or micro-steps) the reduction divides by.

Every boundary settles, before any gradient is communicated, the window's count summed over
processes and the scale (1/count) that makes the summed gradients the window's mean. Under
several processes one int64 vector rides a single count all-reduce; it also tells a rank
whose window is empty whether another rank is flushing (see `WindowReduction.join_empty_flush`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from gradkit.accumulation import Window

__all__ = ["WindowReduction"]


class WindowReduction:
    """The count and scale of the window in progress, found once per window.

    Args:
        sync: the pipeline's `SyncControl` (runs the count all-reduce).
        params: the trained parameters (their device holds the count vector).
        scaler: the pipeline's ``GradScaler`` or None (compression needs its scale).

    Example:
        >>> reduction.begin_boundary(window.items, window.micro_steps)  # the boundary backward; cancel() if it raises
        >>> global_items, scale, count = reduction.settled(window)
    """

    def __init__(self, sync: Any, params: Sequence[Tensor], scaler: Any) -> None:
        self.sync = sync
        self.params = params
        self.scaler = scaler
        #: (global items or None in mean mode, scale, the window's global count for the report)
        self.current: tuple[int | Tensor | None, Tensor | float, int | Tensor] | None = None
        #: device flag of the last boundary: some rank flushed in it (read only by an empty flush)
        self.flushed_last: Tensor | None = None
        #: `flushed_last` before the boundary backward's `begin_boundary`, for `cancel`
        self._flushed_before: Tensor | None = None

    def reset(self) -> None:
        """Forget the finished window's count."""
        self.current = None

    def begin_boundary(self, local_items: int | Tensor | None, micro_steps: int) -> None:
        """`begin` for the boundary backward, which `cancel` undoes if that backward raises."""
        self._flushed_before = self.flushed_last
        self.begin(local_items, micro_steps, complete=True)

    def cancel(self) -> None:
        """Undo `begin_boundary`: its backward raised, so the window does not hold that micro-batch, and
        its count is settled again by the next boundary backward (or by `settled`, for a flush)."""
        self.current = None
        self.flushed_last = self._flushed_before

    def settled(self, window: Window) -> tuple[int | Tensor | None, Tensor | float, int | Tensor]:
        """The window's (global items or None in mean mode, scale, count) at its boundary.

        Settled by the boundary backward (`begin`), or here for a flushed window, whose
        last backward was not the boundary."""
        if self.current is None:
            self.begin(window.items, window.micro_steps, complete=False)
        return self.current  # type: ignore[return-value]

    def join_empty_flush(self, window: Window) -> bool:
        """An empty window under several processes: take part in the other ranks' flush.

        Runs the count all-reduce a flushing rank runs and reads it on the host (this
        read is the flush path's own; stepping windows keep their one read). Returns
        False, with nothing changed, when no rank holds a micro-batch."""
        if self.sync.world_size == 1 or not self.sync.joins_empty_flush:
            return False
        if self.flushed_last is not None and bool(self.flushed_last):
            return False  # the last boundary was already every rank's last (some rank flushed in it)
        counts = self.sync.global_items(self._local_counts(None, 0, complete=False))
        micro_steps, item_ranks = counts[1:3].tolist()
        if micro_steps == 0:
            return False
        # The mode is the flushing ranks': zero items (or micro-steps) from this rank.
        window.items = 0 if item_ranks else None
        self._settle(counts, window.items, 0)
        return True

    def begin(self, local_items: int | Tensor | None, micro_steps: int, *, complete: bool) -> None:
        """Settle the window's global count and scale, and tell the sync (no host read)."""
        if self.sync.world_size > 1:
            # One vector rides the count all-reduce: see `_local_counts`.
            local = self._local_counts(local_items, micro_steps, complete=complete)
            if local_items is not None:
                counts = self.sync.global_items(local)
            else:
                # Mean mode: one divisor for every rank, the micro-steps of all ranks' windows,
                # also when their last windows differ in length.
                counts = self.sync.global_micro_steps(local, complete=complete)  # type: ignore[arg-type]
            self._settle(counts, local_items, micro_steps)
            return
        if local_items is not None:
            global_items = count = self.sync.global_items(local_items)
            scale = Window.scale_for(global_items, micro_steps, self.sync.world_size)
        else:
            global_items, count = None, self.sync.global_micro_steps(micro_steps, complete=complete)
            scale = 1.0 / count.to(torch.float64) if isinstance(count, Tensor) else 1.0 / count
        self._begin(global_items, scale, count, local_items if local_items is not None else micro_steps)

    def _local_counts(self, local_items: int | Tensor | None, micro_steps: int, *, complete: bool) -> Tensor:
        """This rank's [count, micro-steps, in item mode, flushing] as an int64 device vector.

        Summed over ranks it gives the window's count (items, or micro-steps in mean mode),
        whether any rank holds a micro-batch and in which mode (what a rank with an empty
        window joining a flush needs), and whether some rank flushed (after which an empty
        flush has nothing left to join)."""
        # Filled slot by slot: a Python list copied to a GPU would wait for the stream.
        local = torch.zeros(4, dtype=torch.int64, device=self.params[0].device)
        if local_items is not None:
            local[0] = local_items.to(local) if isinstance(local_items, Tensor) else local_items
            local[2] = 1
        else:
            local[0] = micro_steps
        local[1] = micro_steps
        local[3] = 0 if complete else 1
        return local

    def _settle(self, counts: Tensor, local_items: int | Tensor | None, micro_steps: int) -> None:
        """The window's reduction from the summed `_local_counts` vector (no host read)."""
        self.flushed_last = counts[3] > 0
        count = counts[0]
        global_items = count if local_items is not None else None
        local_count = local_items if local_items is not None else micro_steps
        self._begin(global_items, 1.0 / count.to(torch.float64), count, local_count)

    def _begin(
        self, global_items: int | Tensor | None, scale: Tensor | float, count: int | Tensor, local_count: int | Tensor
    ) -> None:
        loss_scale = None
        if self.sync.lossy and self.scaler is not None and self.scaler.is_enabled():
            # Only compression needs it. The scale as a device tensor, read without a host
            # sync (and created on the parameters' device if this is the scaler's first use).
            loss_scale = self.scaler.scale(torch.ones((), device=self.params[0].device))
        self.sync.begin_reduction(local_count, scale, loss_scale)
        self.current = (global_items, scale, count)
